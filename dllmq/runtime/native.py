"""Fused CPU kernels (cpu_kernels.c): per-token activation quantization, the int8 GEMM's epilogue and a
column permutation, each one pass where PyTorch runs 4-10 element-wise ops with a fresh tensor each.

At the bundled model's width (384) those op chains cost more than the int8 GEMM saves, which made W8A8 and
W4A8 checkpoints slower than bf16; fused, they cost a few microseconds per layer. The results are
bit-identical to the torch code they replace (same float32 operations in the same order), so every path
that uses them keeps its numbers; tests/test_native_kernels.py checks it.

The C file is compiled on first use with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native
-fopenmp``, no fast-math) into ``$DLLMQ_CACHE/native/`` (default ``~/.cache/dllmq``), keyed by source, flags
and CPU, and loaded with ctypes: no torch headers, so compiling takes about a second. It links the OpenMP
runtime that PyTorch itself loaded (libgomp.so.1), so both share one thread pool. Without a compiler, or
with ``DLLMQ_NATIVE=0``, every caller falls back to the torch code: same results, slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Below this many elements one thread does it: waking the pool costs more than the work.
_PARALLEL_MIN = 1 << 15

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_status = "not loaded yet"
_off = threading.local()  # `torch_only()` sets it: the kernels are skipped in this thread


def _cache_dir() -> Path:
    return Path(os.environ.get("DLLMQ_CACHE", Path.home() / ".cache" / "dllmq")) / "native"


def _cpu_id() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another sharing the cache."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


_SCRATCH = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread CPU buffer of at least `numel` elements of `dtype`, reused by every layer for what one call
    consumes at once (a per-call dense weight, the int32 products of a group-wise GEMM). Fresh tensors of that size
    (above glibc's 32 MiB mmap threshold) page-fault on every call: 10 ms for 32 MiB, more than the work they hold.
    Keeps the largest size asked for (e.g. 96 MiB bf16 at LLaDA-8B's MLP) for the life of the thread."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (oneDNN's bf16 GEMMs then outrun the AVX-512 kernels here)."""
    return "amx_bf16" in _cpu_id().split()


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (tensor cores; AVX512-BF16 / AMX on x86 CPUs). Elsewhere bf16 is
    emulated: on a 2-core AVX2 AMD EPYC a bf16 step of the bundled model took 5.3x its float32 time."""
    device = str(device)
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    return _cpu_native_bf16()


@functools.cache
def torch_int8_gemm_fast() -> bool:
    """Whether PyTorch's CPU `_int_mm` runs a real int8 kernel here (oneDNN with AVX512-VNNI or AMX). On an AVX2-only
    AMD EPYC it ran a reference loop: 4096x4096 at 256 rows in 2.2 s, 22x the float32 GEMM (benchmarks/kernels.py)."""
    return bool({"avx512_vnni", "amx_int8"} & set(_cpu_id().split()))


@functools.cache
def _cpu_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpu_id().split()))


def cpu_description() -> str:
    """CPU model and its matrix extensions, e.g. 'AMD EPYC (avx512_vnni, avx512_bf16)': kernel crossovers differ
    between CPUs (AMX or not), so benchmark results name the machine they were measured on."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line
    except OSError:
        pass
    extra = [f for f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16") if f in flags.split()]
    if not extra:
        extra = ["AVX2, no AVX-512 / AMX" if "avx2" in flags.split() else "no AMX / AVX-512 int8 or bf16"]
    return f"{model} ({', '.join(extra)})"


def _compile(cc: str, out: Path, extra: list[str]) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            log.debug("compiling %s failed: %s", SOURCE.name, r.stderr.strip()[-500:])
            return False
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("compiling %s failed: %s", SOURCE.name, e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("DLLMQ_NATIVE", "1") == "0":
        _status = "disabled (DLLMQ_NATIVE=0)"
        return None
    if platform.system() != "Linux":
        _status = f"not built on {platform.system()} (Linux only for now)"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        _status = "no C compiler found (set CC); using the torch fallback"
        return None
    for extra in (["-march=native"], []):
        # torch's version is in the key: its OpenMP runtime is the one the library binds to
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, *extra, _cpu_id(), torch.__version__])
                             .encode()).hexdigest()[:16]
        so = _cache_dir() / f"cpu_kernels-{key}.so"
        if so.exists() or _compile(cc, so, extra):
            try:
                lib = ctypes.CDLL(str(so))
            except OSError as e:
                log.debug("loading %s failed: %s", so, e)
                continue
            _declare(lib)
            _status = f"loaded {so}"
            return lib
    _status = f"compiling {SOURCE.name} with {cc} failed; using the torch fallback"
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dllmq_quant_rows.argtypes = [p, i32, i64, i64, i64, i32, f32, i32, i32, p, p, p, p, i32]
    lib.dllmq_quant_rows.restype = None
    lib.dllmq_int8_epilogue.argtypes = [p, i64, i64, p, i64, p, p, p, p, p, p, i32, p, i32, i32, i32]
    lib.dllmq_int8_epilogue.restype = None
    lib.dllmq_int8_group_epilogue.argtypes = [p, i64, i64, i64, i64, i64, p, i64, p, p, p, p, p, p, i32, p, p, i32,
                                                i32]
    lib.dllmq_int8_group_epilogue.restype = None
    lib.dllmq_dequant_rows.argtypes = [p, i32, i64, i64, i64, p, p, i64, i64, p, i32, i32]
    lib.dllmq_dequant_rows.restype = None
    lib.dllmq_gather_cols16.argtypes = [p, i64, i64, p, p, i32]
    lib.dllmq_gather_cols16.restype = None
    lib.dllmq_gather_cols32.argtypes = lib.dllmq_gather_cols16.argtypes
    lib.dllmq_gather_cols32.restype = None
    lib.dllmq_features.argtypes = []
    lib.dllmq_features.restype = i32
    lib.dllmq_pack_bf16_pairs.argtypes = [p, i64, i64, p]
    lib.dllmq_pack_bf16_pairs.restype = None
    lib.dllmq_duquant_rows.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, i32, f32, i32, i32, p, p, p, i32]
    lib.dllmq_duquant_rows.restype = i32
    lib.dllmq_pack_vnni.argtypes = [p, i64, i64, p]
    lib.dllmq_pack_vnni.restype = None
    lib.dllmq_int8_vnni_linear.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p, p, i32, p, i32, i32]
    lib.dllmq_int8_vnni_linear.restype = i32
    lib.dllmq_w32_dot_linear.argtypes = [p, i64, i64, p, i32, i64, p, p, i64, p, i32, p, i64, i32]
    lib.dllmq_w32_dot_linear.restype = i32
    lib.dllmq_int8_mm.argtypes = [p, i64, i64, i64, p, i64, i64, p, i64, i32]
    lib.dllmq_int8_mm.restype = i32
    lib.dllmq_w16_dot_linear.argtypes = [p, i64, i64, p, i32, i64, p, p, i64, p, i32, p, i32, i64, i32]
    lib.dllmq_w16_dot_linear.restype = i32


