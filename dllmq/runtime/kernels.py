"""Low-bit GEMM paths: each computes ``y = x @ W_hat.T (+ bias)`` for ``x`` [..., K].

Paths and their limits (checked by the ``supports_*`` predicates, measured on torch 2.13):

* ``dequant_linear``: reference; dequantize to x.dtype and call F.linear. Always works.
* CPU int4 weight-only (``_weight_int4pack_mm_for_cpu``): weights of <= 4 bits (2/3-bit
  codes are a subset of the int4 range), N % 16 == 0, kernel group size in {32, 64, 128,
  256} dividing the spec's group (per-channel / per-tensor scales are replicated over
  sub-groups). Needs bf16 activations: fp32 runs a path ~100x slower. Only faster than
  AMX bf16 GEMM for a handful of rows (see QuantLinear's INT4_CPU_MAX_ROWS).
* CPU int8 weight-only (``_weight_int8pack_mm``): symmetric per-channel (or per-tensor)
  weights of any width <= 8, K % 16 == 0 (other K segfault or give wrong results in this
  torch build), bf16 activations (fp32/fp16 are 3-10x slower than the dense GEMM).
* CUDA int4 (``_weight_int4pack_mm``, tinygemm): <= 4-bit weights, K % 128 == 0,
  N % 8 == 0, bf16 activations, sm80+.
* int8 x int8 -> int32 (``_int_mm``) for W8A8 / W4A8 / W4A4 with dynamic per-token
  activation scales, symmetric or asymmetric (``quantization.grid.quantize_per_token_affine``: per-row zero
  point, removed exactly from the int32 accumulator with the weight's per-row code sums). On CUDA it needs M > 16 (padded here), K % 8 == 0 and N % 8 == 0
  (otherwise an exact-enough fp32 emulation is used). Group-wise weight scales cost one int GEMM
  per group (K/G inputs each; on CPU all into one buffer reduced by the fused epilogue of
  ``native.int8_group_epilogue``, elsewhere rescaled with addcmul): exact, but with many groups
  slower than the bf16 GEMM at many rows on CPU, where QuantLinear then prefers ``fold_bf16``.
* Triton (``triton_kernels.py``, optional): per-token activation quantization (optionally
  fused with the SmoothQuant division) and a W4A8 GEMM that unpacks the packed int4 words in
  registers, both matching ``quantize_per_token`` / ``int8_linear``; symmetric activations only
  (QuantLinear uses ``int8_linear`` for asymmetric ones). Status: tested only under
  TRITON_INTERPRET=1 on CPU; not yet run on a GPU; not used by QuantLinear's dispatch.

tinygemm convention (both int4 kernels): ``w = (code - 8) * scale + zero`` per group, with
``code`` in [0, 15]. Our signed codes are ``q = code - 8`` and ``w = (q - zp) * scale``,
so ``zero = -zp * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quantization.qweight import QuantizedWeight
from ..quantization.spec import WeightSpec
from . import native

INT4_KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # preferred first: fewer scales, less traffic
# CPU int8 GEMMs of large layers at up to this many rows run as W @ X^T (the same integers): oneDNN took 1.6 vs
# 4.0 ms at 32 rows, 4.2 vs 6.4 at 96, 10.3 vs 12.5 at 256, 39 vs 41 at 1024 for a 4096x4096 layer on a 2-core AMD
# EPYC without AMX, and the same time either way for the bundled model's 384-wide layers, where the transposed
# epilogue's extra cost then makes it a loss. benchmarks/results/kernels_epyc.md.
INT8_SWAPPED_MAX_ROWS = 512
INT8_SWAPPED_MIN_WEIGHTS = 1 << 22
# The int32 products of a group-wise int8 GEMM are G times the output's size (32x at g128, K 4096): on CPU they are
# reduced in chunks of groups whose products fit this many bytes of the reused scratch buffer.
GROUP_PRODUCTS_BYTES = 64 << 20


# --------------------------------------------------------------------------- reference


def dequant_linear(
    x: torch.Tensor, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference path: materialise the weight in x.dtype and run a dense GEMM."""
    w = weight.dequantize(x.dtype) if isinstance(weight, QuantizedWeight) else weight.to(x.dtype)
    return F.linear(x, w.to(x.device), None if bias is None else bias.to(device=x.device, dtype=x.dtype))


# --------------------------------------------------------------------------- helpers


def _group_len(spec: WeightSpec, k: int) -> int:
    """Number of inputs that share one scale."""
    return spec.group_size if spec.strategy == "group" else k  # type: ignore[return-value]


