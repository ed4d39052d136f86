"""Text generation on a loaded model: `dllmq.load(path).generate("What is 12 + 30?")`.

The model's own tokenizer and chat template (the files next to its weights; a dllmq checkpoint carries its base
model's) wrap and encode the prompts, `dllmq.diffusion.generation.generate` runs the family's sampler, and the
text comes back cut at the first stop token. The same settings as `dllmq generate`.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import UserError

CACHES = ("none", "prefix", "dual")


def check_sampler(steps: int, gen_length: int, block_length: int) -> None:
    for k, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{k} must be a positive integer, got {v!r}")
    if gen_length % block_length:
        raise UserError(f"block_length {block_length} must divide gen_length {gen_length}")
    if steps % (gen_length // block_length):
        raise UserError(f"steps {steps} must be a multiple of the number of blocks ({gen_length // block_length})")


def tokenizer_of(model):
    """The model's tokenizer, loaded once from the folder it was loaded from (cached on the model)."""
    tok = getattr(model, "_dllmq_tokenizer", None)
    if tok is None:
        src = getattr(model, "source_path", None)
        if src is None:
            raise UserError("this model was not loaded from a folder, so it has no tokenizer; load it with "
                            "dllmq.load(path) or pass tokenizer=")
        from .models.tokenizer_loading import load_tokenizer

        tok = load_tokenizer(src)
        object.__setattr__(model, "_dllmq_tokenizer", tok)
    return tok


def generate_text(model, prompt: str | Sequence[str], gen_length: int = 64, steps: int = 64, block_length: int = 32,
                  temperature: float = 0.0, cache: str | None = None, threshold: float | None = None,
                  fast: bool = False, chat: bool | None = None, remasking: str = "low_confidence",
                  alg: str = "entropy", seed: int = 0, batch_size: int = 8, tokenizer=None) -> str | list[str]:
    """Generate a completion for one prompt (-> str) or several (-> list[str], batched).

    gen_length / steps / block_length: tokens to generate, denoising steps, semi-autoregressive block (LLaDA);
    temperature: 0 = greedy; cache ("none", "prefix", "dual") and threshold (e.g. 0.9): fast decoding (greedy);
    fast=True: cache "dual" + threshold 0.9 unless given; chat: wrap in the chat template (default: when the
    tokenizer has one); remasking (LLaDA) / alg (Dream): the sampler's variant; seed: for temperature > 0."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("prompt must be a string or a non-empty list of strings")
    check_sampler(steps, gen_length, block_length)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
    if remasking not in ("low_confidence", "random"):
        raise UserError(f"remasking must be low_confidence or random, got {remasking!r}")
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise UserError(f"alg must be origin, maskgit_plus, topk_margin or entropy, got {alg!r}")
    if cache is not None and cache not in CACHES:
        raise UserError(f"cache must be none, prefix or dual, got {cache!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise UserError(f"threshold must be in [0, 1], got {threshold!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    fs = {"cache": "dual", "threshold": 0.9} if fast else {}
    if cache is not None:
        fs["cache"] = cache
    if threshold is not None:
        fs["threshold"] = float(threshold)
    from .diffusion.generation import GenerationConfig, generate

    cfg = GenerationConfig(steps=steps, gen_length=gen_length, block_length=block_length,
                           temperature=float(temperature), remasking=remasking, alg=alg, chat=chat, seed=seed, **fs)
    if cfg.fast and cfg.temperature > 0:
        raise UserError("fast decoding (cache / threshold) is greedy: use temperature 0")
    tok = tokenizer if tokenizer is not None else tokenizer_of(model)
    texts = [r["text"] for r in generate(model, tok, prompts, cfg, batch_size=batch_size)]
    return texts[0] if single else texts
