"""`dllmq quantize`: a thin mapping from flags onto a recipe (dllmq/recipe.py), then the one call path that runs it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..ui import human_bytes, layer_table, out_console
from .options import (
    JsonOpt, ModelArg, RevisionOpt, SeedOpt, VerboseOpt, _emit_json, deprecated_alias, note_deprecated,
    take_alias,
)
from ..validation import METHOD_NAMES, WEIGHT_ACT_METHODS

# the method list of --help, from the registry's static mirror (tests/test_reliability.py checks it against METHODS)
METHODS_HELP = (f"weight-only: {', '.join(n for n in METHOD_NAMES if n not in WEIGHT_ACT_METHODS)} (rtn needs no "
                f"calibration); weight-activation, with --a 8 or 4: {', '.join(WEIGHT_ACT_METHODS)}.")


def quantize(
    ctx: typer.Context,
    model: Optional[str] = ModelArg,
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe file (YAML or JSON: method, weights, activations, calibration, options, ...; see examples/recipe.yaml). Flags given explicitly override its fields. `dllmq.quantize(MODEL, RECIPE)` runs the same recipe from Python."),
    method: str = typer.Option("rtn", "--method", "-m", help=METHODS_HELP),
    w: int = typer.Option(4, "--w", help="Weight bits: 2, 3, 4 or 8."),
    a: int = typer.Option(16, "--a", help="Activation bits: 16 (not quantized), 8 or 4 (dynamic per token)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Weights per scale along the input dim; -1 = one scale per output channel. Default: the method's paper setting (128 for rtn/gptq/awq, per channel for smoothquant/quarot/duquant)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric (zero point 0) or asymmetric weight quantization. Default: the method's paper setting (asymmetric for awq, smoothquant, duquant)."),
    ignore: List[str] = typer.Option([], "--ignore", help="Regex (full match on full layer names) to keep in full precision, repeatable; e.g. 'model\\.transformer\\.blocks\\.0\\..*'. The LM head is always kept."),
    calib: str = typer.Option("bundled", "--calib", help="Calibration text: bundled (offline), a .txt/.jsonl file, or a Hub dataset (wikitext2, c4, pile-val, gsm8k, or path[:config[:split]])."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Number of calibration samples (prompts for TMAS)."),
    calib_seqlen: int = typer.Option(128, "--calib-seq-len", help="Tokens per calibration sample."),
    calib_seqlen_old: Optional[int] = deprecated_alias("--calib-seqlen"),
    calib_mask: str = typer.Option("tmas", "--calib-mask", help="What the model sees: none (clean text), random (one mask ratio per sample), tmas (states of the model's own sampler across denoising time)."),
    tmas_proportions: str = typer.Option("0.3,0.2,0.2,0.3", "--tmas-proportions", help="Share of states drawn from each equal span of denoising steps (the number of values is the number of segments)."),
    tmas_states: int = typer.Option(4, "--tmas-states", help="States drawn per prompt."),
    tmas_gen_length: int = typer.Option(64, "--tmas-gen-length", help="Tokens the sampler generates per calibration prompt."),
    tmas_block_length: int = typer.Option(32, "--tmas-block-length", help="Sampler block length for TMAS."),
    tmas_steps: int = typer.Option(64, "--tmas-steps", help="Sampler steps for TMAS."),
    cgq: Optional[bool] = typer.Option(None, "--cgq/--no-cgq", help="Certainty-guided GPTQ: weight the Hessian's tokens by mask state and full-precision confidence (with GPTQ rounding)."),
    cgq_masked: Optional[float] = typer.Option(None, "--cgq-masked", help="CGQ indicator value for masked tokens (default 1.0)."),
    cgq_visible: Optional[float] = typer.Option(None, "--cgq-visible", help="CGQ indicator value for visible tokens (default 0.7)."),
    w_quantizer: Optional[str] = typer.Option(None, "--w-quantizer", help="For awq, smoothquant, quarot, duquant: how the transformed weights are rounded: rtn or gptq. Default: the paper's (gptq for quarot, rtn otherwise)."),
    a_sym: Optional[bool] = typer.Option(None, "--a-sym/--a-asym", help="Symmetric or asymmetric (zero point per token) activation quantization. Default: the method's paper setting (asymmetric for smoothquant and duquant, symmetric otherwise)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize attention keys (after RoPE) and values per token and head: 4, 8 or 16 (= not quantized). Default: the method's paper protocol (the activation bits for smoothquant, quarot, duquant; 16 otherwise)."),
    a_clip: Optional[float] = typer.Option(None, "--a-clip", help="Activation clipping ratio for --a 8/4. Default: the paper's (0.9 for duquant, 1.0 otherwise)."),
    w_clip: Optional[float] = typer.Option(None, "--w-clip", help="Weight clipping ratio of the min-max range for smoothquant/quarot/duquant. Default: the paper's (0.8 for duquant, 1.0 otherwise)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SmoothQuant / DuQuant migration strength (default 0.5)."),
    ia_aq: Optional[bool] = typer.Option(None, "--ia-aq/--no-ia-aq", help="DLLMQuant's interaction-aware activation quantization: quantize the attention values V (at --kv-bits, or the activation bits when K/V stay 16-bit) with a per-layer clip ratio in [0.8, 1] chosen to minimise the error of softmax·V on calibration inputs."),
    duquant_block: Optional[int] = typer.Option(None, "--duquant-block", help="DuQuant rotation block size (default 128)."),
    duquant_steps: Optional[int] = typer.Option(None, "--duquant-steps", help="DuQuant greedy rotation steps (default 256)."),
    scale_search: Optional[str] = typer.Option(None, "--scale-search", help="How weight scales are chosen: minmax (each group's range) or mse (each group's clipping searched to minimise the rounding error). Default: mse for gptq, minmax for the others (RTN stays the papers' baseline)."),
    damp: Optional[float] = typer.Option(None, "--damp", help="GPTQ dampening, as a fraction of the mean Hessian diagonal (default 0.01; raised automatically if Cholesky fails)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by descending Hessian diagonal (static groups keep scales aligned)."),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Quantize q/k/v, o, gate/up, down one group after another inside each block, each seeing the quantized outputs of the previous."),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="Keep cached calibration activations on disk here instead of in memory."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished block (same arguments)."),
    seed: int = SeedOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: ./<model>-w<W>a<A>-<method>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    device: str = typer.Option("auto", "--device", help="Compute device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype of the block computations during calibration: auto (default: bfloat16 for GPTQ on hardware with native bf16, i.e. CUDA or AVX512-BF16/AMX CPUs, as AutoGPTQ runs the model in its 16-bit dtype; float32 otherwise and for the methods that rewrite weights), float32, bfloat16 or float16. RTN and GPTQ always quantize the weights as stored; AWQ/SmoothQuant/QuaRot/DuQuant transform them in this dtype."),
    revision: Optional[str] = RevisionOpt,
    verbose: bool = VerboseOpt,
    json_out: bool = JsonOpt,
):
    """Quantize MODEL and write a packed low-bit checkpoint.

    Examples:
      [bold]dllmq quantize GSAI-ML/LLaDA-8B-Instruct --method gptq --w 4 --group-size 128 --calib-mask tmas --cgq[/bold]
      [bold]dllmq quantize tiny --method awq --w 4 --group-size 32 --w-quantizer gptq[/bold]
      [bold]dllmq quantize tiny --recipe examples/recipe.yaml --w 8[/bold]  (flags override the recipe's fields)
    """
    from ..recipe import CLI_FIELDS, FIELD_FLAGS, Recipe
    from ..recipe import run as run_recipe
    from ..validation import parse_proportions

    # Every flag is a recipe field (recipe.CLI_FIELDS): the recipe file (or the defaults) with the flags given
    # on the command line on top, then one call path, the same as dllmq.quantize(MODEL, RECIPE).
    values = dict(ctx.params)
    values["calib_seqlen"], old_seqlen = take_alias(ctx, "calib_seqlen", calib_seqlen_old, "--calib-seqlen")
    explicit = {k for k in CLI_FIELDS if k in values and _from_command_line(ctx, k)} | ({"calib_seqlen"} if old_seqlen else set())
    base = Recipe.from_file(recipe) if recipe is not None else Recipe()
    overrides = {}
    for k in sorted(explicit):
        v = values[k]
        if k == "tmas_proportions":
            v = list(parse_proportions(v))
        elif k == "ignore":
            v = list(v)
        overrides[CLI_FIELDS[k]] = v
    if "seed" in explicit and "seed" in base.options:
        base.options.pop("seed")  # --seed also seeds the method (QuaRot's rotation), as without a recipe
    style = "cli" if recipe is None else "recipe"
    # the cheap checks first, before torch is imported: a simple mistake is answered at once
    # the shared checks name the old --calib-seqlen; say the flag the user typed
    new_name = (lambda msg: msg) if old_seqlen else (lambda msg: msg.replace("--calib-seqlen", "--calib-seq-len"))
    try:
        rec = base.override(overrides, display=lambda f: new_name(FIELD_FLAGS.get(f, f))).resolve(style)
    except UserError as e:
        raise type(e)(new_name(str(e))) from None
    if old_seqlen:
        note_deprecated("--calib-seqlen")
    if revision is not None:  # only a Hub download has revisions: never ignore it silently
        from ..models.loading import BUNDLED_MODELS

        name = model or "tiny"
        if name in BUNDLED_MODELS or name == "tiny-outliers" or Path(name).expanduser().exists():
            raise UserError(f"--revision picks a version of a Hub model; {name} is "
                            f"{'a local folder' if Path(name).expanduser().exists() else 'bundled'}: drop --revision")
        if not revision.strip():
            raise UserError("--revision must name a branch, tag or commit of the Hub model, e.g. --revision main")
    from ..validation import check_calib_source

    check_calib_source(rec.calibration.source)  # a local --calib file: UTF-8 text, a .jsonl of objects
    cmd = "dllmq " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    from ..runtime.memory import peak_rss_bytes

    res = run_recipe(model or "tiny", rec, out, overwrite=overwrite, device=device, revision=revision,
                     offload_dir=offload_dir, resume=resume, show_progress=not json_out, command=cmd, style=style,
                     resolved=True)
    src = res.source
    method, a = rec.method, rec.activations.bits
    wspec = rec.quantization_config([]).weights
    size = sum(f.stat().st_size for f in res.out.iterdir() if f.suffix == ".safetensors")
    src_size = sum(f.stat().st_size for f in src.iterdir() if f.suffix == ".safetensors")
    summary = {
        "out": str(res.out), "method": method, "weights": wspec.describe(), "activations": a,
        "layers": len(res.layers), "seconds": round(res.seconds, 2), "bytes": size, "source_bytes": src_size,
        "mean_rel_error": sum(r.rel_error for r in res.layers) / max(1, len(res.layers)),
        "calibration": res.calibration, "peak_rss_bytes": peak_rss_bytes(),
    }
    if json_out:
        _emit_json({**summary, "per_layer": [r.__dict__ for r in res.layers]})
        return
    kind = res.layers[0].error_kind if res.layers else "weight"
    layer_table(f"Per layer ({kind} error relative to full precision)", [r.__dict__ for r in res.layers], verbose)
    out_console.print(
        f"[green]wrote[/green] {res.out}  ({human_bytes(size)} vs {human_bytes(src_size)} full precision, "
        f"{len(res.layers)} layers, {res.seconds:.1f} s, peak memory {human_bytes(summary['peak_rss_bytes'])})"
    )


def _from_command_line(ctx, name: str) -> bool:
    """Was the parameter given on the command line (not left at its default)? Works with click and typer's copy."""
    src = ctx.get_parameter_source(name)
    return getattr(src, "name", str(src)) == "COMMANDLINE"
