"""Quantized linear layers against bf16 F.linear at dLLM shapes, and one full denoising step.

Every timing is a median of torch.utils.benchmark blocked_autorange in the same process; the
table reports time ratios against bf16 F.linear measured in the same run (absolute times on a
shared machine are noise).

    python benchmarks/kernels.py                      # LLaDA-8B layer sizes, rows 256/1024/2048
    python benchmarks/kernels.py --rows 256 --quick   # one size per layer type
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from dllmq.quantization.rtn import rtn_quantize
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime.qlinear import QuantLinear, force_kernel

LLADA_8B = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 12288x4096": (12288, 4096), "down 4096x12288": (4096, 12288)}


def median_ms(fn, min_time: float) -> float:
    fn()
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median * 1e3


def layer_rows(shapes, rows, min_time):
    out = []
    for label, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        wb = w.to(torch.bfloat16)
        variants = {
            "W8A8 int8 GEMM": QuantLinear.from_quantized(rtn_quantize(w, WeightSpec(8, True, "channel", None)),
                                                         act_spec=ActSpec(8), cache_dequantized=True),
            "W4A8 int8 GEMM": QuantLinear.from_quantized(rtn_quantize(w, WeightSpec(4, True, "channel", None)),
                                                         act_spec=ActSpec(8), cache_dequantized=True),
            "W4A16 dequant+bf16 (cached)": QuantLinear.from_quantized(
                rtn_quantize(w, WeightSpec(4, True, "group", 128)), cache_dequantized=True),
            "W4A16 dequant per call": QuantLinear.from_quantized(
                rtn_quantize(w, WeightSpec(4, True, "group", 128)), cache_dequantized=False),
        }
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            base = median_ms(lambda: F.linear(x, wb), min_time)
            row = {"layer": label, "rows": m, "bf16 F.linear ms": base}
            for name, ql in variants.items():
                row[name] = median_ms(lambda ql=ql: ql(x), min_time) / base
            with force_kernel("int4_cpu"):
                ql = variants["W4A16 dequant+bf16 (cached)"]
                row["W4A16 int4 kernel"] = median_ms(lambda: ql(x), min_time) / base if m <= 256 else None
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def denoising_step(batch, seq_len, min_time, tmp):
    """One full-sequence forward of the bundled model: bf16 full precision vs W8A8 / W4A8 / W4A16."""
    import dllmq
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import CalibOptions, quantize

    x = torch.randint(0, 4000, (batch, seq_len))
    fp = dllmq.load("tiny", dtype=torch.bfloat16)
    res = {"fp bf16 ms": None}
    with torch.no_grad():
        base = median_ms(lambda: fp(x), min_time)
    res["fp bf16 ms"] = base
    for label, w, a, method in [("W8A8 smoothquant", 8, 8, "smoothquant"), ("W4A8 quarot", 4, 8, "quarot"),
                                ("W4A16 rtn", 4, 16, "rtn")]:
        out = Path(tmp) / label.replace(" ", "-")
        qcfg = QuantizationConfig(method, WeightSpec(w, True, "channel" if a < 16 else "group", None if a < 16 else 128),
                                  ActSpec(a), ignore=[r"model\.transformer\.ff_out"])
        quantize("tiny", qcfg, out, overwrite=True, calib=CalibOptions(mask="random", samples=8), show_progress=False)
        m = dllmq.load(out, dtype=torch.bfloat16, cache_dequantized=True)
        with torch.no_grad():
            res[label] = median_ms(lambda: m(x), min_time) / base
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--quick", action="store_true", help="only the 4096x4096 layer")
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--step-seq", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels")
    args = ap.parse_args()
    import tempfile

    shapes = {k: v for i, (k, v) in enumerate(LLADA_8B.items()) if not args.quick or i == 0}
    layers = layer_rows(shapes, args.rows, args.min_time)
    with tempfile.TemporaryDirectory() as d:
        step = denoising_step(args.step_batch, args.step_seq, args.min_time, d)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"layers": layers, "denoising_step": step,
                                                         "torch": torch.__version__,
                                                         "threads": torch.get_num_threads()}, indent=2))
    cols = [c for c in layers[0] if c not in ("layer", "rows")]
    lines = ["| layer | rows | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in layers:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else "-" for c in cols]
        lines.append(f"| {r['layer']} | {r['rows']} | " + " | ".join(cells) + " |")
    lines += ["", f"Denoising step of the bundled model, batch {args.step_batch} x {args.step_seq} tokens "
              f"(bf16 = {step['fp bf16 ms']:.1f} ms; ratios, lower is faster):", ""]
    lines += [f"| {k} | {v:.2f} |" for k, v in step.items() if k != "fp bf16 ms"]
    md = "\n".join(lines)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
