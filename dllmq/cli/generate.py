"""`dllmq generate`: diffusion sampling from a full-precision model or a dllmq checkpoint, one prompt."""

from __future__ import annotations

import shlex
import time
from typing import List, Optional

import typer

from ..errors import UserError
from ..ui import err_console, out_console
from ..validation import resolve_device, torch_dtype
from .options import (
    BlockLenOpt, CacheOpt, DeviceOpt, DtypeOpt, FastOpt, GenLenOpt, JsonOpt, SeedOpt, StepsOpt, ThresholdOpt,
    _emit_json, _fast_settings, check_sampler,
)


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
    from ..validation import check_device_name, check_dtype_name, check_finite

    # the cheap checks first, before torch is imported
    if ctx.args:
        words = " ".join([prompt, *ctx.args])
        raise UserError(f"generate takes one PROMPT, got {1 + len(ctx.args)} arguments after MODEL; quote the prompt: "
                        f"dllmq generate {shlex.quote(model)} {shlex.quote(words)}")
    if remasking not in ("low_confidence", "random"):
        raise UserError(f"--remasking must be low_confidence or random, got {remasking!r}")
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise UserError(f"--alg must be origin, maskgit_plus, topk_margin or entropy, got {alg!r}")
    check_sampler(steps, gen_length, block_length)
    check_finite("--temperature", temperature, lo=0.0)
    check_dtype_name(dtype)
    check_device_name(device)
    if _fast_settings(fast, cache, threshold) and temperature > 0:
        raise UserError("--fast/--cache/--threshold decode greedily: drop --temperature")

    from ..diffusion.generation import GenerationConfig, generate as gen
    from ..models.loading import load_tokenizer
    from ..runtime.loader import load

    m = load(model, device=resolve_device(device), dtype=torch_dtype(dtype, resolve_device(device)))
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
