"""The fused CPU kernels (dllmq/runtime/cpu_kernels.c) give bit-identical results to the torch code they replace,
and everything still works, with the same numbers, where they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dllmq.quantization import grid as G
from dllmq.quantization.duquant import DuQuantTransform
from dllmq.quantization.rtn import rtn_quantize
from dllmq.quantization.grid import fake_quant_act
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime import kernels as K
from dllmq.runtime import native
from dllmq.runtime.qlinear import QuantLinear, force_kernel

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.status()}")


def _rows(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4 + torch.randn(m, 1, generator=g)
    if m > 2:
        x[1] = 0.0  # a degenerate row: scale 1
        x[2] = x[2].abs() + 0.1  # one sign only: the range still holds 0
    if m > 0 and k > 5:
        x[0, 5] = 60.0  # an outlier, as at LLaDA's FFN down-projection input
    return x.to(dtype)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_library_builds_where_a_compiler_exists():
    if os.environ.get("DLLMQ_NATIVE") == "0" or not any(
            os.path.exists(os.path.join(p, "cc")) for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("no C compiler / native kernels disabled")
    assert native.library() is not None, native.status()
    assert native.status().startswith("loaded ")


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits,symmetric,clip", [(8, False, 1.0), (8, True, 1.0), (4, False, 0.9), (4, True, 0.85)])
@pytest.mark.parametrize("m,k", [(37, 384), (1, 100), (5, 7), (0, 64)])
def test_per_token_quantization_is_bit_identical(dtype, bits, symmetric, clip, m, k):
    spec = ActSpec(bits, symmetric=symmetric, clip_ratio=clip)
    x = _rows(m, k, dtype)
    fused = G.quantize_per_token_affine(x, spec)
    with native.torch_only():
        ref = G.quantize_per_token_affine(x, spec)
        ref_fake = fake_quant_act(x, spec)
    assert _same(fused, ref)
    assert _same(fake_quant_act(x, spec), ref_fake)
    if symmetric:
        with native.torch_only():
            ref_sym = G.quantize_per_token(x, spec)
        assert _same(G.quantize_per_token(x, spec), ref_sym)
    if m:
        assert int(fused[0].min()) >= spec.qmin and int(fused[0].max()) <= spec.qmax
    if m > 2:
        assert float(fused[1][1]) == 1.0  # the all-zero row


@needs_native
def test_strided_rows_and_leading_dims():
    spec = ActSpec(8, symmetric=False)
    wide = _rows(24, 160, torch.bfloat16, seed=1)
    x = wide[:, 16:144]  # rows with a stride wider than their length
    assert x.stride(0) == 160
    fused = G.quantize_per_token_affine(x, spec)
    with native.torch_only():
        ref = G.quantize_per_token_affine(x, spec)
    assert _same(fused, ref)
    x3 = _rows(24, 64, torch.float32, seed=2).reshape(2, 12, 64)
    with native.torch_only():
        ref3 = fake_quant_act(x3, spec)
    assert _same(fake_quant_act(x3, spec), ref3)


W_SPECS = [WeightSpec(8, True, "channel", None), WeightSpec(8, False, "channel", None),
           WeightSpec(4, False, "channel", None), WeightSpec(4, True, "group", 32), WeightSpec(4, False, "group", 64),
           WeightSpec(8, False, "group", 32)]


@needs_native
@pytest.mark.parametrize("wspec", W_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_sym", [True, False], ids=["sym-act", "asym-act"])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("swapped", [False, True], ids=["x@wT", "w@xT"])
def test_int8_layer_is_bit_identical(wspec, act_sym, bias_dtype, out_dtype, swapped, monkeypatch):
    # swapped: the GEMM as W @ X^T with the transposed epilogue (large layers on CPU), forced here for a small one
    monkeypatch.setattr(K, "INT8_SWAPPED_MIN_WEIGHTS", 0 if swapped else 1 << 62)
    g = torch.Generator().manual_seed(4)
    n, k = 40, 128
    qw = rtn_quantize(torch.randn(n, k, generator=g) * 0.05 + 0.01, wspec)
    bias = None if bias_dtype is None else (torch.randn(n, generator=g) * 0.1).to(bias_dtype)
    layer = QuantLinear.from_quantized(qw, bias, act_spec=ActSpec(8, symmetric=act_sym), compute_dtype=out_dtype)
    x = (torch.randn(3, 9, k, generator=g) + 0.5).to(out_dtype)
    with force_kernel("int8_act"):
        y = layer(x)
        with native.torch_only():
            ref = layer(x)
    assert y.dtype == ref.dtype == out_dtype
    assert torch.equal(y, ref)


@needs_native
@pytest.mark.parametrize("swapped", [False, True], ids=["x@wT", "w@xT"])
def test_epilogue_corrections_are_all_applied(swapped, monkeypatch):
    """Each zero-point correction changes the result: the kernel cannot silently skip one."""
    monkeypatch.setattr(K, "INT8_SWAPPED_MIN_WEIGHTS", 0 if swapped else 1 << 62)
    g = torch.Generator().manual_seed(5)
    m, n, k = 21, 40, 32  # partial 16 x 16 tiles of the transposed epilogue
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
    xz = torch.randint(-20, 20, (m, 1), generator=g, dtype=torch.int32)
    wzp = torch.randint(-20, 20, (n,), generator=g, dtype=torch.int32)
    full = K.int8_linear(xq, xs, wq, ws, torch.float32, None, w_zero_point=wzp, x_zero_point=xz)
    exact = ((xq.double() - xz.double()) @ (wq.double() - wzp.double()[:, None]).t()) * xs.double() * ws.double()
    torch.testing.assert_close(full.double(), exact, rtol=1e-6, atol=1e-6)
    assert not torch.equal(full, K.int8_linear(xq, xs, wq, ws, torch.float32, None, x_zero_point=xz))
    assert not torch.equal(full, K.int8_linear(xq, xs, wq, ws, torch.float32, None, w_zero_point=wzp))


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 1, 7 * 300 * 4 * 2], ids=["one-chunk", "per-group", "two-groups"])
def test_group_epilogue_tiles_and_corrections(out_dtype, chunk_bytes, monkeypatch):
    """Group layout with N beyond one column tile (256), reduced in one chunk or in chunks of groups (fp32 sums
    carried between them): equal to the torch loop, exact against float64, and each correction changes the result."""
    monkeypatch.setattr(K, "GROUP_PRODUCTS_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(6)
    m, n, k, groups = 7, 300, 96, 3
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (groups, n, k // groups), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, 1, generator=g), torch.rand(n, groups, generator=g)
    xz = torch.randint(-20, 20, (m, 1), generator=g, dtype=torch.int32)
    wzp = torch.randint(-20, 20, (n, groups), generator=g, dtype=torch.int32)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    args = (xq, xs, wq, ws, out_dtype, bias)
    full = K.int8_linear(*args, w_zero_point=wzp, x_zero_point=xz)
    with native.torch_only():
        assert torch.equal(full, K.int8_linear(*args, w_zero_point=wzp, x_zero_point=xz))
    w_deq = (wq.double() - wzp.t().double()[:, :, None]).transpose(0, 1).reshape(n, k)  # [N, K] codes minus zp
    w_deq = w_deq * ws.double().repeat_interleave(k // groups, dim=1)
    exact = ((xq.double() - xz.double()) @ w_deq.t()) * xs.double() + bias.double()
    tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-4  # fp32 sums of ~1e5-sized products: relative 1e-5 each
    torch.testing.assert_close(full.double(), exact, rtol=tol, atol=tol)
    assert not torch.equal(full, K.int8_linear(*args, x_zero_point=xz))
    assert not torch.equal(full, K.int8_linear(*args, w_zero_point=wzp))


@needs_native
@pytest.mark.parametrize("wspec,k", [(WeightSpec(4, True, "group", 128), 256), (WeightSpec(4, False, "group", 32), 96),
                                     (WeightSpec(4, True, "group", 8), 200), (WeightSpec(2, False, "channel", None), 200),
                                     (WeightSpec(8, True, "channel", None), 72), (WeightSpec(8, False, "group", 64), 128)],
                         ids=lambda v: v.describe() if isinstance(v, WeightSpec) else f"k{v}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_packed_is_bit_identical(wspec, k, dtype):
    """The fused dequantization from packed words equals `dequantized_weight`, vector body and scalar tails alike
    (K not a multiple of 16, groups not aligned to 16)."""
    g = torch.Generator().manual_seed(7)
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(24, k, generator=g) * 0.05 + 0.01, wspec), None)
    x = torch.zeros(1, k, dtype=dtype)
    fused = layer._dequantize(x)
    assert torch.equal(fused, layer.dequantized_weight(dtype))
    out = torch.empty(24, k, dtype=dtype)
    assert layer._dequantize(x, out=out) is out and torch.equal(out, fused)


@needs_native
def test_three_bit_weights_take_the_torch_dequantization():
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(16, 64) * 0.05, WeightSpec(3, True, "group", 32)), None)
    assert native.dequantize_packed(layer.weight_packed, 3, 64, layer.weight_scale.float(), None, torch.bfloat16) is None
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert torch.equal(layer._dequantize(x), layer.dequantized_weight(torch.bfloat16))


@needs_native
def test_per_call_dense_layers_share_the_scratch_buffer_safely():
    """Uncached layers dequantize into one reused buffer: interleaved calls of layers of different sizes still give
    the cached layers' results, and no dense copy is kept."""
    g = torch.Generator().manual_seed(8)
    specs = [(64, 256), (128, 512), (32, 128)]
    lean, cached = [], []
    for n, k in specs:
        qw = rtn_quantize(torch.randn(n, k, generator=g) * 0.05, WeightSpec(4, True, "group", 128))
        lean.append(QuantLinear.from_quantized(qw, None, cache_dequantized=False))
        cached.append(QuantLinear.from_quantized(qw, None, cache_dequantized=True))
    xs = [torch.randn(40, k, generator=g).to(torch.bfloat16) for _, k in specs]
    for order in ([0, 1, 2], [2, 0, 1, 0]):
        for i in order:
            assert cached[i].kernel_for(xs[i]) == "dequant"
            with force_kernel("dequant"):  # (40 rows: the block kernel w16_dot_cpu by default where the CPU has it)
                assert torch.equal(lean[i](xs[i]), cached[i](xs[i]))
    assert all(layer._cache == {} for layer in lean)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_column_gather_and_duquant_transform(dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(33, 256, generator=g).to(dtype)
    perm = torch.randperm(256, generator=g)
    assert torch.equal(native.gather_columns(x, perm), x[:, perm])
    rots = [torch.linalg.qr(torch.randn(4, 64, 64, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    tr = DuQuantTransform(torch.rand(256, generator=g, dtype=torch.float64) + 0.5, rots[0], perm, rots[1])
    xb = x.to(torch.bfloat16) if dtype != torch.float32 else x  # the transform runs in bf16 or float32
    with native.torch_only():
        ref = tr.apply(xb)
    assert torch.equal(tr.apply(xb), ref)


needs_bf16_dot = pytest.mark.skipif(not native.bf16_dot_available(),
                                    reason="native kernels without AVX512-BF16 dot products (DuQuant's torch path runs)")


def _duquant(k: int, b: int, smooth: bool, seed: int = 0) -> DuQuantTransform:
    g = torch.Generator().manual_seed(seed)
    rots = [torch.linalg.qr(torch.randn(k // b, b, b, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5 if smooth else None
    return DuQuantTransform(s, rots[0], torch.randperm(k, generator=g), rots[1]).to(dtype=torch.bfloat16)


def _close_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to the bf16 rounding of a sum taken in another order: here the kernel matched oneDNN's bmm bit for
    bit; AMX tiles sum in another order, which moves a few values by one bf16 step."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=1e-2)
    assert (a != b).sum().item() <= 0.02 * a.numel()


@needs_bf16_dot
@pytest.mark.parametrize("m", [0, 1, 5, 37, 130])
@pytest.mark.parametrize("k,b", [(384, 128), (256, 64), (80, 16)])
@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "no-smooth"])
def test_duquant_kernel_computes_the_transform(m, k, b, smooth):
    """The fused kernel returns what the torch ops (divide, block bmm, gather, block bmm) return, for row counts
    that are not multiples of its 4-row tiles and for every block size it takes (multiples of 16)."""
    tr = _duquant(k, b, smooth)
    x = _rows(m, k, torch.bfloat16)
    assert tr.native_args(x) is not None
    with native.torch_only():
        ref = tr.apply(x)
    _close_bf16(tr.apply(x), ref)
    _close_bf16(tr.apply(x.reshape(1, m, k)).reshape(m, k), ref)  # leading dims
    strided = torch.cat([x, x], dim=1)[:, :k]  # rows with a stride, read in place
    _close_bf16(tr.apply(strided), ref)


@needs_bf16_dot
@pytest.mark.parametrize("spec", [ActSpec(8, symmetric=False), ActSpec(8), ActSpec(4, symmetric=False, clip_ratio=0.9)],
                         ids=["a8-asym", "a8-sym", "a4-asym-clip"])
def test_duquant_fused_quantization_is_the_quantized_transform(spec):
    """Transform and per-token quantization in one pass: bit-identical to quantizing what `apply` returns, so a
    layer's numbers do not depend on which of the two paths it takes."""
    tr = _duquant(384, 128, True, seed=1)
    x = _rows(37, 384, torch.bfloat16, seed=2)
    fused = tr.apply_quantized(x, spec)
    assert _same(fused, G.quantize_per_token_affine(tr.apply(x), spec))
    assert (fused[2] is None) == spec.symmetric


def test_duquant_kernel_declines_what_it_cannot_run():
    """fp32 inputs, block sizes that are not multiples of 16, and inputs needing grad take the torch ops."""
    tr = _duquant(96, 24, True)
    x = _rows(7, 96, torch.bfloat16)
    assert tr.native_args(x) is None and tr.apply_quantized(x, ActSpec(8)) is None
    tr16 = _duquant(96, 16, True)
    assert tr16.native_args(x.float()) is None
    assert tr16.native_args(x.float().requires_grad_().bfloat16()) is None
    with native.torch_only():
        assert tr16.native_args(x) is None


@needs_bf16_dot
def test_duquant_packed_rotations_follow_in_place_updates():
    tr = _duquant(64, 16, True, seed=3)
    x = _rows(9, 64, torch.bfloat16)
    before = tr.apply(x)
    with torch.no_grad():
        tr.rot1.copy_(tr.rot1.flip(1))
    after = tr.apply(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, DuQuantTransform(tr.smooth_scale, tr.rot1.clone(), tr.perm, tr.rot2.clone()).apply(x))


@needs_bf16_dot
def test_duquant_layers_share_one_fused_pass_and_match_the_unfused_path(monkeypatch):
    """q/k/v read one input: one fused transform-and-quantize pass serves the three int8 GEMMs, and the outputs equal
    those of the unfused path (transform, then quantize)."""
    from dllmq.runtime.transforms import OnlineDuQuant

    tr = _duquant(384, 128, True, seed=4)
    mod = OnlineDuQuant(tr.to_tensors(torch.bfloat16))
    g = torch.Generator().manual_seed(5)
    spec, act = WeightSpec(4, False, "channel", None), ActSpec(8, symmetric=False)
    layers = []
    for n in (384, 128, 128):
        w = torch.randn(n, 384, generator=g)
        layer = QuantLinear.from_quantized(rtn_quantize(w, spec), act_spec=act)
        layer.input_transform = mod
        layers.append(layer)
    mod.consumers = len(layers)
    x = _rows(37, 384, torch.bfloat16, seed=6)
    calls = {"fused": 0}
    orig = native.duquant_rows_plan

    def counting(*a, **kw):  # counts the fused passes, whether a layer runs its call plan or the generic forward
        run = orig(*a, **kw)

        def counted(x2):
            calls["fused"] += 1
            return run(x2)

        return None if run is None else counted

    monkeypatch.setattr(native, "duquant_rows_plan", counting)
    with torch.no_grad():
        fused = [layer(x) for layer in layers]
        assert calls["fused"] == 1 and mod._memo is None  # computed once, released after the last consumer
        again = [layer(x) for layer in layers]  # the second call runs the layers' call plans
        assert calls["fused"] == 2 and mod._memo is None
        assert all(torch.equal(a, b) for a, b in zip(fused, again))
        generic = [layer._forward(x) for layer in layers]  # no plan
        assert calls["fused"] == 3 and all(torch.equal(a, b) for a, b in zip(fused, generic))
    monkeypatch.setattr(OnlineDuQuant, "quantized", lambda self, x, spec: None)
    monkeypatch.setattr(OnlineDuQuant, "quantizer", lambda self, x, spec: None)
    for layer in layers:
        layer.clear_cache()
    with torch.no_grad():
        unfused = [layer(x) for layer in layers]
    assert calls["fused"] == 4  # the transform alone, once for the three layers; then quantized separately
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


PROBE = ("import torch; from dllmq.runtime import native; from dllmq.quantization import grid as G; "
         "from dllmq.quantization.spec import ActSpec; torch.manual_seed(0); x = torch.randn(8, 96).bfloat16(); "
         "q, s, z = G.quantize_per_token_affine(x, ActSpec(8, symmetric=False)); "
         "print(native.status()); print(int(q.int().sum()), float(s.sum()), int(z.sum()))")


def test_fallback_without_compiler_or_when_disabled(tmp_path):
    """No compiler (CC that fails) and DLLMQ_NATIVE=0 both fall back to torch with the same numbers; a fresh
    cache compiles the library (about a second)."""
    fresh = _run(PROBE, DLLMQ_CACHE=str(tmp_path / "fresh"))
    broken = _run(PROBE, DLLMQ_CACHE=str(tmp_path / "broken"), CC="false")
    off = _run(PROBE, DLLMQ_NATIVE="0")
    for r in (fresh, broken, off):
        assert r.returncode == 0, r.stderr[-2000:]
    assert "failed; using the torch fallback" in broken.stdout
    assert "disabled (DLLMQ_NATIVE=0)" in off.stdout
    assert broken.stdout.splitlines()[1] == off.stdout.splitlines()[1]
    if fresh.stdout.startswith("loaded "):
        assert fresh.stdout.splitlines()[1] == off.stdout.splitlines()[1]
        assert list((tmp_path / "fresh" / "native").glob("cpu_kernels-*.so"))
        assert not list((tmp_path / "fresh" / "native").glob("tmp*"))  # compiled to a temp file, then renamed


@pytest.mark.skipif(native.vnni_available() or not native.int8_dot_available(4),
                    reason="the AVX2 emulation of the int8 kernel is compiled only on AVX2 CPUs without AVX512-VNNI")
def test_avx2_int8_kernel_is_exact_at_its_code_limit():
    """VPMADDUBSW sums byte pairs into saturating int16: at the largest weight codes the AVX2 kernel accepts
    (|w| = 64) against the extreme activation codes the sums stay exact, and `pack_vnni` refuses larger codes (their
    sums could saturate) so the layer takes another path."""
    lim = native.AVX2_DOT_MAX_CODE
    n, k, m = 32, 128, 6
    w = torch.full((n, k), -lim, dtype=torch.int8)
    w[::2] = lim
    w[:, 1::3] = -lim
    xq = torch.full((m, k), 127, dtype=torch.int8)
    xq[1::2] = -128
    xq[2, ::2] = -128
    xs = torch.ones(m, 1)
    wsum = w.sum(1, dtype=torch.int32).view(1, n)
    y = native.int8_vnni_linear(xq, xs, None, native.pack_vnni(w), n, 1, wsum, torch.ones(1, n), torch.float32)
    exact = (xq.double() @ w.double().t()).float()  # |sums| < 2^24: exact in float32
    assert torch.equal(y, exact)
    assert native.pack_vnni(torch.full((n, k), lim + 1, dtype=torch.int8)) is None
    assert native.pack_vnni(torch.full((n, k), -lim - 1, dtype=torch.int8)) is None


@pytest.mark.skipif(not native._features() & 16, reason="native kernels built without AVX2")
def test_avx2_int8_mm_is_the_integer_product():
    """The AVX2 integer GEMM that replaces PyTorch's reference `_int_mm` loop: exact int32 products for any int8
    values (extremes included), column-sliced inputs and an output slice, as the group-wise path calls it."""
    g = torch.Generator().manual_seed(3)
    for m, n, k in [(1, 16, 256), (5, 33, 384), (37, 130, 512)]:
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        x[0], w[0] = -128, -128
        assert torch.equal(native.int8_mm(x, w), (x.long() @ w.long().t()).int())
    x = torch.randint(-128, 128, (7, 512), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (4, 40, 128), dtype=torch.int8, generator=g)
    acc = torch.empty(4, 7, 40, dtype=torch.int32)
    for i in range(4):
        assert native.int8_mm(x[:, i * 128:(i + 1) * 128], w[i], out=acc[i]).data_ptr() == acc[i].data_ptr()
        assert torch.equal(acc[i], (x[:, i * 128:(i + 1) * 128].long() @ w[i].long().t()).int())
    assert native.int8_mm(x[:, :8], w[0][:, :8]) is None  # K % 16: the caller runs `_int_mm`


@pytest.mark.parametrize("wspec", [WeightSpec(8, True, "channel"), WeightSpec(8, False, "group", 64)],
                         ids=lambda s: s.describe())
def test_int8_layer_is_the_same_on_either_integer_gemm(wspec, monkeypatch):
    """`int8_act` gives the same outputs whether its integer GEMM is PyTorch's `_int_mm` or the AVX2 kernel."""
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(48, 256), wspec), act_spec=ActSpec(8, symmetric=False))
    x = torch.randn(3, 20, 256)
    outs = []
    for fast in (True, False):
        monkeypatch.setattr(native, "torch_int8_gemm_fast", lambda v=fast: v)
        with force_kernel("int8_act"):
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
