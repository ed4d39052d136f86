import threading

import pytest
import torch

from dllmq.errors import UserError
from dllmq.quantization.rtn import rtn_quantize
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime import kernels as K
from dllmq.quantization import grid as G
from dllmq.runtime import qlinear as QL
from dllmq.runtime import native
from dllmq.runtime.qlinear import (ACT_INT8_CPU_MAX_GROUPS, INT4_CPU_UNCACHED_MAX_ROWS, QuantLinear, force_kernel,
                                    set_dispatch)

cuda = pytest.mark.skipif(not K.cuda_int4_available(), reason="needs a CUDA GPU (sm80+)")

BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def _reset_dispatch():
    set_dispatch(None)
    yield
    set_dispatch(None)


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm())


def make_weight(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05


def make_x(*shape, dtype=torch.bfloat16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def make_layer(spec, n=64, k=256, act=ActSpec(), bias=True, **kw):
    qw = rtn_quantize(make_weight(n, k), spec)
    b = make_weight(1, n, seed=7)[0] if bias else None
    return QuantLinear.from_quantized(qw, b, act_spec=act, **kw), qw


def reference(layer, x):
    """x @ w_hat.T + bias in float64, with the same per-token rounding when acts are quantized."""
    x2 = x.reshape(-1, layer.in_features)
    if layer.act_spec.enabled:
        xq, xs = G.quantize_per_token(x2, layer.act_spec)
        x2 = xq.double() * xs.double()
    y = x2.double() @ layer.dequantized_weight(torch.float64).t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


# ----------------------------------------------------------------------------- raw kernels

INT4_SPECS = [
    WeightSpec(4, True, "group", 32),
    WeightSpec(4, False, "group", 64),
    WeightSpec(4, True, "group", 128),
    WeightSpec(4, False, "group", 512),  # kernel group 256, scales replicated
    WeightSpec(4, True, "channel"),
    WeightSpec(4, False, "tensor"),
    WeightSpec(3, False, "group", 128),  # 2/3-bit codes are a subset of int4
    WeightSpec(2, True, "channel"),
]


@pytest.mark.parametrize("spec", INT4_SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_int4_cpu_kernel_matches_reference(spec):
    n, k = 48, 1024
    qw = rtn_quantize(make_weight(n, k), spec)
    assert K.supports_int4_cpu(n, k, spec)
    state = K.prepare_int4_cpu(qw.q, qw.scale, qw.zero_point)
    for m in (1, 3, 17):
        x = make_x(m, k)
        y = K.int4_cpu_mm(x, state)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert rel_err(y, x.double() @ qw.dequantize(torch.float64).t()) < BF16_TOL


def test_int4_cpu_support_predicate():
    assert not K.supports_int4_cpu(40, 256, WeightSpec(4, True, "group", 32))  # N % 16
    assert not K.supports_int4_cpu(64, 256, WeightSpec(4, True, "group", 16))  # group < 32
    assert not K.supports_int4_cpu(64, 256, WeightSpec(8, True, "channel"))
    assert not K.supports_int4_cpu(64, 48, WeightSpec(4, True, "channel"))  # 48 not a multiple of 32
    assert K.supports_int4_cpu(64, 96, WeightSpec(4, True, "channel"))  # kernel group 32
    assert K.int4_kernel_group_size(96) == 32 and K.int4_kernel_group_size(4096) == 256


@pytest.mark.parametrize("bits", [8, 4])
def test_int8pack_cpu_kernel_matches_reference(bits):
    n, k = 40, 272
    qw = rtn_quantize(make_weight(n, k), WeightSpec(bits, True, "channel"))
    w, s = K.prepare_int8pack(qw.q, qw.scale)
    assert w.dtype == torch.int8 and s.shape == (n,)
    for m in (1, 4, 9):
        x = make_x(m, k)
        y = K.int8pack_mm(x, w, s)
        assert rel_err(y, x.double() @ qw.dequantize(torch.float64).t()) < BF16_TOL


def test_int8pack_support_predicate():
    assert K.supports_int8pack_cpu(40, 272, WeightSpec(8, True, "channel"))
    assert not K.supports_int8pack_cpu(40, 264, WeightSpec(8, True, "channel"))  # K % 16 (crashes torch)
    assert not K.supports_int8pack_cpu(40, 256, WeightSpec(8, False, "channel"))
    assert not K.supports_int8pack_cpu(40, 256, WeightSpec(8, True, "group", 128))


def test_dequant_linear():
    spec = WeightSpec(4, False, "group", 32)
    qw = rtn_quantize(make_weight(24, 64), spec)
    x = make_x(2, 5, 64, dtype=torch.float32)
    bias = torch.randn(24)
    ref = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    assert rel_err(K.dequant_linear(x, qw, bias), ref) < 1e-6
    assert rel_err(K.dequant_linear(x, qw.dequantize(), bias), ref) < 1e-6
    yb = K.dequant_linear(x.bfloat16(), qw, bias)
    assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < BF16_TOL


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_per_token(bits):
    act = ActSpec(bits)
    x = make_x(3, 7, 64, dtype=torch.float32)
    x[0, 0] = 0.0  # an all-zero token
    xq, xs = G.quantize_per_token(x, act)
    assert xq.dtype == torch.int8 and xq.shape == (21, 64) and xs.shape == (21, 1)
    assert int(xq.min()) >= act.qmin and int(xq.max()) <= act.qmax
    assert int(xq.abs().max()) == act.qmax  # full range used
    assert (xq[0] == 0).all() and torch.isfinite(xs).all()
    err = (xq.float() * xs - x.reshape(21, 64)).abs()
    assert (err <= xs / 2 * (1 + 1e-5)).all()
    # clipping: scale shrinks, the largest values get clamped
    xq2, xs2 = G.quantize_per_token(x, ActSpec(bits, clip_ratio=0.5))
    torch.testing.assert_close(xs2[1:], xs[1:] * 0.5)
    with pytest.raises(UserError):
        G.quantize_per_token(x, ActSpec(8, symmetric=False))


@pytest.mark.parametrize("layout", ["channel", "group", "channel_zp", "group_zp"])
def test_int8_linear_is_exact(layout):
    # The int GEMM + fp32 rescale equals the dequantized float computation up to fp32 rounding.
    gen = torch.Generator().manual_seed(3)
    m, n, k, gs = 5, 24, 128, 32
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    xs = torch.rand(m, 1, generator=gen) + 0.1
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    groups = 1 if layout.startswith("channel") else k // gs
    ws = torch.rand(n, groups, generator=gen) + 0.1
    zp = torch.randint(-128, 128, (n, groups), generator=gen, dtype=torch.int32) if "zp" in layout else None
    bias = torch.randn(n, generator=gen)
    w_hat = w.double() - (0 if zp is None else zp.double().repeat_interleave(k // groups, 1))
    w_hat = w_hat * ws.double().repeat_interleave(k // groups, 1)
    ref = (xq.double() * xs.double()) @ w_hat.t() + bias.double()
    if groups == 1:
        y = K.int8_linear(xq, xs, w, ws.reshape(n), torch.float32, bias, None if zp is None else zp.reshape(n))
    else:
        wg = w.view(n, groups, gs).transpose(0, 1).contiguous()
        y = K.int8_linear(xq, xs, wg, ws, torch.float32, bias, zp)
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-6


# ----------------------------------------------------------------------------- QuantLinear

LAYER_CASES = [
    # (spec, act, forced path)
    (WeightSpec(4, True, "group", 128), ActSpec(), "int4_cpu"),
    (WeightSpec(4, False, "group", 64), ActSpec(), "int4_cpu"),
    (WeightSpec(3, False, "channel"), ActSpec(), "int4_cpu"),
    (WeightSpec(8, True, "channel"), ActSpec(), "int8pack_cpu"),
    (WeightSpec(4, True, "channel"), ActSpec(), "int8pack_cpu"),
    (WeightSpec(4, False, "group", 32), ActSpec(), "dequant"),
    (WeightSpec(2, True, "group", 32), ActSpec(), "dequant"),
    (WeightSpec(8, True, "channel"), ActSpec(8), "int8_act"),  # W8A8
    (WeightSpec(8, False, "group", 64), ActSpec(8), "int8_act"),  # zero-point correction path
    (WeightSpec(4, True, "group", 128), ActSpec(8), "int8_act"),  # W4A8
    (WeightSpec(4, False, "channel"), ActSpec(8), "int8_act"),
    (WeightSpec(4, True, "group", 32), ActSpec(4, clip_ratio=0.9), "int8_act"),  # W4A4
    (WeightSpec(4, True, "group", 32), ActSpec(4), "dequant"),  # fake-quant reference
]


@pytest.mark.parametrize("spec,act,path", LAYER_CASES, ids=lambda v: str(getattr(v, "num_bits", v)))
@pytest.mark.parametrize("shape", [(1, 256), (2, 3, 256), (2, 40, 256)])
def test_quantlinear_paths_match_reference(spec, act, path, shape):
    _check_forced_path(spec, act, path, shape, reference, BF16_TOL)


@pytest.fixture
def no_dot_kernels(monkeypatch):
    """Dispatch as on a CPU without the fused dot-product kernels (AVX512-VNNI / BF16, or their AVX2 emulation) whose
    PyTorch `_int_mm` is a real int8 kernel, whatever this one has."""
    monkeypatch.setattr(native, "_features", lambda: 0)
    monkeypatch.setattr(native, "torch_int8_gemm_fast", lambda: True)


needs_vnni = pytest.mark.skipif(not native.vnni_available(), reason="native kernels without AVX512-VNNI")

VNNI_CASES = [
    (WeightSpec(8, True, "channel"), ActSpec(8)),
    (WeightSpec(4, True, "group", 128), ActSpec(8)),
    (WeightSpec(4, False, "group", 32), ActSpec(8, symmetric=False)),
    (WeightSpec(4, False, "channel"), ActSpec(8, symmetric=False)),
    (WeightSpec(4, True, "group", 32), ActSpec(4, clip_ratio=0.9)),
    (WeightSpec(2, False, "group", 64), ActSpec(8)),
]


@pytest.mark.parametrize("spec,act", VNNI_CASES, ids=lambda v: str(getattr(v, "num_bits", v)))
@pytest.mark.parametrize("shape", [(1, 256), (2, 3, 256), (2, 40, 256)])
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float32, False)], ids=["bf16", "fp32"])
def test_vnni_kernel_is_the_integer_gemm_bit_for_bit(spec, act, shape, dtype, bias):
    """The fused int8 kernel (GEMM and epilogue in one pass; VPDPBUSD, or its AVX2 emulation for <= 6-bit weights)
    returns exactly what `int8_act` (`_int_mm` and the epilogue) returns, for per-channel and group-wise weights,
    symmetric and asymmetric activations."""
    if not native.int8_dot_available(spec.num_bits):
        pytest.skip(f"native kernels without an exact int8 dot product for {spec.num_bits}-bit weights on this CPU")
    layer, _ = make_layer(spec, act=act, bias=bias)
    x = make_x(*shape, dtype=dtype)
    with force_kernel("int8_vnni"):
        y = layer(x)
    with force_kernel("int8_act"):
        ref = layer(x)
    assert y.dtype == ref.dtype == dtype and torch.equal(y, ref)
    assert rel_err(y, act_reference(layer, x)) < BF16_TOL


needs_bf16_dot = pytest.mark.skipif(not native.bf16_dot_available(), reason="native kernels without AVX512-BF16")


@needs_bf16_dot
@pytest.mark.parametrize("spec", [WeightSpec(4, True, "group", 128), WeightSpec(4, False, "group", 32),
                                  WeightSpec(2, False, "group", 64), WeightSpec(8, True, "channel"),
                                  WeightSpec(8, False, "channel"), WeightSpec(4, True, "tensor")],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(9, 256), (2, 20, 256), (100, 256)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_w16_dot_kernel_is_the_dense_product(spec, shape, bias):
    """Weight-only layers without a dense copy: the kernel that dequantizes a block of columns and multiplies it in
    cache computes what the dense path does, up to a bf16 GEMM's summation order."""
    layer, _ = make_layer(spec, n=96, bias=bias, cache_dequantized=False)
    x = make_x(*shape)
    with force_kernel("w16_dot_cpu"):
        y = layer(x)
    with force_kernel("dequant"):
        dense = layer(x)
    assert y.shape == dense.shape and y.dtype == dense.dtype == torch.bfloat16
    assert rel_err(y, dense) < 4e-3 and rel_err(y, reference(layer, x)) < BF16_TOL
    assert not any(key[0] == "dequant" for key in layer._cache)  # no dense copy kept


@needs_bf16_dot
def test_w16_dot_dispatch(monkeypatch):
    """Uncached weight-only layers take the block kernel from W16_DOT_MIN_ROWS to W16_DOT_MAX_ROWS rows, not
    with a cached dense copy, fp32 inputs, 3-bit weights, or on AMX CPUs."""
    lean, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=False)
    limit = QL.W16_DOT_MIN_ROWS
    assert lean.kernel_for(make_x(limit, 256)) == "int4_cpu"
    assert lean.kernel_for(make_x(limit + 1, 256)) == lean.kernel_for(make_x(QL.W16_DOT_MAX_ROWS, 256)) == "w16_dot_cpu"
    assert lean.kernel_for(make_x(QL.W16_DOT_MAX_ROWS + 1, 256)) == "dequant"  # oneDNN's blocked GEMM wins there
    assert lean.kernel_for(make_x(64, 256, dtype=torch.float32)) == "dequant"
    cached, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=True)
    assert cached.kernel_for(make_x(64, 256)) == "dequant"
    three, _ = make_layer(WeightSpec(3, True, "group", 128), cache_dequantized=False)
    assert three.kernel_for(make_x(64, 256)) != "w16_dot_cpu"
    monkeypatch.setattr(native, "has_amx", lambda: True)
    assert lean.kernel_for(make_x(64, 256)) == "dequant"


needs_w32_dot = pytest.mark.skipif(not native.w32_dot_available(), reason="native kernels without AVX2 + FMA")


@needs_w32_dot
@pytest.mark.parametrize("spec", [WeightSpec(4, True, "group", 128), WeightSpec(4, False, "group", 32),
                                  WeightSpec(2, False, "group", 64), WeightSpec(8, True, "channel"),
                                  WeightSpec(8, False, "channel")], ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(1, 256), (2, 9, 256), (48, 256)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_w32_dot_kernel_is_the_dense_product(spec, shape, bias):
    """float32 weight-only layers without a dense copy: the kernel that dequantizes 16 columns at a time to float32
    and multiplies them in cache computes the dense float32 product (another summation order), for every output
    width (n = 40: a partial last block)."""
    layer, _ = make_layer(spec, n=40, bias=bias, cache_dequantized=False)
    x = make_x(*shape, dtype=torch.float32)
    with force_kernel("w32_dot_cpu"):
        y = layer(x)
    with force_kernel("dequant"):
        dense = layer(x)
    assert y.shape == dense.shape and y.dtype == dense.dtype == torch.float32
    assert rel_err(y, dense) < 1e-5
    assert not any(key[0] == "dequant" for key in layer._cache)  # no dense copy kept


@needs_w32_dot
def test_w32_dot_dispatch():
    """Uncached weight-only layers with float32 inputs take the block kernel up to W32_DOT_MAX_ROWS rows; not with a
    cached dense copy, bf16 inputs or 3-bit weights."""
    lean, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=False)
    limit = QL.W32_DOT_MAX_ROWS
    assert lean.kernel_for(make_x(1, 256, dtype=torch.float32)) == "w32_dot_cpu"
    assert lean.kernel_for(make_x(limit, 256, dtype=torch.float32)) == "w32_dot_cpu"
    assert lean.kernel_for(make_x(limit + 1, 256, dtype=torch.float32)) == "dequant"
    assert lean.kernel_for(make_x(8, 256)) != "w32_dot_cpu"
    cached, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=True)
    assert cached.kernel_for(make_x(8, 256, dtype=torch.float32)) == "dequant"
    three, _ = make_layer(WeightSpec(3, True, "group", 128), cache_dequantized=False)
    assert three.kernel_for(make_x(8, 256, dtype=torch.float32)) == "dequant"


@needs_vnni
def test_vnni_dispatch(monkeypatch):
    """With AVX512-VNNI the fused kernel runs weight-activation layers at every row count, except 8-bit per-channel
    layers without dense copies (their int8_act path reads the stored weight, no copy), layers it cannot tile
    (N % 16), and on AMX CPUs inputs above VNNI_AMX_MAX_ROWS rows."""
    w4, _ = make_layer(WeightSpec(4, True, "group", 128), act=ActSpec(8), cache_dequantized=False)
    for m in (1, 8, 9, 300):
        assert w4.kernel_for(make_x(m, 256)) == "int8_vnni"
    assert w4.kernel_for(make_x(5, 256, dtype=torch.float32)) == "int8_vnni"
    w8_lean, _ = make_layer(WeightSpec(8, True, "channel"), act=ActSpec(8), cache_dequantized=False)
    w8_cached, _ = make_layer(WeightSpec(8, True, "channel"), act=ActSpec(8), cache_dequantized=True)
    assert w8_lean.kernel_for(make_x(64, 256)) == "int8_act" and w8_cached.kernel_for(make_x(64, 256)) == "int8_vnni"
    odd, _ = make_layer(WeightSpec(4, True, "group", 128), act=ActSpec(8), n=40)
    assert odd.kernel_for(make_x(64, 256)) == "int8_act"
    monkeypatch.setattr(native, "has_amx", lambda: True)
    limit = K.VNNI_AMX_MAX_ROWS
    assert w4.kernel_for(make_x(limit, 256)) == "int8_vnni" and w4.kernel_for(make_x(limit + 1, 256)) == "int8_act"
    with force_kernel("int8_vnni"), pytest.raises(RuntimeError):
        odd.kernel_for(make_x(1, 256))
    with force_kernel("int8_vnni"), pytest.raises(RuntimeError):  # weight-only layer
        make_layer(WeightSpec(4, True, "group", 128))[0].kernel_for(make_x(1, 256))


def test_avx2_int8_dispatch(monkeypatch):
    """On a CPU with AVX2 only (the emulated int8 kernel), layers of 2-4-bit weights take the fused kernel at every
    row count; 8-bit ones and layers it cannot tile take `int8_act`, whose integer GEMM is then the AVX2 kernel
    (`native.int8_mm`, see test_native_kernels.py), not PyTorch's reference loop."""
    monkeypatch.setattr(native, "_features", lambda: 4)
    monkeypatch.setattr(native, "torch_int8_gemm_fast", lambda: False)
    monkeypatch.setattr(native, "has_amx", lambda: False)
    w4, _ = make_layer(WeightSpec(4, True, "group", 128), act=ActSpec(8), cache_dequantized=False)
    for m in (1, 8, 300):
        for dtype in (torch.bfloat16, torch.float32):
            assert w4.kernel_for(make_x(m, 256, dtype=dtype)) == "int8_vnni"
    w3, _ = make_layer(WeightSpec(3, False, "channel"), act=ActSpec(8))
    assert w3.kernel_for(make_x(40, 256, dtype=torch.float32)) == "int8_vnni"
    w8, _ = make_layer(WeightSpec(8, True, "channel"), act=ActSpec(8), cache_dequantized=True)
    odd, _ = make_layer(WeightSpec(4, True, "group", 128), act=ActSpec(8), n=40)
    for layer in (w8, odd):
        assert layer.kernel_for(make_x(64, 256, dtype=torch.float32)) == "int8_act"


def _check_forced_path(spec, act, path, shape, ref_fn, tol):
    """Force `path`, check it is the one taken, and compare the output with `ref_fn(layer, x)`."""
    layer, _ = make_layer(spec, act=act)
    x = make_x(*shape)
    with force_kernel(path):
        assert layer.kernel_for(x) == path
        y = layer(x)
    assert y.shape == (*shape[:-1], 64) and y.dtype == torch.bfloat16
    ref = ref_fn(layer, x)
    assert rel_err(y, ref) < tol
    return layer, x, ref


def test_quantlinear_matches_float_weights_within_quant_error():
    # End to end: against the unquantized weight, 8-bit must be much closer than 4-bit.
    w = make_weight(64, 256)
    x = make_x(4, 256, dtype=torch.float32)
    ref = x.double() @ w.double().t()
    errs = {}
    for bits in (4, 8):
        layer = QuantLinear.from_quantized(rtn_quantize(w, WeightSpec(bits, True, "channel")), None)
        errs[bits] = rel_err(layer(x), ref)
    assert errs[8] < 0.01 < errs[4] < 0.2


def test_dispatch_by_rows_device_and_dtype(no_dot_kernels):
    # with a cached dequantized copy: int4 kernel up to 8 rows, then the dense bf16 GEMM
    layer, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=True)
    assert layer.kernel_for(make_x(1, 256)) == "int4_cpu"
    assert layer.kernel_for(make_x(2, 4, 256)) == "int4_cpu"  # M = 8
    assert layer.kernel_for(make_x(9, 256)) == "dequant"
    assert layer.kernel_for(make_x(64, 256)) == "dequant"
    assert layer.kernel_for(make_x(1, 256, dtype=torch.float32)) == "dequant"  # fp32 int4 path is ~100x slower
    # without one (the memory-saving default): the int4 kernel up to INT4_CPU_UNCACHED_MAX_ROWS, then the fused
    # per-call dequantization into the scratch buffer; the torch dequantization is too slow to ever win
    lean, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=False)
    assert lean.kernel_for(make_x(INT4_CPU_UNCACHED_MAX_ROWS, 256)) == "int4_cpu"
    assert lean.kernel_for(make_x(64, 256)) == ("dequant" if native.library() else "int4_cpu")
    with native.torch_only():
        assert lean.kernel_for(make_x(64, 256)) == "int4_cpu"
    assert lean.kernel_for(make_x(64, 256, dtype=torch.float32)) == "dequant"
    int8, _ = make_layer(WeightSpec(8, True, "channel"))
    assert int8.kernel_for(make_x(1, 256)) == "int8pack_cpu"
    assert int8.kernel_for(make_x(64, 256)) == "dequant"
    odd, _ = make_layer(WeightSpec(4, True, "group", 128), n=40)  # N % 16 != 0
    assert odd.kernel_for(make_x(1, 256)) == "dequant"
    act, _ = make_layer(WeightSpec(4, True, "group", 128), act=ActSpec(8))
    # W4A8 on CPU: int4 kernel on the activation codes for few rows; group-wise scales at many rows: one int GEMM
    # per group (see test_act_dispatch_* below)
    assert act.kernel_for(make_x(1, 256)) == "int4_cpu_act"
    assert act.kernel_for(make_x(64, 256)) == "int8_act"


