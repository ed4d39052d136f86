"""Options and helpers shared by every `dllmq` command: the same flag means the same thing everywhere."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..errors import UserError


# Shared options: the same flag means the same thing in every command.
ModelArg = typer.Argument(None, help="Model folder, Hub id (e.g. GSAI-ML/LLaDA-8B-Instruct) or 'tiny' (bundled default).")
DeviceOpt = typer.Option("cpu", "--device", help="Compute device: cpu, cuda, cuda:1 ...")
DtypeOpt = typer.Option("auto", "--dtype", help="Activation/compute dtype: auto (default: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 on other CPUs, where bf16 is emulated and ~5x slower), bfloat16, float16 or float32.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of tables.")
SeedOpt = typer.Option(0, "--seed", help="Random seed for sampling and Monte-Carlo estimates.")
StepsOpt = typer.Option(64, "--steps", help="Denoising steps (one full forward each).")
GenLenOpt = typer.Option(64, "--gen-length", help="Number of tokens to generate.")
BlockLenOpt = typer.Option(32, "--block-length", help="Semi-autoregressive block length (LLaDA); must divide --gen-length.")
RevisionOpt = typer.Option(None, "--revision", help="Which version of MODEL to download when it is a Hub id: a branch, tag or commit (default: main).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show every layer in the per-layer table (default: the worst layers by error, the mean and totals).")
FastOpt = typer.Option(False, "--fast", help="Fast decoding: dual block KV cache + confidence-threshold parallel decoding (= --cache dual --threshold 0.9).")
CacheOpt = typer.Option(None, "--cache", help="Approximate block KV cache: none, prefix or dual (refreshed at each block start).")
ThresholdOpt = typer.Option(None, "--threshold", help="Parallel decoding: commit every masked token of the block whose confidence exceeds this (e.g. 0.9).")


# One name per concept across commands (issue 16). The old names keep working as hidden options, so that
# scripts don't break: old flag -> new flag. `deprecated_alias` declares one, `take_alias` merges it.
DEPRECATED_FLAGS = {
    "--calib-seqlen": "--calib-seq-len",  # quantize
    "--samples": "--calib-samples",       # inspect
    "--seq-len": "--calib-seq-len",       # inspect (bench and eval keep --seq-len: not calibration)
    "--batch": "--batch-size",            # bench
}


def deprecated_alias(old: str):
    """A hidden option for the old name `old` of DEPRECATED_FLAGS[old] (None when not given)."""
    return typer.Option(None, old, hidden=True, help=f"Deprecated: use {DEPRECATED_FLAGS[old]}.")


def take_alias(ctx, name: str, old_value, old: str):
    """The value of parameter `name`, or of its deprecated flag `old` when that was given instead
    (both at once is refused). Returns (value, used_old)."""
    if old_value is None:
        return ctx.params[name], False
    src = ctx.get_parameter_source(name)
    if getattr(src, "name", str(src)) == "COMMANDLINE":
        raise UserError(f"{old} is the old name of {DEPRECATED_FLAGS[old]}; give only {DEPRECATED_FLAGS[old]}")
    return old_value, True


def note_deprecated(*olds: str) -> None:
    """One stderr line per deprecated flag used (stdout, e.g. --json, stays clean)."""
    from ..ui import err_console

    for old in olds:
        err_console.print(f"[yellow]note:[/yellow] {old} is deprecated; use {DEPRECATED_FLAGS[old]}",
                          highlight=False, soft_wrap=True)


def _fast_settings(fast: bool, cache: Optional[str], threshold: Optional[float]) -> dict:
    """--fast/--cache/--threshold -> GenerationConfig fields (explicit options win over --fast)."""
    if cache is not None and cache not in ("none", "prefix", "dual"):
        raise UserError(f"--cache must be none, prefix or dual, got {cache!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    out = {"cache": "dual", "threshold": 0.9} if fast else {}
    if cache is not None:
        out["cache"] = cache
    if threshold is not None:
        out["threshold"] = threshold
    return out


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def check_sampler(steps: int, gen_length: int, block_length: int) -> None:
    if gen_length <= 0 or steps <= 0 or block_length <= 0:
        raise UserError("--steps, --gen-length and --block-length must be positive")
    if gen_length % block_length:
        raise UserError(f"--block-length {block_length} must divide --gen-length {gen_length}")
    if steps % (gen_length // block_length):
        raise UserError(f"--steps {steps} must be a multiple of the number of blocks ({gen_length // block_length})")
