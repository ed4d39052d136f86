"""`dllmq eval --tasks ... --output FILE --output-format lm-eval`: the results in lm-evaluation-harness's own
schema, the dict `lm_eval.simple_evaluate` returns (and lm-eval writes to results_*.json): results, configs,
versions, n-shot, higher_is_better, n-samples, config, ..., so tools that read lm-eval results read ours.

Every task run keeps lm-eval's own output in its settings (harness.lm_eval_raw); the conversion merges those
of one model's tasks. For a task evaluated without it (a results file from an older dllmq), the entries are
rebuilt from dllmq's fields (metric, value, stderr, n, num_fewshot). lm-eval's schema describes one model: with
a full-precision reference evaluated alongside, the file describes the evaluated model (the last one), as
`--compare` reads results files. Per-sample outputs are not part of it (lm-eval writes them to separate files).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

FORMATS = ("dllmq", "lm-eval")
_MERGED = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def to_lm_eval(res: dict, model_index: int = -1) -> dict:
    """One model's entry of `dllmq eval --tasks` results (report.evaluate_tasks) in lm-eval's schema."""
    if not res.get("models"):
        raise UserError("--output-format lm-eval needs task results (dllmq eval MODEL --tasks ...)")
    entry = res["models"][model_index]
    out: dict = {k: {} for k in _MERGED}
    config, extra, seconds = None, {}, 0.0
    for task, r in entry["tasks"].items():
        raw = json.loads(json.dumps((r.get("settings") or {}).get("lm_eval") or _rebuilt(task, r)))  # a copy
        seconds += float(r.get("seconds") or 0.0)
        for k in _MERGED:
            out[k].update(raw.get(k) or {})
        for name, v in (raw.get("results") or {}).items():  # bootstrap_iters=0 leaves "N/A": dllmq's per-doc stderr
            metric = r.get("metric")
            for key in [k for k in v if k.startswith(f"{metric}_stderr,")]:
                if v[key] == "N/A" and name == task and isinstance(r.get("stderr"), (int, float)):
                    out["results"][name][key] = r["stderr"]
        if config is None and raw.get("config"):
            config = dict(raw["config"])
        for k in ("date", "lm_eval_version", "transformers_version"):
            if k in raw and k not in extra:
                extra[k] = raw[k]
    run = res.get("config") or {}
    config = {**(config or {}), "model": "dllmq", "model_args": f"pretrained={entry.get('model')}",
              "batch_size": run.get("batch_size"), "device": run.get("device"), "limit": run.get("limit")}
    if not out["groups"]:
        del out["groups"]  # lm-eval leaves it out when no group was evaluated
    return {**out, "config": config, **extra, "model_name": str(entry.get("model")),
            "total_evaluation_time_seconds": str(round(seconds, 3))}


def _rebuilt(task: str, r: dict) -> dict:
    metric, st = r.get("metric") or "acc", r.get("settings") or {}
    return {"results": {task: {"alias": task, f"{metric},none": r.get("value"), f"{metric}_stderr,none": r.get("stderr")}},
            "n-shot": {task: st.get("num_fewshot") or 0},
            "n-samples": {task: {"original": r.get("n"), "effective": r.get("n")}},
            "higher_is_better": {task: {metric: True}}}


def write(path: Path, res: dict) -> None:
    """Write `res` (dllmq eval --tasks results) to `path` in lm-eval's schema, atomically."""
    doc = to_lm_eval(res)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"cannot write --output {path}: {e.strerror}") from None
