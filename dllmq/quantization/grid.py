"""The integer grid every method rounds onto: group views, min-max parameters, quantize / dequantize.

Convention: ``w_hat = (q - zero_point) * scale``, ``q`` signed in ``[qmin, qmax]``, ``zero_point`` in the same
signed domain (0 / None for symmetric). Pure tensor functions: RTN, GPTQ, AWQ and the packed-weight container
(qweight.py) all use these, so rounding and clamping are identical everywhere. The per-token activation grid
(`quantize_per_token`, `_affine`, `dequantize_per_token`) lives here too: the runtime kernels, SmoothQuant's fake
quantizer and the K/V quantizers share it. Kept free of QuantizedWeight so that
qweight.py can import it without a cycle.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..runtime import native
from .spec import ActSpec, WeightSpec

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


def quantize_per_token(x: torch.Tensor, act_spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantization of x [..., K] -> (int8 [M, K], fp32 [M, 1]).

    4-bit activations are stored in int8 with values in [-8, 7] so the same int8 GEMM runs
    them exactly. ``clip_ratio`` < 1 shrinks each row's range (outliers get clamped).
    """
    if not act_spec.enabled:
        raise ValueError("activation quantization is disabled (16 bits)")
    if not act_spec.symmetric:
        # (q, scale) cannot carry a zero point: asymmetric callers use quantize_per_token_affine
        raise UserError("quantize_per_token is symmetric only; use quantize_per_token_affine for asymmetric activations")
    x2 = x.reshape(-1, x.shape[-1])
    fused = native.quantize_rows(x2, act_spec.qmin, act_spec.qmax, act_spec.clip_ratio, asym=False)
    if fused is not None:  # CPU: the same arithmetic in one pass (runtime/cpu_kernels.c), bit-identical
        return fused[0], fused[1]
    amax = x2.abs().amax(dim=-1, keepdim=True).float() * act_spec.clip_ratio  # abs / max are exact in bf16
    scale = torch.where(amax > 0, amax / act_spec.qmax, torch.ones_like(amax))
    # one fp32 copy, divided / rounded / clamped in place: bit-identical to round(x.float() / scale), and
    # 2.7x faster at 2048 x 4096 (the temporaries were ~20% of a W4A8 layer's time at 2048 rows)
    q = x2.to(torch.float32, copy=True).div_(scale).round_().clamp_(act_spec.qmin, act_spec.qmax).to(torch.int8)
    return q, scale


def quantize_per_token_affine(
    x: torch.Tensor, act_spec: ActSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dynamic per-row quantization of x [..., K] -> (int8 [M, K], fp32 scale [M, 1], zero point).

    Symmetric specs: exactly `quantize_per_token`, zero point None. Asymmetric specs (QDLM Eq. 1,
    DuQuant's / SmoothQuant's per-token activation quantizer): per row, with ``r`` = clip_ratio,

        lo = r * min(min(row), 0),  hi = r * max(max(row), 0)
        scale = (hi - lo) / (2^bits - 1),  zp = qmin - round(lo / scale)      (int32 [M, 1])
        q = clamp(round(x / scale) + zp, qmin, qmax),  x_hat = (q - zp) * scale

    Codes stay in the signed range [qmin, qmax] so they feed the same int8 GEMM; ``int8_linear``
    subtracts ``zp * sum_k q_w`` from the integer accumulator. The range always contains 0 (as
    PyTorch's observers do), so ``zp`` lies in [qmin, qmax] and that correction is exact in int32;
    the references use the bare row min/max, which differs only for rows of a single sign.
    Degenerate rows (all zeros) get scale 1.
    """
    if not act_spec.enabled:
        raise ValueError("activation quantization is disabled (16 bits)")
    if act_spec.symmetric:
        q, scale = quantize_per_token(x, act_spec)
        return q, scale, None
    fused = native.quantize_rows(x.reshape(-1, x.shape[-1]), act_spec.qmin, act_spec.qmax, act_spec.clip_ratio, asym=True)
    if fused is not None:  # CPU: the computation below in one pass (runtime/cpu_kernels.c), bit-identical
        return fused
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32, copy=True)  # a copy: quantized in place below
    lo = x2.amin(dim=-1, keepdim=True).clamp(max=0.0) * act_spec.clip_ratio
    hi = x2.amax(dim=-1, keepdim=True).clamp(min=0.0) * act_spec.clip_ratio
    rng = hi - lo
    levels = float(act_spec.qmax - act_spec.qmin)
    scale = torch.where(rng > 0, rng / levels, torch.ones_like(rng))
    zp = (act_spec.qmin - torch.round(lo / scale)).clamp_(act_spec.qmin, act_spec.qmax)
    # in place on the fp32 copy, as in `quantize_per_token`: the same values as clamp(round(x2 / scale) + zp), and
    # no fresh [M, K] temporaries (each one a page-faulting allocation: 8x slower at 256 x 1024)
    q = x2.div_(scale).round_().add_(zp).clamp_(act_spec.qmin, act_spec.qmax).to(torch.int8)
    return q, scale, zp.to(torch.int32)


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``(q - zp) * scale`` (``q * scale`` when symmetric) for the outputs of `quantize_per_token_affine`."""
    qf = q.float()
    if zero_point is not None:
        qf = qf - zero_point.float()
    return qf * scale


def fake_quant_act(x: torch.Tensor, act_spec: ActSpec) -> torch.Tensor:
    """Dynamic per-token fake quantization of ``x`` [..., K], in ``x``'s dtype and shape.

    Same arithmetic as the runtime (`grid.quantize_per_token_affine`, shared with the runtime):
    symmetric specs use one scale per row = ``max|row| · clip_ratio / qmax``, round to nearest,
    clamp to ``[qmin, qmax]`` (4-bit values are the int8 codes in [-8, 7]), then ``q · scale``;
    asymmetric specs add a per-row zero point (range ``[min, max] · clip_ratio``, always holding 0)
    and return ``(q - zp) · scale``. A 16-bit spec returns ``x`` unchanged.
    """
    if not act_spec.enabled:
        return x
    fused = native.quantize_rows(x.reshape(-1, x.shape[-1]), act_spec.qmin, act_spec.qmax, act_spec.clip_ratio,
                                 asym=not act_spec.symmetric, dequantize=True)
    if fused is not None:  # CPU: both steps below in one pass, bit-identical (runtime/cpu_kernels.c)
        return fused.reshape(x.shape)
    q, scale, zp = quantize_per_token_affine(x, act_spec)
    return dequantize_per_token(q, scale, zp).reshape(x.shape).to(x.dtype)
