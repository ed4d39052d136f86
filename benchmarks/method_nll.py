"""Weight-only methods on the bundled model, judged by masked-token NLL and generation agreement.

The task scores of the bundled model sit near the floor (see its model card), so they cannot separate
methods; the Monte-Carlo masked-token NLL on held-out text (same masks for every model) and the token
agreement of greedy generations with full precision can. Same configurations as method_matrix.py.
Writes benchmarks/results/method_nll.{md,json}.

    python benchmarks/method_nll.py               # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from method_matrix import CONFIGS, add_common_args, quantize_config

from dllmq.evaluation.report import compare_models
from dllmq.models.loading import resolve_model_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all of method_matrix's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "method_nll")
    args = ap.parse_args()
    src = resolve_model_path(args.model)
    rows, fp = [], None
    with tempfile.TemporaryDirectory() as d:
        for bits in args.bits:
            for label, method, mask, opts in CONFIGS:
                if args.only and label not in args.only:
                    continue
                out = Path(d) / f"{method}-{bits}-{len(rows)}"
                _, qs = quantize_config(src, out, method, bits, args.group_size, mask, opts, args.samples)
                res = compare_models(str(out), max_seqs=args.max_seqs, mc_num=args.mc_num, n_prompts=args.prompts,
                                     show_progress=False)
                f, q = res["models"]
                fp = f["nll"]
                rows.append({"label": label, "bits": bits, "nll": q["nll"], "fp_nll": fp,
                             "agreement": q.get("agreement"), "quant_seconds": qs})
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "rows": rows}, indent=2))
    lines = [f"Full-precision NLL {fp:.4f} nats/token (held-out text, {args.max_seqs} windows, mc_num {args.mc_num}, "
             "same masks for every model); agreement = share of generated tokens equal to full precision "
             f"({args.prompts} prompts, greedy).", "",
             "| method | W | NLL | Δ NLL vs FP | agreement | quantize (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits']} | {r['nll']:.4f} | {r['nll'] - r['fp_nll']:+.4f} | "
                     f"{r['agreement']:.3f} | {r['quant_seconds']:.1f} |")
    md = "\n".join(lines)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
