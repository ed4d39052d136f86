"""Compare a quantized checkpoint with its full-precision base: masked-token NLL and agreement (no lm-eval).

    python examples/evaluate.py [--checkpoint out/tiny-recipe] [--tasks tiny-math --limit 4]

Without --checkpoint the bundled `tiny` model is quantized (RTN W4) into a temporary folder.
`dllmq eval CHECKPOINT` and `dllmq eval --tasks tiny-math --limit 4` do the same from the command line.
"""

import argparse
import tempfile

import dllmq
from dllmq.diffusion.generation import GenerationConfig
from dllmq.evaluation.report import compare_models, compare_tasks

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--checkpoint")
ap.add_argument("--tasks", default="", help="comma-separated bundled tasks (tiny-math, tiny-code, tiny-mc)")
ap.add_argument("--limit", type=int, default=4, help="examples per task")
args = ap.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    ckpt = args.checkpoint or str(dllmq.quantize("tiny", {"method": "rtn", "weights": {"group_size": 32}},
                                                  out=f"{tmp}/tiny-w4").out)
    # NLL on held-out text (Monte-Carlo masked likelihood), one-step fill-in agreement and generation agreement
    res = compare_models(ckpt, against="tiny", max_seqs=4, mc_num=2, n_prompts=2, steps=16, gen_length=16,
                         block_length=16, show_progress=False)
    for row in res["models"]:
        print(f"{row['label']:>15}: NLL {row['nll']:.4f} nats/token, "
              f"step agreement {row.get('step_agreement', 1.0):.3f}, generation agreement {row.get('agreement', 1.0):.3f}")
    if args.tasks:
        tasks = compare_tasks(ckpt, args.tasks.split(","), against="tiny", limit=args.limit,
                              gcfg=GenerationConfig(steps=16, gen_length=16, block_length=16), show_progress=False)
        for m in tasks["models"]:
            for t, r in m["tasks"].items():
                print(f"{m['label']:>15}: {t} {r['metric']} {100 * r['value']:.1f}% ± {100 * r['stderr']:.1f} "
                      f"(n={r['n']})")
