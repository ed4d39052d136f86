"""Which CPU path a weight-activation layer (per-token int8 activations) should take at many rows: the integer GEMM
(`int8_act`: one `_int_mm`, or one per weight group reduced by the fused epilogue) or the bf16 fold (`fold_bf16`:
activation codes times a cached dense bf16 copy), each timed against the plain bf16 F.linear in the same run, at
the bundled model's and LLaDA-8B's layer shapes, g128 and per-channel 4-bit weights.

    python benchmarks/act_paths.py [--rows 256 2048] [--quick]

Writes benchmarks/results/act_paths.{json,md}. QuantLinear's CPU dispatch for group-wise W?A8 layers follows these numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
SHAPES = [("bundled q/k/v/o", 384, 384), ("bundled ff_out", 384, 1024), ("8B q/k/v/o", 4096, 4096),
          ("8B gate/up", 12288, 4096), ("8B down", 4096, 12288)]


def _median_us(fn, min_time: float) -> float:
    for _ in range(3):
        fn()
    ts: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(ts) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--quick", action="store_true", help="bundled shapes only")
    args = ap.parse_args()
    from dllmq.quantization.rtn import rtn_quantize
    from dllmq.quantization.spec import ActSpec, WeightSpec
    from dllmq.runtime import native
    from dllmq.runtime.qlinear import QuantLinear, force_kernel

    torch.manual_seed(0)
    rows_out = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    for name, n, k in shapes:
        for group in (128, None):
            spec = WeightSpec(4, True, "group", group) if group else WeightSpec(4, True, "channel", None)
            layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(n, k) * 0.02, spec), None,
                                               act_spec=ActSpec(8), compute_dtype=torch.bfloat16)
            layer.cache_dequantized = True
            w = layer.dequantized_weight(torch.bfloat16)
            for m in args.rows:
                if k >= 4096 and m > 256 and args.min_time < 1:
                    continue  # minutes per shape on 2 cores; the 256-row point decides the dispatch
                x = torch.randn(m, k).to(torch.bfloat16)
                with torch.no_grad():
                    t = {"bf16": _median_us(lambda: F.linear(x, w), args.min_time)}
                    for path in ("int8_act", "fold_bf16"):
                        with force_kernel(path):
                            t[path] = _median_us(lambda: layer(x), args.min_time)
                    chosen = layer.kernel_for(x)
                row = {"layer": name, "n": n, "k": k, "weights": spec.describe(), "rows": m,
                       "groups": k // group if group else 1, "bf16_us": t["bf16"],
                       "int8_act": t["int8_act"] / t["bf16"], "fold_bf16": t["fold_bf16"] / t["bf16"],
                       "dispatch": chosen}
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "native_cpu_kernels": native.status(),
            "cpu": native.cpu_description()}
    (RESULTS / "act_paths.json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    lines = ["# Weight-activation layer paths on CPU (time / bf16 F.linear, same run)", "",
             f"`python benchmarks/act_paths.py`; {meta['cpu']}; torch {meta['torch']}, {meta['threads']} threads; "
             f"fused kernels: {'loaded' if meta['native_cpu_kernels'].startswith('loaded') else meta['native_cpu_kernels']}.",
             "", "| layer | N x K | weights | groups | rows | bf16 (us) | int8_act | fold_bf16 | dispatch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['layer']} | {r['n']}x{r['k']} | {r['weights']} | {r['groups']} | {r['rows']} | "
                     f"{r['bf16_us']:.0f} | {r['int8_act']:.2f} | {r['fold_bf16']:.2f} | {r['dispatch']} |")
    (RESULTS / "act_paths.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