def int4_kernel_group_size(spec_group_len: int) -> int | None:
    """Largest tinygemm group size that tiles one quantization group, or None."""
    for g in INT4_KERNEL_GROUP_SIZES:
        if spec_group_len % g == 0:
            return g
    return None


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tensor params [1, G] -> [n, G]; others unchanged."""
    return t.expand(n, t.shape[1]) if t.shape[0] == 1 and n != 1 else t


def _scale_zeros(
    scale: torch.Tensor, zero_point: torch.Tensor | None, n: int, k: int, kernel_gs: int, dtype: torch.dtype
) -> torch.Tensor:
    """tinygemm's qScaleAndZeros [K/kernel_gs, N, 2] from our [N, G] scale / zero point."""
    scale = _per_row(scale.float(), n)
    rep = (k // scale.shape[1]) // kernel_gs  # kernel groups per quantization group
    zero = torch.zeros_like(scale) if zero_point is None else -_per_row(zero_point, n).float() * scale
    if rep > 1:
        scale = scale.repeat_interleave(rep, dim=1)
        zero = zero.repeat_interleave(rep, dim=1)
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def _check_int4_codes(q: torch.Tensor) -> torch.Tensor:
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 kernels need codes in [-8, 7]")
    return (q.to(torch.int32) + 8).contiguous()


@dataclass
class Int4State:
    """A weight prepared for one of the tinygemm int4 kernels."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor  # [K / group_size, N, 2] in the activation dtype
    group_size: int  # kernel group size
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zeros.nbytes


# --------------------------------------------------------------------------- CPU int4


def supports_int4_cpu(n: int, k: int, spec: WeightSpec) -> bool:
    if spec.num_bits > 4 or n % 16:
        return False
    if spec.strategy == "group" and k % spec.group_size:  # type: ignore[operator]
        return False
    return int4_kernel_group_size(_group_len(spec, k)) is not None


def prepare_int4_cpu(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Int4State:
    """Pack signed codes q [N, K] (in [-8, 7]) for ``_weight_int4pack_mm_for_cpu``.

    ``group_size`` is the number of inputs per column of ``scale`` (default K / G); the kernel
    group size is the largest of 256/128/64/32 dividing it.
    """
    n, k = q.shape
    group_len = group_size or k // scale.shape[1]
    kgs = int4_kernel_group_size(group_len)
    if kgs is None or n % 16:
        raise ValueError(f"CPU int4 kernel cannot take N={n}, K={k}, group={group_len}")
    codes = _check_int4_codes(q.cpu())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = _scale_zeros(scale.cpu(), None if zero_point is None else zero_point.cpu(), n, k, kgs, dtype)
    return Int4State(packed, sz, kgs, n, k)


def int4_cpu_mm(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), state.packed, state.group_size, state.scale_zeros.to(x.dtype)
    )


# --------------------------------------------------------------------------- CPU int8 weight-only


def supports_int8pack_cpu(n: int, k: int, spec: WeightSpec) -> bool:
    return spec.symmetric and spec.strategy in ("channel", "tensor") and k % 16 == 0


def prepare_int8pack(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel codes [N, K] and scale [N, 1] / [1, 1] -> (int8 [N, K], fp32 [N])."""
    n = q.shape[0]
    if scale.shape[1] != 1:
        raise ValueError("the int8 weight-only kernel needs one scale per output channel")
    return q.to(torch.int8).contiguous(), _per_row(scale.float(), n).reshape(n).contiguous()


def int8pack_mm(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> x @ (w_int8 * scales[:, None]).T, in x.dtype."""
    return torch._weight_int8pack_mm(x.contiguous(), w_int8, scales.to(x.dtype))


# --------------------------------------------------------------------------- CUDA int4


def cuda_int4_available(device: torch.device | None = None) -> bool:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def supports_int4_cuda(n: int, k: int, spec: WeightSpec) -> bool:
    return supports_int4_cpu(16, k, spec) and k % 128 == 0 and n % 8 == 0


def prepare_int4_cuda(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> Int4State:
    """Pack codes for ``_weight_int4pack_mm`` (CUDA tinygemm, innerKTiles=8).

    The CUDA packer takes uint8 [N, K/2] with the even column in the HIGH nibble.
    """
    n, k = q.shape
    group_len = group_size or k // scale.shape[1]
    kgs = int4_kernel_group_size(group_len)
    if kgs is None or k % 128 or n % 8:
        raise ValueError(f"CUDA int4 kernel cannot take N={n}, K={k}, group={group_len}")
    codes = _check_int4_codes(q).to(device)
    u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    sz = _scale_zeros(scale, zero_point, n, k, kgs, dtype).to(device)
    return Int4State(packed, sz, kgs, n, k)


def int4_cuda_mm(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """x [M, K] bf16 on CUDA -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm(
        x.contiguous(), state.packed, state.group_size, state.scale_zeros.to(x.dtype)
    )


# --------------------------------------------------------------------------- W8A8 / W4A8 / W4A4


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], working around CUDA's shape limits."""
    if a.device.type != "cuda":
        return _cpu_int_mm(a, b_t.t())
    m, k = a.shape
    n = b_t.shape[1]
    if k % 8 or n % 8:
        # cuBLASLt int8 GEMM cannot take these; fp32 holds the int sums exactly up to 2^24.
        return torch.matmul(a.float(), b_t.float()).round().to(torch.int32)
    if m <= 16:  # cuBLASLt int8 path requires more than 16 rows
        a = torch.cat([a, a.new_zeros(32 - m, k)])
        return torch._int_mm(a, b_t)[:m]
    return torch._int_mm(a.contiguous(), b_t)


def _cpu_int_mm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 a [M, K] @ w [N, K]^T -> int32 [M, N] on CPU: PyTorch's `_int_mm`, or where that is a reference loop
    (`native.torch_int8_gemm_fast`), the AVX2 kernel `native.int8_mm` (the same integers)."""
    if not native.torch_int8_gemm_fast():
        y = native.int8_mm(a, w, out=out)
        if y is not None:
            return y
    return torch._int_mm(a, w.t()) if out is None else torch._int_mm(a, w.t(), out=out)


def int8_linear(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    w_zero_point: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
    w_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_int8 * x_scale) @ ((w_int8 - w_zero_point) * w_scale).T + bias`` with an int GEMM.

    x_int8 [M, K] int8, x_scale [M, 1] fp32. Weight layouts:

    * per channel: w_int8 [N, K] contiguous (passed to ``_int_mm`` as its transposed view,
      the fast layout), w_scale [N] or [N, 1];
    * per group: w_int8 [G, N, K/G] (group-major, contiguous) and w_scale [N, G]; each group
      is one int GEMM, rescaled and accumulated in fp32.

    ``w_zero_point`` (same shape as w_scale, for 8-bit asymmetric weights whose ``q - zp``
    does not fit int8) is applied exactly as ``acc -= rowsum(x_int8) * zp``.

    ``x_zero_point`` int32 [M, 1] (asymmetric activations, `quantize_per_token_affine`): the
    product is ``sum_k (q_x - z_x)(q_w - z_w) = acc' - z_x * sum_k (q_w - z_w)``, so the
    accumulator (after the weight zero point's correction ``acc'``) loses ``z_x`` times the
    weight's per-output-channel sums of integer codes (per group in the group layout). ``w_sum``
    may pass those sums precomputed (int32 [N], or [G, N] for the group layout, with the weight
    zero point already subtracted); otherwise they are computed here. All of it stays in int32:
    |z_x| <= 128 and |q_w - z_w| <= 255, exact for K < 65536.
    """
    m = x_int8.shape[0]
    cpu_fused = x_int8.device.type == "cpu" and native.library() is not None
    swapped = int8_swapped(m, w_int8.numel(), grouped=w_int8.dim() == 3)
    if w_int8.dim() == 2:
        n = w_int8.shape[0]
        if x_zero_point is not None and w_sum is None:
            w_sum = weight_code_sums(w_int8, w_zero_point)
        if cpu_fused:
            # CPU: the zero-point corrections, both scales, bias and the cast in one pass after the GEMM,
            # bit-identical to the torch code below
            acc = torch._int_mm(w_int8, x_int8.t()) if swapped else _cpu_int_mm(x_int8, w_int8)
            y = native.int8_epilogue(acc, x_scale, w_scale, out_dtype, bias, x_zero_point, w_sum, x_int8,
                                     w_zero_point, transposed=swapped)
            if y is not None:
                return y
        acc = _int_mm(x_int8, w_int8.t())
        if w_zero_point is not None:
            acc = acc - x_int8.sum(dim=-1, dtype=torch.int32)[:, None] * w_zero_point.reshape(1, n).to(torch.int32)
        if x_zero_point is not None:
            if w_sum is None:
                w_sum = weight_code_sums(w_int8, w_zero_point)
            acc = acc - x_zero_point.reshape(m, 1).to(torch.int32) * w_sum.reshape(1, n).to(torch.int32)
        y = acc.float() * x_scale * w_scale.reshape(1, n).float()
    else:
        groups, n, gs = w_int8.shape
        ws_t = w_scale.float().reshape(n, groups).t().contiguous()  # [G, N]: contiguous rows per group
        if x_zero_point is not None and w_sum is None:
            w_sum = weight_code_sums(w_int8, w_zero_point)
        if cpu_fused:
            # CPU: the groups' GEMMs into one scratch buffer (strided column slices need no copy), in chunks of at
            # most GROUP_PRODUCTS_BYTES, each reduced by one fused pass (corrections, group sum, both scales, bias,
            # cast) that carries the fp32 sums between chunks: bit-identical to the loop below, 2x faster at the
            # bundled width
            per_chunk = max(1, GROUP_PRODUCTS_BYTES // max(1, 4 * m * n))
            partial = torch.empty(m, n, dtype=torch.float32) if per_chunk < groups else None
            y = None
            for g0 in range(0, groups, per_chunk):
                g1 = min(groups, g0 + per_chunk)
                acc = native.scratch((g1 - g0) * m * n, torch.int32).view(g1 - g0, m, n)  # consumed below
                for g in range(g0, g1):
                    _cpu_int_mm(x_int8[:, g * gs:(g + 1) * gs], w_int8[g], out=acc[g - g0])
                y = native.int8_group_epilogue(acc, x_scale, ws_t, out_dtype, bias, x_zero_point, w_sum, x_int8,
                                               w_zero_point, groups=(g0, g1), partial=partial)
                if y is None:
                    break
            if y is not None:
                return y
        xg = x_int8.view(m, groups, gs).transpose(0, 1).contiguous()  # [G, M, gs]
        y = torch.zeros(m, n, dtype=torch.float32, device=x_int8.device)
        if x_zero_point is not None:
            xz = x_zero_point.reshape(m, 1).to(torch.int32)
        for g in range(groups):
            acc = _int_mm(xg[g], w_int8[g].t())
            if w_zero_point is not None:
                acc = acc - xg[g].sum(dim=-1, dtype=torch.int32)[:, None] * w_zero_point[:, g].to(torch.int32)[None]
            if x_zero_point is not None:
                acc = acc - xz * w_sum[g].reshape(1, n).to(torch.int32)
            y.addcmul_(acc, ws_t[g])  # one fused pass (was 3 passes over [M, N]): ~1.5-2x faster loop
        y *= x_scale
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)


def int8_swapped(m: int, n_weights: int, grouped: bool) -> bool:
    """Whether `int8_linear` computes an m-row product on CPU (with the fused kernels) as W @ X^T: large layers (see
    INT8_SWAPPED_MIN_WEIGHTS), per channel only: with weight groups (K/G = 128 inputs per GEMM) it measured slower
    than X @ W^T (1.4-1.6x vs 1.0-1.3x bf16 at 16-256 rows, 4096x4096)."""
    return (not grouped and m <= INT8_SWAPPED_MAX_ROWS and n_weights >= INT8_SWAPPED_MIN_WEIGHTS
            and native.torch_int8_gemm_fast())


# The fused int8 GEMM + epilogue (`native.int8_vnni_linear`) against the other CPU paths of weight-activation layers,
# measured on a 2-core AMD EPYC without AMX (AVX-512 VNNI; time / bf16 F.linear, activation quantization included,
# 1-256 rows): LLaDA-8B layer shapes per channel 0.14-0.53x (oneDNN `_int_mm` + epilogue, or the int4 kernel on the
# codes, 0.24-0.92x), group-wise g128 0.19-0.72x (0.36-1.76x); the bundled model's 384/1024-wide layers 0.65-1.5x
# (0.85-4x). So it runs every layer it can, except on AMX CPUs above this many rows, where oneDNN's AMX int8 tiles
# should win (not measured against it: no AMX CPU in the session that built it).
VNNI_AMX_MAX_ROWS = 64


def vnni_wins(m: int) -> bool:
    """Whether the fused VNNI kernel runs an m-row weight-activation layer on this CPU (see VNNI_AMX_MAX_ROWS)."""
    return m <= VNNI_AMX_MAX_ROWS or not native.has_amx()


def weight_code_sums(w_int8: torch.Tensor, w_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel sums of ``q_w - z_w`` for `int8_linear`'s layouts: int32 [N] for
    w_int8 [N, K] (zero point [N] / [N, 1]), int32 [G, N] for group-major [G, N, K/G] (zero point [N, G])."""
    if w_int8.dim() == 2:
        s = w_int8.sum(dim=1, dtype=torch.int32)
        if w_zero_point is not None:
            s = s - w_zero_point.reshape(-1).to(torch.int32) * w_int8.shape[1]
        return s
    s = w_int8.sum(dim=2, dtype=torch.int32)  # [G, N]
    if w_zero_point is not None:
        s = s - w_zero_point.to(torch.int32).t() * w_int8.shape[2]
    return s
