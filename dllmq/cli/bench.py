"""`dllmq bench`: speed and memory of a checkpoint against full precision, measured in one run."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import UserError
from ..ui import human_bytes, out_console, table
from ..validation import resolve_device, torch_dtype
from .options import (
    BlockLenOpt, DeviceOpt, DtypeOpt, GenLenOpt, JsonOpt, StepsOpt, _emit_json,
    check_sampler, deprecated_alias, note_deprecated, take_alias,
)


def bench(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A dllmq checkpoint (or any model folder / Hub id / 'tiny')."),
    against: Optional[str] = typer.Option(None, "--against", help="Full-precision reference (default: the checkpoint's base model)."),
    batch: int = typer.Option(1, "--batch-size", help="Sequences per denoising step / generation batch."),
    batch_old: Optional[int] = deprecated_alias("--batch"),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence in the denoising-step timing."),
    rows: int = typer.Option(256, "--rows", help="Input rows for the per-layer GEMM timings."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per measurement (medians are reported)."),
    steps: int = StepsOpt,
    gen_length: int = GenLenOpt,
    block_length: int = BlockLenOpt,
    fast: bool = typer.Option(True, "--fast/--no-fast", help="Also time the fast sampler (dual KV cache + threshold 0.9)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (CPU: a fresh subprocess per model)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Speed and memory of MODEL against its full-precision base, measured in one run (alternating, medians).

    Example: [bold]dllmq bench ./tiny-w8a8 --seq-len 256 --rows 512[/bold]
    """
    from ..validation import check_device_name, check_dtype_name

    # the cheap checks first, before torch is imported
    batch, old_batch = take_alias(ctx, "batch", batch_old, "--batch")
    for flag, v in (("--batch" if old_batch else "--batch-size", batch), ("--seq-len", seq_len), ("--rows", rows),
                    ("--repeats", repeats)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    check_sampler(steps, gen_length, block_length)
    check_dtype_name(dtype)
    check_device_name(device)
    if old_batch:
        note_deprecated("--batch")

    from ..evaluation.speed import bench as run_bench
    from ..evaluation.speed import size_ratio_text, throughput_ratio_text, time_ratio_text

    res = run_bench(model, against=against, batch=batch, seq_len=seq_len, gen_length=gen_length, steps=steps,
                    block_length=block_length, rows=rows, repeats=repeats, fast=fast, memory=memory,
                    device=resolve_device(device), dtype=torch_dtype(dtype, resolve_device(device)), show_progress=not json_out)
    if json_out:
        _emit_json(res)
        return
    names = list(res["models"])
    r = res["ratios"]
    rows_out = [["denoising step (ms)"] + [f"{res['step_ms'][k]:.2f}" for k in names]
                + [time_ratio_text(r.get("step_time"))]]
    rows_out.append(["generation (tok/s)"] + [f"{res['generation_tok_s'][k]:.1f}" for k in names]
                    + [throughput_ratio_text(r.get("generation_tok_s"))])
    if any(f"{k} --fast" in res["generation_tok_s"] for k in names):
        rows_out.append(["generation --fast (tok/s)"] + [f"{res['generation_tok_s'][k + ' --fast']:.1f}" for k in names]
                        + [throughput_ratio_text(r.get("fast_quantized_vs_plain_fp")) + " (vs plain fp)"
                           if r.get("fast_quantized_vs_plain_fp") else "-"])
    rows_out.append(["resident weights"] + [human_bytes(res["resident_weight_bytes"][k]) for k in names]
                    + [size_ratio_text(r.get("resident_weight_bytes"))])
    if res.get("peak_bytes"):
        rows_out.append(["peak memory (step)"] + [human_bytes(res["peak_bytes"][k]) if res["peak_bytes"].get(k) else "-"
                                                  for k in names] + [size_ratio_text(r.get("peak_bytes"))])
    dt = str(res["config"].get("dtype", "")).replace("torch.", "")
    table(f"Speed and memory ({', '.join(filter(None, [res['config']['device'], dt]))}, batch {batch}, seq {seq_len}; medians of {repeats})",
          ["measure"] + names + ["quantized vs full precision"], rows_out)
    if res["config"].get("native_cpu_kernels") and res["config"]["device"] == "cpu":
        out_console.print(f"Fused CPU kernels: {res['config']['native_cpu_kernels']}; CPU: {res['config'].get('cpu')}",
                          highlight=False)
    if "fast_vs_plain_quantized" in r:
        out_console.print(f"--fast vs plain sampler (quantized): "
                          f"{throughput_ratio_text(r['fast_vs_plain_quantized'])}", highlight=False)
    if res.get("layers"):
        table(f"Per layer type ({rows} rows)", ["layer", "shape", "kernel", "full precision (ms)", "quantized (ms)",
                                                 "quantized vs full precision"],
              [[x["layer"], x["shape"], x["kernel"], f"{x['fp_ms']:.3f}", f"{x['q_ms']:.3f}",
                time_ratio_text(x["ratio"])] for x in res["layers"]])
