"""Side-by-side comparison of a quantized checkpoint and its full-precision base."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoint.format import MANIFEST
from ..diffusion.generation import GenerationConfig
from ..errors import UserError
from ..models.loading import BUNDLED_DIR, load_tokenizer, read_config, resolve_model_path
from ..runtime.loader import default_dtype, load
from ..ui import bar, progress
from .quality import GEN_BATCH, agreement, chunk_texts, masked_predictions, sample_ids, text_nll

DEFAULT_PROMPTS = [
    "What is 17 + 25?", "Write a Python function that returns the square of x.", "Name a primary colour.",
    "Tom has 12 apples and buys 7 more. How many apples does he have?", "def add(a, b):",
    "Explain what a list is in Python.", "What is 9 times 6?", "Say hello.",
    "A shop sells 4 boxes with 15 pens each. How many pens?", "Write a function that reverses a string.",
]


def default_eval_texts() -> list[str]:
    """Held-out text: the bundled task solutions when present (never trained on), else stdlib text."""
    texts = []
    tasks = BUNDLED_DIR / "tasks"
    for name in ("tiny-math.jsonl", "tiny-code.jsonl"):
        f = tasks / name
        if f.exists():
            for line in f.read_text().splitlines():
                d = json.loads(line)
                texts.append(d.get("question", d.get("prompt", "")) + "\n" + d.get("solution", d.get("canonical_solution", "")))
    if texts:
        return texts
    from ..data.corpus import stdlib_documents

    return stdlib_documents(seed=1234)[:200]


def base_of(path: Path) -> str | None:
    mf = path / MANIFEST
    if mf.exists():
        m = json.loads(mf.read_text())
        for key in ("base_model_path", "base_model"):
            if m.get(key) and Path(m[key]).exists():
                return m[key]
        return m.get("base_model")
    return None


def resident_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def compare_models(model: str, against: str | None = None, text_file: Path | None = None, seq_len: int = 128,
                   max_seqs: int = 16, mc_num: int = 4, n_prompts: int = 8, steps: int = 64, gen_length: int = 64,
                   block_length: int = 32, seed: int = 0, device: str = "cpu", dtype=None,
                   show_progress: bool = True, baseline: bool = True) -> dict:
    """NLL, step and generation agreement of `model` and (when known, and `baseline`) its full-precision reference,
    both in `dtype` (default: the runtime's, `runtime.loader.default_dtype`)."""
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(model)
    quantized = "quantization_config" in read_config(path)
    ref = (against or (base_of(path) if quantized else None)) if baseline else None
    labels = []
    if ref is not None:
        labels.append(("full precision", ref))
    labels.append(("quantized" if quantized else "model", model))
    tok = load_tokenizer(path)
    texts = [text_file.read_text()] if text_file else default_eval_texts()
    try:
        seqs = chunk_texts(tok, texts, seq_len, max_seqs)
    except ValueError as e:
        raise UserError(f"evaluation text too short: {e}; pass a longer --text or lower --seq-len") from None
    prompts = (DEFAULT_PROMPTS * 10)[:n_prompts]
    gcfg = GenerationConfig(steps=steps, gen_length=gen_length, block_length=block_length, seed=seed)
    rows, ref_ids, ref_preds = [], None, None
    n = int(seqs.shape[0])
    gen_batches = -(-len(prompts) // GEN_BATCH)
    with progress(show_progress) as prog:
        for label, name in labels:
            # one line per model: NLL and step predictions per window, generation per denoising step
            with bar(f"{label}", total=2 * n + gen_batches * steps, info="load", prog=prog) as pb:
                m = load(name, device=device, dtype=dtype)
                pb.update(info="masked-token NLL")
                t0 = time.time()
                nll = text_nll(m, seqs, mc_num=mc_num, seed=seed, bar=pb)
                nll_s = time.time() - t0
                row = {"label": label, "model": str(name), "disk_bytes": disk_bytes(m.source_path),
                       "resident_weight_bytes": resident_bytes(m), "nll": nll, "nll_seconds": nll_s,
                       "gen_seconds": 0.0}
                # one denoising step's top-1 fill-ins on identical masked inputs: agreement without the cascade
                # of whole-generation agreement (one early different token changes every later one)
                pb.update(info="step predictions")
                preds = masked_predictions(m, seqs, seed=seed, bar=pb)
                if ref_preds is None:
                    ref_preds = preds
                else:
                    row["step_agreement"] = agreement(preds, ref_preds)
                if prompts:
                    pb.update(info="generation")
                    ids, gs = sample_ids(m, tok, prompts, gcfg, bar=pb)
                    row["gen_seconds"] = gs
                    if ref_ids is None:
                        ref_ids = ids
                    else:
                        row["agreement"] = agreement(ids, ref_ids)
                pb.update(completed=2 * n + gen_batches * steps, info="done")
                rows.append(row)
                del m
    return {"models": rows, "config": {"seq_len": seq_len, "windows": int(seqs.shape[0]), "mc_num": mc_num,
                                       "prompts": len(prompts), "generation": gcfg.to_dict(), "device": device,
                                       "dtype": str(dtype)}}


def reference_for(model: str, against: str | None) -> str | None:
    path = resolve_model_path(model)
    quantized = "quantization_config" in read_config(path)
    return against or (base_of(path) if quantized else None)


def evaluate_tasks(entries: list[tuple[str, str]], tasks: list[str], gcfg: GenerationConfig | None = None,
                   limit: int | None = None, mc_num: int | None = None, allow_exec: bool = False, device: str = "cpu",
                   dtype=None, batch_size: int = 16, num_fewshot: int | None = None,
                   chat: bool | None = None, fast: dict | None = None, show_progress: bool = True) -> dict:
    """Run `tasks` (bundled or lm-eval) on each (label, model) entry, one model in memory at a time, in `dtype`
    (default: the runtime's, `runtime.loader.default_dtype`).

    fast: GenerationConfig fields of the fast sampler ({"cache": "dual", "threshold": 0.9}) or None.
    """
    dtype = dtype or default_dtype(device)
    from ..ui import progress
    from .tasks import run_task

    results = []
    settings = {}
    with progress(show_progress) as prog:
        bar = prog.add_task("evaluate", total=len(entries) * len(tasks), info="") if prog else None
        for label, name in entries:
            m = load(name, device=device, dtype=dtype)
            tok = load_tokenizer(m.source_path)
            per = {}
            for t in tasks:
                if prog:
                    prog.update(bar, info=f"{label}: {t}")
                r = run_task(t, m, tok, gcfg, limit=limit, mc_num=mc_num, allow_exec=allow_exec,
                             batch_size=batch_size, num_fewshot=num_fewshot, chat=chat, fast=fast)
                per[t] = r.to_dict()
                settings[t] = r.settings
                if prog:
                    prog.update(bar, advance=1)
            results.append({"label": label, "model": str(name), "tasks": per})
            del m
    return {"models": results, "config": {"tasks": tasks, "limit": limit, "settings": settings,
                                          "batch_size": batch_size, "device": device, "dtype": str(dtype)}}


def compare_tasks(model: str, tasks: list[str], against: str | None = None, baseline: bool = True, **kw) -> dict:
    """Run the tasks on the model and (when known, and `baseline`) its full-precision reference."""
    ref = reference_for(model, against) if baseline else None
    entries = ([("full precision", ref)] if ref else []) + [("quantized" if ref else "model", model)]
    return evaluate_tasks(entries, tasks, **kw)


def degradation_level(base: float, value: float) -> str:
    """QDLM's levels for the drop relative to full precision: negligible < 1%, moderate 1-4%, significant > 4%."""
    if base <= 0:
        return "-"
    drop = 100 * (base - value) / base
    if drop < 1:
        return "negligible"
    return "moderate" if drop <= 4 else "significant"


def comparison_rows(base: dict, other: dict) -> tuple[list[str], list[list]]:
    """Side-by-side rows for two task-result entries ({"label", "tasks": {task: result}})."""
    cols = ["task", "metric", "n", base["label"], other["label"], "delta (points)", "relative", "degradation"]
    rows = []
    for t, b in base["tasks"].items():
        o = other["tasks"].get(t)
        if o is None:
            continue
        d = 100 * (o["value"] - b["value"])
        rel = f"{100 * (o['value'] - b['value']) / b['value']:+.1f}%" if b["value"] else "-"
        rows.append([t, b["metric"], b["n"], f"{100 * b['value']:.1f} ± {100 * b['stderr']:.1f}",
                     f"{100 * o['value']:.1f} ± {100 * o['stderr']:.1f}", f"{d:+.1f}", rel,
                     degradation_level(b["value"], o["value"])])
    return cols, rows


def task_table_rows(res: dict) -> tuple[list[str], list[list]]:
    models = res["models"]
    cols = ["task", "metric", "n"] + [m["label"] for m in models] + (["delta"] if len(models) == 2 else [])
    rows = []
    for t in res["config"]["tasks"]:
        if any(t not in m["tasks"] for m in models):
            continue
        first = models[0]["tasks"][t]
        row = [t, first["metric"], first["n"]]
        for m in models:
            r = m["tasks"][t]
            row.append(f"{100 * r['value']:.1f} ± {100 * r['stderr']:.1f}")
        if len(models) == 2:
            d = 100 * (models[1]["tasks"][t]["value"] - first["value"])
            row.append(f"{d:+.1f}")
        rows.append(row)
    return cols, rows
