"""The model card (README.md) uploaded with a checkpoint.

Everything on the card is read from the checkpoint itself (quantization_config, manifest, file
sizes) and, when given, from a `dllmq eval --output` results file, so the card cannot claim a
setting the weights were not made with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from ..ui import human_bytes

if TYPE_CHECKING:
    from .checkpoint_info import Checkpoint

FAMILY_NAMES = {"llada": "LLaDA", "dream": "Dream", "llama": "LLaMA"}
# method_args keys -> what a reader understands
ARG_NAMES = {
    "damp": "GPTQ dampening", "act_order": "GPTQ act-order", "cgq": "certainty-guided GPTQ (CGQ)",
    "cgq_masked": "CGQ masked-token weight", "cgq_visible": "CGQ visible-token weight",
    "w_quantizer": "weight rounding", "alpha": "migration strength (alpha)", "w_clip": "weight clip ratio",
    "ia_aq": "interaction-aware activation quantization (IA-AQ)", "seed": "seed",
    "block": "DuQuant rotation block", "steps": "DuQuant rotation steps",
}


def is_hub_id(name: object) -> bool:
    """True for 'owner/name' ids; local paths and bundled names ('tiny') are not valid `base_model`s."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def method_label(ckpt: "Checkpoint") -> str:
    q = ckpt.qcfg
    from ..quantization.methods import label_of  # the registry names every method, added ones too

    label = label_of(q.method)
    args = q.method_args
    if q.method not in ("rtn", "gptq") and args.get("w_quantizer") == "gptq":
        label += " + GPTQ rounding"
    if args.get("cgq"):
        label += " with DLLMQuant's CGQ"
    if args.get("ia_aq"):
        label += " + IA-AQ"
    return label


def scheme(ckpt: "Checkpoint") -> str:
    """Short scheme name, e.g. w4a16 (weight-only) or w4a8."""
    return f"w{ckpt.qcfg.weights.num_bits}a{ckpt.qcfg.activations.num_bits}"


def card_data(ckpt: "Checkpoint", repo_id: str | None = None, record: dict | None = None) -> ModelCardData:
    q = ckpt.qcfg
    tags = ["dllmq", "diffusion", "quantized", f"{q.weights.num_bits}-bit", scheme(ckpt), q.method, ckpt.family]
    if q.method_args.get("cgq"):
        tags.append("cgq")
    extra = {}
    base = ckpt.manifest.get("base_model")
    if is_hub_id(base):  # the Hub rejects a local path here, and the relation needs a base
        extra = {"base_model": base, "base_model_relation": "quantized"}
    evals = eval_results(record)
    if evals:  # the `model-index` block: the Hub shows it as the model's evaluation results
        extra.update(model_name=repo_id or ckpt.path.name, eval_results=evals)
    return ModelCardData(library_name="dllmq", pipeline_tag="text-generation",
                         tags=list(dict.fromkeys(t for t in tags if t)), **extra)