def library() -> ctypes.CDLL | None:
    """The loaded kernels, compiling them on first call; None if unavailable (callers fall back)."""
    global _lib, _tried
    if getattr(_off, "on", False):
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def kernels_off() -> bool:
    """Whether `torch_only` is in force in this thread (plans built while the kernels ran must not run then)."""
    return getattr(_off, "on", False)


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Run the torch code instead of the kernels in this block (tests and benchmarks compare the two)."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def status() -> str:
    """One line on the native kernels (for `dllmq bench` and bug reports)."""
    library()
    return _status


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= _PARALLEL_MIN else 1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and not x.requires_grad


def quantize_rows(x2: torch.Tensor, qmin: int, qmax: int, clip: float, asym: bool, dequantize: bool = False):
    """Per-row quantization of x2 [M, K] (see `grid.quantize_per_token_affine`): (int8 codes [M, K], fp32 scale
    [M, 1], int32 zero point [M, 1] or None), or with ``dequantize`` the fake-quantized x2 in its dtype.
    None when the kernels are unavailable or x2 does not suit them (the caller runs its torch code)."""
    lib = library()
    if lib is None or x2.dim() != 2 or not _usable(x2) or (x2.shape[0] > 1 and x2.stride(1) != 1):
        return None
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    scale = torch.empty(m, 1, dtype=torch.float32)
    zp = torch.empty(m, 1, dtype=torch.int32) if asym else None
    q = None if dequantize else torch.empty(m, k, dtype=torch.int8)
    deq = torch.empty(m, k, dtype=x2.dtype) if dequantize else None
    if m:
        lib.dllmq_quant_rows(x2.data_ptr(), _DTYPES[x2.dtype], m, k, x2.stride(0), int(asym), float(clip), qmin, qmax,
                             _ptr(q), scale.data_ptr(), _ptr(zp), _ptr(deq), _threads(m * k))
    return deq if dequantize else (q, scale, zp)


