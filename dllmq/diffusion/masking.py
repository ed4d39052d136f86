"""Forward (masking) processes of masked diffusion LMs, plus the helpers shared by sampling and likelihood.

Conventions used throughout `dllmq.diffusion`:

* A *logits function* has the signature
  ``logits_fn(input_ids: LongTensor[B, L], attention_mask: LongTensor[B, L] | None) -> FloatTensor[B, L, V]``
  and returns logits that are already aligned: ``logits[:, i]`` predicts the token at position ``i``.
  (LLaDA's logits are unshifted by construction; the Dream wrapper undoes Dream's AR-style shift.)
* Randomness comes from an optional ``torch.Generator``. When one is given, the global RNG is never used.
  The generator may live on a different device than the tensors: numbers are drawn on the generator's device
  and moved afterwards.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

LogitsFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

__all__ = [
    "LogitsFn",
    "forward_process",
    "stratified_mask_counts",
    "mask_by_count",
    "cfg_combine",
    "guided_logits",
    "rand",
    "randint",
    "randperm",
    "multinomial",
]


# --------------------------------------------------------------------------------------------------------------
# RNG helpers: draw on the generator's device, then move to the target device.
# --------------------------------------------------------------------------------------------------------------


def _gen_device(generator: Optional[torch.Generator], device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def rand(shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) samples of ``shape`` on ``device``, drawn from ``generator`` if given."""
    out = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def randint(low: int, high: int, shape: Sequence[int], generator: Optional[torch.Generator] = None,
            device=None) -> torch.Tensor:
    """Integers uniform in [low, high)."""
    out = torch.randint(low, high, tuple(shape), generator=generator, device=_gen_device(generator, device))
    return out.to(device) if device is not None else out


