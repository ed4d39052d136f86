"""Weight-activation methods on the bundled model: W8A8, W4A8 and W4A4, scored on the task suite.

Every configuration goes through the user's path: `dllmq quantize ... --json`, then
`dllmq eval CHECKPOINT --tasks ...`'s evaluation (real integer activations in the runtime), next to the
full-precision model evaluated in the same run with the same sampler settings. Writes
benchmarks/results/wa_matrix.{md,json}.

    python benchmarks/wa_matrix.py                          # bundled model (natural FFN outliers)
    python benchmarks/wa_matrix.py --model tiny-outliers    # + injected LLaDA-like outliers
    python benchmarks/wa_matrix.py --only W4A4              # one precision

Settings are each method's paper defaults (docs/methods.md): per-channel weights (asymmetric for SmoothQuant
and DuQuant), per-token activations (asymmetric for SmoothQuant and DuQuant), K/V quantized at the
activation bits, SmoothQuant alpha 0.5, QuaRot with GPTQ rounding and weight-clip search, DuQuant block 128
(capped by the width), activation clip 0.9, weight clip 0.8; "+ GPTQ" rows round with GPTQ instead of RTN.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DLLMQ = str(Path(sys.executable).parent / "dllmq")
CONFIGS = [  # precision, label, extra quantize arguments; everything else at the method's paper defaults
    ("W8A8", "SmoothQuant", ["--method", "smoothquant", "--w", "8", "--a", "8"]),
    ("W8A8", "QuaRot", ["--method", "quarot", "--w", "8", "--a", "8"]),
    ("W8A8", "DuQuant", ["--method", "duquant", "--w", "8", "--a", "8"]),
    ("W4A8", "QuaRot (GPTQ)", ["--method", "quarot", "--w", "4", "--a", "8"]),
    ("W4A8", "DuQuant", ["--method", "duquant", "--w", "4", "--a", "8"]),
    ("W4A8", "DuQuant + GPTQ", ["--method", "duquant", "--w", "4", "--a", "8", "--w-quantizer", "gptq"]),
    ("W4A4", "SmoothQuant", ["--method", "smoothquant", "--w", "4", "--a", "4"]),
    ("W4A4", "SmoothQuant + GPTQ", ["--method", "smoothquant", "--w", "4", "--a", "4", "--w-quantizer", "gptq"]),
    ("W4A4", "QuaRot (GPTQ)", ["--method", "quarot", "--w", "4", "--a", "4"]),
    ("W4A4", "DuQuant", ["--method", "duquant", "--w", "4", "--a", "4"]),
    ("W4A4", "DuQuant + GPTQ", ["--method", "duquant", "--w", "4", "--a", "4", "--w-quantizer", "gptq"]),
]


def cli(*args: str) -> dict:
    p = subprocess.run([DLLMQ, *args, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"dllmq {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def nll_agreement(model: str) -> dict:
    """`dllmq eval CHECKPOINT` without tasks: masked-token NLL (same masks as full precision) and the share of
    greedy generated tokens equal to full precision's."""
    from dllmq.evaluation.report import compare_models

    f, q = compare_models(model, max_seqs=16, mc_num=4, n_prompts=8, show_progress=False)["models"]
    return {"nll": q["nll"], "fp_nll": f["nll"], "agreement": q.get("agreement"), "step_agreement": q.get("step_agreement")}


def scores(model: str, tasks: list[str]) -> dict:
    """`dllmq eval MODEL --tasks ...` for this model only (the CLI would add the FP reference each time)."""
    from dllmq.evaluation.report import evaluate_tasks

    res = evaluate_tasks([("model", model)], tasks, show_progress=False)
    return {t: {k: v[k] for k in ("value", "stderr", "n")} for t, v in res["models"][0]["tasks"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tasks", default="tiny-math,tiny-mc", help="comma list; '' = NLL and agreement only")
    ap.add_argument("--only", nargs="*", default=None, help="precisions to run, e.g. W4A4 W4A8")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-mask", default="none", help="none (clean text, QDLM's setting), random or tmas")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wa_matrix")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    rows = [{"precision": "W16A16", "label": "full precision", "seconds": 0.0, "step_agreement": 1.0,
             "tasks": scores(args.model, tasks) if tasks else {}, "nll": None, "agreement": 1.0}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for i, (prec, label, extra) in enumerate(CONFIGS):
            if args.only and prec not in args.only:
                continue
            out = Path(d) / f"c{i}"
            t0 = time.time()
            cli("quantize", args.model, *extra, "--calib-samples", str(args.calib_samples),
                "--calib-mask", args.calib_mask, "--out", str(out))
            qs = time.time() - t0
            rows.append({"precision": prec, "label": label, "seconds": qs, "args": extra,
                         "tasks": scores(str(out), tasks) if tasks else {}, **nll_agreement(str(out))})
            print(json.dumps(rows[-1]), flush=True)
    suffix = "" if args.model == "tiny" else "-" + args.model.replace("/", "_")
    out = args.out.with_name(args.out.name + suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "tasks": tasks, "rows": rows}, indent=2))
    fp = rows[0]["tasks"]
    lines = [f"Model: {args.model}; calibration: {args.calib_samples} samples, mask {args.calib_mask}. Accuracy % ± "
             "standard error; Δ in points against full precision, same run.", "",
             "| precision | method | " + "".join(f"{t} | " for t in tasks) + "".join(f"Δ {t} | " for t in tasks)
             + "Δ NLL vs FP | step agreement | generation agreement | quantize (s) |",
             "|" + "---|" * (2 * len(tasks) + 6)]
    for r in rows:
        cells = [f"{100 * r['tasks'][t]['value']:.1f} ± {100 * r['tasks'][t]['stderr']:.1f}" for t in tasks]
        deltas = [f"{100 * (r['tasks'][t]['value'] - fp[t]['value']):+.1f}" for t in tasks]
        dn = "-" if r.get("nll") is None else f"{r['nll'] - r['fp_nll']:+.4f}"
        lines.append(f"| {r['precision']} | {r['label']} | " + "".join(f"{c} | " for c in cells + deltas)
                     + f"{dn} | {r.get('step_agreement') or 1.0:.3f} | {r['agreement']:.3f} | {r['seconds']:.0f} |")
    md = "\n".join(lines)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