def _epilogue_usable(acc: torch.Tensor, dims: int, out_dtype: torch.dtype, bias: torch.Tensor | None) -> bool:
    return (acc.device.type == "cpu" and acc.dtype == torch.int32 and acc.dim() == dims and out_dtype in _DTYPES
            and (bias is None or (bias.dtype in _DTYPES and bias.device.type == "cpu")))


def _flat(t: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """t's elements as a contiguous tensor of dtype, t itself when it already is one (the C code reads the pointer
    only, so no reshape is needed: each torch op here costs about a microsecond, as much as a small layer's pass)."""
    if t.numel() != numel:
        raise ValueError(f"expected {numel} elements, got a tensor of shape {tuple(t.shape)}")
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


class _EpilogueArgs:
    """The epilogues' inputs as the C code reads them: contiguous, fp32 scales, int32 zero points and sums, each in
    its layout (w_*_shape); the activation codes only when the weight zero point needs their row sums."""

    def __init__(self, m: int, n: int, x_scale, w_scale, w_scale_shape, x_zero_point, w_sum, w_sum_shape, x_int8,
                 w_zero_point, w_zero_point_shape, bias):
        self.xs = _flat(x_scale, torch.float32, m)
        self.ws = _flat(w_scale, torch.float32, math.prod(w_scale_shape))
        self.xz = self.wsum = self.xq = self.wzp = None
        if x_zero_point is not None:
            self.xz = _flat(x_zero_point, torch.int32, m)
            self.wsum = _flat(w_sum, torch.int32, math.prod(w_sum_shape))
        if w_zero_point is not None:
            self.xq = x_int8.contiguous()
            self.wzp = _flat(w_zero_point, torch.int32, math.prod(w_zero_point_shape))
        self.k = 0 if self.xq is None else self.xq.shape[1]
        self.bias = None if bias is None else _flat(bias, bias.dtype, n)
        self.bias_dtype = 0 if bias is None else _DTYPES[bias.dtype]


def int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                  bias: torch.Tensor | None = None, x_zero_point: torch.Tensor | None = None,
                  w_sum: torch.Tensor | None = None, x_int8: torch.Tensor | None = None,
                  w_zero_point: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor | None:
    """What `kernels.int8_linear` computes from the int32 accumulator acc [M, N] ([N, M] with ``transposed``) for
    per-channel weights: ``acc - rowsum(x_int8) * w_zero_point - x_zero_point * w_sum``, times ``x_scale *
    w_scale``, plus bias, cast to out_dtype [M, N]. None when unavailable or the inputs do not suit the kernel."""
    lib = library()
    if lib is None or not _epilogue_usable(acc, 2, out_dtype, bias):
        return None
    n, m = acc.shape if transposed else acc.shape[::-1]
    a = _EpilogueArgs(m, n, x_scale, w_scale, (n,), x_zero_point, w_sum, (n,), x_int8, w_zero_point, (n,), bias)
    out = torch.empty(m, n, dtype=out_dtype)
    lib.dllmq_int8_epilogue(acc.contiguous().data_ptr(), m, n, _ptr(a.xq), a.k, _ptr(a.wzp), _ptr(a.xz), _ptr(a.wsum),
                            a.xs.data_ptr(), a.ws.data_ptr(), _ptr(a.bias), a.bias_dtype, out.data_ptr(),
                            _DTYPES[out_dtype], int(transposed), _threads(m * n))
    return out


def int8_group_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale_t: torch.Tensor, out_dtype: torch.dtype,
                        bias: torch.Tensor | None = None, x_zero_point: torch.Tensor | None = None,
                        w_sum: torch.Tensor | None = None, x_int8: torch.Tensor | None = None,
                        w_zero_point: torch.Tensor | None = None, groups: tuple[int, int] | None = None,
                        partial: torch.Tensor | None = None) -> torch.Tensor | None:
    """What `kernels.int8_linear` computes for group-wise weights from acc [g1 - g0, M, N], the int32 products of
    groups ``groups = (g0, g1)`` (default: all of them): per group the zero-point corrections (``w_zero_point``
    [N, G], ``w_sum`` [G, N]), times ``w_scale_t`` [G, N], summed over groups in fp32, times ``x_scale`` [M, 1], plus
    bias, cast. A chunk that does not end at the last group adds into ``partial`` (fp32 [M, N], read unless g0 is 0)
    and returns it; the last chunk returns the output. None when unavailable."""
    lib = library()
    if lib is None or not _epilogue_usable(acc, 3, out_dtype, bias):
        return None
    total = w_scale_t.shape[0]
    g0, g1 = groups or (0, total)
    _, m, n = acc.shape
    if g1 - g0 != acc.shape[0] or (g1 < total and (partial is None or not partial.is_contiguous()
                                                  or partial.dtype != torch.float32 or partial.shape != (m, n))):
        return None
    a = _EpilogueArgs(m, n, x_scale, w_scale_t, (total, n), x_zero_point, w_sum, (total, n), x_int8, w_zero_point,
                      (n, total), bias)
    out = torch.empty(m, n, dtype=out_dtype) if g1 == total else None
    lib.dllmq_int8_group_epilogue(acc.contiguous().data_ptr(), total, g0, g1, m, n, _ptr(a.xq), a.k, _ptr(a.wzp),
                                  _ptr(a.xz), _ptr(a.wsum), a.xs.data_ptr(), a.ws.data_ptr(), _ptr(a.bias),
                                  a.bias_dtype, _ptr(partial), _ptr(out), _DTYPES[out_dtype],
                                  _threads((g1 - g0) * m * n))
    return out if out is not None else partial


