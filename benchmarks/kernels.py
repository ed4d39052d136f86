"""Quantized linear layers against full-precision F.linear at dLLM shapes, and one full denoising step.

Every timing is a median of torch.utils.benchmark blocked_autorange in the same process; the
table reports time ratios against F.linear in the runtime's default dtype (bf16 where the CPU computes it
natively, float32 where it is emulated; --dtype) measured in the same run (absolute times on a
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
from dllmq.runtime import native
from dllmq.runtime.qlinear import QuantLinear, force_kernel

LLADA_8B = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 12288x4096": (12288, 4096), "down 4096x12288": (4096, 12288)}


def crossovers(layers: list[dict]) -> list[str]:
    """Per layer and kernel: the largest row count at which it is faster than full precision (ratio < 1), if any."""
    out = []
    for label in dict.fromkeys(r["layer"] for r in layers):
        rs = [r for r in layers if r["layer"] == label]
        cols = dict.fromkeys(c for r in rs for c in r)
        for col in [c for c in cols if c not in ("layer", "rows", BASE)]:
            if any(isinstance(r.get(col), str) for r in rs):
                continue  # kernel-name columns
            fast = [r["rows"] for r in rs if r.get(col) is not None and r[col] < 1.0]
            slow = [r["rows"] for r in rs if r.get(col) is not None and r[col] >= 1.0]
            out.append(f"{label}, {col}: faster than {BASE.split()[0]} at rows {fast or 'none'}; slower at {slow or 'none'}")
    return out


# The full-precision baseline: the runtime's default activation dtype on this CPU (bf16 where it is native, float32
# where it is emulated), or --dtype.
DTYPE = torch.bfloat16
BASE, STEP_BASE = "bf16 F.linear ms", "fp bf16 ms"


def set_dtype(dtype: torch.dtype) -> None:
    global DTYPE, BASE, STEP_BASE
    name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    DTYPE, BASE, STEP_BASE = dtype, f"{name} F.linear ms", f"fp {name} ms"


def median_ms(fn, min_time: float) -> float:
    fn()
    # Timer runs on one thread unless told otherwise; the ratios (paired_ratio) run on torch's threads
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def paired_ratio(base, fn, min_time: float) -> float:
    """median(fn) / median(base), the two timed in alternation (A B A B ...) so load drift hits both."""
    import statistics
    import time

    base(), fn()
    tb, tf, t_end = [], [], time.perf_counter() + 2 * min_time
    while len(tb) < 3 or time.perf_counter() < t_end:
        for f, acc in ((base, tb), (fn, tf)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    return statistics.median(tf) / statistics.median(tb)


def _ql(w, spec, act=ActSpec(), cache=True):
    return QuantLinear.from_quantized(rtn_quantize(w, spec), act_spec=act, cache_dequantized=cache)


def layer_variants(w) -> list[tuple[str, QuantLinear, str | None, int | None]]:
    """(label, layer, forced kernel or None = automatic dispatch, max rows or None)."""
    g128, ch = WeightSpec(4, True, "group", 128), WeightSpec(4, True, "channel", None)
    w8 = WeightSpec(8, True, "channel", None)
    w4a16, w4a16_lean = _ql(w, g128), _ql(w, g128, cache=False)
    w8a8, w4a8 = _ql(w, w8, ActSpec(8), cache=False), _ql(w, ch, ActSpec(8), cache=False)
    g_cached, g_lean = _ql(w, g128, ActSpec(8), cache=True), _ql(w, g128, ActSpec(8), cache=False)
    return [
        # automatic dispatch; "lean" = dllmq.load's default cache_dequantized=False (no dense bf16 copy)
        ("W4A16 g128 auto", w4a16, None, None),
        ("W4A16 g128 auto lean", w4a16_lean, None, None),
        ("W8A8 ch auto", w8a8, None, None),
        ("W4A8 ch auto", w4a8, None, None),
        ("W4A8 g128 auto", g_cached, None, None),
        ("W4A8 g128 auto lean", g_lean, None, None),
        # each path forced
        ("W4A16 int4 kernel", w4a16, "int4_cpu", 64),
        ("W8A8 ch int8_act", w8a8, "int8_act", None),
        ("W8A8 ch int8pack_cpu_act", w8a8, "int8pack_cpu_act", 64),
        ("W4A8 ch int8_act", w4a8, "int8_act", None),
        ("W4A8 ch int4_cpu_act", w4a8, "int4_cpu_act", 64),
        ("W4A8 g128 int8_act", g_cached, "int8_act", None),
        ("W4A8 g128 fold_bf16", g_cached, "fold_bf16", None),
        ("W4A8 g128 int4_cpu_act", g_cached, "int4_cpu_act", 64),
        # the fused C kernels where this CPU has them (skipped per row where a layer cannot take them)
        ("W8A8 ch int8_vnni", w8a8, "int8_vnni", None),
        ("W4A8 ch int8_vnni", w4a8, "int8_vnni", None),
        ("W4A8 g128 int8_vnni", g_lean, "int8_vnni", None),
        ("W4A16 g128 w16_dot_cpu", w4a16_lean, "w16_dot_cpu", 256),
        ("W4A16 g128 w32_dot_cpu", w4a16_lean, "w32_dot_cpu", 256),
    ]


def layer_rows(shapes, rows, min_time, before=False):
    out = []
    for label, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        wb = w.to(DTYPE)
        variants = layer_variants(w)
        for m in rows:
            x = torch.randn(m, k, dtype=DTYPE)
            base = lambda: F.linear(x, wb)  # noqa: E731
            row = {"layer": label, "rows": m, BASE: median_ms(base, min_time)}
            for name, ql, force, max_rows in variants:
                if max_rows is not None and m > max_rows or force is not None and not ql._supported(force, x):
                    row[name] = None
                    continue
                with force_kernel(force):
                    if force is None:
                        row[name + " kernel"] = ql.kernel_for(x)
                    row[name] = paired_ratio(base, lambda ql=ql: ql(x), min_time)
            if before and m <= 256:
                # the pre-fix behaviour of the default load: int8 weights rebuilt on every call
                ql = variants[5][1]
                with force_kernel("int8_act"):
                    row["W4A8 g128 int8_act rebuilt per call (before)"] = paired_ratio(
                        base, lambda: (ql.clear_cache(), ql(x)), min_time)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def wide_model(tmp, tokenizer: bool = False) -> Path:
    """Random LLaDA with LLaDA-8B's block shapes (d 4096, 32 heads, MLP 12288), 2 blocks and a 4096-token
    vocabulary, so the step is dominated by the blocks (LLaDA-8B's LM head stays bf16 in every variant).
    tokenizer=True adds the tiny byte tokenizer with LLaDA's special tokens moved inside the vocabulary, so that
    calibration can read text."""
    from dllmq.models.tiny import LLADA_CHAT_TEMPLATE, byte_tokenizer, write_tiny_llada

    src = write_tiny_llada(Path(tmp) / "wide", n_layers=2, d_model=4096, n_heads=32, n_kv_heads=32,
                           mlp_hidden_size=12288, vocab_size=4096, embedding_size=4096, mask_token_id=4095,
                           eos_token_id=4094, pad_token_id=4094, shards=1)
    if tokenizer:
        special = {"<|startoftext|>": 4090, "<|start_header_id|>": 4091, "<|end_header_id|>": 4092,
                   "<|eot_id|>": 4093, "<|endoftext|>": 4094, "<|mdm_mask|>": 4095}
        byte_tokenizer(special, LLADA_CHAT_TEMPLATE, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>",
                       "<|mdm_mask|>", src)
    return src


def denoising_step(model, batch, seq_len, min_time, tmp, vocab):
    """One full-sequence forward: full precision (DTYPE) vs W8A8 / W4A8 (int8 GEMM) / W4A16, same run.
    Weight-activation variants use RTN weights: the transform (SmoothQuant/QuaRot/DuQuant) changes
    accuracy, not the GEMM a step runs (online transforms are timed by `dllmq bench`)."""
    import dllmq
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    fp = dllmq.load(model, dtype=DTYPE)
    x[torch.rand(batch, seq_len, generator=g) < 0.5] = fp.mask_token_id
    with torch.no_grad():
        base = median_ms(lambda: fp(x), min_time)
    res = {STEP_BASE: base}
    for label, w, a, gs in [("W8A8 int8 GEMM", 8, 8, None), ("W4A8 int8 GEMM", 4, 8, None),
                            ("W4A8 g128", 4, 8, 128), ("W4A16 g128", 4, 16, 128)]:
        out = Path(tmp) / label.replace(" ", "-")
        qcfg = QuantizationConfig("rtn", WeightSpec(w, True, "channel" if gs is None else "group", gs),
                                  ActSpec(a), ignore=[r"model\.transformer\.ff_out"])
        quantize(model, qcfg, out, overwrite=True, show_progress=False)
        m = dllmq.load(out, dtype=DTYPE)  # the default load: no dense copies of large layers kept
        with torch.no_grad():  # alternating with the full-precision step, so that load drift hits both
            res[label] = paired_ratio(lambda: fp(x), lambda: m(x), min_time)
        del m
    del fp
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
    ap.add_argument("--no-step", action="store_true", help="layers only, skip the denoising-step models")
    ap.add_argument("--before", action="store_true",
                    help="also time W4A8 g128 int8_act with its int8 weight rebuilt on every call (the old default)")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="activation dtype of the baseline and the quantized layers (auto: dllmq's runtime default, "
                         "bfloat16 where the CPU computes it natively, else float32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a machine shared with other jobs")
    args = ap.parse_args()
    import tempfile

    if args.threads:
        torch.set_num_threads(args.threads)
    from dllmq.runtime.loader import default_dtype

    set_dtype(default_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype))

    shapes = {k: v for i, (k, v) in enumerate(LLADA_8B.items()) if not args.quick or i == 0}
    layers = layer_rows(shapes, args.rows, args.min_time, before=args.before)
    steps = {}
    if not args.no_step:
        with tempfile.TemporaryDirectory() as d:
            steps = {f"bundled tiny (d 384, batch {args.step_batch})": denoising_step("tiny", args.step_batch, args.step_seq, args.min_time,
                                                            d, 4000),
                     "LLaDA-8B block shapes (d 4096, 2 blocks)": denoising_step(
                         str(wide_model(d)), 1, args.step_seq, args.min_time, d, 4000)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"layers": layers, "denoising_step": steps,
                                                         "torch": torch.__version__,
                                                         "threads": torch.get_num_threads(),
                                                         "cpu": native.cpu_description()}, indent=2))
    # one row per (layer, variant), one column per row count: time / bf16 F.linear [kernel picked]
    all_rows = list(dict.fromkeys(r["rows"] for r in layers))
    lines = [f"{native.cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"fused CPU kernels: {native.status()}", "",
             "| layer | variant | " + " | ".join(f"{m} rows" for m in all_rows) + " |",
             "|" + "---|" * (len(all_rows) + 2)]
    for lab in dict.fromkeys(r["layer"] for r in layers):
        rs = {r["rows"]: r for r in layers if r["layer"] == lab}
        names = [c for c in dict.fromkeys(c for r in rs.values() for c in r)
                 if c not in ("layer", "rows") and not c.endswith(" kernel")]
        for c in names:
            cells = []
            for m in all_rows:
                v, kern = rs.get(m, {}).get(c), rs.get(m, {}).get(c + " kernel")
                cell = (f"{v:.1f} ms" if c == BASE else f"{v:.2f}") if isinstance(v, float) else "-"
                cells.append(f"{cell} [{kern}]" if kern else cell)
            lines.append(f"| {lab} | {c} | " + " | ".join(cells) + " |")
    for name, step in steps.items():
        fp = BASE.split()[0]
        lines += ["", f"Denoising step, {name}: {fp} = {step[STEP_BASE]:.1f} ms; ratios (lower is faster):", ""]
        lines += [f"| variant | time / {fp} |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in step.items()
                                                                 if k != STEP_BASE]
    lines += ["", f"Crossovers (rows where each kernel stops / starts beating {BASE.split()[0]} F.linear):", ""]
    lines += [f"- {c}" for c in crossovers(layers)]
    md = "\n".join(lines)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
