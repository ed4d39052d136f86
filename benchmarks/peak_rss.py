"""Peak memory of block-by-block quantization does not grow with depth.

Writes random LLaDA-layout models (LLaDA's real vocabulary) of the same width and different depths, quantizes each with
GPTQ (calibrated, random masks) in a fresh process, and reports that process's peak RSS.

    python benchmarks/peak_rss.py --layers 4 16 32 --d-model 1024

`--cli` measures the default command instead, `dllmq quantize MODEL --method gptq` (TMAS calibration: the
full-precision model runs its sampler, streamed block by block on CPU), on LLaDA-layout models with a small
vocabulary, so the blocks dominate the weights; extra flags (e.g. a smaller calibration, for time) after
`--quantize-args`. `--calib-forward whole|stream` forces the calibration model's mode (DLLMQ_CALIB_FORWARD), to
measure what streaming costs; `--pythonpath DIR` runs another checkout of dllmq (e.g. the previous commit).

    python benchmarks/peak_rss.py --cli --layers 4 24 --d-model 1024 --mlp 3072 --vocab 512 \
        --quantize-args "--calib-samples 8 --calib-seq-len 64 --tmas-steps 8 --tmas-gen-length 16 --tmas-block-length 8"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.spec import WeightSpec
src, out = sys.argv[1], sys.argv[2]
t = time.time()
quantize(src, QuantizationConfig("gptq", WeightSpec(4, True, "group", 128), ignore=[r"model\.transformer\.ff_out"]), out,
         calib=CalibOptions(mask="random", samples=16, seq_len=128), show_progress=False)
from dllmq.runtime.memory import peak_rss_bytes  # this process's own peak (not ru_maxrss: see there)
print(json.dumps({"peak_rss_mib": peak_rss_bytes() / 2**20, "seconds": time.time() - t}))
"""


CLI = r"""
import sys
from dllmq.cli.main import main
sys.argv = ["dllmq", *sys.argv[1:]]
main()
"""


def run_cli(args, d: Path) -> list[dict]:
    """`dllmq quantize MODEL --method gptq` (the defaults otherwise) on small-vocabulary models."""
    from dllmq.models.tiny import write_tiny_llada

    env = dict(os.environ)
    if args.calib_forward:
        env["DLLMQ_CALIB_FORWARD"] = args.calib_forward
    if args.pythonpath:
        env["PYTHONPATH"] = str(args.pythonpath)
    rows = []
    for n in args.layers:
        src = write_tiny_llada(d / f"m{n}", n_layers=n, d_model=args.d_model, n_heads=args.d_model // 64,
                               n_kv_heads=args.d_model // 64, mlp_hidden_size=args.mlp or args.d_model * 3,
                               small_vocab=args.vocab, shards=max(1, n // 4))
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        cmd = ["quantize", str(src), "--method", "gptq", *shlex.split(args.quantize_args), "--out", str(d / f"q{n}"),
               "--json"]
        p = subprocess.run([sys.executable, "-c", CLI, *cmd], capture_output=True, text=True, env=env, cwd=d)
        if p.returncode:
            sys.exit(f"dllmq {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout)
        fwd = (r.get("calibration") or {}).get("fp_forward") or {}
        row = {"layers": n, "d_model": args.d_model, "mlp": args.mlp or args.d_model * 3, "vocab": args.vocab,
               "model_mib": size / 2**20, "peak_rss_mib": r["peak_rss_bytes"] / 2**20, "seconds": r["seconds"],
               "calib_forward": fwd.get("mode", "whole (fp32, before)" if args.pythonpath else None),
               "calib_seconds": fwd.get("seconds"), "calib_load_seconds": fwd.get("load_seconds"),
               "calib_passes": fwd.get("passes"), "stderr_tail": p.stderr.strip().splitlines()[-3:]}
        rows.append(row)
        print(f"layers {n:3d}  model {row['model_mib']:8.1f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
              f"{row['seconds']:.1f} s  calibration model {row['calib_forward']} {row['calib_seconds']} s "
              f"(reading blocks {row['calib_load_seconds']} s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--cli", action="store_true", help="measure `dllmq quantize MODEL --method gptq` (TMAS default)")
    ap.add_argument("--mlp", type=int, default=None, help="--cli: MLP hidden size (default 3 x d-model)")
    ap.add_argument("--vocab", type=int, default=512, help="--cli: vocabulary rows (special tokens remapped)")
    ap.add_argument("--quantize-args", default="", help="--cli: extra flags for dllmq quantize")
    ap.add_argument("--calib-forward", choices=["whole", "stream"], default=None,
                    help="--cli: force the calibration model's mode (default: dllmq's choice)")
    ap.add_argument("--pythonpath", type=Path, default=None, help="--cli: run the dllmq found here instead")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default results/peak_rss.json, or results/peak_rss_cli.json with --cli)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("peak_rss_cli.json" if args.cli else "peak_rss.json")
    if args.cli:
        with tempfile.TemporaryDirectory() as d:
            rows = run_cli(args, Path(d))
        base = rows[0]["peak_rss_mib"]
        for r in rows:
            r["rss_ratio_vs_first"] = r["peak_rss_mib"] / base
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(shlex.quote(a) for a in sys.argv), "rows": rows}, indent=2))
        print("| layers | model size (MiB) | calibration model | peak RSS (MiB) | RSS / shallowest | total s | "
              "calibration s (reading blocks s) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layers']} | {r['model_mib']:.0f} | {r['calib_forward']} | {r['peak_rss_mib']:.0f} | "
                  f"{r['rss_ratio_vs_first']:.2f} | {r['seconds']:.0f} | {r['calib_seconds']} ({r['calib_load_seconds']}) |")
        return
    from dllmq.models.tiny import write_tiny_llada

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.layers:
            src = write_tiny_llada(Path(d) / f"m{n}", n_layers=n, d_model=args.d_model, n_heads=args.d_model // 64,
                                   n_kv_heads=args.d_model // 64, mlp_hidden_size=args.d_model * 3,
                                   shards=max(1, n // 4))
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(d) / f"q{n}")],
                               capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append({"layers": n, "d_model": args.d_model, "model_mib": size / 2**20, **r})
            print(f"layers {n:3d}  model {size / 2**20:8.1f} MiB  peak RSS {r['peak_rss_mib']:8.1f} MiB  "
                  f"{r['seconds']:.1f} s", flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["rss_ratio_vs_first"] = r["peak_rss_mib"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print("| layers | model size (MiB) | peak RSS (MiB) | RSS / shallowest |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['model_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['rss_ratio_vs_first']:.2f} |")


if __name__ == "__main__":
    main()
