"""The `dllmq` command line.

Every command takes MODEL as a local folder, a Hub id, or `tiny` (the bundled model), prints
tables for people and `--json` for scripts, and turns any user error into one line on stderr
with exit code 2.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import Interrupted, UserError
from ..ui import err_console, fitted_console, human_bytes, layer_table, out_console, table
from .options import (  # noqa: F401  (re-exported for tests and plugins)
    DTYPES, ModelArg, DeviceOpt, DtypeOpt, JsonOpt, SeedOpt, StepsOpt, GenLenOpt, BlockLenOpt,
    RevisionOpt, FastOpt, CacheOpt, ThresholdOpt, VerboseOpt, _fast_settings, _dtype, _device, _emit_json,
    deprecated_alias, note_deprecated, take_alias,
)
from .export import export as export_cmd
from .push import push as push_cmd

app = typer.Typer(
    name="dllmq",
    help="Quantize diffusion language models (LLaDA, Dream) into deployable low-bit checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


from ..recipe import option_flag  # noqa: E402,F401  (the flag of a method option, for error messages)


@app.command()
def quantize(
    ctx: typer.Context,
    model: Optional[str] = ModelArg,
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe file (YAML or JSON: method, weights, activations, calibration, options, ...; see examples/recipe.yaml). Flags given explicitly override its fields. `dllmq.quantize(MODEL, RECIPE)` runs the same recipe from Python."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn (no calibration), gptq, awq; weight-activation: smoothquant, quarot, duquant (need --a 8 or 4)."),
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
    dtype: str = typer.Option("float32", "--dtype", help="Dtype of the block computations during calibration: float32 (default), bfloat16 (AMX/tensor cores: faster) or float16. RTN and GPTQ still quantize the weights as stored; AWQ/SmoothQuant/QuaRot/DuQuant transform them in this dtype."),
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
    from .validate import parse_proportions

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
    from .validate import check_calib_source

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


@app.command()
def info(checkpoint: str = typer.Argument(..., help="A dllmq checkpoint folder (or a full-precision model)."),
         verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file of a dllmq checkpoint against the sha256 in its manifest (reads every byte once)."),
         show_recipe: bool = typer.Option(False, "--recipe", help="Print the recipe this checkpoint was made with, as a file that reproduces the run (YAML; JSON with --json)."),
         verbose: bool = VerboseOpt,
         json_out: bool = JsonOpt):
    """Show a checkpoint's method, specs, sizes and per-layer summary.

    Example: [bold]dllmq info ./llada-w4[/bold]   (or [bold]dllmq info ./llada-w4 --recipe > recipe.yaml[/bold])
    """
    if show_recipe:
        from ..recipe import recipe_of

        rec = recipe_of(checkpoint)
        sys.stdout.write(rec.to_json() if json_out else rec.to_yaml())
        return
    from ..checkpoint.format import MANIFEST, QuantizationConfig
    from ..checkpoint.writer import verify_manifest
    from ..models.loading import parse, read_config, resolve_model_path

    p = resolve_model_path(checkpoint)
    raw = read_config(p)
    arch, cfg = parse(p)
    files = {f.name: f.stat().st_size for f in p.iterdir() if f.is_file()}
    weights_bytes = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    data = {"path": str(p), "family": arch.family, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "weights_bytes": weights_bytes, "quantized": "quantization_config" in raw}
    per_layer = []
    if data["quantized"]:
        q = QuantizationConfig.from_dict(raw["quantization_config"])
        data.update(method=q.method, weights=q.weights.to_dict(), activations=q.activations.to_dict(),
                    kv_cache=q.kv_cache.to_dict(), method_options=q.method_args,
                    online_transforms=len(q.transforms), ignore=q.ignore, quantized_layers=len(q.quantized_layers))
        mf = p / MANIFEST
        if not mf.exists():
            data["verified"] = f"no: {MANIFEST} is missing (not written by dllmq, or incomplete)"
        else:
            if verify:
                m = verify_manifest(p)  # one-line UserError on any mismatch or malformed manifest
                from ..checkpoint.structure import check_folder

                check_folder(p, raw)  # every layer the config describes, with its shapes and dtypes
                data["verified"] = (f"yes: sha256 of {len(m['files'])} files match {MANIFEST}; every layer has the "
                                    "shapes and dtypes its config describes")
            else:
                try:
                    m = json.loads(mf.read_text())
                except (ValueError, OSError):
                    raise UserError(f"{mf} is corrupt; re-create the checkpoint") from None
                if not isinstance(m, dict):
                    raise UserError(f"{mf} is malformed (not a JSON object); re-create the checkpoint")
                data["verified"] = "no (--no-verify): files not checked against the manifest"
            data.update(base_model=m.get("base_model"), command=m.get("command"), created=m.get("created"),
                        tool_version=m.get("tool_version"), calibration=m.get("calibration"))
            per_layer = m.get("layers", []) if isinstance(m.get("layers"), list) else []
    if json_out:
        _emit_json({**data, "per_layer": per_layer})
        return
    con = fitted_console()  # piped: the terminal's width (or 100 columns), not rich's 80 or a fixed 200
    table(f"{p}", ["field", "value"], _info_rows(data, q if data["quantized"] else None), console=con,
          justify="left")
    if per_layer:
        layer_table("Per layer (error relative to full precision)", per_layer, verbose, console=con)


def _info_rows(data: dict, q) -> list[list]:
    """`dllmq info` fields for people: human sizes and specs in words (--json keeps the raw values)."""
    def compact(v):
        if isinstance(v, dict):
            return ", ".join(f"{k}={compact(x)}" for k, x in v.items()) or "-"
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "-"
        return "-" if v is None else v

    def per_token(spec, what: str) -> str:
        if not spec.enabled:
            return "not quantized"
        clip = f", clip {spec.clip_ratio:g}" if spec.clip_ratio < 1 else ""
        return f"int{spec.num_bits} {'sym' if spec.symmetric else 'asym'} dynamic per {what}{clip}"

    names = {"layers": "transformer blocks", "kv_cache": "K/V cache", "hidden_size": "hidden size", "vocab_size": "vocabulary", "weights_bytes": "weights on disk",
             "method_options": "method options", "online_transforms": "online transforms",
             "quantized_layers": "quantized layers", "base_model": "base model", "tool_version": "dllmq version"}
    rows = []
    for k, v in data.items():
        if k == "weights_bytes":
            v = human_bytes(v)
        elif k == "quantized":
            v = "yes" if v else "no (full precision)"
        elif q is not None and k == "weights":
            v = q.weights.describe()
        elif q is not None and k == "activations":
            v = per_token(q.activations, "token")
        elif q is not None and k == "kv_cache":
            v = per_token(q.kv_cache, "token and head") + (", q/k rotated" if q.kv_cache.rotate_qk else "")
        rows.append([names.get(k, k), compact(v)])
    return rows


@app.command(context_settings={"allow_extra_args": True})  # extra words: refused below with a hint to quote
def generate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, Hub id, 'tiny', or a dllmq checkpoint."),
    prompt: str = typer.Argument(..., help="The prompt, as one argument: quote it if it has spaces. A prompt (with its chat template) plus --gen-length must fit the model's maximum sequence length (max_sequence_length / max_position_embeddings in config.json); a longer one is refused, not truncated."),
    steps: int = StepsOpt,
    gen_length: int = GenLenOpt,
    block_length: int = BlockLenOpt,
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; >0 samples with Gumbel noise."),
    remasking: str = typer.Option("low_confidence", "--remasking", help="LLaDA: low_confidence or random."),
    alg: str = typer.Option("entropy", "--alg", help="Dream: origin, maskgit_plus, topk_margin or entropy."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap the prompt in the chat template (default: when the tokenizer has one)."),
    fast: bool = FastOpt,
    cache: Optional[str] = CacheOpt,
    threshold: Optional[float] = ThresholdOpt,
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Generate text by iterative unmasking. A prompt longer than the model's maximum sequence length (less
    --gen-length) is refused with one line, not truncated.

    Example: [bold]dllmq generate tiny "What is 12 + 30?" --steps 64 --gen-length 64 --block-length 32[/bold]
    Fast:    [bold]dllmq generate tiny "What is 12 + 30?" --fast[/bold]
    """
    from .validate import check_device_name, check_dtype_name, check_finite

    # the cheap checks first, before torch is imported
    if ctx.args:
        words = " ".join([prompt, *ctx.args])
        raise UserError(f"generate takes one PROMPT, got {1 + len(ctx.args)} arguments after MODEL; quote the prompt: "
                        f"dllmq generate {shlex.quote(model)} {shlex.quote(words)}")
    if remasking not in ("low_confidence", "random"):
        raise UserError(f"--remasking must be low_confidence or random, got {remasking!r}")
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise UserError(f"--alg must be origin, maskgit_plus, topk_margin or entropy, got {alg!r}")
    _check_sampler(steps, gen_length, block_length)
    check_finite("--temperature", temperature, lo=0.0)
    check_dtype_name(dtype)
    check_device_name(device)
    if _fast_settings(fast, cache, threshold) and temperature > 0:
        raise UserError("--fast/--cache/--threshold decode greedily: drop --temperature")

    from ..diffusion.generation import GenerationConfig, generate as gen
    from ..models.loading import load_tokenizer
    from ..runtime.loader import load

    m = load(model, device=_device(device), dtype=_dtype(dtype))
    tok = load_tokenizer(m.source_path)
    prompts = [prompt]
    _check_prompt_lengths(m, tok, prompts, gen_length, chat)
    fs = _fast_settings(fast, cache, threshold)
    if fs and (temperature > 0):
        raise UserError("--fast/--cache/--threshold decode greedily: drop --temperature")
    cfg = GenerationConfig(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                           remasking=remasking, alg=alg, chat=chat, seed=seed, **fs)
    t0 = time.time()
    res = gen(m, tok, prompts, cfg, show_progress=not json_out)
    dt = time.time() - t0
    if json_out:
        _emit_json({"outputs": [{"prompt": p, "text": r["text"]} for p, r in zip(prompts, res)],
                    "seconds": dt, "config": cfg.to_dict()})
        return
    for p, r in zip(prompts, res):
        out_console.print(f"> {p}", style="bold", markup=False, highlight=False)
        out_console.print(r["text"], markup=False, highlight=False)
    err_console.print(f"[dim]{steps} steps, {dt:.1f} s[/dim]")