def test_forced_dispatch():
    layer, _ = make_layer(WeightSpec(4, True, "group", 128))
    x = make_x(1, 256)
    with force_kernel("dequant"):
        assert layer.kernel_for(x) == "dequant"
        with force_kernel("int8pack_cpu"):  # group-wise weights cannot use it
            with pytest.raises(RuntimeError):
                layer(x)
        assert QL.get_dispatch() == "dequant"
    assert QL.get_dispatch() is None and layer.kernel_for(x) == "int4_cpu"  # 1 row
    with force_kernel("int8_act"), pytest.raises(RuntimeError):  # no activation spec
        layer(x)
    with pytest.raises(ValueError):
        set_dispatch("fast")


def test_int4_and_dense_paths_agree_on_same_module():
    layer, _ = make_layer(WeightSpec(4, False, "group", 64))
    x = make_x(3, 256)
    y_int4 = layer(x)
    with force_kernel("dequant"):
        y_dense = layer(x)
    assert rel_err(y_int4, y_dense) < BF16_TOL


def test_caching():
    layer, _ = make_layer(WeightSpec(4, True, "group", 128))
    x1, x64 = make_x(1, 256), make_x(64, 256)
    y1, y64 = layer(x1), layer(x64)
    assert {key[0] for key in layer._cache} == {"int4_cpu", "dequant"}
    assert layer.cache_nbytes() >= 64 * 256 * 2
    assert torch.equal(layer(x64), y64) and torch.equal(layer(x1), y1)
    layer.to(torch.float32)  # any move / cast invalidates derived states
    assert layer._cache == {}
    lean, _ = make_layer(WeightSpec(4, True, "group", 128), cache_dequantized=False)
    # 64 rows: the per-call dense path (scratch buffer) with the fused kernel, else the int4 kernel; never a kept copy
    if native.library():
        assert torch.equal(lean(x64), y64) and lean._cache == {}
    with native.torch_only():
        torch.testing.assert_close(lean(x64).float(), y64.float(), rtol=2e-2, atol=2e-2)  # int4 kernel, not dense
        assert {key[0] for key in lean._cache} == {"int4_cpu"}


