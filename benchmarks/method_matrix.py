"""Quantization methods on the bundled model, scored on the offline task suite.

Quantizes the bundled `tiny` model with every configuration below (same seed, same calibration
budget) and evaluates each on tiny-math and tiny-mc next to full precision, measured in the same
run. Writes benchmarks/results/method_matrix.{md,json}.

    python benchmarks/method_matrix.py                  # ~15 min on 2 cores
    python benchmarks/method_matrix.py --bits 4 --quick # a smaller matrix
    python benchmarks/method_matrix.py --bits 3 4 --only RTN "GPTQ, TMAS" --tasks tiny-code tiny-mc \
        --out benchmarks/results/method_matrix_code_mc
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dllmq.checkpoint.format import QuantizationConfig
from dllmq.diffusion.generation import GenerationConfig
from dllmq.evaluation.tasks import run_task
from dllmq.models.loading import load_tokenizer, resolve_model_path
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.spec import WeightSpec
from dllmq.runtime.loader import load

CONFIGS = [  # label, method, calibration mask, options
    ("RTN", "rtn", "none", {}),
    ("GPTQ, clean calibration (QDLM)", "gptq", "none", {}),
    ("GPTQ, random masks", "gptq", "random", {}),
    ("GPTQ, TMAS", "gptq", "tmas", {}),
    ("GPTQ, TMAS + CGQ", "gptq", "tmas", {"cgq": True}),
    ("AWQ (rtn)", "awq", "tmas", {"w_quantizer": "rtn"}),
    ("AWQ + GPTQ", "awq", "tmas", {"w_quantizer": "gptq"}),
]
QUICK = {"RTN", "GPTQ, clean calibration (QDLM)", "GPTQ, TMAS", "GPTQ, TMAS + CGQ"}


def quantize_config(src, out, method, bits, group_size, mask, opts, samples):
    """One row's checkpoint (LM head kept in full precision) -> (QuantizeResult, seconds)."""
    qcfg = QuantizationConfig(method, WeightSpec(bits, True, "group", group_size),
                              ignore=[r"model\.transformer\.ff_out", "lm_head"])
    t0 = time.time()
    res = quantize(src, qcfg, out, calib=CalibOptions(mask=mask, samples=samples), method_options=opts,
                   show_progress=False)
    return res, time.time() - t0


def evaluate(path, tasks, gcfg, mc_num):
    m = load(path, dtype=None)
    tok = load_tokenizer(m.source_path)
    # tiny-code runs the model's programs in dllmq's code sandbox (evaluation/execution.py), as `--allow-code-execution`
    return {t: run_task(t, m, tok, gcfg, mc_num=mc_num, allow_exec=t == "tiny-code").to_dict(with_samples=False)
            for t in tasks}


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options every weight-only method benchmark shares (also used by method_nll.py)."""
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--mc-num", type=int, default=8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--tasks", nargs="+", default=["tiny-math", "tiny-mc"])
    ap.add_argument("--quick", action="store_true", help="only RTN, GPTQ clean, GPTQ TMAS, GPTQ TMAS+CGQ")
    ap.add_argument("--only", nargs="+", default=None, help="only these configuration labels, e.g. RTN 'GPTQ, TMAS'")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "method_matrix")
    args = ap.parse_args()
    gcfg = GenerationConfig()
    src = resolve_model_path(args.model)
    rows = [{"label": "full precision", "bits": 16, "quant_seconds": 0.0,
             "tasks": evaluate(src, args.tasks, gcfg, args.mc_num)}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for bits in args.bits:
            for label, method, mask, opts in CONFIGS:
                if (args.quick and label not in QUICK) or (args.only and label not in args.only):
                    continue
                out = Path(d) / f"{method}-{bits}-{len(rows)}"
                res, qs = quantize_config(src, out, method, bits, args.group_size, mask, opts, args.samples)
                err = sum(r.rel_error for r in res.layers) / len(res.layers)
                rows.append({"label": label, "bits": bits, "quant_seconds": qs, "mean_layer_error": err,
                             "tasks": evaluate(out, args.tasks, gcfg, args.mc_num)})
                print(json.dumps(rows[-1]), flush=True)
                write(args, rows)
    print(write(args, rows))


def write(args, rows) -> str:
    """The JSON and Markdown tables (also after every row, so an interrupted run keeps what it measured)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                        indent=2))
    fp = rows[0]["tasks"]
    head = "| method | W | " + " | ".join(f"{t} (%)" for t in args.tasks) + f" | Δ {args.tasks[0]} vs FP | quantize (s) |"
    lines = [head, "|" + "---|" * (len(args.tasks) + 4)]
    for r in rows:
        cells = [f"{100 * r['tasks'][t]['value']:.1f} ± {100 * r['tasks'][t]['stderr']:.1f}" for t in args.tasks]
        delta = 100 * (r["tasks"][args.tasks[0]]["value"] - fp[args.tasks[0]]["value"])
        lines.append(f"| {r['label']} | {r['bits']} | " + " | ".join(cells) + f" | {delta:+.1f} | {r['quant_seconds']:.1f} |")
    md = "\n".join(lines)
    args.out.with_suffix(".md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
