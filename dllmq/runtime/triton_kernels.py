"""Triton kernels for the weight-activation (W4A8 / W4A4) path.

Status: tested only under ``TRITON_INTERPRET=1`` on CPU (``tests/test_triton_kernels.py``,
which also compiles them, without running, for sm80 / sm90); not yet run on a GPU, so neither
GPU results nor speed have been checked; not used by ``QuantLinear``'s dispatch.

Two kernels, each behind a torch wrapper:

* ``quantize_per_token_triton``: dynamic symmetric per-row quantization of activations, the
  same arithmetic as ``quantization.grid.quantize_per_token`` (bit-identical codes and scales),
  optionally fused with SmoothQuant's online division by a per-channel vector.
* ``w4a8_matmul_triton``: int8 activations times 4-bit weights that stay packed in memory;
  the kernel unpacks each weight tile to int8 in registers, accumulates ``tl.dot`` in int32
  over one quantization group, then rescales in fp32 (same operation order as
  ``kernels.int8_linear``).

Packed weight layout (``pack_w4_for_triton``): int32 [N, ceil(K / 8)], exactly the
checkpoint's ``weight_packed`` for 4-bit weights (``dllmq/checkpoint/packing.py``): code
``q`` in [-8, 7] is stored as ``u = q + 8``; input ``k`` of row ``n`` sits in word ``k // 8``
at bits ``4 * (k % 8)`` .. ``4 * (k % 8) + 3``. A 4-bit ``QuantLinear.weight_packed`` can be
passed as is; 2/3-bit codes are a subset of the int4 range and need repacking with
``pack_w4_for_triton(codes)``. Only symmetric weights (no zero point) are supported.

Triton is imported guarded, so this module imports without it. ``TRITON_INTERPRET`` is read
at each call (not when triton or this module is imported): set it to run the kernels on CPU
tensors in Triton's interpreter.
"""

from __future__ import annotations

import functools
import os

import torch

from ..checkpoint.packing import pack_rows, packed_words

