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


def crossovers(layers: list[dict]) -> list[str]:
    """Per layer and kernel: the largest row count at which it is faster than bf16 (ratio < 1), if any."""
    out = []
    for label in dict.fromkeys(r["layer"] for r in layers):
        rs = [r for r in layers if r["layer"] == label]
        for col in [c for c in rs[0] if c not in ("layer", "rows", "bf16 F.linear ms")]:
            fast = [r["rows"] for r in rs if r.get(col) is not None and r[col] < 1.0]
            slow = [r["rows"] for r in rs if r.get(col) is not None and r[col] >= 1.0]
            out.append(f"{label}, {col}: faster than bf16 at rows {fast or 'none'}; slower at {slow or 'none'}")
    return out


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
                row["W4A16 int4 kernel"] = median_ms(lambda: ql(x), min_time) / base if m <= 64 else None
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def wide_model(tmp) -> Path:
    """Random LLaDA with LLaDA-8B's block shapes (d 4096, 32 heads, MLP 12288), 2 blocks and a 4096-token
    vocabulary, so the step is dominated by the blocks (LLaDA-8B's LM head stays bf16 in every variant)."""
    from dllmq.models.tiny import write_tiny_llada

    return write_tiny_llada(Path(tmp) / "wide", n_layers=2, d_model=4096, n_heads=32, n_kv_heads=32,
                            mlp_hidden_size=12288, vocab_size=4096, embedding_size=4096, mask_token_id=4095,
                            eos_token_id=4094, pad_token_id=4094, shards=1)


def denoising_step(model, batch, seq_len, min_time, tmp, vocab):
    """One full-sequence forward: bf16 full precision vs W8A8 / W4A8 (int8 GEMM) / W4A16, same run.
    Weight-activation variants use RTN weights: the transform (SmoothQuant/QuaRot/DuQuant) changes
    accuracy, not the GEMM a step runs (online transforms are timed by `dllmq bench`)."""
    import dllmq
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    fp = dllmq.load(model, dtype=torch.bfloat16)
    x[torch.rand(batch, seq_len, generator=g) < 0.5] = fp.mask_token_id
    with torch.no_grad():
        base = median_ms(lambda: fp(x), min_time)
    del fp
    res = {"fp bf16 ms": base}
    for label, w, a in [("W8A8 int8 GEMM", 8, 8), ("W4A8 int8 GEMM", 4, 8), ("W4A16 g128", 4, 16)]:
        out = Path(tmp) / label.replace(" ", "-")
        qcfg = QuantizationConfig("rtn", WeightSpec(w, True, "channel" if a < 16 else "group", None if a < 16 else 128),
                                  ActSpec(a), ignore=[r"model\.transformer\.ff_out"])
        quantize(model, qcfg, out, overwrite=True, show_progress=False)
        m = dllmq.load(out, dtype=torch.bfloat16, cache_dequantized=True)
        with torch.no_grad():
            res[label] = median_ms(lambda: m(x), min_time) / base
        del m
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256, 1024, 2048])
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
        steps = {"bundled tiny (d 256)": denoising_step("tiny", args.step_batch, args.step_seq, args.min_time, d, 4000),
                 "LLaDA-8B block shapes (d 4096, 2 blocks)": denoising_step(
                     str(wide_model(d)), 1, args.step_seq, args.min_time, d, 4000)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"layers": layers, "denoising_step": steps,
                                                         "torch": torch.__version__,
                                                         "threads": torch.get_num_threads()}, indent=2))
    cols = [c for c in layers[0] if c not in ("layer", "rows")]
    lines = ["| layer | rows | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in layers:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else "-" for c in cols]
        lines.append(f"| {r['layer']} | {r['rows']} | " + " | ".join(cells) + " |")
    for name, step in steps.items():
        lines += ["", f"Denoising step, {name}: bf16 = {step['fp bf16 ms']:.1f} ms; ratios (lower is faster):", ""]
        lines += ["| variant | time / bf16 |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in step.items()
                                                                 if k != "fp bf16 ms"]
    lines += ["", "Crossovers (rows where each kernel stops / starts beating bf16 F.linear):", ""]
    lines += [f"- {c}" for c in crossovers(layers)]
    md = "\n".join(lines)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
