"""`QuantLinear`: a drop-in replacement for nn.Linear holding a packed low-bit weight.

Buffers are named like compressed-tensors' pack-quantized checkpoints (``weight_packed``,
``weight_scale``, ``weight_zero_point``, ``weight_shape``) so a checkpoint's tensors load
straight into ``state_dict`` / `from_state`.

``forward`` picks a kernel per call from the device, dtype and number of rows (see
`QuantLinear.kernel_for`); the unpacked / prepared weight each kernel wants is built lazily
on first use and cached on the module (not in the state dict).

Kernel paths (``KERNELS``) and what each really computes:

* ``dequant``: reference. Dense copy of the dequantized weight in x.dtype + F.linear (AMX bf16
  on CPU). With activation quantization, x is rounded per token first, then dequantized to
  x.dtype. The dense copy (2 B/weight in bf16) is cached only when ``cache_dequantized``; otherwise,
  on CPU, a fused kernel dequantizes the packed weight per call into one per-thread scratch buffer
  shared by all layers (the largest layer's dense size, kept for the thread's life).
* ``w16_dot_cpu`` (weight-only, no dense copy, CPU with AVX512-BF16 and no AMX, 9-64 rows): the packed
  weight dequantized to bf16 one block of 64 output columns at a time into a per-thread buffer that stays in cache,
  multiplied there with bf16 dot products (fp32 sums, rounded once): the same products as ``dequant`` in another
  summation order, without writing a dense copy of the whole weight per call.
* ``w32_dot_cpu`` (weight-only, no dense copy, float32 x on CPU with AVX2 + FMA, up to W32_DOT_MAX_ROWS rows): the
  same for float32 activations (the default on CPUs without native bf16): 16 columns at a time dequantized to
  float32 in cache and multiplied with FMAs; the products of ``dequant``'s float32 GEMM in another summation order.
* ``int4_cpu`` / ``int8pack_cpu`` / ``int4_cuda``: weight-only kernels (tinygemm int4,
  ``_weight_int8pack_mm``); prepared weight always cached (int4: about the packed size; int8pack:
  1 B/weight).
* ``int8_act`` (W8A8 / W4A8 / W4A4): x quantized per token to int8 codes, a true integer GEMM
  (``_int_mm``, AMX-int8 on CPU, int32 accumulation; on CPUs where PyTorch's is a reference loop, i.e. without
  AVX512-VNNI / AMX, the AVX2 int16 kernel ``native.int8_mm``, same integers) against int8 weight codes, rescaled
  in fp32.
  Per channel: one GEMM. Group-wise scales: one int GEMM per group of K/G inputs, each rescaled
  by its scales (exact; on CPU the groups' products are reduced in one fused pass). The int8 weight copy is
  prepared once and always cached: 1 B/weight, i.e. 2x the packed int4 weight (8-bit per-channel
  weights reuse ``weight_packed``: no copy).
* ``int8_vnni`` (CPU with AVX512-VNNI, or AVX2 for weights of <= 4 bits): the same integer GEMM and epilogue as
  ``int8_act`` in one fused pass (runtime/cpu_kernels.c; on AVX2 VPDPBUSD is emulated with VPMADDUBSW + VPMADDWD,
  exact while |code| <= 64): int8 codes with zero points folded in, packed once for VPDPBUSD (1 B/weight), group
  scales applied inside the K loop (no per-group product buffer), bit-identical outputs. Chosen for every
  weight-activation layer it can tile on such CPUs (see `kernels.vnni_wins`), except 8-bit per-channel layers
  without ``cache_dequantized``, which ``int8_act`` runs on the stored weight without a copy.
* ``int4_cpu_act`` / ``int8pack_cpu_act`` (W?A8 at few rows on CPU without VNNI): x is quantized per token to
  real integer codes exactly as for ``int8_act``; the codes (``q - zp``, |.| <= 255, exact in bf16)
  go through the weight-only int4 / int8 kernel and its bf16 output is multiplied in place by the
  per-token scale. The integer GEMM is *simulated* by a bf16-input kernel (fp32 accumulation,
  weight scales rounded to bf16): same activation rounding, float (not integer) arithmetic.
* ``fold_bf16`` (group-wise W?A8 with many groups at many rows on CPU, only with ``cache_dequantized`` and without
  the fused CPU kernels, whose per-group integer GEMMs are as fast): x quantized
  to integer codes as above; the codes (exact in bf16) times a cached bf16 dequantized weight on
  the AMX bf16 GEMM (fp32 accumulation, output rounded to bf16), rescaled per token in place. This
  *simulates* the integer GEMM in bf16: the only differences from exact integer arithmetic are the
  bf16 rounding of each dequantized weight and of the GEMM output (relative 2^-9), the same as the
  ``dequant`` reference. It costs the dense bf16 copy (2 B/weight, 4x the packed int4 weight).
* ``triton_w4a8``: CUDA (or the Triton interpreter): packed int4 unpacked in registers, int8 GEMM. Chosen for
  group-wise weights on CUDA; per channel ``int8_act`` measured 3-10x faster on an H200.

A layer that runs both few-row and many-row inputs keeps each path's prepared weight: e.g. a W4A8 g128
layer of a 4096x4096 weight (packed 8.5 MiB, bf16 32 MiB) adds 8.5 MiB (int4 kernel state) plus 16 MiB
(int8 copy) without ``cache_dequantized``, or 8.5 + 32 MiB (dense bf16 copy) with it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.packing import packed_words, unpack_cols, unpack_rows
from ..errors import UserError
from ..quantization.grid import fake_quant_act, quantize_per_token_affine
from ..quantization.qweight import QuantizedWeight
from ..quantization.spec import ActSpec, WeightSpec
from . import kernels as K
from . import native

# Measured on a 2-core AMX CPU (benchmarks/kernels.py, LLaDA-8B layer shapes, bf16): the int4 kernel
# takes 0.25-0.27x the AMX bf16 GEMM's time at 1 row, 0.5x at 4, 0.87-0.93x at 8 and 1.3-1.4x at 16.
# With a cached dequantized copy the dense GEMM wins from 16 rows on; without one (the default, to
# save memory) dequantizing per call costs 12x at 256 rows, so the int4 kernel is used at any size.
INT4_CPU_MAX_ROWS = 8
# Without a cached dense copy, on a 2-core AMD EPYC without AMX (AVX-512 bf16/VNNI; benchmarks/kernels.py, 4096x4096
# and 12288x4096 g128): the int4 kernel takes 0.8-0.9x bf16 at 8 rows, 1.2-1.4x at 16, 1.6-1.8x at 32, 2.5x at 256;
# the fused per-call dequantization into a scratch buffer plus the bf16 GEMM ~1.6x at 16, 1.4x at 32, 1.2x at 64 and
# 1.07x at 256. Above this many rows the per-call dense path is used (where the fused kernel is available).
INT4_CPU_UNCACHED_MAX_ROWS = 24
INT8PACK_CPU_MAX_ROWS = 4
# Weight-only layers without a dense copy on a CPU with AVX512-BF16 (no AMX), LLaDA-8B shapes 4096x4096 / 12288x4096
# g128 (benchmarks/kernels.py, two runs; time / bf16): the fused kernel that dequantizes a cache-sized block of
# columns and multiplies it there (`w16_dot_cpu`) takes 1.00-1.18x at 16 rows, 1.03-1.15x at 32 and 1.07-1.14x at 64,
# against 1.21-1.32x (int4 kernel), 1.39-1.46x and 1.27-1.30x for the previous paths; from 96 rows it measured
# 1.08-1.38x and at 256 1.13-1.26x, against 1.07-1.13x at 256 for the per-call dequantization + oneDNN's blocked
# GEMM, which keeps those sizes. The int4 kernel keeps the rows up to W16_DOT_MIN_ROWS (0.2-0.4x at 1 row). Not used
# on AMX CPUs (not measured there: oneDNN's AMX bf16 GEMM on the per-call copy should win).
W16_DOT_MIN_ROWS = 8
W16_DOT_MAX_ROWS = 64
# float32 inputs (the default on CPUs without native bf16), weight-only layers without a dense copy, 4096x4096 g128 on
# a 2-core AVX2 AMD EPYC (time / float32 F.linear, one run): the AVX2 + FMA kernel that dequantizes 16 columns at a
# time to float32 and multiplies them in cache (`w32_dot_cpu`) 1.34x at 1 row, 0.43x at 8, 0.55x at 16, 0.86x at 32,
# 1.03x at 64, 1.63x at 256; the per-call float32 dequantization + MKL's GEMM 1.68x, 1.55x, 1.11x, 1.73x, 1.0-1.8x
# (noisy), 1.02x. So the kernel up to this many rows, the dense path above.
W32_DOT_MAX_ROWS = 48
# CUDA, measured on one H200 (benchmarks/gpu_check.py, benchmarks/results/gpu/gpu_check.md, LLaDA-8B layer shapes,
# time / bf16 F.linear): tinygemm W4A16 is 0.6-1.08x at 1 row, 0.63-0.70x at 8, 0.17-0.24x at 64 and 0.04-0.06x
# from 512 rows on. Above 8 rows the dense path (dequantize, cuBLAS bf16) is used: one dequantization per call
# reads the packed weight and writes a bf16 copy (bandwidth-bound, not yet timed on the GPU), against tinygemm's
# 6.9 ms at 2048 rows of a 4096x12288 layer where bf16 takes 0.28 ms.
INT4_CUDA_MAX_ROWS: int | None = 8
# Weight-activation layers on CUDA, same run, per-channel weights: the Triton W4A8 kernel (default block sizes) ran
# at 0.02-0.15x bf16's speed, one `_int_mm` (int8_act) at 0.10-0.42x, i.e. 3-10x faster. So per-channel layers use
# `_int_mm`. Group-wise layers keep Triton (0.01-0.07x): their `_int_mm` path is one GEMM per group, not yet timed
# on a GPU. Both are far from bf16: the next GPU session sweeps Triton block sizes (benchmarks/gpu_check.py).
CUDA_TRITON_W4A8_STRATEGIES = ("group",)

# Weight-activation layers on CPU (W8A8 / W4A8, per-token int8 activations). Measured at LLaDA-8B layer shapes
# (benchmarks/kernels.py --rows 1 8 256 2048 --threads 1, time / bf16 F.linear in the same run, shared machine):
# * <= 8 rows, <= 4-bit weights: the int4 kernel on the activation codes, 0.1-0.4x at 1 row, 0.8-1.0x at 8
#   (`_int_mm` is fast at 1 row, 0.1-0.4x, but 1.7-2.3x at 2-16 rows: oneDNN switches kernels above M = 1);
# * 2-8 rows, 8-bit per-channel weights: the int8 weight-only kernel on the codes, 1.1-1.2x at 8 rows, vs 1.7-2x
#   for `_int_mm`; 1 row: `_int_mm`;
# * more rows, per-channel weights: one `_int_mm`, 0.65-0.77x at 256 rows, 0.7-0.9x at 2048;
# * more rows, group-wise weights: one int GEMM per group, all into one scratch buffer and reduced by the fused CPU
#   epilogue (runtime/native.py): 1.0-1.2x bf16 at the bundled model's 3-8 groups, 0.96-1.06x at LLaDA-8B's 32-96
#   groups at 256 rows, against 1.04-1.41x for the bf16 fold, which also needs a dense copy
#   (`python benchmarks/act_paths.py`, AMD EPYC without AMX). Without the fused kernels the torch loop over groups
#   costs 3-3.8x at 32 groups, so then the fold is used beyond ACT_INT8_CPU_MAX_GROUPS groups when a dense bf16
#   copy may be cached (`cache_dequantized`).
ACT_INT4_CPU_MAX_ROWS = 8
ACT_INT8PACK_CPU_MAX_ROWS = 8
# Large per-channel layers whose `_int_mm` runs as W @ X^T (kernels.INT8_SWAPPED_MIN_WEIGHTS), 4096x4096, AMD EPYC:
# int8_act 0.91-0.95x bf16 at 4 rows vs the weight-only kernels on the codes 0.61-0.76x; at 8 rows 0.74-0.91x vs
# 0.93-1.06x; from 16 rows 0.59-0.73x vs 1.3-2.9x. So the code kernels only up to 4 rows there.
ACT_CODES_SWAPPED_MAX_ROWS = 4
ACT_INT8_CPU_MAX_GROUPS = 8

KERNELS = ("dequant", "int4_cpu", "int8pack_cpu", "int4_cuda", "w16_dot_cpu", "w32_dot_cpu", "int8_act", "int8_vnni",
           "triton_w4a8", "int4_cpu_act", "int8pack_cpu_act", "fold_bf16")
ACT_CODE_KERNELS = ("int4_cpu_act", "int8pack_cpu_act", "fold_bf16")  # float GEMMs on integer activation codes

_FORCED: str | None = None

# QuantLinear keeps a call plan per input shape (a denoising step and generation each run one or two shapes); past
# this many it starts over, so inputs of ever-changing lengths cannot grow the table.
MAX_PLANS = 16
# Attributes that change what a plan does: setting one drops the layer's plans.
PLAN_INPUTS = frozenset({"cache_dequantized", "input_transform", "act_spec", "spec", "bias", "compute_dtype",
                         "in_features", "out_features"})
_NO_PLAN = object()


def set_dispatch(force: str | None) -> None:
    """Force every QuantLinear onto one kernel path (tests, benchmarks); None = automatic.

    A forced path that a layer or input cannot run raises instead of silently falling back,
    so a benchmark never reports the wrong kernel.
    """
    global _FORCED
    if force is not None and force not in KERNELS:
        raise ValueError(f"unknown kernel {force!r}; choose one of {', '.join(KERNELS)}")
    _FORCED = force


def get_dispatch() -> str | None:
    return _FORCED


@contextlib.contextmanager
def force_kernel(force: str | None) -> Iterator[None]:
    """Context-manager form of `set_dispatch`."""
    previous = _FORCED
    set_dispatch(force)
    try:
        yield
    finally:
        set_dispatch(previous)


_LAST_QUANTIZED = threading.local()


def _quantize_shared_input(x: torch.Tensor, x2: torch.Tensor, spec: ActSpec):
    """`quantize_per_token_affine(x2, spec)` for x2 = x as rows, reusing the previous call's result when it was for the
    same tensor object at the same version with the same spec: q/k/v (and gate/up) read one input and quantize it
    alike, so they share one quantization. Inference tensors carry no version counter, so they are never reused."""
    if x.is_inference():
        return quantize_per_token_affine(x2, spec)
    last = getattr(_LAST_QUANTIZED, "entry", None)
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == spec:
        return last[3]
    out = quantize_per_token_affine(x2, spec)
    _LAST_QUANTIZED.entry = (weakref.ref(x), x._version, spec, out)  # holds the codes (1 B/element) until replaced
    return out


class QuantLinear(nn.Module):
    """Linear layer with a packed int weight; computes ``x @ W_hat.T + bias``.

    Storage: ``weight_packed`` int32 [N, ceil(K*bits/32)] (int8 [N, K] for 8-bit),
    ``weight_scale`` [N, G] (fp32 by default, like the checkpoint writer stores it, so a
    saved and reloaded layer computes exactly what the freshly quantized one did),
    ``weight_zero_point`` packed along dim 0 (asymmetric only), ``weight_shape`` [2].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: WeightSpec,
        act_spec: ActSpec = ActSpec(),
        bias: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
        cache_dequantized: bool = True,
        device: torch.device | str | None = None,
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        spec.check_layer("QuantLinear", in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act_spec = act_spec
        self.compute_dtype = compute_dtype
        # Keeping dense / int8-unpacked copies costs memory (2 bytes/weight for bf16) but
        # avoids unpacking on every call; turn off to keep only the packed weight resident.
        self.cache_dequantized = cache_dequantized
        self._cache: dict[tuple, Any] = {}
        self._plans: dict[tuple, Any] = {}  # call plans by input (shape, dtype, device): `_plan`
        n, k, bits = out_features, in_features, spec.num_bits
        rows, groups = self._param_shape()
        if bits == 8:
            packed = torch.zeros(n, k, dtype=torch.int8, device=device)
        else:
            packed = torch.zeros(n, packed_words(k, bits), dtype=torch.int32, device=device)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=scale_dtype, device=device))
        if spec.symmetric:
            self.register_buffer("weight_zero_point", None)
        elif bits == 8:
            self.register_buffer("weight_zero_point", torch.zeros(rows, groups, dtype=torch.int8, device=device))
        else:
            zp = torch.zeros(packed_words(rows, bits), groups, dtype=torch.int32, device=device)
            self.register_buffer("weight_zero_point", zp)
        self.register_buffer("weight_shape", torch.tensor([n, k], dtype=torch.int64, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=compute_dtype, device=device) if bias else None)
        # online transform of the input (rotation / smoothing of weight-activation methods), or None
        self.input_transform: nn.Module | None = None

    # ------------------------------------------------------------------ construction

    def _param_shape(self) -> tuple[int, int]:
        """(rows, groups) of scale / zero point: [1, 1] per tensor, [N, G] otherwise."""
        if self.spec.strategy == "tensor":
            return 1, 1
        return self.out_features, self.spec.groups(self.in_features)

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        act_spec: ActSpec = ActSpec(),
        compute_dtype: torch.dtype = torch.bfloat16,
        cache_dequantized: bool = True,
    ) -> "QuantLinear":
        from ..checkpoint.serialize import packed_tensors

        m = cls.from_state(packed_tensors(qw), qw.spec, act_spec, bias=bias, cache_dequantized=cache_dequantized)
        m.compute_dtype = compute_dtype
        if bias is not None:
            m.bias.data = m.bias.data.to(compute_dtype)
        return m

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, torch.Tensor],
        spec: WeightSpec,
        act_spec: ActSpec = ActSpec(),
        bias: torch.Tensor | None = None,
        cache_dequantized: bool = True,
        name: str = "layer",
    ) -> "QuantLinear":
        """Build from checkpoint tensors (weight_packed / weight_scale / weight_zero_point /
        weight_shape); shapes are validated so a tampered checkpoint fails with a UserError."""
        for key in ("weight_packed", "weight_scale", "weight_shape"):
            if key not in tensors:
                raise UserError(f"checkpoint tensor {name}.{key} is missing")
        shape = tensors["weight_shape"].flatten().tolist()
        if len(shape) != 2 or min(shape) <= 0:
            raise UserError(f"{name}.weight_shape must hold [out_features, in_features], got {shape}")
        n, k = int(shape[0]), int(shape[1])
        scale = tensors["weight_scale"]
        m = cls(
            k,
            n,
            spec,
            act_spec,
            bias=bias is not None,
            compute_dtype=bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16,
            cache_dequantized=cache_dequantized,
            device=scale.device,
            scale_dtype=scale.dtype,  # keep the checkpoint's precision
        )

        def check(key: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape) != tuple(like.shape):
                raise UserError(
                    f"{name}.{key} has shape {tuple(t.shape)}, expected {tuple(like.shape)} for a "
                    f"[{n}, {k}] weight quantized as {spec.describe()}; the checkpoint is corrupt or "
                    "its config does not match"
                )
            if t.is_floating_point() != like.is_floating_point():
                raise UserError(f"{name}.{key} has dtype {t.dtype}, expected {like.dtype}")
            return t.to(like.dtype)

        with torch.no_grad():
            m.weight_packed.copy_(check("weight_packed", tensors["weight_packed"], m.weight_packed))
            m.weight_scale.copy_(check("weight_scale", scale, m.weight_scale))
            if m.weight_zero_point is not None:
                if tensors.get("weight_zero_point") is None:
                    raise UserError(f"checkpoint tensor {name}.weight_zero_point is missing (asymmetric weights)")
                m.weight_zero_point.copy_(check("weight_zero_point", tensors["weight_zero_point"], m.weight_zero_point))
            if bias is not None:
                if tuple(bias.shape) != (n,):
                    raise UserError(f"{name}.bias has shape {tuple(bias.shape)}, expected ({n},)")
                m.bias.copy_(bias)
        return m

    # ------------------------------------------------------------------ weight views

    def codes(self) -> torch.Tensor:
        """Signed integer codes, int32 [N, K]."""
        if self.spec.num_bits == 8:
            return self.weight_packed.to(torch.int32)
        return unpack_rows(self.weight_packed, self.spec.num_bits, self.in_features)

    def zero_points(self) -> torch.Tensor | None:
        """Signed zero points, int32 [rows, G], or None when symmetric."""
        zp = self.weight_zero_point
        if zp is None:
            return None
        if self.spec.num_bits == 8:
            return zp.to(torch.int32)
        return unpack_cols(zp, self.spec.num_bits, self._param_shape()[0])

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes(), self.weight_scale.float(), self.zero_points(), self.spec)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def packed_nbytes(self) -> int:
        """Resident bytes of the packed weight and its quantization parameters."""
        total = self.weight_packed.nbytes + self.weight_scale.nbytes
        if self.weight_zero_point is not None:
            total += self.weight_zero_point.nbytes
        return total

    def cache_nbytes(self) -> int:
        """Bytes held by lazily built kernel states / dequantized copies."""
        total = 0
        own = {b.data_ptr() for b in self.buffers(recurse=False) if b is not None}  # shared with a buffer: free
        for v in self._cache.values():
            items = v if isinstance(v, tuple) else (v,)
            for t in items:
                if isinstance(t, torch.Tensor):
                    total += 0 if t.data_ptr() in own else t.nbytes
                elif isinstance(t, K.Int4State):
                    total += t.nbytes()
        return total

    def clear_cache(self) -> None:
        self._cache.clear()
        self._plans.clear()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Moving / casting the module invalidates anything derived from the buffers.
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in PLAN_INPUTS and "_plans" in self.__dict__:
            self._plans.clear()

    # ------------------------------------------------------------------ dispatch

    def _supported(self, path: str, x: torch.Tensor) -> bool:
        n, k, spec = self.out_features, self.in_features, self.spec
        wo = not self.act_spec.enabled  # weight-only kernels would skip activation quantization
        if path == "dequant":
            return True
        if path == "int8_act":
            return self.act_spec.enabled
        if path == "int8_vnni":
            # zero points folded into int8 codes (<= 4-bit weights, or none); 16-column vectors, 4-byte input steps
            return (self.act_spec.enabled and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                    and (spec.num_bits < 8 or spec.symmetric) and n % 16 == 0
                    and (k // self._param_shape()[1]) % 4 == 0 and native.int8_dot_available(spec.num_bits))
        if path == "triton_w4a8":
            # packed <=4-bit symmetric weights, per-token int activations; CUDA, or CPU under TRITON_INTERPRET=1
            from . import triton_kernels as T

            return (self.act_spec.enabled and self.act_spec.symmetric and spec.num_bits <= 4 and spec.symmetric
                    and spec.strategy in ("group", "channel") and T.triton_available()
                    and (x.device.type == "cuda" or T._interpreting()))
        if path == "int4_cpu":
            return wo and x.device.type == "cpu" and x.dtype == torch.bfloat16 and K.supports_int4_cpu(n, k, spec)
        if path == "w16_dot_cpu":
            return (wo and x.device.type == "cpu" and x.dtype == torch.bfloat16 and spec.num_bits in (2, 4, 8)
                    and k % 2 == 0 and self.weight_packed.device.type == "cpu" and native.bf16_dot_available())
        if path == "w32_dot_cpu":
            return (wo and x.device.type == "cpu" and x.dtype == torch.float32 and spec.num_bits in (2, 4, 8)
                    and self.weight_packed.device.type == "cpu" and native.w32_dot_available())
        if path == "int8pack_cpu":
            return (
                wo and x.device.type == "cpu" and x.dtype == torch.bfloat16 and K.supports_int8pack_cpu(n, k, spec)
            )
        if path == "int4_cuda":
            return (
                wo
                and x.device.type == "cuda"
                and x.dtype == torch.bfloat16
                and K.supports_int4_cuda(n, k, spec)
                and K.cuda_int4_available(x.device)
            )
        cpu_bf16_act = self.act_spec.enabled and x.device.type == "cpu" and x.dtype == torch.bfloat16
        if path == "int4_cpu_act":
            return cpu_bf16_act and K.supports_int4_cpu(n, k, spec)
        if path == "int8pack_cpu_act":
            return cpu_bf16_act and K.supports_int8pack_cpu(n, k, spec)
        if path == "fold_bf16":
            return cpu_bf16_act
        return False

    def kernel_for(self, x: torch.Tensor) -> str:
        """Name of the kernel path `forward` would use for input ``x``."""
        if _FORCED is not None:
            if not self._supported(_FORCED, x):
                raise RuntimeError(
                    f"forced kernel {_FORCED!r} cannot run this layer ([{self.out_features}, "
                    f"{self.in_features}] {self.spec.describe()}, act bits {self.act_spec.num_bits}) "
                    f"on a {x.dtype} input on {x.device.type}"
                )
            return _FORCED
        if self.act_spec.enabled:
            # Activation quantization changes the numerics, so it must apply at every size. On CUDA the
            # Triton kernel keeps 4-bit weights packed and unpacks them inside the int8 GEMM; per channel it
            # measured slower than `_int_mm` (see CUDA_TRITON_W4A8_STRATEGIES).
            if (x.device.type == "cuda" and self.spec.strategy in CUDA_TRITON_W4A8_STRATEGIES
                    and self._supported("triton_w4a8", x)):
                return "triton_w4a8"
            rows = x.numel() // self.in_features
            # the fused VNNI kernel, where it may keep its own copy of the codes (1 B/weight): always for <= 4-bit weights,
            # whose `int8_act` path keeps such a copy too; for 8-bit per-channel ones (which `int8_act` reads in place)
            # only where dense copies are kept (`cache_dequantized`: small layers by default)
            if (self._supported("int8_vnni", x) and K.vnni_wins(rows)
                    and (self.cache_dequantized or not self._int8_reads_packed())):
                return "int8_vnni"
            # CPU: measured crossovers, see ACT_INT4_CPU_MAX_ROWS; the activation rounding is the same on every path.
            # Large per-channel layers run `_int_mm` as W @ X^T (kernels.int8_swapped), which wins from 8 rows on.
            swapped = (x.device.type == "cpu" and native.library() is not None
                       and K.int8_swapped(rows, self.out_features * self.in_features, self.spec.strategy == "group"))
            code_rows = ACT_CODES_SWAPPED_MAX_ROWS if swapped else ACT_INT4_CPU_MAX_ROWS
            if rows <= code_rows and self._supported("int4_cpu_act", x):
                return "int4_cpu_act"
            if 1 < rows <= min(code_rows, ACT_INT8PACK_CPU_MAX_ROWS) and self._supported("int8pack_cpu_act", x):
                return "int8pack_cpu_act"
            if (self.spec.strategy == "group" and self.cache_dequantized and native.library() is None
                    and self._supported("fold_bf16", x)
                    and self.in_features // self.spec.group_size > ACT_INT8_CPU_MAX_GROUPS):  # type: ignore[operator]
                return "fold_bf16"
            return "int8_act"
        rows = x.numel() // self.in_features
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # every weight-only kernel but the float32 block kernel takes bf16 (this branch only saves the per-call
            # checks below: ~10 us of a 30 us layer at the bundled width)
            return ("w32_dot_cpu" if not self.cache_dequantized and rows <= W32_DOT_MAX_ROWS
                    and self._supported("w32_dot_cpu", x) else "dequant")
        if (not self.cache_dequantized and W16_DOT_MIN_ROWS < rows <= W16_DOT_MAX_ROWS and not native.has_amx()
                and self._supported("w16_dot_cpu", x)):
            return "w16_dot_cpu"
        if self._supported("int4_cpu", x) and (rows <= INT4_CPU_MAX_ROWS or not self.cache_dequantized and (
                rows <= INT4_CPU_UNCACHED_MAX_ROWS or not self._fast_dequant(x))):
            return "int4_cpu"
        if rows <= INT8PACK_CPU_MAX_ROWS and self._supported("int8pack_cpu", x):
            return "int8pack_cpu"
        if (INT4_CUDA_MAX_ROWS is None or rows <= INT4_CUDA_MAX_ROWS) and self._supported("int4_cuda", x):
            return "int4_cuda"
        return "dequant"

    # ------------------------------------------------------------------ prepared states

    def _cached(self, key: tuple, build, keep: bool = True):
        hit = self._cache.get(key)
        if hit is None:
            hit = build()
            if keep:
                self._cache[key] = hit
        return hit

    def _scale_f32(self) -> torch.Tensor:
        return self.weight_scale.float()

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense weight in x's dtype for one call: cached when `cache_dequantized`, else (CPU, fused kernel)
        written into the thread's scratch buffer, valid until the next layer's call, else a fresh copy."""
        if not self.cache_dequantized and self._fast_dequant(x):
            n, k = self.out_features, self.in_features
            w = self._dequantize(x, out=native.scratch(n * k, x.dtype).view(n, k))
            if w is not None:
                return w
        return self._cached(("dequant", x.device, x.dtype), lambda: self._dequantize(x), keep=self.cache_dequantized)

    def _fast_dequant(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and self.weight_packed.device.type == "cpu" and self.spec.num_bits in (2, 4, 8)
                and native.library() is not None)

    def _dequantize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        # CPU: one fused pass from the packed words, bit-identical to `dequantized_weight`; 1.3 ms for a 4096x4096
        # int4 layer into a warm buffer, against 20 ms for its bf16 GEMM at 256 rows, where the int4 kernel takes
        # 2.5x the GEMM's time on CPUs without AMX (benchmarks/kernels.py)
        if self._fast_dequant(x):
            n = self.out_features
            zp = self.zero_points()
            w = native.dequantize_packed(self.weight_packed, self.spec.num_bits, self.in_features,
                                         K._per_row(self._scale_f32(), n), None if zp is None else K._per_row(zp, n),
                                         x.dtype, out=out)
            if w is not None or out is not None:
                return w
        return self.dequantized_weight(x.dtype).to(x.device)

    def _int4_cpu_state(self) -> K.Int4State:
        return self._cached(
            ("int4_cpu",),
            lambda: K.prepare_int4_cpu(self.codes(), self._scale_f32(), self.zero_points(), dtype=torch.bfloat16),
        )

    def _int8pack_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            w = self.weight_packed if self.spec.num_bits == 8 else self.codes()
            return K.prepare_int8pack(w, self._scale_f32())

        return self._cached(("int8pack_cpu",), build)

    def _int4_cuda_state(self, device: torch.device) -> K.Int4State:
        return self._cached(
            ("int4_cuda", device),
            lambda: K.prepare_int4_cuda(self.codes(), self._scale_f32(), self.zero_points(), device=device),
        )

    def _int8_reads_packed(self) -> bool:
        """Whether `int8_act` computes on the stored weight itself (8-bit, one scale per row, no zero point)."""
        return self.spec.num_bits == 8 and self.weight_zero_point is None and self.spec.strategy != "group"

    def _int8_act_state(self, device: torch.device):
        """(w_int8, w_scale, w_zero_point) laid out for `kernels.int8_linear`."""

        def build():
            n, k = self.out_features, self.in_features
            scale = K._per_row(self._scale_f32(), n)
            zp = self.zero_points()
            groups = scale.shape[1]
            if self.spec.num_bits == 8 and groups == 1 and zp is None and self.weight_packed.device == device:
                # the stored int8 [N, K] weight already is the layout `_int_mm` wants: no copy
                return self.weight_packed, scale.reshape(n).contiguous().to(device), None
            w, zp_arg = self._int8_codes(groups)
            if groups == 1:
                return w.contiguous().to(device), scale.reshape(n).contiguous().to(device), (
                    None if zp_arg is None else zp_arg.reshape(n).to(device)
                )
            w = w.view(n, groups, k // groups).transpose(0, 1).contiguous()
            return w.to(device), scale.contiguous().to(device), None if zp_arg is None else zp_arg.to(device)

        # A prepared kernel weight, like the int4 state: always cached (never rebuilt per call), whatever
        # `cache_dequantized` says. Costs 1 B/weight (2x a packed int4 weight; 0 for 8-bit per channel).
        return self._cached(("int8_act", device), build)

    def _int8_codes(self, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(int8 codes [N, K], int32 zero points [N, G] still to apply, or None). Below 8 bits the zero point is folded
        into the codes (|q - zp| <= 2^bits - 1 <= 127); 8-bit zero points do not fit and are returned."""
        n, k = self.out_features, self.in_features
        q = self.codes()
        zp = self.zero_points()
        if zp is None:
            return q.to(torch.int8), None
        zp = K._per_row(zp, n)
        if self.spec.num_bits == 8:
            return q.to(torch.int8), zp.contiguous()
        return (q - zp.repeat_interleave(k // groups, dim=1)).to(torch.int8), None

    def _vnni_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(packed int8 codes with zero points folded in, int32 code sums [G, N], fp32 scales [G, N], G) for
        `native.int8_vnni_linear` (8-bit asymmetric weights never come here: `_supported`). Cached like the int8 copy
        of `int8_act`: 1 B/weight."""

        def build():
            n, k = self.out_features, self.in_features
            scale = K._per_row(self._scale_f32(), n)
            groups = scale.shape[1]
            w, _ = self._int8_codes(groups)
            wsum = w.view(n, groups, k // groups).sum(dim=2, dtype=torch.int32).t().contiguous()
            return native.pack_vnni(w), wsum, scale.t().contiguous(), groups

        return self._cached(("int8_vnni",), build)

    def _w16_dot_args(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 scales [N, G], int32 zero points [N, G] or None) for `native.w16_dot_linear`. Not cached: the layer
        keeps no state on this path (views for symmetric weights; asymmetric zero points unpack a few KiB)."""
        n = self.out_features
        zp = self.zero_points()
        return K._per_row(self._scale_f32(), n), None if zp is None else K._per_row(zp, n)

    def _act_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token activation quantization for the float-GEMM paths: (codes ``q - zp`` in x.dtype, fp32
        scale [M, 1]). Same rounding as ``int8_act``; |q - zp| <= 255 is exact in bf16."""
        xq, xs, xz = quantize_per_token_affine(x2, self.act_spec)
        codes = xq.to(x2.dtype) if xz is None else (xq.to(torch.int32) - xz).to(x2.dtype)
        return codes, xs

    def _rescale(self, y: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-token scale (and bias) applied in place to a GEMM output computed on activation codes."""
        if y.dtype != dtype:
            y = y.to(dtype)
        y.mul_(xs)  # computed in fp32, rounded once to the output dtype (no fp32 [M, N] temporary)
        if self.bias is not None:
            y.add_(self.bias.to(dtype))
        return y

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The call plan for this input's shape, dtype and device (see `_plan`): at the bundled model's width the
        # checks below cost 40-70 us per call, as much as the layer's arithmetic, on every denoising step.
        if _FORCED is None and not x.requires_grad and not native.kernels_off():
            key = (x.shape, x.dtype, x.device)
            plans = self._plans
            run = plans.get(key, _NO_PLAN)
            if run is _NO_PLAN:
                if len(plans) >= MAX_PLANS:
                    plans.clear()
                run = plans[key] = self._plan(x)
            if run is not None:
                y = run(x)
                if y is not None:
                    return y
        return self._forward(x)

    def _plan(self, x: torch.Tensor):
        """What `_forward` does for inputs like ``x`` (shape, dtype, device), as a callable with the dispatch decided
        and the kernels' arguments checked once; it returns None where a kernel declines (then `_forward` runs).
        None for paths without a plan. Plans are dropped whenever what they were built from changes (`clear_cache`,
        `.to()`, a state dict load, or setting an attribute in `PLAN_INPUTS`)."""
        path = self.kernel_for(x)
        out_shape = (*x.shape[:-1], self.out_features)
        if path == "dequant" and not self.act_spec.enabled and self.input_transform is None and self.cache_dequantized:
            w, bias = self._dense(x), self.bias
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            return lambda x: F.linear(x, w, bias)
        if path != "int8_vnni" or x.device.type != "cpu":
            return None
        wp, wsum, ws, groups = self._vnni_state()
        gemm = native.int8_vnni_plan(self.in_features, wp, self.out_features, groups, wsum, ws, x.dtype, self.bias)
        if gemm is None:
            return None
        spec, k, tr = self.act_spec, self.in_features, self.input_transform
        quantizer = getattr(tr, "quantizer", None)
        quantize = None if quantizer is None else quantizer(x, spec)  # transform and quantization in one pass
        if quantize is None:
            def quantize(x):
                if tr is not None:
                    x = tr(x)
                return _quantize_shared_input(x, x.reshape(-1, k), spec)

        def run(x):
            codes = quantize(x)
            y = None if codes is None else gemm(*codes)
            return None if y is None else y.view(out_shape)

        return run

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        path = self.kernel_for(x)  # online transforms keep the shape, dtype and device it depends on
        fused = None
        if self.input_transform is not None:
            quantized = getattr(self.input_transform, "quantized", None)
            if path in ("int8_act", "int8_vnni") and quantized is not None:
                fused = quantized(x, self.act_spec)  # transform and activation quantization in one pass (CPU)
            if fused is None:
                x = self.input_transform(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        bias = self.bias
        if path == "dequant":
            if self.act_spec.enabled:
                # Reference for W?A?: same per-token rounding as int8_act, dense float GEMM (CPU: one fused pass)
                x2 = fake_quant_act(x2, self.act_spec)
            y = F.linear(x2, self._dense(x), bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
        elif path == "triton_w4a8":
            from . import triton_kernels as T

            packed = self._cached(("triton_w4", x.device), lambda: (
                self.weight_packed if self.spec.num_bits == 4 else T.pack_w4_for_triton(self.codes())).to(x.device))
            y = T.w4a8_linear_triton(x2, packed, self._scale_f32().to(x.device), K._group_len(self.spec, self.in_features),
                                     bias, qmax=self.act_spec.qmax, clip_ratio=self.act_spec.clip_ratio)
        elif path in ("int8_act", "int8_vnni"):
            # xz: asymmetric activations only
            xq, xs, xz = fused if fused is not None else _quantize_shared_input(x, x2, self.act_spec)
            if path == "int8_vnni":
                wp, wsum, ws, groups = self._vnni_state()
                y = native.int8_vnni_linear(xq, xs, xz, wp, self.out_features, groups, wsum, ws, x.dtype, bias)
                if y is None:
                    raise RuntimeError("the int8 VNNI kernel declined a layer it was dispatched to")
            else:
                w, ws, wzp = self._int8_act_state(x.device)
                wsum = None if xz is None else self._cached(
                    ("int8_act_wsum", x.device), lambda: K.weight_code_sums(w, wzp))  # [N] / [G, N] int32: tiny
                y = K.int8_linear(xq, xs, w, ws, x.dtype, bias, w_zero_point=wzp, x_zero_point=xz, w_sum=wsum)
        elif path in ACT_CODE_KERNELS:
            codes, xs = self._act_codes(x2)
            if path == "int4_cpu_act":
                y = K.int4_cpu_mm(codes, self._int4_cpu_state())
            elif path == "int8pack_cpu_act":
                y = K.int8pack_mm(codes, *self._int8pack_state())
            else:  # fold_bf16: the dense weight cached, or dequantized per call into the scratch buffer
                y = F.linear(codes, self._dense(codes))
            y = self._rescale(y, xs, x.dtype)
        else:
            if path in ("w16_dot_cpu", "w32_dot_cpu"):
                if path == "w16_dot_cpu":
                    y = native.w16_dot_linear(x2, self.weight_packed, self.spec.num_bits, *self._w16_dot_args(),
                                              x.dtype, bias)
                else:
                    y = native.w32_dot_linear(x2, self.weight_packed, self.spec.num_bits, *self._w16_dot_args(), bias)
                if y is None:
                    raise RuntimeError(f"the weight-only dot-product kernel {path} declined a layer it was dispatched to")
                bias = None  # added by the kernel
            elif path == "int4_cpu":
                y = K.int4_cpu_mm(x2, self._int4_cpu_state())
            elif path == "int8pack_cpu":
                y = K.int8pack_mm(x2, *self._int8pack_state())
            else:  # int4_cuda
                y = K.int4_cuda_mm(x2, self._int4_cuda_state(x.device))
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = f"int{self.act_spec.num_bits} per-token" if self.act_spec.enabled else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.spec.describe()}, act_quant={act}, bias={self.bias is not None}"
        )