try:  # guarded: triton is an optional extra (`pip install dllmq[triton]`)
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
# how the kernels round an fp32 value to the activation / output dtype (constexpr codes)
_ROUND_NONE, _ROUND_FP16, _ROUND_BF16 = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when triton imports and there is something to run it on: a CUDA device, or the
    interpreter (``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need triton: pip install 'dllmq[triton]'")


def _check_device(*tensors: torch.Tensor) -> None:
    if not _interpreting() and any(t.device.type != "cuda" for t in tensors):
        raise ValueError("the Triton kernels take CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)")


def _round_code(dtype: torch.dtype) -> int:
    return {torch.float16: _ROUND_FP16, torch.bfloat16: _ROUND_BF16}.get(dtype, _ROUND_NONE)


# --------------------------------------------------------------------------- kernels
#
# Notes shared by both kernels:
#
# * Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest, what torch does) because a plain
#   ``/`` on fp32 may compile to an approximate division on GPUs.
# * Rounding fp32 -> bf16 is done by hand on the bit pattern (round half to even) and the
#   result, now exactly representable, is then cast. Triton's interpreter truncates on a
#   ``.to(tl.bfloat16)`` instead of rounding; the manual rounding gives the same result on
#   a GPU and in the interpreter. NaN / inf inputs are not given special treatment.
# * Only builtins of triton.language are used, not its @jit library functions (tl.zeros,
#   tl.max, ...): those are decorated when triton is imported, so when triton was imported
#   before TRITON_INTERPRET was set (compressed-tensors imports it, for one) the interpreter
#   cannot call them. Helper code is inlined for the same reason; the one helper, the
#   reduction's combine function, is an always-compiled JITFunction, which a GPU kernel
#   resolves by name and which the interpreter calls through its ``.fn``.


def _max_combine_impl(a, b):
    return tl.maximum(a, b)


_max_combine = None if triton is None else triton.runtime.jit.JITFunction(_max_combine_impl)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple:
    """The kernels, wrapped for the interpreter or for the compiler (what ``triton.jit`` would
    do, but chosen by the argument rather than by the environment at decoration time)."""
    _require_triton()
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = triton.runtime.jit.JITFunction
    return wrap(_quantize_rows_kernel), wrap(_w4a8_matmul_kernel)


def _quantize_rows_kernel(
    x_ptr,
    smooth_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    clip_ratio,
    QMAX: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROUND_SMOOTHED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per row: pass 1 finds amax of the (smoothed) row, pass 2 writes codes."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)

    running = tl.full([BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32)
            v = tl.math.div_rn(v, s)
            # the unfused path (transforms.OnlineScale) rounds x / s back to x's dtype
            if ROUND_SMOOTHED == 1:
                v = v.to(tl.float16).to(tl.float32)
            if ROUND_SMOOTHED == 2:
                bits = v.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                v = bits.to(tl.float32, bitcast=True)
        running = tl.maximum(running, tl.abs(v))
    amax = tl.reduce(running, 0, _max_combine) * clip_ratio
    scale = tl.where(amax > 0.0, tl.math.div_rn(amax, QMAX * 1.0), 1.0)

    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32)
            v = tl.math.div_rn(v, s)
            if ROUND_SMOOTHED == 1:
                v = v.to(tl.float16).to(tl.float32)
            if ROUND_SMOOTHED == 2:
                bits = v.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                v = bits.to(tl.float32, bitcast=True)
        r = tl.math.div_rn(v, scale)
        # Clamping to integer bounds before rounding equals rounding then clamping (rounding
        # is monotonic and keeps integers), and keeps |r| small so the steps below are exact.
        r = tl.minimum(tl.maximum(r, -QMAX - 1.0), QMAX * 1.0)
        # round half to even, as torch.round: floor, then decide on the fractional part
        f = tl.floor(r)
        frac = r - f  # exact: r and f are within 1 of each other and |r| <= 128
        f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
        code = tl.where(up, f + 1.0, f)
        tl.store(q_row + offs, code.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def _w4a8_matmul_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    group_size,
    num_groups,
    stride_xm,
    stride_wn,
    stride_wsn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, n] = x_scale[m] * sum_g w_scale[n, g] * (sum_{k in g} x[m, k] * q[n, k]) + bias[n].

    The int8 x int8 products of one group are summed exactly in int32 by ``tl.dot`` (the
    interpreter computes int8 dots exactly too); fp32 only enters in the per-group rescale.
    Floating-point order matches ``kernels.int8_linear``: per channel ``(acc * xs) * ws``,
    per group ``(sum_g acc_g * ws_g) * xs``, then ``+ bias``; launch with fp fusion off so
    no multiply-add is contracted into an FMA.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn

    y = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for g in range(0, num_groups):
        k_start = g * group_size
        k_end = k_start + group_size  # the wrapper checks K % group_size == 0
        acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + rk
            mask_k = offs_k < k_end
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            )
            # Each int32 word holds 8 consecutive inputs; every k of the tile reads its word
            # (neighbouring k share a word, so the repeats are served by the cache) and
            # shifts its nibble out. Padded / masked k get x = 0, so their codes do not count.
            # (Loading [BLOCK_K / 8, BLOCK_N] words once and interleaving the nibbles would
            # save load instructions; untuned until it can be measured on a GPU.)
            words = tl.load(
                w_rows[None, :] + (offs_k // 8)[:, None],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            )
            nibble = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
            b = (nibble - 8).to(tl.int8)  # [BLOCK_K, BLOCK_N] signed codes
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6 checks acc dtype == out_dtype (default fp32)
        if PER_CHANNEL:
            y = acc.to(tl.float32)
        else:
            ws = tl.load(w_scale_ptr + offs_n * stride_wsn + g, mask=mask_n, other=0.0)
            y += acc.to(tl.float32) * ws[None, :]

    xs = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
    if PER_CHANNEL:
        ws = tl.load(w_scale_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0)
        y = (y * xs[:, None]) * ws[None, :]
    else:
        y = y * xs[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    if ROUND_OUT == 1:
        y = y.to(tl.float16).to(tl.float32)
    if ROUND_OUT == 2:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- wrappers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quantize_per_token_triton(
    x: torch.Tensor,
    qmax: int = 127,
    clip_ratio: float = 1.0,
    smooth: torch.Tensor | None = None,
    *,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 codes [M, K], fp32 scales [M, 1]), M = x.numel() // K.

    Same result as ``grid.quantize_per_token(x, ActSpec(bits, clip_ratio=clip_ratio))``
    with ``qmax = 2^(bits-1) - 1`` (codes in [-qmax - 1, qmax]). With ``smooth`` [K] the
    kernel quantizes ``x / smooth`` computed like ``transforms.OnlineScale``: the division
    in fp32, rounded back to x's dtype (fp16 / bf16), so it equals
    ``quantize_per_token(OnlineScale(smooth)(x), ...)``.
    """
    _require_triton()
    if not 1 <= qmax <= 127:
        raise ValueError(f"qmax must be in [1, 127] for int8 codes, got {qmax}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype not in _FLOAT_TYPES:
        x2 = x2.float()
    x2 = x2.contiguous()
    m = x2.shape[0]
    if smooth is not None:
        if smooth.numel() != k:
            raise ValueError(f"smooth must have {k} elements, got shape {tuple(smooth.shape)}")
        smooth = smooth.reshape(k).to(device=x2.device).contiguous()
    _check_device(x2)
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, scale
    if block_k is None:
        block_k = min(_next_pow2(k), 4096)
    quant_kernel, _ = _kernels(_interpreting())
    quant_kernel[(m,)](
        x2,
        x2 if smooth is None else smooth,  # unused pointer when there is no smoothing
        q,
        scale,
        k,
        x2.stride(0),
        q.stride(0),
        float(clip_ratio),
        QMAX=int(qmax),
        HAS_SMOOTH=smooth is not None,
        ROUND_SMOOTHED=_round_code(x2.dtype) if smooth is not None else _ROUND_NONE,
        BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8,
        enable_fp_fusion=False,
    )
    return q, scale


def pack_w4_for_triton(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes q [N, K] in [-8, 7] -> int32 [N, ceil(K / 8)] (see module doc).

    The same words as the checkpoint's 4-bit ``weight_packed`` (``packing.pack_rows(q, 4)``);
    ``packing.unpack_rows(packed, 4, K)`` inverts it.
    """
    if q.dim() != 2:
        raise ValueError(f"expected codes [N, K], got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"4-bit codes must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    return pack_rows(q, 4)


def _largest_block_k(group_size: int) -> int:
    for b in (128, 64, 32):
        if group_size % b == 0:
            return b
    return 32  # the kernel masks the tail of each group


def w4a8_matmul_triton(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """``(x_int8 * x_scale) @ (q * w_scale).T + bias`` with q kept packed (4-bit, symmetric).

    x_int8 int8 [M, K]; x_scale fp32 [M, 1]; w_packed int32 [N, ceil(K / 8)] from
    ``pack_w4_for_triton``; w_scale [N, G] with G = K / group_size ([N] or [N, 1] per
    channel, [1, G] broadcast over rows); bias [N]. Returns [M, N] in ``out_dtype``, equal to
    ``kernels.int8_linear`` on the unpacked codes up to fp32 rounding (see the kernel doc).
    """
    _require_triton()
    if x_int8.dim() != 2 or x_int8.dtype != torch.int8:
        raise ValueError(f"x_int8 must be int8 [M, K], got {x_int8.dtype} {tuple(x_int8.shape)}")
    m, k = x_int8.shape
    if w_packed.dim() != 2 or w_packed.dtype != torch.int32:
        raise ValueError(f"w_packed must be int32 [N, K/8], got {w_packed.dtype} {tuple(w_packed.shape)}")
    n = w_packed.shape[0]
    if w_packed.shape[1] != packed_words(k, 4):
        raise ValueError(f"w_packed has {w_packed.shape[1]} words per row; K={k} needs {packed_words(k, 4)}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide K={k}")
    groups = k // group_size
    ws = w_scale.float()
    if ws.dim() == 1:
        ws = ws[:, None]
    if ws.shape[1] != groups or ws.shape[0] not in (1, n):
        raise ValueError(f"w_scale shape {tuple(w_scale.shape)} does not match N={n}, G={groups}")
    ws = ws.expand(n, groups).contiguous()
    if x_scale.numel() != m:
        raise ValueError(f"x_scale must have one scale per row ({m}), got shape {tuple(x_scale.shape)}")
    xs = x_scale.float().reshape(m).contiguous()
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got shape {tuple(bias.shape)}")
        bias = bias.reshape(n).contiguous()
    _check_device(x_int8, xs, w_packed, ws, *(() if bias is None else (bias,)))
    x_int8 = x_int8.contiguous()
    w_packed = w_packed.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x_int8.device)
    if m == 0 or n == 0:
        return out
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_k is None:
        block_k = _largest_block_k(group_size)
    _, mm_kernel = _kernels(_interpreting())
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    mm_kernel[grid](
        x_int8,
        xs,
        w_packed,
        ws,
        ws if bias is None else bias,  # unused pointer when there is no bias
        out,
        m,
        n,
        group_size,
        groups,
        x_int8.stride(0),
        w_packed.stride(0),
        ws.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        PER_CHANNEL=groups == 1,
        ROUND_OUT=_round_code(out_dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def w4a8_linear_triton(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    qmax: int = 127,
    clip_ratio: float = 1.0,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype: per-token quantization (optionally smoothed) then
    the packed W4A8 GEMM. ``qmax=7`` gives W4A4 (codes still held in int8)."""
    k = x.shape[-1]
    xq, xs = quantize_per_token_triton(x, qmax=qmax, clip_ratio=clip_ratio, smooth=smooth)
    y = w4a8_matmul_triton(xq, xs, w_packed, w_scale, group_size, x.dtype, bias)
    return y.reshape(*x.shape[:-1], w_packed.shape[0]) if k else y