def randperm(n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    out = torch.randperm(n, generator=generator, device=_gen_device(generator, device))
    return out.to(device) if device is not None else out


def multinomial(probs: torch.Tensor, num_samples: int, replacement: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.multinomial`` that tolerates a generator on another device than ``probs``."""
    if generator is not None and generator.device != probs.device:
        out = torch.multinomial(probs.to(generator.device), num_samples, replacement=replacement, generator=generator)
        return out.to(probs.device)
    return torch.multinomial(probs, num_samples, replacement=replacement, generator=generator)


# --------------------------------------------------------------------------------------------------------------
# Forward processes
# --------------------------------------------------------------------------------------------------------------


def forward_process(
    x: torch.Tensor,
    mask_id: int,
    t: Union[None, float, torch.Tensor] = None,
    eps: float = 1e-3,
    maskable: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's pre-training / SFT forward process.

    For each row, ``t ~ U(0, 1]`` (unless given), ``p_mask = (1 - eps) * t + eps`` and every maskable token is
    replaced by ``mask_id`` independently with probability ``p_mask``.

    Args:
        x: LongTensor [B, L] of clean tokens.
        mask_id: id of the mask token.
        t: optional noise level: a float (same for every row) or a tensor with B elements.
        eps: minimum masking probability.
        maskable: optional bool [B, L] (or [L], broadcast); False positions are never masked (e.g. the prompt
            of chat data, or padding).
        generator: optional torch.Generator.

    Returns:
        ``(noisy, masked, p_mask)``: noisy LongTensor [B, L]; masked bool [B, L] (True where a token was replaced);
        p_mask float [B, L] (the row's masking probability, broadcast over positions).
    """
    if x.dim() != 2:
        raise ValueError(f"forward_process expects x of shape [B, L], got {tuple(x.shape)}")
    b, l = x.shape
    device = x.device
    if t is None:
        # 1 - U[0, 1) is U(0, 1]
        t_row = 1.0 - rand((b,), generator=generator, device=device)
    elif isinstance(t, torch.Tensor):
        t_row = t.to(device=device, dtype=torch.float32).reshape(-1)
        if t_row.numel() == 1:
            t_row = t_row.expand(b)
        if t_row.numel() != b:
            raise ValueError(f"t must have 1 or B={b} elements, got {t.numel()}")
    else:
        t_row = torch.full((b,), float(t), device=device)
    p_mask = ((1.0 - eps) * t_row + eps)[:, None].expand(b, l).contiguous()
    masked = rand((b, l), generator=generator, device=device) < p_mask
    if maskable is not None:
        masked &= _as_bool_2d(maskable, b, l, device)
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    return noisy, masked, p_mask


def stratified_mask_counts(L: int, b: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Stratified number of tokens to mask for ``b`` rows of a length-``L`` target (LLaDA's likelihood).

    ``k ~ U{1..L}``, ``counts = round(linspace(k, k + (b-1) L / b, b))`` wrapped into ``[1, L]``.
    Returns a LongTensor [b] with values in ``[1, L]``.
    """
    if L < 1:
        raise ValueError(f"stratified_mask_counts needs L >= 1, got {L}")
    if b < 1:
        raise ValueError(f"stratified_mask_counts needs b >= 1, got {b}")
    k = int(randint(1, L + 1, (1,), generator=generator).item())
    counts = torch.round(torch.linspace(float(k), k + (b - 1) * (L / b), steps=b, dtype=torch.float64)).long()
    counts = ((counts - 1) % L) + 1
    return counts.to(device) if device is not None else counts


def mask_by_count(
    x: torch.Tensor,
    counts: torch.Tensor,
    mask_id: int,
    maskable: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask exactly ``counts[i]`` uniformly random maskable positions of row ``i``.

    Args:
        x: LongTensor [B, L] (or [L], repeated to ``len(counts)`` rows).
        counts: LongTensor [B] (or an int sequence) of the number of tokens to mask per row; clipped to the
            number of maskable positions of the row.
        maskable: optional bool [B, L] or [L]; default: every position.

    Returns ``(noisy, masked)``.
    """
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1).cpu()
    if x.dim() == 1:
        x = x[None, :].expand(counts.numel(), -1)
    if x.dim() != 2 or x.shape[0] != counts.numel():
        raise ValueError(f"mask_by_count: x {tuple(x.shape)} does not match {counts.numel()} counts")
    b, l = x.shape
    device = x.device
    mk = _as_bool_2d(maskable, b, l, device) if maskable is not None else torch.ones(b, l, dtype=torch.bool, device=device)
    masked = torch.zeros(b, l, dtype=torch.bool, device=device)
    for i in range(b):
        pos = mk[i].nonzero(as_tuple=True)[0]
        n = int(pos.numel())
        c = min(max(int(counts[i]), 0), n)
        if c == 0:
            continue
        perm = randperm(n, generator=generator, device=device)
        masked[i, pos[perm[:c]]] = True
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    return noisy, masked


def _as_bool_2d(m: torch.Tensor, b: int, l: int, device) -> torch.Tensor:
    m = torch.as_tensor(m, device=device).bool()
    if m.dim() == 1:
        m = m[None, :]
    if m.shape[-1] != l or m.shape[0] not in (1, b):
        raise ValueError(f"mask of shape {tuple(m.shape)} does not match [B={b}, L={l}]")
    return m.expand(b, l)


# --------------------------------------------------------------------------------------------------------------
# Classifier-free guidance (shared by sampling and likelihood)
# --------------------------------------------------------------------------------------------------------------


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA's guidance: ``uncond + (cfg_scale + 1) * (cond - uncond)``."""
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def guided_logits(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    uncond_positions: Optional[torch.Tensor],
    mask_id: int,
    cfg_scale: float = 0.0,
) -> torch.Tensor:
    """One forward, with classifier-free guidance when ``cfg_scale > 0``.

    The unconditional copy replaces ``uncond_positions`` (bool [B, L], normally the prompt) by ``mask_id``; both
    copies run in one batch (same attention mask), and the result is ``cfg_combine(cond, uncond, cfg_scale)``.
    """
    if cfg_scale is None or cfg_scale <= 0.0:
        return logits_fn(x, attention_mask)
    if uncond_positions is None:
        raise ValueError("cfg_scale > 0 needs the prompt positions to build the unconditional input")
    un_x = x.clone()
    un_x[uncond_positions.expand_as(x)] = mask_id
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
    both = logits_fn(torch.cat([x, un_x], dim=0), am)
    cond, uncond = torch.chunk(both, 2, dim=0)
    return cfg_combine(cond, uncond, cfg_scale)
