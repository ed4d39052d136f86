"""Fast decoding for masked diffusion LMs: a block-wise approximate KV cache and confidence-threshold parallel
decoding (after Fast-dLLM, arXiv 2505.22618; see ../shared/reference/dllm-models.md section 3).

Why it is approximate: attention is bidirectional, so the keys/values of every position change whenever any
token changes. Within one semi-autoregressive block, though, the prefix (and the still-masked suffix) change
little, so the sampler runs one full forward when a block starts (filling the cache) and then, for the
block's remaining steps, a forward over the block only (dual cache: prefix and suffix keys/values reused) or
over the block and everything after it (prefix cache). The cache is refreshed at every block start.

Parallel decoding: instead of a fixed number of tokens per step, commit every masked token of the current
block whose confidence (probability of its argmax) exceeds `threshold`, and at least the most confident one,
so a block takes as many steps as the model needs.

`fast_generate` works for every family (it needs only `window_logits`, which undoes Dream's logit shift);
for Dream it is block-wise, as Fast-dLLM's Dream variant is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from ..models.layers import AttentionCore
from .sampling import _ban_mask_token, _prep_prompt, _to_float, num_transfer_tokens

CACHE_MODES = ("none", "prefix", "dual")


class KVCache:
    """Per-layer keys/values of the last full forward; splices a window's fresh keys/values into them."""

    def __init__(self):
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.window: Optional[tuple[int, int]] = None  # None: full forward (fill)

    def update(self, core: AttentionCore, k: torch.Tensor, v: torch.Tensor):
        key = id(core)
        if self.window is None:
            self.store[key] = (k, v)
            return k, v
        s, e = self.window
        ck, cv = self.store[key]
        if e - s != k.shape[2]:  # pragma: no cover - a caller bug, not a user error
            raise RuntimeError(f"window [{s},{e}) does not match {k.shape[2]} new positions")
        k = torch.cat([ck[:, :, :s], k, ck[:, :, e:]], dim=2)
        v = torch.cat([cv[:, :, :s], v, cv[:, :, e:]], dim=2)
        return k, v


@contextmanager
def kv_cache(model):
    """Install one KVCache on every attention core of `model` for the duration of a generation."""
    cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    cache = KVCache()
    for c in cores:
        c.kv_cache = cache
    try:
        yield cache
    finally:
        for c in cores:
            c.kv_cache = None


def _window_forward(model, x, am, cache: KVCache, start: int, end: int) -> torch.Tensor:
    """Aligned logits of [start, end) with the other positions' keys/values from the cache."""
    ws = max(start - 1, 0) if model.arch.logits_shifted else start
    cache.window = (ws, end)
    try:
        return model.window_logits(x, start, end, am)
    finally:
        cache.window = None


@torch.no_grad()
def fast_generate(model, prompt: torch.Tensor, steps: int = 64, gen_length: int = 64, block_length: int = 32,
                  cache: str = "dual", threshold: Optional[float] = 0.9, attention_mask=None,
                  eos_id: Optional[int] = None, on_step=None) -> torch.Tensor:
    """Semi-autoregressive block decoding with an approximate KV cache and/or confidence-threshold commits.

    cache: "none" (full forward every step), "prefix" (window = current block + suffix) or "dual" (window =
    current block). threshold: None keeps LLaDA's fixed linear schedule (steps // blocks per block);
    a float commits every masked token of the block above it (at least one per step), so `steps` is unused.
    Greedy (temperature 0), low-confidence order, as LLaDA's default. Returns [B, Lp + gen_length].
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if threshold is None and steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    mask_id = model.mask_token_id
    x, am, lp = _prep_prompt(prompt, attention_mask, gen_length, mask_id)
    b = x.shape[0]
    n_forward = 0
    ctx = kv_cache(model) if cache != "none" else _null()
    with ctx as kv:
        for nb in range(num_blocks):
            s, e = lp + nb * block_length, lp + (nb + 1) * block_length
            schedule = None if threshold is not None else num_transfer_tokens(x[:, s:e] == mask_id, steps // num_blocks)
            i = 0
            while bool((x[:, s:e] == mask_id).any()):
                if cache == "none" or i == 0:  # block start: full forward (refreshes the cache)
                    logits = model.aligned_logits(x, am)[:, s:e]
                elif cache == "dual":
                    logits = _window_forward(model, x, am, kv, s, e)
                else:  # prefix: the block and everything after it are recomputed
                    logits = _window_forward(model, x, am, kv, s, x.shape[1])[:, : e - s]
                n_forward += 1
                masked = x[:, s:e] == mask_id
                lf = _to_float(logits).clone()
                _ban_mask_token(lf.view(-1, lf.shape[-1]), mask_id)
                probs = torch.softmax(lf, dim=-1)
                conf, x0 = probs.max(dim=-1)
                conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
                if threshold is not None:
                    commit = masked & (conf > threshold)
                    best = conf.argmax(dim=1)
                    commit[torch.arange(b), best] |= masked[torch.arange(b), best]
                else:
                    k = schedule[:, min(i, schedule.shape[1] - 1)]
                    commit = torch.zeros_like(masked)
                    for j in range(b):
                        kj = min(int(k[j]), int(masked[j].sum()))
                        if i >= schedule.shape[1] - 1:
                            kj = int(masked[j].sum())  # last scheduled step: finish the block
                        if kj > 0:
                            commit[j, torch.topk(conf[j], kj).indices] = True
                    commit &= masked
                blk = x[:, s:e]
                blk[commit] = x0[commit]
                x[:, s:e] = blk
                if on_step is not None:
                    on_step({"block": nb, "block_step": i, "committed": int(commit.sum()), "forward": n_forward})
                i += 1
    fast_generate.last_forwards = n_forward  # for benchmarks: forwards of the last call
    return x


@contextmanager
def _null():
    yield None
