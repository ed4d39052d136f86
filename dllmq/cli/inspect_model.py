"""`dllmq inspect`: activation outliers per layer (what makes a model hard to quantize)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..ui import err_console, table
from ..validation import resolve_device, torch_dtype
from .options import (
    DeviceOpt, DtypeOpt, JsonOpt, SeedOpt, _emit_json, deprecated_alias, note_deprecated,
    take_alias,
)


def inspect(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, Hub id, 'tiny', or a dllmq checkpoint."),
    samples: int = typer.Option(16, "--calib-samples", help="Number of calibration samples (bundled text, randomly masked) to run."),
    seq_len: int = typer.Option(128, "--calib-seq-len", help="Tokens per calibration sample."),
    samples_old: Optional[int] = deprecated_alias("--samples"),
    seq_len_old: Optional[int] = deprecated_alias("--seq-len"),
    k_sigma: float = typer.Option(10.0, "--k-sigma", help="A token carries an outlier if some |x| exceeds K x the layer's RMS."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Show every linear, not only the per-type summary."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Also show the statistics after this weight-activation transform (smoothquant, quarot, duquant), as the quantized layers see them."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG plots (max |x| per block, before/after) into this folder (needs matplotlib: pip install 'dllmq[plot]')."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Activation outlier statistics at every linear input (masked calibration inputs).

    Example: [bold]dllmq inspect tiny --calib-samples 16 --per-layer[/bold]
    """
    import importlib.util
    import math

    from ..validation import METHOD_NAMES, WEIGHT_ACT_METHODS, check_device_name, check_dtype_name

    # the cheap checks first, before torch is imported
    samples, old_samples = take_alias(ctx, "samples", samples_old, "--samples")
    seq_len, old_seq_len = take_alias(ctx, "seq_len", seq_len_old, "--seq-len")
    for flag, v in (("--samples" if old_samples else "--calib-samples", samples),
                    ("--seq-len" if old_seq_len else "--calib-seq-len", seq_len)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib, which is not installed: pip install 'dllmq[plot]' "
                        "(or pip install matplotlib)")
    if not (math.isfinite(k_sigma) and k_sigma > 0):
        raise UserError(f"--k-sigma must be a positive number, got {k_sigma}")
    if method is not None and method not in WEIGHT_ACT_METHODS:
        raise UserError(f"--method {method} does not transform activations; use smoothquant, quarot or duquant"
                        if method in METHOD_NAMES else
                        f"unknown method {method!r}; --method takes smoothquant, quarot or duquant")
    if plot is not None and plot.exists() and not plot.is_dir():
        raise UserError(f"--plot {plot} is a file; give a folder for the PNG plots (it is created if missing)")
    check_dtype_name(dtype)
    check_device_name(device)
    note_deprecated(*[f for f, used in (("--samples", old_samples), ("--seq-len", old_seq_len)) if used])

    from ..calibration.data import bundled_items, encode_items, random_masked
    from ..evaluation.outliers import activation_stats, summarize_by_type
    from ..models.loading import load_tokenizer
    from ..runtime.loader import load

    m = load(model, device=resolve_device(device), dtype=torch_dtype(dtype, resolve_device(device)))
    tok = load_tokenizer(m.source_path)
    ids, maskable = encode_items(tok, bundled_items(samples, seed), seq_len)
    noisy = random_masked(ids, maskable, m.mask_token_id, seed)
    stats = activation_stats(m, list(noisy.split(8)), k_sigma=k_sigma, show_progress=not json_out)
    summary = summarize_by_type(stats, m.arch)
    after = None
    if method:
        import tempfile

        from ..checkpoint.format import QuantizationConfig
        from ..pipeline import CalibOptions
        from ..pipeline import quantize as run
        from ..quantization.methods import get_method
        from ..quantization.spec import ActSpec, WeightSpec

        if not get_method(method).quantizes_activations:
            raise UserError(f"--method {method} does not transform activations; use smoothquant, quarot or duquant")
        with tempfile.TemporaryDirectory() as d:
            # W8A8 keeps the weights nearly exact; what changes is what the linears see
            run(model, QuantizationConfig(method, WeightSpec(8, True, "channel", None), ActSpec(8),
                                          ignore=m.arch.default_ignore()), Path(d) / "t",
                calib=CalibOptions(mask="random", samples=samples, seq_len=seq_len, seed=seed), show_progress=not json_out)
            mt = load(Path(d) / "t", device=resolve_device(device), dtype=torch_dtype(dtype, resolve_device(device)))
            after = activation_stats(mt, list(noisy.split(8)), k_sigma=k_sigma, show_progress=not json_out,
                                     label=f"inspect after {method}")
    if plot:
        from ..evaluation.outliers import plot_stats

        files = plot_stats(stats, after, m.arch, plot, f"{Path(str(model)).name}" + (f" / {method}" if method else ""))
        err_console.print(f"wrote {len(files)} plots to {plot}")
    if json_out:
        _emit_json({"summary": summary, "layers": [s.to_dict() for s in stats],
                    **({"after": {"method": method, "summary": summarize_by_type(after, m.arch)}} if after else {})})
        return
    cols = ["linear", "max |x|", "worst block", "top/median channel", "kurtosis", "outlier tokens"]

    def rows(summ):
        return [[r["linear"], r["max_abs"], r["worst_block"], r["channel_ratio"], r["kurtosis"],
                 f"{100 * r['outlier_token_share']:.1f}%"] for r in summ]

    table("Linear inputs by type (worst block for max |x|)", cols, rows(summary))
    if after:
        table(f"After {method} (what the quantized linears see)", cols, rows(summarize_by_type(after, m.arch)))
    if per_layer:
        table("Per layer", ["layer", "max |x|", "top channels", "top/median", "kurtosis", "outlier tokens"],
              [[s.name, s.max_abs, ",".join(map(str, s.top_channels)), s.channel_ratio, s.kurtosis,
                f"{100 * s.outlier_token_share:.1f}%"] for s in stats])