def test_packed_nbytes_and_repr():
    layer, _ = make_layer(WeightSpec(4, True, "group", 128))
    assert layer.weight_packed.shape == (64, 32) and layer.weight_packed.dtype == torch.int32
    assert layer.packed_nbytes() == 64 * 32 * 4 + 64 * 2 * 4  # int32 words + fp32 scales
    asym, _ = make_layer(WeightSpec(4, False, "group", 128))
    assert asym.weight_zero_point.shape == (8, 2)  # 64 zero points x 4 bits = 8 words per group column
    assert asym.packed_nbytes() == layer.packed_nbytes() + 8 * 2 * 4
    w8, _ = make_layer(WeightSpec(8, True, "channel"))
    assert w8.weight_packed.dtype == torch.int8 and w8.weight_packed.shape == (64, 256)
    assert "int4 sym g128" in repr(layer) and "in_features=256" in repr(layer)


@pytest.mark.parametrize("spec", [WeightSpec(4, False, "group", 64), WeightSpec(8, False, "channel"), WeightSpec(3, True, "tensor")])
def test_from_state_and_state_dict_round_trip(spec):
    layer, qw = make_layer(spec)
    assert torch.equal(layer.codes(), qw.q)
    if qw.zero_point is not None:
        assert torch.equal(layer.zero_points(), qw.zero_point)
    sd = layer.state_dict()
    assert {"weight_packed", "weight_scale", "weight_shape", "bias"} <= set(sd)
    assert ("weight_zero_point" in sd) == (not spec.symmetric)
    tensors = {k: v.clone() for k, v in sd.items() if k != "bias"}
    x = make_x(3, 256)
    y = layer(x)
    other = QuantLinear.from_state(tensors, spec, bias=sd["bias"])
    assert torch.equal(other(x), y)
    fresh = QuantLinear(256, 64, spec, bias=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


def test_from_state_rejects_tampered_checkpoints():
    spec = WeightSpec(4, False, "group", 64)
    layer, _ = make_layer(spec, bias=False)
    sd = layer.state_dict()
    bad = dict(sd, weight_packed=sd["weight_packed"][:, :-1])
    with pytest.raises(UserError, match="weight_packed"):
        QuantLinear.from_state(bad, spec, name="layers.0.q_proj")
    bad = {k: v for k, v in sd.items() if k != "weight_zero_point"}
    with pytest.raises(UserError, match="weight_zero_point"):
        QuantLinear.from_state(bad, spec)
    bad = dict(sd, weight_scale=sd["weight_scale"][:, :1])
    with pytest.raises(UserError, match="weight_scale"):
        QuantLinear.from_state(bad, spec)


# ----------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("spec", [WeightSpec(4, True, "group", 128), WeightSpec(4, False, "group", 32), WeightSpec(4, True, "channel")])
def test_int4_cuda_kernel(spec):
    layer, _ = make_layer(spec, n=64, k=512)
    layer = layer.cuda()
    for shape in [(1, 512), (2, 40, 512)]:
        x = make_x(*shape).cuda()
        assert layer.kernel_for(x) == "int4_cuda"
        y = layer(x)
        assert rel_err(y.cpu(), reference(layer.cpu(), x.cpu())) < BF16_TOL
        layer.cuda()


@cuda
@pytest.mark.parametrize("m", [1, 16, 33])
def test_int8_linear_cuda_pads_rows(m):
    layer, _ = make_layer(WeightSpec(8, True, "channel"), act=ActSpec(8))
    x = make_x(m, 256)
    ref = reference(layer, x)
    y = layer.cuda()(x.cuda())
    assert rel_err(y.cpu(), ref) < BF16_TOL


@pytest.mark.parametrize("spec", [WeightSpec(4, False, "group", 32), WeightSpec(8, True, "channel")])
def test_checkpoint_tensors_reload_identically(spec):
    # What the writer stores (serialize.packed_tensors) must rebuild the very same layer.
    from dllmq.checkpoint.serialize import packed_tensors

    qw = rtn_quantize(make_weight(64, 256), spec)
    bias = make_weight(1, 64, seed=5)[0].bfloat16()
    fresh = QuantLinear.from_quantized(qw, bias)
    loaded = QuantLinear.from_state(packed_tensors(qw), spec, bias=bias)
    for shape in [(1, 256), (2, 9, 256)]:
        x = make_x(*shape)
        assert torch.equal(fresh(x), loaded(x))


# ----------------------------------------------------------------------------- W?A8 on CPU: prepared int8 weight,
# float GEMMs on integer activation codes (int4_cpu_act / int8pack_cpu_act / fold_bf16)


def act_reference(layer, x):
    """float64 ``x_hat @ w_hat.T + bias`` with x_hat the per-token (affine when asymmetric) rounding of x."""
    x2 = x.reshape(-1, layer.in_features)
    xq, xs, xz = G.quantize_per_token_affine(x2, layer.act_spec)
    xd = xq.double() if xz is None else xq.double() - xz.double()
    y = (xd * xs.double()) @ layer.dequantized_weight(torch.float64).t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


ACT_CODE_CASES = [
    # (spec, act, forced path)
    (WeightSpec(4, True, "group", 128), ActSpec(8), "fold_bf16"),  # DuQuant / QuaRot W4A8 default
    (WeightSpec(4, False, "group", 64), ActSpec(8, symmetric=False), "fold_bf16"),
    (WeightSpec(8, True, "channel"), ActSpec(8), "fold_bf16"),
    (WeightSpec(4, True, "group", 128), ActSpec(8), "int4_cpu_act"),
    (WeightSpec(4, False, "group", 32), ActSpec(8, symmetric=False), "int4_cpu_act"),
    (WeightSpec(4, True, "channel"), ActSpec(4, clip_ratio=0.9), "int4_cpu_act"),  # W4A4
    (WeightSpec(8, True, "channel"), ActSpec(8), "int8pack_cpu_act"),
    (WeightSpec(4, True, "channel"), ActSpec(8, symmetric=False), "int8pack_cpu_act"),
]


@pytest.mark.parametrize("spec,act,path", ACT_CODE_CASES, ids=lambda v: str(getattr(v, "num_bits", v)))
@pytest.mark.parametrize("shape", [(1, 256), (2, 3, 256), (2, 40, 256)])
def test_act_code_paths_match_dequantized_reference(spec, act, path, shape):
    # bf16 output / weight rounding only: the activation codes are exact
    layer, x, ref = _check_forced_path(spec, act, path, shape, act_reference, 5e-3)
    with force_kernel("int8_act"):  # the true integer GEMM, same rounding of x
        assert rel_err(layer(x), ref) < 5e-3


def test_act_code_paths_agree_with_integer_gemm_on_large_values():
    # codes up to +-127 (and q - zp up to 255 when asymmetric) must stay exact when fed as bf16
    for act in (ActSpec(8), ActSpec(8, symmetric=False)):
        layer, _ = make_layer(WeightSpec(4, True, "group", 128), n=128, k=512, act=act)
        x = make_x(5, 512) * 30 + 3
        with force_kernel("int8_act"):
            y_int = layer(x).double()
        for path in ("fold_bf16", "int4_cpu_act"):
            with force_kernel(path):
                assert rel_err(layer(x), y_int) < 5e-3, path


def test_int8_act_weight_prepared_once():
    # the int8 weight (and the zero-point sums) are built on the first call and reused, even without a dense copy
    for act in (ActSpec(8), ActSpec(8, symmetric=False)):
        layer, _ = make_layer(WeightSpec(4, True, "group", 128), act=act, cache_dequantized=False)
        builds = []
        codes = layer.codes
        layer.codes = lambda: builds.append(1) or codes()
        x = make_x(40, 256)
        with force_kernel("int8_act"):
            y1 = layer(x)
            state = layer._cache[("int8_act", x.device)]
            y2 = layer(x)
        assert layer._cache[("int8_act", x.device)] is state and len(builds) == 1
        assert torch.equal(y1, y2)
        assert not any(key[0] == "dequant" for key in layer._cache)  # no dense copy
        # int8 copy of an int4 weight: 1 B/weight = 2x the packed weight (plus the fp32 scales, shared)
        assert state[0].dtype == torch.int8 and state[0].numel() == 64 * 256
        assert layer.cache_nbytes() >= 64 * 256 and state[0].nbytes == 2 * layer.weight_packed.nbytes
    # 8-bit per-channel weights: the stored int8 buffer is used as is, no copy
    w8, _ = make_layer(WeightSpec(8, True, "channel"), act=ActSpec(8), cache_dequantized=False)
    with force_kernel("int8_act"):
        w8(make_x(40, 256))
    assert w8._cache[("int8_act", torch.device("cpu"))][0] is w8.weight_packed and w8.cache_nbytes() < 64 * 256


def test_fold_bf16_builds_dense_copy_once_when_cached():
    layer, _ = make_layer(WeightSpec(4, True, "group", 16), act=ActSpec(8))
    x = make_x(40, 256)
    with native.torch_only():  # the fold is automatic only without the fused kernels
        assert layer.kernel_for(x) == "fold_bf16"
    with force_kernel("fold_bf16"):
        layer(x)
    dense = layer._cache[("dequant", x.device, torch.bfloat16)]
    with force_kernel("fold_bf16"):
        layer(x)
    assert layer._cache[("dequant", x.device, torch.bfloat16)] is dense
    lean, _ = make_layer(WeightSpec(4, True, "group", 16), act=ActSpec(8), cache_dequantized=False)
    with force_kernel("fold_bf16"):  # allowed when forced, but the dense copy is not kept
        torch.testing.assert_close(lean(x).float(), layer(x).float())
    assert not any(key[0] == "dequant" for key in lean._cache)


def test_act_dispatch_on_cpu(no_dot_kernels):
    g128, ch, w8 = WeightSpec(4, True, "group", 128), WeightSpec(4, True, "channel"), WeightSpec(8, True, "channel")
    cached, _ = make_layer(g128, act=ActSpec(8))
    lean, _ = make_layer(g128, act=ActSpec(8), cache_dequantized=False)
    for layer in (cached, lean):
        assert layer.kernel_for(make_x(1, 256)) == layer.kernel_for(make_x(2, 4, 256)) == "int4_cpu_act"
        assert layer.kernel_for(make_x(1, 256, dtype=torch.float32)) == "int8_act"  # bf16-only kernels
    assert cached.kernel_for(make_x(9, 256)) == "int8_act"  # 2 groups: the int GEMMs beat the fold
    assert lean.kernel_for(make_x(9, 256)) == "int8_act"  # no dense copy allowed: one int GEMM per group
    g16 = WeightSpec(4, True, "group", 16)
    many = ACT_INT8_CPU_MAX_GROUPS + 1
    cached_many, _ = make_layer(g16, k=16 * many, act=ActSpec(8))
    lean_many, _ = make_layer(g16, k=16 * many, act=ActSpec(8), cache_dequantized=False)
    x_many = make_x(64, 16 * many)
    # with the fused CPU kernels the per-group integer GEMMs at any number of groups; without them the bf16 fold
    # beyond ACT_INT8_CPU_MAX_GROUPS groups, when a dense copy may be cached
    assert cached_many.kernel_for(x_many) == ("int8_act" if native.library() else "fold_bf16")
    assert lean_many.kernel_for(x_many) == "int8_act"
    with native.torch_only():
        assert cached_many.kernel_for(x_many) == "fold_bf16"
        assert lean_many.kernel_for(x_many) == "int8_act"
        at_limit, _ = make_layer(g16, k=16 * ACT_INT8_CPU_MAX_GROUPS, act=ActSpec(8))
        assert at_limit.kernel_for(make_x(64, 16 * ACT_INT8_CPU_MAX_GROUPS)) == "int8_act"
    pc, _ = make_layer(ch, act=ActSpec(8))
    assert pc.kernel_for(make_x(8, 256)) == "int4_cpu_act" and pc.kernel_for(make_x(9, 256)) == "int8_act"
    p8, _ = make_layer(w8, act=ActSpec(8))
    assert p8.kernel_for(make_x(1, 256)) == "int8_act"  # `_int_mm` is fast at exactly one row
    assert p8.kernel_for(make_x(8, 256)) == "int8pack_cpu_act" and p8.kernel_for(make_x(9, 256)) == "int8_act"
    odd, _ = make_layer(g128, n=40, act=ActSpec(8), cache_dequantized=False)  # N % 16: no int4 kernel
    assert odd.kernel_for(make_x(1, 256)) == "int8_act"
    wo, _ = make_layer(g128)
    with force_kernel("fold_bf16"), pytest.raises(RuntimeError):  # weight-only layer: no activation codes
        wo(make_x(1, 256))


def test_loader_keeps_a_dense_copy_only_for_small_layers(tiny_llada, tmp_path, monkeypatch):
    """Small layers (the bundled model's) keep a dense bf16 copy so their many-row GEMMs match bf16; large ones
    (LLaDA-8B's) keep only the packed weight unless asked; an explicit argument always wins."""
    import dllmq
    import dllmq.runtime.loader as loader
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize
    from dllmq.quantization.spec import WeightSpec
    from dllmq.runtime.qlinear import QuantLinear

    out = tmp_path / "q"
    quantize(tiny_llada, QuantizationConfig("rtn", WeightSpec(4, True, "group", 32)), out, show_progress=False)
    flags = lambda m: {q.cache_dequantized for q in m.modules() if isinstance(q, QuantLinear)}
    assert flags(dllmq.load(out)) == {True}
    assert flags(dllmq.load(out, cache_dequantized=False)) == {False}
    monkeypatch.setattr(loader, "SMALL_LAYER_WEIGHTS", 64 * 64 - 1)  # every layer of the tiny model is "large"
    assert flags(dllmq.load(out)) == {False}
    assert flags(dllmq.load(out, cache_dequantized=True)) == {True}


def test_act_dispatch_for_large_per_channel_layers(monkeypatch, no_dot_kernels):
    """Layers whose int GEMM runs as W @ X^T (kernels.int8_swapped: large, per channel) leave the weight-only kernels
    on the activation codes after ACT_CODES_SWAPPED_MAX_ROWS rows instead of ACT_INT4_CPU_MAX_ROWS."""
    monkeypatch.setattr(K, "INT8_SWAPPED_MIN_WEIGHTS", 64 * 256)  # make the suite's 64x256 layers "large"
    w8, ch, g128 = WeightSpec(8, True, "channel"), WeightSpec(4, True, "channel"), WeightSpec(4, True, "group", 128)
    limit = QL.ACT_CODES_SWAPPED_MAX_ROWS
    p8, _ = make_layer(w8, act=ActSpec(8))
    p4, _ = make_layer(ch, act=ActSpec(8))
    grouped, _ = make_layer(g128, act=ActSpec(8))
    if native.library():
        assert p8.kernel_for(make_x(limit, 256)) == "int8pack_cpu_act" and p8.kernel_for(make_x(limit + 1, 256)) == "int8_act"
        assert p4.kernel_for(make_x(limit, 256)) == "int4_cpu_act" and p4.kernel_for(make_x(limit + 1, 256)) == "int8_act"
        assert K.int8_swapped(limit + 1, p4._int8_act_state(torch.device("cpu"))[0].numel(), grouped=False)
    assert grouped.kernel_for(make_x(QL.ACT_INT4_CPU_MAX_ROWS, 256)) == "int4_cpu_act"  # groups: never swapped
    with native.torch_only():  # without the fused kernels the product is never swapped
        assert p4.kernel_for(make_x(QL.ACT_INT4_CPU_MAX_ROWS, 256)) == "int4_cpu_act"


def test_layers_reading_one_input_share_its_quantization(monkeypatch):
    """q/k/v read the same tensor: it is quantized once for all three (same results as separately), again after an
    in-place change or for another spec, and never reused for inference tensors (no version counter)."""
    calls = []
    real = QL.quantize_per_token_affine
    monkeypatch.setattr(QL, "quantize_per_token_affine", lambda x2, spec: (calls.append(1), real(x2, spec))[1])
    layers = [make_layer(WeightSpec(8, True, "channel"), n=64, act=ActSpec(8), bias=False)[0] for _ in range(3)]
    x = make_x(2, 20, 256)
    with force_kernel("int8_act"):
        ys = [layer(x) for layer in layers]
        assert len(calls) == 1
        with monkeypatch.context() as m:
            m.setattr(QL, "_LAST_QUANTIZED", threading.local())  # no memo: each layer quantizes for itself
            for layer, y in zip(layers, ys):
                m.setattr(QL, "_LAST_QUANTIZED", threading.local())
                assert torch.equal(layer(x), y)
        calls.clear()
        x.mul_(2)  # an in-place change bumps the version: quantized again
        layers[0](x), layers[1](x)
        assert len(calls) == 1
        other = make_layer(WeightSpec(8, True, "channel"), n=64, act=ActSpec(8, symmetric=False), bias=False)[0]
        other(x)
        assert len(calls) == 2
        calls.clear()
        with torch.inference_mode():
            xi = make_x(2, 20, 256)
            layers[0](xi), layers[1](xi)
        assert len(calls) == 2


# --------------------------------------------------------------------------- call plans (QuantLinear._plan)

def _plan_cases():
    yield "dense", make_layer(WeightSpec(4, True, "group", 64), bias=True)[0]
    if native.library() is not None and native.int8_dot_available(4):
        yield "int8_vnni", make_layer(WeightSpec(4, False, "channel", None), act=ActSpec(8, symmetric=False))[0]


@pytest.mark.parametrize("name", ["dense", "int8_vnni"])
def test_call_plans_compute_what_the_generic_forward_computes(name):
    cases = dict(_plan_cases())
    if name not in cases:
        pytest.skip("no int8 dot-product kernel on this CPU")
    layer = cases[name]
    x = make_x(2, 24, 256)
    with torch.no_grad():
        first = layer(x)  # builds the plan
        key = (x.shape, x.dtype, x.device)
        assert layer._plans.get(key) is not None, "a plan was expected for this path"
        assert torch.equal(layer(x), first) and torch.equal(layer._forward(x), first)
        assert layer(x).shape == (2, 24, 64)


def test_call_plans_are_dropped_when_what_they_were_built_from_changes():
    layer = make_layer(WeightSpec(4, True, "group", 64), bias=True)[0]
    x = make_x(24, 256)
    with torch.no_grad():
        layer(x)
        assert layer._plans
        layer.cache_dequantized = False  # the dense copy is no longer the layer's path at this size
        assert not layer._plans
        lean = layer(x)
        layer.clear_cache()
        assert not layer._plans and not layer._cache
        layer(x)
        layer.to(torch.float32)  # _apply
        assert not layer._plans
        layer.input_transform = torch.nn.Identity()
        assert not layer._plans
        assert torch.allclose(layer(x).float(), lean.float(), rtol=0, atol=0)


def test_call_plans_step_aside_for_forced_kernels_torch_only_and_autograd(monkeypatch):
    layer = make_layer(WeightSpec(4, True, "group", 64), bias=True)[0]
    x = make_x(24, 256)
    calls = []
    orig = QuantLinear._forward
    monkeypatch.setattr(QuantLinear, "_forward", lambda self, x: calls.append(1) or orig(self, x))
    with torch.no_grad():
        layer(x)
        layer(x)
        assert calls == []  # both served by the plan
        with force_kernel("dequant"):
            layer(x)
        with native.torch_only():
            layer(x)
    assert len(calls) == 2
    layer(x.clone().requires_grad_())
    assert len(calls) == 3


def test_call_plans_are_bounded_per_layer():
    layer = make_layer(WeightSpec(4, True, "group", 64), bias=False)[0]
    with torch.no_grad():
        for rows in range(1, 3 * QL.MAX_PLANS):
            y = layer(make_x(rows, 256))
            assert y.shape == (rows, 64)
            assert len(layer._plans) <= QL.MAX_PLANS
