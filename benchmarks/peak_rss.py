"""Peak memory of block-by-block quantization does not grow with depth.

Writes random LLaDA-layout models (LLaDA's real vocabulary) of the same width and different depths, quantizes each with
GPTQ (calibrated, random masks) in a fresh process, and reports that process's peak RSS.

    python benchmarks/peak_rss.py --layers 4 16 32 --d-model 1024
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peak_rss.json")
    args = ap.parse_args()
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
