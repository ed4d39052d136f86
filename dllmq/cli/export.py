"""`dllmq export`: convert a dllmq checkpoint into another on-disk format (compressed-tensors)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from ..ui import human_bytes, out_console, table
from .options import JsonOpt, _emit_json

FORMATS = ("compressed-tensors",)


def export(
    checkpoint: str = typer.Argument(..., help="A dllmq checkpoint folder (written by `dllmq quantize`)."),
    fmt: str = typer.Option("compressed-tensors", "--format", "-f", help="Target format: compressed-tensors (pack-quantized for weight-only int2-8, int-quantized for W8A8 with dynamic per-token activations)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; must not exist or be empty."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the checkpoint's files against the sha256 in its manifest first."),
    json_out: bool = JsonOpt,
):
    """Export a dllmq checkpoint for compressed-tensors-aware loaders (vLLM, transformers, llm-compressor).

    Weight-only int2-8 checkpoints become pack-quantized, W8A8 ones int-quantized; the rest is copied unchanged.
    Checkpoints that need online transforms (QuaRot, DuQuant, unfolded SmoothQuant scales, IA-AQ) are refused.

    Example:
      [bold]dllmq export ./llada-w4 --format compressed-tensors --out ./llada-w4-ct[/bold]
    """
    # the cheap checks first, before torch is imported
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    src = Path(checkpoint).expanduser()
    if src.exists() and not src.is_dir():
        raise UserError(f"{checkpoint} is a file; pass the checkpoint folder written by `dllmq quantize --out`")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new or empty folder")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; give a new or empty folder")

    from ..checkpoint.export_ct import export_compressed_tensors

    res = export_compressed_tensors(checkpoint, out, verify=verify)
    if json_out:
        _emit_json(res.summary())
        return
    w = res.scheme["weights"]
    g = f"group {w['group_size']}" if w["strategy"] == "group" else w["strategy"]
    acts = res.scheme["input_activations"]
    table(f"{res.out}", ["field", "value"], [
        ["format", res.format],
        ["weights", f"int{w['num_bits']} {'sym' if w['symmetric'] else 'asym'} {g}"],
        ["activations", f"int{acts['num_bits']} dynamic per token" if acts else "not quantized"],
        ["quantized linears", res.quantized_layers],
        ["kept in full precision", ", ".join(res.ignored) or "-"],
    ])
    out_console.print(f"[green]wrote[/green] {res.out}  ({human_bytes(res.bytes)}, {res.seconds:.1f} s)")