def _check_prompt_lengths(m, tok, prompts: List[str], gen_length: int, chat: Optional[bool]) -> None:
    """Refuse (never truncate) a prompt that, with --gen-length, exceeds the model's maximum sequence length."""
    from ..diffusion.generation import encode_prompts

    raw = m.config.raw
    key = next((k for k in ("max_sequence_length", "max_position_embeddings") if k in raw), None)
    limit = raw.get(key) if key else None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return
    if gen_length >= limit:
        raise UserError(f"--gen-length {gen_length} leaves no room for a prompt within the model's maximum sequence "
                        f"length of {limit} tokens ({key} in config.json); lower --gen-length")
    for i, ids in enumerate(encode_prompts(tok, prompts, chat)):
        if len(ids) + gen_length > limit:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            raise UserError(f"{which} is {len(ids)} tokens; with --gen-length {gen_length} that exceeds the model's "
                            f"maximum sequence length of {limit} tokens ({key} in config.json): shorten it to at "
                            f"most {limit - gen_length} tokens or lower --gen-length")


def _check_sampler(steps: int, gen_length: int, block_length: int) -> None:
    if gen_length <= 0 or steps <= 0 or block_length <= 0:
        raise UserError("--steps, --gen-length and --block-length must be positive")
    if gen_length % block_length:
        raise UserError(f"--block-length {block_length} must divide --gen-length {gen_length}")
    if steps % (gen_length // block_length):
        raise UserError(f"--steps {steps} must be a multiple of the number of blocks ({gen_length // block_length})")


@app.command("eval")
def eval_cmd(
    models: List[str] = typer.Argument(..., help="A dllmq checkpoint, a model folder, a Hub id or 'tiny'; with --compare: BASE and CHECKPOINT (models or results files from --output)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks: the bundled tiny-math, tiny-code, tiny-mc ('tiny' = all three) and any lm-eval task (gsm8k, arc_challenge, mmlu ...). Without it: masked-token NLL and agreement."),
    compare: bool = typer.Option(False, "--compare", help="Side-by-side table of two models or two results files, with the delta per task and QDLM's degradation level."),
    against: Optional[str] = typer.Option(None, "--against", help="Full-precision reference (default: the checkpoint's base model)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also evaluate the full-precision reference, side by side. --no-baseline evaluates only MODEL: save it with --output and compare later with `dllmq eval --compare fp.json w4.json`."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (default: the task's preset, e.g. gsm8k 4, mmlu 5)."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="Allow running model-generated code (tiny-code, humaneval, mbpp) in a subprocess with a timeout."),
    apply_chat_template: Optional[bool] = typer.Option(None, "--apply-chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template (Instruct models). Default: on for the tiny tasks, off for lm-eval tasks."),
    mc_num: Optional[int] = typer.Option(None, "--mc-num", help="Monte-Carlo mask draws per likelihood (default: the task's preset, 128 for ARC/HellaSwag/PIQA/WinoGrande, 1 for MMLU; 8 for the NLL)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the task's preset, e.g. gsm8k 256)."),
    gen_length: Optional[int] = typer.Option(None, "--gen-length", help="Tokens to generate (default: the task's preset)."),
    block_length: Optional[int] = typer.Option(None, "--block-length", help="Semi-autoregressive block length (default: the task's preset)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch / requests per likelihood batch."),
    fast: bool = FastOpt,
    cache: Optional[str] = CacheOpt,
    threshold: Optional[float] = ThresholdOpt,
    text: Optional[Path] = typer.Option(None, "--text", help="Text file for the masked-token NLL (default: bundled held-out text)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per NLL window."),
    max_seqs: int = typer.Option(16, "--max-seqs", help="Number of NLL windows."),
    prompts: int = typer.Option(8, "--prompts", help="Number of prompts for the agreement check (0 = skip)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the full results (metrics, settings, versions, timings, sample outputs) to this JSON file."),
    output_format: str = typer.Option("dllmq", "--output-format", help="--output's schema: dllmq (the full results, readable by --compare) or lm-eval (lm-evaluation-harness's results schema: results, configs, versions, n-shot, config; with --tasks)."),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
):
    """Evaluate a model or checkpoint: task accuracy through lm-evaluation-harness, or NLL and agreement.

    Examples:
      [bold]dllmq eval ./tiny-w4 --tasks tiny --allow-code-execution[/bold]
      [bold]dllmq eval ./llada-w4 --tasks gsm8k,arc_challenge --limit 100 --output w4.json[/bold]
      [bold]dllmq eval --compare GSAI-ML/LLaDA-8B-Instruct ./llada-w4 --tasks gsm8k[/bold]
      [bold]dllmq eval ./llada-w4 --tasks gsm8k --no-baseline --output w4.json[/bold]  (full precision not re-run)
      [bold]dllmq eval --compare fp.json w4.json[/bold]
    """
    if compare and len(models) != 2:
        raise UserError("--compare takes two arguments: BASE and CHECKPOINT (models or results files)")
    if not compare and len(models) != 1:
        raise UserError(f"eval takes one model (got {len(models)}); to compare two, add --compare")
    if not baseline and (compare or against):
        raise UserError(f"--no-baseline evaluates MODEL alone; drop {'--compare' if compare else '--against'} "
                        "or --no-baseline")
    if text is not None and not text.is_file():
        raise UserError(f"--text {text}: no such file")
    if limit is not None and limit <= 0:
        raise UserError("--limit must be a positive number of examples")
    for flag, v in (("--mc-num", mc_num), ("--steps", steps), ("--gen-length", gen_length),
                    ("--block-length", block_length), ("--batch-size", batch_size)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if gen_length and block_length and gen_length % block_length:
        raise UserError(f"--block-length {block_length} must divide --gen-length {gen_length}")
    _check_eval_args(seq_len=seq_len, max_seqs=max_seqs, prompts=prompts, num_fewshot=num_fewshot, output=output,
                     device=device, dtype=dtype)
    if output_format not in ("dllmq", "lm-eval") or (output_format == "lm-eval" and (compare or not tasks)):
        raise UserError(f"--output-format takes dllmq or lm-eval, got {output_format!r}" if output_format != "lm-eval"
                        else "--output-format lm-eval writes task results: use it with --tasks, without --compare")
    fs = _fast_settings(fast, cache, threshold)

    from ..diffusion.generation import GenerationConfig
    from ..evaluation.report import compare_models, compare_tasks, comparison_rows, task_table_rows
    from ..evaluation.tasks import parse_tasks

    gcfg = None
    if steps or gen_length or block_length:
        g = GenerationConfig()
        gl = gen_length or g.gen_length
        gcfg = GenerationConfig(steps=steps or gl, gen_length=gl, block_length=block_length or min(g.block_length, gl),
                                seed=seed, **fs)
        _check_sampler(gcfg.steps, gcfg.gen_length, gcfg.block_length)
    names = parse_tasks(tasks) if tasks else None
    if names and not allow_code_execution:
        code = [t for t in names if t in ("tiny-code", "humaneval", "mbpp") or t.startswith(("humaneval", "mbpp"))]
        if code:
            raise UserError(f"{', '.join(code)} run model-generated Python; pass --allow-code-execution to allow it")
    kw = dict(gcfg=gcfg, limit=limit, mc_num=mc_num, allow_exec=allow_code_execution, device=_device(device),
              dtype=_dtype(dtype), batch_size=batch_size, num_fewshot=num_fewshot, chat=apply_chat_template,
              fast=fs or None, show_progress=not json_out)

    if compare:
        entries = [_compare_entry(m, names, kw) for m in models]
        res = {"models": entries, "config": {"tasks": list(entries[0]["tasks"]), "compare": models}}
        _write_output(output, res)
        if json_out:
            _emit_json(_strip_samples(res))
            return
        cols, rows = comparison_rows(entries[0], entries[1])
        if not rows:
            raise UserError("the two results have no task in common; evaluate both on the same --tasks")
        table("Base vs checkpoint (score %, ± standard error; degradation relative to base, as in QDLM)", cols, rows)
        return
    model = models[0]
    if names:
        res = compare_tasks(model, names, against=against, baseline=baseline, **kw)
        if output and output_format == "lm-eval":
            from ..evaluation import lm_eval_schema

            lm_eval_schema.write(output, res)
        else:
            _write_output(output, res)
        if json_out:
            _emit_json(_strip_samples(res))
            return
        cols, rows = task_table_rows(res)
        table("Tasks (score %, ± standard error)", cols, rows)
        return
    g = gcfg or GenerationConfig()
    res = compare_models(model, against=against, text_file=text, seq_len=seq_len, max_seqs=max_seqs,
                         mc_num=mc_num or 8, n_prompts=prompts, steps=g.steps, gen_length=g.gen_length,
                         block_length=g.block_length, seed=seed, device=_device(device), dtype=_dtype(dtype),
                         show_progress=not json_out, baseline=baseline)
    _write_output(output, res)
    if json_out:
        _emit_json(res)
        return
    _print_comparison(res)


def _check_eval_args(*, seq_len: int, max_seqs: int, prompts: int, num_fewshot: Optional[int],
                     output: Optional[Path], device: str, dtype: str) -> None:
    """The cheap checks of `dllmq eval`, before torch is imported."""
    from .validate import check_device_name, check_dtype_name

    check_dtype_name(dtype)
    check_device_name(device)
    for flag, v in (("--seq-len", seq_len), ("--max-seqs", max_seqs)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if prompts < 0:
        raise UserError(f"--prompts must be 0 (skip the agreement check) or more, got {prompts}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if output is not None and output.is_dir():
        raise UserError(f"--output {output} is a folder; give the path of a JSON file to write")


def _compare_entry(arg: str, names: Optional[List[str]], kw: dict) -> dict:
    """One side of --compare: the last model of a results file, or a fresh evaluation of a model."""
    from ..evaluation.report import evaluate_tasks

    p = Path(arg)
    if p.is_file() and p.suffix == ".json":
        try:
            doc = json.loads(p.read_text())
            entry = doc["models"][-1]
            entry["tasks"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{arg} is not a results file from `dllmq eval --tasks ... --output`") from None
        if names:
            entry = dict(entry, tasks={t: r for t, r in entry["tasks"].items() if t in names})
        return dict(entry, label=f"{entry.get('label', 'model')} ({p.name})" if entry.get("label") else p.name)
    if not names:
        raise UserError(f"{arg} is a model: give --tasks to evaluate it (or pass results files from --output)")
    res = evaluate_tasks([(Path(arg).name or arg, arg)], names, **kw)
    return res["models"][0]


def _strip_samples(res: dict) -> dict:
    out = json.loads(json.dumps(res, default=str))
    for m in out.get("models", []):
        for t in m.get("tasks", {}).values():
            t.pop("samples", None)
    return out


def _write_output(path: Optional[Path], res: dict) -> None:
    if path is None:
        return
    import platform

    import torch

    from .._version import __version__

    doc = {**res, "versions": {"dllmq": __version__, "torch": torch.__version__, "python": platform.python_version()},
           "command": "dllmq " + " ".join(shlex.quote(x) for x in sys.argv[1:])}
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"cannot write --output {path}: {e.strerror}") from None


def _print_comparison(res: dict) -> None:
    rows = []
    for r in res["models"]:
        rows.append([r["label"], human_bytes(r["disk_bytes"]), human_bytes(r["resident_weight_bytes"]),
                     r["nll"], r.get("step_agreement", "-"), r.get("agreement", "-"), f"{r['gen_seconds']:.2f}"])
    table("Full precision vs quantized", ["model", "size on disk", "resident weights", "NLL (nats/token)",
                                          "step agreement", "generation agreement", "generate (s)"], rows)


@app.command()
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

    from .validate import METHOD_NAMES, WEIGHT_ACT_METHODS, check_device_name, check_dtype_name

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

    m = load(model, device=_device(device), dtype=_dtype(dtype))
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
            mt = load(Path(d) / "t", device=_device(device), dtype=_dtype(dtype))
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


@app.command()
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
    from .validate import check_device_name, check_dtype_name

    # the cheap checks first, before torch is imported
    batch, old_batch = take_alias(ctx, "batch", batch_old, "--batch")
    for flag, v in (("--batch" if old_batch else "--batch-size", batch), ("--seq-len", seq_len), ("--rows", rows),
                    ("--repeats", repeats)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    _check_sampler(steps, gen_length, block_length)
    check_dtype_name(dtype)
    check_device_name(device)
    if old_batch:
        note_deprecated("--batch")

    from ..evaluation.speed import bench as run_bench
    from ..evaluation.speed import size_ratio_text, throughput_ratio_text, time_ratio_text

    res = run_bench(model, against=against, batch=batch, seq_len=seq_len, gen_length=gen_length, steps=steps,
                    block_length=block_length, rows=rows, repeats=repeats, fast=fast, memory=memory,
                    device=_device(device), dtype=_dtype(dtype), show_progress=not json_out)
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
    table(f"Speed and memory ({res['config']['device']}, batch {batch}, seq {seq_len}; medians of {repeats})",
          ["measure"] + names + ["quantized vs full precision"], rows_out)
    if "fast_vs_plain_quantized" in r:
        out_console.print(f"--fast vs plain sampler (quantized): "
                          f"{throughput_ratio_text(r['fast_vs_plain_quantized'])}", highlight=False)
    if res.get("layers"):
        table(f"Per layer type ({rows} rows)", ["layer", "shape", "kernel", "full precision (ms)", "quantized (ms)",
                                                 "quantized vs full precision"],
              [[x["layer"], x["shape"], x["kernel"], f"{x['fp_ms']:.3f}", f"{x['q_ms']:.3f}",
                time_ratio_text(x["ratio"])] for x in res["layers"]])


@app.command()
def demo(
    out: Path = typer.Option(Path("out/tiny-w4a16-rtn"), "--out", "-o", help="Where to write the quantized demo checkpoint."),
    method: str = typer.Option("rtn", "--method", "-m", help="Method for the demo: rtn, gptq or awq."),
    w: int = typer.Option(4, "--w", help="Weight bits."),
    group_size: int = typer.Option(32, "--group-size", "-g", help="Group size."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Examples per task (default: all)."),
    json_out: bool = JsonOpt,
):
    """Quantize the bundled model and compare it with full precision: task suite, NLL, agreement, size, time.

    Example: [bold]dllmq demo --method gptq --w 4[/bold]
    """
    from ..checkpoint.format import QuantizationConfig
    from ..diffusion.generation import GenerationConfig
    from ..evaluation.report import compare_models, compare_tasks, task_table_rows
    from ..evaluation.tasks import TASKS
    from ..models.loading import read_config, resolve_model_path
    from ..models.registry import arch_for
    from ..pipeline import CalibOptions
    from ..pipeline import quantize as run
    from ..quantization.methods import get_method
    from ..quantization.spec import WeightSpec

    get_method(method)
    arch = arch_for(read_config(resolve_model_path("tiny")))
    qcfg = QuantizationConfig(method=method, weights=WeightSpec(num_bits=w, group_size=group_size),
                              ignore=arch.default_ignore())
    res_q = run("tiny", qcfg, out, overwrite=True, calib=CalibOptions(),
                command=f"dllmq demo --method {method} --w {w} --group-size {group_size}", show_progress=not json_out)
    tasks = compare_tasks(str(out), list(TASKS), against="tiny", gcfg=GenerationConfig(), limit=limit,
                          allow_exec=True, show_progress=not json_out)
    quality = compare_models(str(out), against="tiny", show_progress=not json_out)
    if json_out:
        _emit_json({"quantize_seconds": res_q.seconds, "tasks": _strip_samples(tasks), "quality": quality})
        return
    cols, rows = task_table_rows(tasks)
    table(f"Bundled model: full precision vs {method.upper()} W{w} g{group_size} (accuracy %, ± standard error)",
          cols, rows)
    _print_comparison(quality)


def _export_with_overwrite(cmd):
    """cli/export.py's command plus --overwrite, as on `dllmq quantize`: a non-empty --out is moved aside, the
    export written, and the old folder deleted only once the new one is complete (restored on any failure)."""
    import functools
    import inspect as pyinspect

    @functools.wraps(cmd)
    def export(*args, overwrite: bool = False, **kw):
        out, src = Path(kw["out"]).expanduser(), Path(kw["checkpoint"]).expanduser()
        if not (out.is_dir() and any(out.iterdir())):
            return cmd(*args, **kw)
        if not overwrite:  # as quantize says it
            raise UserError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it or "
                            "choose another --out")
        if src.exists() and (src.resolve() == out.resolve() or out.resolve() in src.resolve().parents):
            raise UserError(f"--out {out} holds the checkpoint itself; --overwrite would delete it: give another --out")
        if out.resolve() in (Path.cwd(), *Path.cwd().parents, Path.home()):
            raise UserError(f"--out {out} is the current folder, one above it or your home; --overwrite would delete "
                            "it: give the export's own folder")
        import shutil

        old = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        try:
            res = cmd(*args, **kw)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True) if out.exists() else None
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return res

    sig = pyinspect.signature(cmd, eval_str=True)
    params = list(sig.parameters.values())
    at = [q.name for q in params].index("out") + 1
    params.insert(at, pyinspect.Parameter(
        "overwrite", pyinspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool,
        default=typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty (the old "
                             "folder is deleted only once the new export is complete).")))
    export.__signature__ = sig.replace(parameters=params)
    export.__annotations__ = {**{q.name: q.annotation for q in params}, "return": sig.return_annotation}
    return export


app.command("export")(_export_with_overwrite(export_cmd))
app.command("push")(push_cmd)


def _show_version(value: bool) -> None:
    if value:
        from .._version import __version__

        out_console.print(f"dllmq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Quantize diffusion language models (LLaDA, Dream) into deployable low-bit checkpoints."""


def _is_click(e: BaseException, kind: str) -> bool:
    """Is `e` click's `kind` (ClickException, Exit, Abort)? typer >= 0.29 ships its own copy of click
    (`typer._click`, with Exit and Abort in `typer.exceptions`), older typer uses click itself; both
    flavours are handled so that a usage error never escapes as a traceback."""
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        mod = sys.modules.get(name)
        cls = getattr(mod, kind, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def _interrupted() -> None:
    err_console.print("[yellow]interrupted[/yellow]: stopped before any checkpoint file was written; nothing was "
                      "kept, rerun the command", highlight=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except Interrupted as e:  # Ctrl-C during quantize: says what was kept and how to continue
        err_console.print(f"[yellow]interrupted:[/yellow] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except UserError as e:  # escaped: a message may hold brackets (pip install 'dllmq[plot]', a regex)
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        if isinstance(e, typer.Exit) or _is_click(e, "Exit"):
            sys.exit(getattr(e, "exit_code", 0))
        if _is_click(e, "ClickException"):  # usage errors: usage line, hint, message
            e.show()
            if getattr(e, "ctx", None) is None:
                err_console.print("Try 'dllmq --help' for help.", highlight=False)
            sys.exit(2)
        if _is_click(e, "Abort"):
            _interrupted()  # older click turns Ctrl-C into Abort
        raise
    # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, returns the code
    if rc == 130:
        _interrupted()
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