def eval_results(record: dict | None) -> list:
    """This checkpoint's results (its record in a `dllmq eval --output` file) as model-index entries."""
    from huggingface_hub import EvalResult

    if not isinstance(record, dict):
        return []
    out = []
    tasks = record.get("tasks") if isinstance(record.get("tasks"), dict) else {}
    for name, r in tasks.items():
        if not isinstance(r, dict) or not _is_num(r.get("value")):
            continue
        metric = str(r.get("metric") or "score")
        out.append(EvalResult(task_type="text-generation", dataset_type=str(name), dataset_name=str(name),
                              metric_type=metric, metric_name=metric, metric_value=float(r["value"])))
    for key, label in (("nll", "masked-token NLL (nats/token)"), ("agreement", "greedy token agreement with full "
                                                                              "precision")):
        if _is_num(record.get(key)):
            out.append(EvalResult(task_type="text-generation", dataset_type="dllmq-held-out-text",
                                  dataset_name="dllmq held-out text", metric_type=key, metric_name=label,
                                  metric_value=float(record[key])))
    return out


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def build_card(ckpt: "Checkpoint", repo_id: str, results: dict | None = None,
               results_file: str | None = None, record: dict | None = None) -> ModelCard:
    """record: this checkpoint's entry in `results` (hub.push.match_results), for the model-index."""
    data = card_data(ckpt, repo_id, record)
    body = "\n\n".join(s for s in (
        _intro(ckpt, repo_id),
        _settings(ckpt),
        _results_section(results, results_file),
        _usage(ckpt, repo_id),
        _format_note(),
    ) if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _intro(ckpt: "Checkpoint", repo_id: str) -> str:
    q = ckpt.qcfg
    base = ckpt.manifest.get("base_model")
    if is_hub_id(base):
        base_txt = f"[{base}](https://huggingface.co/{base})"
    elif base == "tiny":
        base_txt = "dllmq's bundled `tiny` model"
    else:  # a local folder: its name only, the rest of the path says nothing to readers
        base_txt = f"`{Path(str(base)).name}` (a local model folder)" if base else "A full-precision model"
    acts = (f"{q.activations.num_bits}-bit dynamic per-token activations" if q.activations.enabled
            else "activations in floating point")
    family = FAMILY_NAMES.get(ckpt.family, ckpt.family)
    return (f"# {repo_id}\n\n"
            f"{base_txt} ({family} diffusion language model) quantized with "
            f"dllmq: {q.weights.num_bits}-bit weights "
            f"({q.weights.describe()}), {acts}, method {method_label(ckpt)}.\n\n"
            f"The weights stay packed on disk and in memory: dllmq loads them into quantized linear layers that "
            f"run low-bit kernels on CPU and GPU.")


def _settings(ckpt: "Checkpoint") -> str:
    q, m = ckpt.qcfg, ckpt.manifest
    w, a = q.weights, q.activations
    rows = [
        ("method", f"{method_label(ckpt)}, `--method {q.method}`"),
        ("weight bits", w.num_bits),
        ("granularity", {"group": f"per group of {w.group_size} input columns", "channel": "per output channel",
                         "tensor": "per tensor"}.get(w.strategy, w.strategy)),
        ("group size", w.group_size if w.strategy == "group" else "-"),
        ("symmetric", "yes" if w.symmetric else "no (zero points stored)"),
        ("activation bits", f"{a.num_bits} (dynamic, per token, clip ratio {a.clip_ratio})" if a.enabled
         else "16 (not quantized)"),
        ("quantized linears", len(q.quantized_layers)),
        ("kept in full precision", _ignored(q.ignore)),
    ]
    rows += [(ARG_NAMES.get(k, k), _value(v)) for k, v in sorted(q.method_args.items()) if _relevant(ckpt, k)]
    if q.transforms:
        rows.append(("online transforms", _transforms(q.transforms)))
    calib = m.get("calibration")
    rows.append(("calibration", "none (RTN needs none)" if not calib else
                 "; ".join(f"{k}: {_value(v)}" for k, v in calib.items())))
    errors = [r.get("rel_error") for r in m.get("layers", []) if isinstance(r, dict)]
    errors = [e for e in errors if isinstance(e, (int, float))]
    if errors:
        rows.append(("relative layer error (mean / max)", f"{sum(errors) / len(errors):.4f} / {max(errors):.4f}"))
    rows += [
        ("size on disk", f"{human_bytes(ckpt.total_bytes)} ({human_bytes(ckpt.weight_bytes)} of safetensors)"),
        ("format", f"`{q.to_dict()['format']}` v{q.to_dict()['format_version']}"),
    ]
    for key, label in (("tool_version", "dllmq version"), ("created", "created (UTC)"),
                       ("revision", "base model revision"), ("command", "command")):
        if m.get(key):
            rows.append((label, f"`{m[key]}`" if key == "command" else m[key]))
    text = "## Quantization\n\n" + _md_table(["setting", "value"], rows)
    regexes = [p for p in q.ignore if _literal(p) is None]
    if regexes:  # in a code block, not the table, where `|` would have to be escaped
        text += ("\n\nAlso kept in full precision: the modules whose names match these regular expressions:"
                 "\n\n```text\n" + "\n".join(regexes) + "\n```")
    return text


def _literal(pattern: str) -> str | None:
    """The module name an ignore pattern matches exactly (`model\\.transformer\\.ff_out` -> the name with
    plain dots), or None for a real regular expression."""
    import re

    p = str(pattern)
    if re.search(r"(?<!\\)[.^$*+?{}\[\]|()]", p) or re.search(r"\\[A-Za-z0-9]", p):
        return None  # an unescaped metacharacter, or a class / back-reference like \d or \1
    name = re.sub(r"\\(.)", r"\1", p)
    try:
        return name if re.fullmatch(p, name) else None
    except re.error:
        return None


def _ignored(patterns: list) -> str:
    names = [n for n in (_literal(p) for p in patterns) if n is not None]
    text = ", ".join(f"`{n}`" for n in names)
    if len(names) < len(patterns):
        text += (" and " if text else "") + "the modules matching the regular expressions below"
    return text or "-"


def _relevant(ckpt: "Checkpoint", key: str) -> bool:
    """The CLI records GPTQ's defaults for every method; show them only where GPTQ rounded the weights."""
    q = ckpt.qcfg
    uses_gptq = q.method == "gptq" or q.method_args.get("w_quantizer") == "gptq"
    if key in ("cgq_masked", "cgq_visible"):  # CGQ's token weights mean nothing unless CGQ was on
        return uses_gptq and bool(q.method_args.get("cgq"))
    return uses_gptq or key not in ("damp", "act_order", "cgq")


def _transforms(transforms: dict) -> str:
    from ..runtime.transforms import summarize

    return summarize(transforms.values()) or "-"


def _value(v) -> str:
    """Settings as text; long lists (e.g. TMAS mask ratios) are summarised."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        nums = [x for x in v if isinstance(x, (int, float))]
        if len(v) > 8 and len(nums) == len(v):
            return f"{len(v)} values, mean {sum(nums) / len(nums):.3g}, range {min(nums):.3g}-{max(nums):.3g}"
        return ", ".join(_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    return str(v)


def _results_section(doc: dict | None, results_file: str | None) -> str | None:
    if not doc:
        return None
    tables = results_tables(doc)
    if not tables:
        return None
    src = f" (`{results_file}` in this repo" if results_file else " ("
    src += ", written by `dllmq eval --output`)" if "models" in doc else ")"
    parts = [f"## Evaluation\n\nResults{src}."]
    parts += tables
    cfg = doc.get("config")
    if isinstance(cfg, dict):
        settings = {k: v for k, v in cfg.items() if k in ("limit", "mc_num", "seq_len", "windows", "prompts",
                                                            "generation", "device", "dtype") and v is not None}
        if settings:
            parts.append("Settings: " + "; ".join(f"{k}: {_value(v)}" for k, v in settings.items()) + ".")
    return "\n\n".join(parts)


def results_tables(doc: dict) -> list[str]:
    """Markdown tables for the shapes `dllmq eval --output` writes (task suite, or NLL and agreement),
    with a fallback for a flat {task: {metric: value}} file; unknown shapes give no table."""
    models = [m for m in doc.get("models", []) if isinstance(m, dict)] if isinstance(doc.get("models"), list) else []
    tables = []
    with_tasks = [m for m in models if isinstance(m.get("tasks"), dict)]
    if with_tasks:
        labels = [str(m.get("label") or m.get("model") or f"model {i + 1}") for i, m in enumerate(with_tasks)]
        names = list(dict.fromkeys(t for m in with_tasks for t in m["tasks"]))
        rows = []
        for t in names:
            per = [m["tasks"].get(t) if isinstance(m["tasks"].get(t), dict) else {} for m in with_tasks]
            first = next((p for p in per if p), {})
            cells = [_pct(p) for p in per]
            delta = "-"
            if len(per) == 2 and all(isinstance(p.get("value"), (int, float)) for p in per):
                delta = f"{100 * (per[1]['value'] - per[0]['value']):+.1f}"
            rows.append([t, first.get("metric", "-"), first.get("n", "-"), *cells] + ([delta] if len(per) == 2 else []))
        cols = ["task", "metric", "n", *labels] + (["delta"] if len(with_tasks) == 2 else [])
        tables.append("Task accuracy (%, ± standard error):\n\n" + _md_table(cols, rows))
    with_nll = [m for m in models if isinstance(m.get("nll"), (int, float))]
    if with_nll:
        rows = [[m.get("label", m.get("model", "-")), _num(m.get("nll")), _num(m.get("agreement")),
                 human_bytes(m["disk_bytes"]) if isinstance(m.get("disk_bytes"), (int, float)) else "-"]
                for m in with_nll]
        tables.append("Masked-token NLL and greedy token agreement with full precision:\n\n"
                      + _md_table(["model", "NLL (nats/token)", "token agreement", "size on disk"], rows))
    if not tables:
        flat = doc.get("results") if isinstance(doc.get("results"), dict) else doc
        rows = []
        for task, metrics in flat.items():
            if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
                rows.append([task, "-", _num(metrics)])
            elif isinstance(metrics, dict):
                rows += [[task, k, _num(v)] for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k]
        if rows:
            tables.append(_md_table(["task", "metric", "value"], rows))
    return tables


def _pct(r: dict) -> str:
    v, se = r.get("value"), r.get("stderr")
    if not isinstance(v, (int, float)):
        return "-"
    return f"{100 * v:.1f} ± {100 * se:.1f}" if isinstance(se, (int, float)) else f"{100 * v:.1f}"


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _usage(ckpt: "Checkpoint", repo_id: str) -> str:
    return f"""## Usage

```bash
# dllmq is installed from its source checkout (see its README): a torch build for your hardware first, then
pip install -e .
dllmq generate {repo_id} "What is 17 * 23?" --steps 64 --gen-length 64 --block-length 32
dllmq info {repo_id}
```

```python
import dllmq
from dllmq.diffusion.generation import GenerationConfig, generate
from dllmq.models.loading import load_tokenizer

model = dllmq.load("{repo_id}", device="cpu")   # or "cuda"; checks the sha256 of every file
tok = load_tokenizer(model.source_path)
out = generate(model, tok, ["What is 17 * 23?"], GenerationConfig(steps=64, gen_length=64, block_length=32))
print(out[0]["text"])
```"""


def _format_note() -> str:
    return ("## Files\n\n"
            "`config.json` is the base model's config plus a `quantization_config` block; the safetensors shards "
            "hold packed integer weights (`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_shape`, "
            "compressed-tensors' pack-quantized layout); `dllmq_manifest.json` records how the checkpoint was made "
            "and the sha256 of every file. The format is described in dllmq's `docs/format.md`.")


def _md_table(cols: list[str], rows: list) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