def dequantize_packed(packed: torch.Tensor, bits: int, k: int, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``(q - zp) * scale`` [N, K] in out_dtype (as `grid.dequantize`) straight from the stored weight: int32 words
    [N, W] of `pack_rows` for 2/4 bits, int8 [N, K] for 8 bits; scale fp32 [N, G] and zero point int32 [N, G] or
    None, G dividing K; into ``out`` (contiguous [N, K]) when given. None when unavailable or another width (3-bit
    values straddle words: the torch path)."""
    lib = library()
    if lib is None or packed.device.type != "cpu" or out_dtype not in _DTYPES or bits not in (2, 4, 8):
        return None
    if (bits == 8) != (packed.dtype == torch.int8) or (bits < 8 and packed.dtype != torch.int32):
        return None
    n = packed.shape[0]
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups or (zero_point is not None and tuple(zero_point.shape) != (n, groups)):
        return None
    packed = packed.contiguous()
    sc = scale.to(torch.float32).contiguous()
    zp = None if zero_point is None else zero_point.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(n, k, dtype=out_dtype)
    elif out.shape != (n, k) or out.dtype != out_dtype or not out.is_contiguous():
        return None
    lib.dllmq_dequant_rows(packed.data_ptr(), bits, n, k, packed.shape[1] if bits < 8 else k, sc.data_ptr(), _ptr(zp),
                           groups, k // groups, out.data_ptr(), _DTYPES[out_dtype], _threads(n * k))
    return out


def gather_columns(x2: torch.Tensor, perm: torch.Tensor) -> torch.Tensor | None:
    """``x2[:, perm]`` for a 2- or 4-byte float x2 [M, K] and int64 perm [K], which must be a permutation of range(K)
    (not checked here: `DuQuantTransform` validates it once); None when unavailable."""
    lib = library()
    if (lib is None or x2.dim() != 2 or x2.device.type != "cpu" or x2.element_size() not in (2, 4)
            or not x2.is_floating_point() or perm.dtype != torch.int64 or perm.device.type != "cpu"):
        return None
    x2 = x2.contiguous()
    perm = perm.contiguous()
    out = torch.empty_like(x2)
    gather = lib.dllmq_gather_cols16 if x2.element_size() == 2 else lib.dllmq_gather_cols32
    gather(x2.data_ptr(), x2.shape[0], x2.shape[1], perm.data_ptr(), out.data_ptr(), _threads(x2.numel()))
    return out


def _features() -> int:
    """The CPU extensions the loaded kernels were compiled with (bits of `dllmq_features`); 0 without kernels."""
    global _FEATURES
    lib = library()
    if lib is None:
        return 0
    if _FEATURES is None:
        _FEATURES = int(lib.dllmq_features())
    return _FEATURES


_FEATURES: int | None = None


def bf16_dot_available() -> bool:
    """Whether the kernels were compiled with AVX512-BF16 dot products (`duquant_rows`)."""
    return bool(_features() & 1)


def vnni_available() -> bool:
    """Whether the kernels were compiled with AVX512-VNNI (`int8_vnni_linear` for any int8 weight codes)."""
    return bool(_features() & 2)


# AVX2 emulates VPDPBUSD with VPMADDUBSW, whose int16 pair sums saturate unless |weight code| <= 64 (cpu_kernels.c).
AVX2_DOT_MAX_CODE = 64


def int8_dot_available(weight_bits: int) -> bool:
    """Whether `int8_vnni_linear` runs weight codes of this many bits (zero points folded in: |q - zp| <= 2^bits - 1):
    any with AVX512-VNNI; up to 6 bits on AVX2-only CPUs, whose emulation is exact only for |codes| <= 64 (dllmq weights have 2, 3, 4 or 8 bits)."""
    f = _features()
    return bool(f & 2) or bool(f & 4) and (1 << weight_bits) - 1 <= AVX2_DOT_MAX_CODE


def pack_bf16_pairs(rot: torch.Tensor) -> torch.Tensor | None:
    """Block rotations rot [nb, b, b] (bf16) laid out for `duquant_rows`; None when unavailable."""
    if not bf16_dot_available() or rot.dim() != 3 or rot.dtype != torch.bfloat16 or rot.device.type != "cpu":
        return None
    rot = rot.contiguous()
    out = torch.empty(rot.numel(), dtype=torch.bfloat16)
    library().dllmq_pack_bf16_pairs(rot.data_ptr(), rot.shape[0], rot.shape[1], out.data_ptr())
    return out


def duquant_rows(x2: torch.Tensor, smooth_scale: torch.Tensor | None, rot1_pairs: torch.Tensor, perm: torch.Tensor,
                 rot2_pairs: torch.Tensor, block: int, quantize: tuple[int, int, float, bool] | None = None):
    """DuQuant's online transform ``((x2 / s) R1) P R2`` of bf16 rows x2 [M, K] in one pass, each product rounded to
    bf16 as `DuQuantTransform.apply` rounds it (rotations from `pack_bf16_pairs`, s bf16 [K] or None, perm int64 [K]
    a validated permutation). Returns y [M, K] bf16, or with ``quantize = (qmin, qmax, clip, asym)`` the per-token
    quantization of y as `quantize_rows` returns it, without writing y. None when unavailable."""
    if x2.dim() != 2 or x2.dtype != torch.bfloat16 or x2.device.type != "cpu" or x2.requires_grad:
        return None
    run = duquant_rows_plan(x2.shape[1], smooth_scale, rot1_pairs, perm, rot2_pairs, block, quantize)
    return None if run is None else run(x2)


def duquant_rows_plan(k: int, smooth_scale: torch.Tensor | None, rot1_pairs: torch.Tensor, perm: torch.Tensor,
                      rot2_pairs: torch.Tensor, block: int, quantize: tuple[int, int, float, bool] | None = None):
    """`duquant_rows` for bf16 CPU rows of width k with these arguments, checked once: a callable x2 -> its result
    (None where the kernel declines), or None when unavailable. A layer calls it on every forward, where the
    checks and argument conversions cost as much as the pass itself at the bundled model's width."""
    lib = library()
    if lib is None or block % 16 or k % block or not bf16_dot_available():
        return None
    # the caller guarantees the rest (DuQuantTransform.native_args): bf16 s [K] and packed rotations, int64 perm
    f, keep = lib.dllmq_duquant_rows, (smooth_scale, rot1_pairs, perm, rot2_pairs)
    sp, r1, pp, r2 = _ptr(smooth_scale), rot1_pairs.data_ptr(), perm.data_ptr(), rot2_pairs.data_ptr()
    qmin, qmax, clip, asym = quantize if quantize is not None else (0, 0, 1.0, False)

    def run(x2: torch.Tensor):
        assert keep  # the tensors behind the pointers live as long as the plan
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = q = scale = zp = None
        if quantize is None:
            y = torch.empty(m, k, dtype=torch.bfloat16)
        else:
            q = torch.empty(m, k, dtype=torch.int8)
            scale = torch.empty(m, 1, dtype=torch.float32)
            zp = torch.empty(m, 1, dtype=torch.int32) if asym else None
        if m and not f(x2.data_ptr(), m, k, x2.stride(0), sp, r1, pp, r2, block, _ptr(y), int(asym), float(clip), qmin,
                       qmax, _ptr(q), _ptr(scale), _ptr(zp), _threads(m * k * 8)):
            return None
        return y if quantize is None else (q, scale, zp)

    return run


# Below this many multiply-adds one thread runs the GEMM: waking the pool costs more.
_GEMM_PARALLEL_MIN = 1 << 20


def pack_vnni(w_int8: torch.Tensor) -> torch.Tensor | None:
    """Weight codes w_int8 [N, K] (int8, N % 16 == 0, K % 4 == 0) laid out for `int8_vnni_linear`; None when
    unavailable, or on AVX2-only CPUs when a code exceeds AVX2_DOT_MAX_CODE in magnitude (its sums would saturate)."""
    if not _features() & 6 or w_int8.dim() != 2 or w_int8.dtype != torch.int8 or w_int8.device.type != "cpu":
        return None
    n, k = w_int8.shape
    if n % 16 or k % 4:
        return None
    if not vnni_available() and w_int8.numel() and int(w_int8.abs().max()) > AVX2_DOT_MAX_CODE:
        return None
    w = w_int8.contiguous()
    out = torch.empty(n * k, dtype=torch.int8)
    library().dllmq_pack_vnni(w.data_ptr(), n, k, out.data_ptr())
    return out


def int8_vnni_linear(x_int8: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor | None,
                     w_packed: torch.Tensor, n: int, groups: int, w_sum: torch.Tensor, w_scale: torch.Tensor,
                     out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`kernels.int8_linear` for weights without a separate zero point, GEMM and epilogue in one pass (bit-identical):
    x_int8 [M, K] codes, x_scale [M, 1] fp32, x_zero_point [M, 1] int32 or None, w_packed from `pack_vnni`, w_sum
    int32 [groups, N] code sums per group, w_scale fp32 [groups, N] ([N] per channel). None when unavailable. On
    AVX2-only CPUs the weight codes must satisfy |w| <= AVX2_DOT_MAX_CODE (`pack_vnni` refuses others)."""
    if x_int8.dtype != torch.int8 or x_int8.dim() != 2:
        return None
    run = int8_vnni_plan(x_int8.shape[1], w_packed, n, groups, w_sum, w_scale, out_dtype, bias)
    return None if run is None else run(x_int8, x_scale, x_zero_point)


def int8_vnni_plan(k: int, w_packed: torch.Tensor, n: int, groups: int, w_sum: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype, bias: torch.Tensor | None = None):
    """`int8_vnni_linear` for inputs of k columns with this weight, checked once: a callable (x_int8, x_scale,
    x_zero_point) -> out (None where the kernel declines), or None when unavailable. A layer calls it on every
    forward (see `duquant_rows_plan`)."""
    lib = library()
    if (lib is None or not _features() & 6 or out_dtype not in _DTYPES or (bias is not None and bias.dtype not in _DTYPES)
            or k % (4 * groups) or w_packed.numel() != n * k):
        return None
    b = None if bias is None else _flat(bias, bias.dtype, n)
    f, keep = lib.dllmq_int8_vnni_linear, (w_packed, w_sum, w_scale, b)
    wp, ws, sc = w_packed.data_ptr(), w_sum.data_ptr(), w_scale.data_ptr()
    bt, ot = 0 if b is None else _DTYPES[b.dtype], _DTYPES[out_dtype]
    per_row = n * k

    def run(x_int8: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor | None):
        assert keep  # the tensors behind the pointers live as long as the plan
        m = x_int8.shape[0]
        xq = x_int8 if x_int8.is_contiguous() else x_int8.contiguous()
        xs = _flat(x_scale, torch.float32, m)
        xz = None if x_zero_point is None else _flat(x_zero_point, torch.int32, m)
        out = torch.empty(m, n, dtype=out_dtype)
        if m and not f(xq.data_ptr(), m, k, xs.data_ptr(), _ptr(xz), wp, n, groups, ws, sc, _ptr(b), bt, out.data_ptr(), ot,
                       torch.get_num_threads() if m * per_row >= _GEMM_PARALLEL_MIN else 1):
            return None
        return out

    return run


def _weight_only_args(x2: torch.Tensor, packed: torch.Tensor, bits: int, scale: torch.Tensor,
                      zero_point: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype):
    """The arguments both weight-only dot kernels take, or None where they do not run (x2 not dtype rows on CPU,
    another width or layout)."""
    if (x2.dim() != 2 or x2.dtype != dtype or x2.device.type != "cpu" or bits not in (2, 4, 8)
            or (bias is not None and bias.dtype not in _DTYPES)):
        return None
    m, k = x2.shape
    n, groups = scale.shape
    if k % groups or (bits == 8) != (packed.dtype == torch.int8) or packed.shape[0] != n:
        return None
    # the (possibly copied) tensors behind the pointers: the caller holds them until the kernel returns
    keep = (x2.contiguous(), packed.contiguous(), _flat(scale, torch.float32, n * groups),
            None if zero_point is None else _flat(zero_point, torch.int32, n * groups),
            None if bias is None else _flat(bias, bias.dtype, n))
    xc, pk, sc, zp, b = keep
    args = (xc.data_ptr(), m, k, pk.data_ptr(), bits, pk.shape[1] if bits < 8 else k, sc.data_ptr(), _ptr(zp), groups,
            _ptr(b), 0 if b is None else _DTYPES[b.dtype])
    return args, keep, m, n, k


def w16_dot_linear(x2: torch.Tensor, packed: torch.Tensor, bits: int, scale: torch.Tensor,
                   zero_point: torch.Tensor | None, out_dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """A weight-only layer without a dense copy, ``x2 @ dequantize(W).T + bias`` for bf16 rows x2 [M, K]: W as stored
    (int32 words of `pack_rows` for 2/4 bits, int8 [N, K] for 8), scale fp32 [N, G], zero point int32 [N, G] or None,
    dequantized to bf16 one cache-sized block of columns at a time and multiplied there (AVX512-BF16). None when
    unavailable or another width / layout."""
    lib = library()
    got = None if lib is None or not bf16_dot_available() or out_dtype not in _DTYPES or x2.shape[-1] % 2 else (
        _weight_only_args(x2, packed, bits, scale, zero_point, bias, torch.bfloat16))
    if got is None:
        return None
    args, _keep, m, n, k = got
    out = torch.empty(m, n, dtype=out_dtype)
    if m and not lib.dllmq_w16_dot_linear(*args, out.data_ptr(), _DTYPES[out_dtype], n,
                                          torch.get_num_threads() if m * n * k >= _GEMM_PARALLEL_MIN else 1):
        return None
    return out


def w32_dot_available() -> bool:
    """Whether the kernels were compiled with AVX2 + FMA (`w32_dot_linear`)."""
    return bool(_features() & 8)


def w32_dot_linear(x2: torch.Tensor, packed: torch.Tensor, bits: int, scale: torch.Tensor,
                   zero_point: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`w16_dot_linear` for float32 rows x2 [M, K] (AVX2 + FMA): W dequantized to float32 a cache-sized block of
    columns at a time and multiplied there; float32 output. None when unavailable or another width / layout."""
    lib = library()
    got = None if lib is None or not w32_dot_available() else (
        _weight_only_args(x2, packed, bits, scale, zero_point, bias, torch.float32))
    if got is None:
        return None
    args, _keep, m, n, k = got
    out = torch.empty(m, n, dtype=torch.float32)
    if m and not lib.dllmq_w32_dot_linear(*args, out.data_ptr(), n,
                                          torch.get_num_threads() if m * n * k >= _GEMM_PARALLEL_MIN else 1):
        return None
    return out


def int8_mm(x_int8: torch.Tensor, w_int8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``torch._int_mm(x_int8, w_int8.t())`` (int8 [M, K] x int8 [N, K] -> int32 [M, N], exact) with AVX2 on CPUs
    where PyTorch's is a reference loop (`torch_int8_gemm_fast` False). x may be a column slice (row stride > K), w
    rows contiguous, out [M, N] int32 (any row stride). None when unavailable or K % 16."""
    lib = library()
    if (lib is None or not _features() & 16 or x_int8.dim() != 2 or w_int8.dim() != 2 or x_int8.dtype != torch.int8
            or w_int8.dtype != torch.int8 or x_int8.device.type != "cpu" or w_int8.device.type != "cpu"):
        return None
    m, k = x_int8.shape
    n = w_int8.shape[0]
    if k % 16 or w_int8.shape[1] != k or x_int8.stride(1) != 1 or w_int8.stride(1) != 1:
        return None
    if out is None:
        out = torch.empty(m, n, dtype=torch.int32)
    elif out.shape != (m, n) or out.dtype != torch.int32 or out.stride(1) != 1:
        return None
    if m and n and not lib.dllmq_int8_mm(x_int8.data_ptr(), m, k, x_int8.stride(0), w_int8.data_ptr(), n,
                                         w_int8.stride(0), out.data_ptr(), out.stride(0),
                                         torch.get_num_threads() if m * n * k >= _GEMM_PARALLEL_MIN else 1):
        return None
    return out
