"""SmoothQuant (Xiao et al., 2023) as pure tensor functions.

Activation outliers live in a few fixed input channels; per-token activation quantization
wastes its range on them. SmoothQuant migrates part of that range into the weights with a
per-input-channel scale ``s``: ``y = x Wᵀ = (x / s)(W · s)ᵀ``, where

    s_j = max|X_j|^α / max_i max|W_i[:, j]|^(1 - α)

over calibration tokens (``X_j``: input channel j) and over every linear ``W_i`` reading the
same input. ``α = 0.5`` balances the two ranges; larger α pushes more into the weights.
``1 / s`` is folded into the op producing ``x`` (a norm's weight, or a previous linear's
output rows) with `dllmq.quantization.awq.fold_scales`, so the model is unchanged before
quantization; both ``x / s`` and ``W · s`` are then quantized (e.g. W8A8: per-channel
weights, dynamic per-token activations).

`fake_quant_act` is the activation side of that runtime (quantize + dequantize per token,
symmetric or asymmetric, optional clip ratio) through the same code the int8 GEMM path uses, so simulated
and real W8A8 / W4A8 / W4A4 agree.
"""

from __future__ import annotations

from typing import Sequence

import torch



def smooth_scales(
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float = 0.5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per-input-channel smoothing scales ``s`` [K] (float32) for the linears in ``weights``.

    ``act_absmax`` [K]: max |x| per input channel over calibration tokens. ``weights``: the
    linears ([N_i, K]) that read that input (e.g. q/k/v, or gate/up); their column maxima
    are combined with a max. Both maxima are clamped to ≥ ``eps`` (dead channels, zero
    columns), and ``s`` to ``[eps, 1/eps]`` so that neither ``x / s`` nor ``W · s`` can
    overflow. Use: divide the producer of ``x`` by ``s`` and multiply the weights' columns by
    ``s`` (`fold_scales`), or call the weight ``W * s`` and the input ``x / s``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not weights:
        raise ValueError("weights must hold at least one linear weight")
    a = act_absmax.detach().float().reshape(-1)
    k = a.numel()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match {k} input channels")
    if not torch.isfinite(a).all():
        raise ValueError("act_absmax must be finite")
    device = a.device
    w_max = torch.stack([w.detach().float().abs().amax(dim=0).to(device) for w in weights]).amax(dim=0)
    a = a.abs().clamp_min(eps)
    w_max = w_max.clamp_min(eps)
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)
    return s.clamp(eps, 1.0 / eps)


def _pair_magnitude(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """|(x_c, x_{c+d/2})| per head-dim channel of x [T, H*d] -> [T, H, d]: the part RoPE leaves unchanged
    (it rotates each such pair), so scales derived from it commute with RoPE."""
    x = x.reshape(-1, x.shape[-1])
    t = x.reshape(x.shape[0], -1, head_dim).float()
    half = head_dim // 2
    m = (t[..., :half].pow(2) + t[..., half:].pow(2)).sqrt()
    return torch.cat([m, m], dim=-1)


def qk_smooth_scales(q: torch.Tensor, k: torch.Tensor, head_dim: int, alpha: float = 0.5,
                     eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant between queries and keys (the reference code's ``qkt_smooth_scale``): per KV head and
    head-dim channel ``s = max|K|^α / max|Q|^(1-α)`` over tokens, the query side maxed over the query heads
    sharing that KV head, one value per RoPE pair. ``K / s`` and ``Q · s`` leave QKᵀ unchanged while the
    keys (quantized per token when K/V are quantized) lose their outlier channels.
    ``q`` [T, H*d], ``k`` [T, Hkv*d] (pre-RoPE projections) -> s [Hkv, d]."""
    qm = _pair_magnitude(q, head_dim).amax(0)  # [H, d]
    km = _pair_magnitude(k, head_dim).amax(0)  # [Hkv, d]
    rep = qm.shape[0] // km.shape[0]
    qm = qm.reshape(km.shape[0], rep, head_dim).amax(1)
    s = km.clamp_min(eps).pow(alpha) / qm.clamp_min(eps).pow(1.0 - alpha)
    return s.clamp(eps, 1.0 / eps)


@torch.no_grad()
def fold_qk_scales(q_proj, k_proj, s: torch.Tensor) -> None:
    """In place: k_proj's output rows ÷ s, q_proj's × s (each query head by its KV head's scales)."""
    hkv, d = s.shape
    rep = q_proj.weight.shape[0] // (hkv * d)
    sk = s.reshape(-1).double()
    sq = s.repeat_interleave(rep, dim=0).reshape(-1).double()
    for lin, f in ((k_proj, 1.0 / sk), (q_proj, sq)):
        lin.weight.copy_((lin.weight.double() * f.to(lin.weight.device)[:, None]).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() * f.to(lin.bias.device)).to(lin.bias.dtype))
