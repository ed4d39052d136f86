"""`dllmq eval`: NLL, agreement and task accuracy of one model or several side by side."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..ui import human_bytes, table
from ..validation import resolve_device, torch_dtype
from .options import (
    CacheOpt, DeviceOpt, DtypeOpt, FastOpt, JsonOpt, SeedOpt, ThresholdOpt, _emit_json,
    _fast_settings, check_sampler,
)


def eval_cmd(
    models: List[str] = typer.Argument(..., help="A dllmq checkpoint, a model folder, a Hub id or 'tiny'; with --compare: BASE and CHECKPOINT (models or results files from --output)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks: the bundled tiny-math, tiny-code, tiny-mc ('tiny' = all three) and any lm-eval task (gsm8k, arc_challenge, mmlu ...). Without it: masked-token NLL and agreement."),
    compare: bool = typer.Option(False, "--compare", help="Side-by-side table of two models or two results files, with the delta per task and QDLM's degradation level."),
    against: Optional[str] = typer.Option(None, "--against", help="Full-precision reference (default: the checkpoint's base model)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also evaluate the full-precision reference, side by side. --no-baseline evaluates only MODEL: save it with --output and compare later with `dllmq eval --compare fp.json w4.json`."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (default: the task's preset, e.g. gsm8k 4, mmlu 5)."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="Allow running model-generated code (tiny-code, humaneval, mbpp) in a subprocess with a timeout."),
    apply_chat_template: Optional[bool] = typer.Option(None, "--apply-chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template (Instruct models). Default: on for the tiny tasks, off for lm-eval tasks."),
    mc_num: Optional[int] = typer.Option(None, "--mc-num", help="Monte-Carlo mask draws per likelihood (default: the task's preset, 128 for ARC/HellaSwag/PIQA/WinoGrande, 1 for MMLU; 8 for the NLL)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the task's preset, e.g. gsm8k 256)."),
    gen_length: Optional[int] = typer.Option(None, "--gen-length", help="Tokens to generate (default: the task's preset)."),
    block_length: Optional[int] = typer.Option(None, "--block-length", help="Semi-autoregressive block length (default: the task's preset)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch / requests per likelihood batch."),
    fast: bool = FastOpt,
    cache: Optional[str] = CacheOpt,
    threshold: Optional[float] = ThresholdOpt,
    text: Optional[Path] = typer.Option(None, "--text", help="Text file for the masked-token NLL (default: bundled held-out text)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per NLL window."),
    max_seqs: int = typer.Option(16, "--max-seqs", help="Number of NLL windows."),
    prompts: int = typer.Option(8, "--prompts", help="Number of prompts for the agreement check (0 = skip)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the full results (metrics, settings, versions, timings, sample outputs) to this JSON file."),
    output_format: str = typer.Option("dllmq", "--output-format", help="--output's schema: dllmq (the full results, readable by --compare) or lm-eval (lm-evaluation-harness's results schema: results, configs, versions, n-shot, config; with --tasks)."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Evaluate a model or checkpoint: task accuracy through lm-evaluation-harness, or NLL and agreement.

    Examples:
      [bold]dllmq eval ./tiny-w4 --tasks tiny --allow-code-execution[/bold]
      [bold]dllmq eval ./llada-w4 --tasks gsm8k,arc_challenge --limit 100 --output w4.json[/bold]
      [bold]dllmq eval --compare GSAI-ML/LLaDA-8B-Instruct ./llada-w4 --tasks gsm8k[/bold]
      [bold]dllmq eval ./llada-w4 --tasks gsm8k --no-baseline --output w4.json[/bold]  (full precision not re-run)
      [bold]dllmq eval --compare fp.json w4.json[/bold]
    """
    if compare and len(models) != 2:
        raise UserError("--compare takes two arguments: BASE and CHECKPOINT (models or results files)")
    if not compare and len(models) != 1:
        raise UserError(f"eval takes one model (got {len(models)}); to compare two, add --compare")
    if not baseline and (compare or against):
        raise UserError(f"--no-baseline evaluates MODEL alone; drop {'--compare' if compare else '--against'} "
                        "or --no-baseline")
    if text is not None and not text.is_file():
        raise UserError(f"--text {text}: no such file")
    if limit is not None and limit <= 0:
        raise UserError("--limit must be a positive number of examples")
    for flag, v in (("--mc-num", mc_num), ("--steps", steps), ("--gen-length", gen_length),
                    ("--block-length", block_length), ("--batch-size", batch_size)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if gen_length and block_length and gen_length % block_length:
        raise UserError(f"--block-length {block_length} must divide --gen-length {gen_length}")
    _check_eval_args(seq_len=seq_len, max_seqs=max_seqs, prompts=prompts, num_fewshot=num_fewshot, output=output,
                     device=device, dtype=dtype)
    if output_format not in ("dllmq", "lm-eval") or (output_format == "lm-eval" and (compare or not tasks)):
        raise UserError(f"--output-format takes dllmq or lm-eval, got {output_format!r}" if output_format != "lm-eval"
                        else "--output-format lm-eval writes task results: use it with --tasks, without --compare")
    fs = _fast_settings(fast, cache, threshold)

    from ..diffusion.generation import GenerationConfig
    from ..evaluation.report import compare_models, compare_tasks, comparison_rows, task_table_rows
    from ..evaluation.tasks import parse_tasks

    gcfg = None
    if steps or gen_length or block_length:
        g = GenerationConfig()
        gl = gen_length or g.gen_length
        gcfg = GenerationConfig(steps=steps or gl, gen_length=gl, block_length=block_length or min(g.block_length, gl),
                                seed=seed, **fs)
        check_sampler(gcfg.steps, gcfg.gen_length, gcfg.block_length)
    names = parse_tasks(tasks) if tasks else None
    if names and not allow_code_execution:
        code = [t for t in names if t in ("tiny-code", "humaneval", "mbpp") or t.startswith(("humaneval", "mbpp"))]
        if code:
            raise UserError(f"{', '.join(code)} run model-generated Python; pass --allow-code-execution to allow it")
    kw = dict(gcfg=gcfg, limit=limit, mc_num=mc_num, allow_exec=allow_code_execution, device=resolve_device(device),
              dtype=torch_dtype(dtype, resolve_device(device)), batch_size=batch_size, num_fewshot=num_fewshot, chat=apply_chat_template,
              fast=fs or None, show_progress=not json_out)

    if compare:
        entries = [_compare_entry(m, names, kw) for m in models]
        res = {"models": entries, "config": {"tasks": list(entries[0]["tasks"]), "compare": models}}
        _write_output(output, res)
        if json_out:
            _emit_json(strip_samples(res))
            return
        cols, rows = comparison_rows(entries[0], entries[1])
        if not rows:
            raise UserError("the two results have no task in common; evaluate both on the same --tasks")
        table("Base vs checkpoint (score %, ± standard error; degradation relative to base, as in QDLM)", cols, rows)
        return
    model = models[0]
    if names:
        res = compare_tasks(model, names, against=against, baseline=baseline, **kw)
        if output and output_format == "lm-eval":
            from ..evaluation import lm_eval_schema

            lm_eval_schema.write(output, res)
        else:
            _write_output(output, res)
        if json_out:
            _emit_json(strip_samples(res))
            return
        cols, rows = task_table_rows(res)
        table("Tasks (score %, ± standard error)", cols, rows)
        return
    g = gcfg or GenerationConfig()
    res = compare_models(model, against=against, text_file=text, seq_len=seq_len, max_seqs=max_seqs,
                         mc_num=mc_num or 8, n_prompts=prompts, steps=g.steps, gen_length=g.gen_length,
                         block_length=g.block_length, seed=seed, device=resolve_device(device), dtype=torch_dtype(dtype, resolve_device(device)),
                         show_progress=not json_out, baseline=baseline)
    _write_output(output, res)
    if json_out:
        _emit_json(res)
        return
    print_comparison(res)


def _check_eval_args(*, seq_len: int, max_seqs: int, prompts: int, num_fewshot: Optional[int],
                     output: Optional[Path], device: str, dtype: str) -> None:
    """The cheap checks of `dllmq eval`, before torch is imported."""
    from ..validation import check_device_name, check_dtype_name

    check_dtype_name(dtype)
    check_device_name(device)
    for flag, v in (("--seq-len", seq_len), ("--max-seqs", max_seqs)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if prompts < 0:
        raise UserError(f"--prompts must be 0 (skip the agreement check) or more, got {prompts}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if output is not None and output.is_dir():
        raise UserError(f"--output {output} is a folder; give the path of a JSON file to write")


def _compare_entry(arg: str, names: Optional[List[str]], kw: dict) -> dict:
    """One side of --compare: the last model of a results file, or a fresh evaluation of a model."""
    from ..evaluation.report import evaluate_tasks

    p = Path(arg)
    if p.is_file() and p.suffix == ".json":
        try:
            doc = json.loads(p.read_text())
            entry = doc["models"][-1]
            entry["tasks"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{arg} is not a results file from `dllmq eval --tasks ... --output`") from None
        if names:
            entry = dict(entry, tasks={t: r for t, r in entry["tasks"].items() if t in names})
        return dict(entry, label=f"{entry.get('label', 'model')} ({p.name})" if entry.get("label") else p.name)
    if not names:
        raise UserError(f"{arg} is a model: give --tasks to evaluate it (or pass results files from --output)")
    res = evaluate_tasks([(Path(arg).name or arg, arg)], names, **kw)
    return res["models"][0]


def strip_samples(res: dict) -> dict:
    out = json.loads(json.dumps(res, default=str))
    for m in out.get("models", []):
        for t in m.get("tasks", {}).values():
            t.pop("samples", None)
    return out


def _write_output(path: Optional[Path], res: dict) -> None:
    if path is None:
        return
    import platform

    import torch

    from .._version import __version__

    doc = {**res, "versions": {"dllmq": __version__, "torch": torch.__version__, "python": platform.python_version()},
           "command": "dllmq " + " ".join(shlex.quote(x) for x in sys.argv[1:])}
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"cannot write --output {path}: {e.strerror}") from None


def print_comparison(res: dict) -> None:
    rows = []
    for r in res["models"]:
        rows.append([r["label"], human_bytes(r["disk_bytes"]), human_bytes(r["resident_weight_bytes"]),
                     r["nll"], r.get("step_agreement", "-"), r.get("agreement", "-"), f"{r['gen_seconds']:.2f}"])
    table("Full precision vs quantized", ["model", "size on disk", "resident weights", "NLL (nats/token)",
                                          "step agreement", "generation agreement", "generate (s)"], rows)
