"""The integer grid every method rounds onto: group views, min-max parameters, quantize / dequantize.

Convention: ``w_hat = (q - zero_point) * scale``, ``q`` signed in ``[qmin, qmax]``, ``zero_point`` in the same
signed domain (0 / None for symmetric). Pure tensor functions: RTN, GPTQ, AWQ and the packed-weight container
(qweight.py) all use these, so rounding and clamping are identical everywhere. Kept free of QuantizedWeight so that
qweight.py can import it without a cycle.
"""

from __future__ import annotations

import torch

from .spec import WeightSpec

# Smallest scale we emit: keeps w / scale finite for denormal-sized weights.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def _grouped(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """View w [N, K] as [rows, G, group_len] following the spec's strategy."""
    n, k = w.shape
    if spec.strategy == "tensor":
        return w.reshape(1, 1, n * k)
    if spec.strategy == "channel":
        return w.reshape(n, 1, k)
    spec.check_layer("weight", k)
    return w.reshape(n, k // spec.group_size, spec.group_size)  # type: ignore[operator]


def compute_qparams(
    w: torch.Tensor, spec: WeightSpec, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max quantization parameters for ``w`` [N, K].

    Returns ``scale`` float32 [N, G] ([1, 1] for per-tensor) and ``zero_point`` int32 of the
    same shape, or None when symmetric. ``clip_ratio`` < 1 shrinks the range (trading
    clipping error on outliers for finer steps elsewhere; AWQ/grid search tune it).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    g = _grouped(w.float(), spec)
    if spec.symmetric:
        return _sym_scale(g.abs().amax(dim=-1) * clip_ratio, spec).contiguous(), None
    # Keep 0 inside the range so that zero (padding, pruned weights) stays exactly representable.
    scale, zp = _asym_params(g.amin(dim=-1).clamp_max(0) * clip_ratio, g.amax(dim=-1).clamp_min(0) * clip_ratio, spec)
    return scale.contiguous(), zp.contiguous()


def _sym_scale(amax: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    # An all-zero group would give scale 0 and 0/0 later; any scale reconstructs it exactly.
    return torch.where(amax > 0, (amax / spec.qmax).clamp_min(_MIN_SCALE), torch.ones_like(amax))


def _asym_params(mn: torch.Tensor, mx: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    rng = mx - mn
    scale = torch.where(rng > 0, (rng / (spec.qmax - spec.qmin)).clamp_min(_MIN_SCALE), torch.ones_like(rng))
    return scale, torch.round(spec.qmin - mn / scale).clamp(spec.qmin, spec.qmax).to(torch.int32)


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """Broadcastable version of per-group params [.., G] against a weight with k columns.

    [.., 1] and [.., k] broadcast as they are (per-channel, or a single column / group slice
    as GPTQ uses); otherwise each group column is repeated over its k/G inputs.
    """
    groups = t.shape[-1]
    if groups in (1, k):
        return t
    if k % groups:
        raise ValueError(f"{groups} groups do not divide {k} columns")
    return t.repeat_interleave(k // groups, dim=-1)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: WeightSpec
) -> torch.Tensor:
    """Round-to-nearest codes: int32, same shape as ``w``, clamped to [qmin, qmax].

    ``scale`` / ``zero_point`` may be [N, G] for the whole weight, or [N, 1] for a single
    column or a slice within one group (GPTQ's column loop).
    """
    k = w.shape[-1]
    x = w.float() / _expand(scale.float(), k)
    if zero_point is not None:
        x = x + _expand(zero_point, k).float()
    return torch.round(x).clamp_(spec.qmin, spec.qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: WeightSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` computed in float32, returned in ``dtype``."""
    k = q.shape[-1]
    x = q.float()
    if zero_point is not None:
        x = x - _expand(zero_point, k).float()
    return (x * _expand(scale.float(), k)).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    spec: WeightSpec,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype.

    Without ``scale`` the parameters are computed from ``w`` (min/max, optional clipping);
    with it, the given parameters are used (e.g. a group's scale for GPTQ columns).
    """
    if scale is None:
        scale, zero_point = compute_qparams(w, spec, clip_ratio)
    q = quantize(w, scale, zero_point, spec)
    return dequantize(q, scale, zero_point, spec, dtype=w.dtype)
