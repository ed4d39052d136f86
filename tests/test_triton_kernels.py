"""Triton kernels (dllmq/runtime/triton_kernels.py) against the torch reference paths.

Run under Triton's interpreter on CPU tensors. The kernels are decorated on first use, so
the variable only has to be set before the first kernel call, not before triton is imported
(checked in a subprocess below).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from dllmq.checkpoint.packing import pack_rows, unpack_rows  # noqa: E402
from dllmq.quantization.rtn import rtn_quantize  # noqa: E402
from dllmq.quantization.spec import ActSpec, WeightSpec  # noqa: E402
from dllmq.runtime import kernels as K  # noqa: E402
from dllmq.quantization import grid as G
from dllmq.runtime import triton_kernels as T  # noqa: E402
from dllmq.runtime.qlinear import QuantLinear, force_kernel  # noqa: E402
from dllmq.runtime.transforms import OnlineScale  # noqa: E402

FP32_TOL = dict(rtol=1e-6, atol=1e-6)
BF16_TOL = dict(rtol=2**-8, atol=1e-6)  # one bf16 ulp


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_available_under_interpreter():
    assert T.triton_available()


# ----------------------------------------------------------------------------- per-token quantization


def _act(x, outliers=True):
    x = x.clone()
    if outliers:  # a few large channels, as in LLM activations
        x[:, 3] *= 40
        x[:, -1] *= 15
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,clip", [(8, 1.0), (8, 0.85), (4, 1.0), (4, 0.9)])
def test_quantize_matches_reference(dtype, bits, clip):
    k = 77  # odd, not a power of two
    x = _act(torch.randn(6, k, generator=gen(bits)) * 2).to(dtype)
    x[2] = 0  # a zero row gets scale 1 and zero codes
    spec = ActSpec(bits, clip_ratio=clip)
    ref_q, ref_s = G.quantize_per_token(x, spec)
    q, s = T.quantize_per_token_triton(x, qmax=spec.qmax, clip_ratio=clip)
    assert q.dtype == torch.int8 and q.shape == (6, k)
    assert s.dtype == torch.float32 and s.shape == (6, 1)
    assert torch.equal(s, ref_s)
    assert torch.equal(q, ref_q)
    assert s[2].item() == 1.0 and not q[2].any()


def test_quantize_ties_round_half_to_even():
    # amax 127 -> scale exactly 1, so x / scale lands exactly on the .5 ties
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -126.5, 126.5, 4.4999, -5.5001]])
    q, s = T.quantize_per_token_triton(x)
    ref_q, ref_s = G.quantize_per_token(x, ActSpec(8))
    assert s.item() == 1.0
    assert torch.equal(q, ref_q)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4, -126, 126, 4, -6]]


def test_quantize_multi_block_rows_and_batch_dims():
    """K spread over several blocks (two-pass loop) and a [B, T, K] input."""
    x = _act(torch.randn(2, 3, 100, generator=gen(3)).reshape(6, 100)).reshape(2, 3, 100)
    ref_q, ref_s = G.quantize_per_token(x, ActSpec(8, clip_ratio=0.9))
    q, s = T.quantize_per_token_triton(x, clip_ratio=0.9, block_k=32)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_quantize_fused_smoothing(dtype, clip):
    """Fused x / s equals the unfused runtime path: OnlineScale, then quantize_per_token."""
    k = 45
    x = _act(torch.randn(5, k, generator=gen(5)) * 3).to(dtype)
    x[4] = 0
    smooth = torch.rand(k, generator=gen(6)) * 8 + 0.25
    smooth[3] = 37.0  # the outlier channel is scaled down
    spec = ActSpec(8, clip_ratio=clip)
    ref_q, ref_s = G.quantize_per_token(OnlineScale(smooth)(x), spec)
    q, s = T.quantize_per_token_triton(x, clip_ratio=clip, smooth=smooth, block_k=16)
    assert torch.equal(s, ref_s)
    assert torch.equal(q, ref_q)


def test_quantize_rejects_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError):
        T.quantize_per_token_triton(x, qmax=200)
    with pytest.raises(ValueError):
        T.quantize_per_token_triton(x, clip_ratio=0.0)
    with pytest.raises(ValueError):
        T.quantize_per_token_triton(x, smooth=torch.ones(7))


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("k", [64, 75])
def test_pack_w4_round_trip(k):
    q = torch.randint(-8, 8, (9, k), generator=gen(k), dtype=torch.int32)
    packed = T.pack_w4_for_triton(q)
    assert packed.dtype == torch.int32 and packed.shape == (9, -(-k // 8))
    assert torch.equal(unpack_rows(packed, 4, k), q)
    assert torch.equal(packed, pack_rows(q, 4))  # same words as the checkpoint format


def test_pack_w4_layout():
    q = torch.arange(-8, 8, dtype=torch.int32)[None]  # u = q + 8 = 0..15
    words = T.pack_w4_for_triton(q)[0].tolist()
    assert [w & 0xFFFFFFFF for w in words] == [0x76543210, 0xFEDCBA98]  # input 0 in the low nibble


def test_pack_w4_rejects_out_of_range():
    with pytest.raises(ValueError):
        T.pack_w4_for_triton(torch.tensor([[0, 8]]))
    with pytest.raises(ValueError):
        T.pack_w4_for_triton(torch.tensor([[-9, 0]]))


# ----------------------------------------------------------------------------- W4A8 matmul


def _w4_problem(m, n, k, group_size, seed=0):
    g = gen(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int32)
    w_scale = torch.rand(n, k // group_size, generator=g) * 0.02 + 1e-3
    x = _act(torch.randn(m, k, generator=g))
    xq, xs = G.quantize_per_token(x, ActSpec(8))
    return q, w_scale, xq, xs


def _reference(xq, xs, q, w_scale, group_size, out_dtype, bias):
    """kernels.int8_linear on the unpacked codes, in its per-channel / group-major layouts."""
    n, k = q.shape
    groups = k // group_size
    w = q.to(torch.int8)
    if groups > 1:
        w = w.view(n, groups, group_size).transpose(0, 1).contiguous()
    return K.int8_linear(xq, xs, w, w_scale, out_dtype, bias)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group_size", [192, 32, 64], ids=["channel", "g32", "g64"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_w4a8_matmul_matches_int8_linear(m, group_size, with_bias, out_dtype):
    n, k = 72, 192  # N is not a multiple of BLOCK_N=64
    q, w_scale, xq, xs = _w4_problem(m, n, k, group_size, seed=m + group_size)
    bias = torch.randn(n, generator=gen(9)) if with_bias else None
    y = T.w4a8_matmul_triton(xq, xs, T.pack_w4_for_triton(q), w_scale, group_size, out_dtype, bias)
    ref = _reference(xq, xs, q, w_scale, group_size, out_dtype, bias)
    assert y.dtype == out_dtype and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref.float(), **(FP32_TOL if out_dtype == torch.float32 else BF16_TOL))


@pytest.mark.parametrize(
    "k,group_size,block_k",
    [(75, 75, None), (96, 48, None), (128, 128, 32), (64, 16, 32)],
    ids=["odd-K-channel", "g48-masked-tail", "channel-4-blocks", "g16-half-block"],
)
def test_w4a8_matmul_masks_k(k, group_size, block_k):
    """K not a multiple of 8 (padded last word), groups not a multiple of BLOCK_K."""
    m, n = 3, 20
    q, w_scale, xq, xs = _w4_problem(m, n, k, group_size, seed=k)
    y = T.w4a8_matmul_triton(xq, xs, T.pack_w4_for_triton(q), w_scale, group_size, torch.float32, block_k=block_k)
    torch.testing.assert_close(y, _reference(xq, xs, q, w_scale, group_size, torch.float32, None), **FP32_TOL)


def test_w4a8_matmul_fp16_out_and_scale_shapes():
    m, n, k = 4, 24, 64
    q, w_scale, xq, xs = _w4_problem(m, n, k, k, seed=2)
    packed = T.pack_w4_for_triton(q)
    ref = _reference(xq, xs, q, w_scale, k, torch.float16, None)
    y = T.w4a8_matmul_triton(xq, xs, packed, w_scale.reshape(n), k, torch.float16)  # [N] per channel
    torch.testing.assert_close(y.float(), ref.float(), rtol=2**-11, atol=1e-6)
    per_tensor = w_scale[:1, :1]  # [1, 1] broadcast over rows
    ref_t = _reference(xq, xs, q, per_tensor.expand(n, 1), k, torch.float32, None)
    y_t = T.w4a8_matmul_triton(xq, xs, packed, per_tensor, k, torch.float32)
    torch.testing.assert_close(y_t, ref_t, **FP32_TOL)


def test_w4a8_matmul_rejects_bad_shapes():
    q, w_scale, xq, xs = _w4_problem(2, 8, 64, 32)
    packed = T.pack_w4_for_triton(q)
    with pytest.raises(ValueError):
        T.w4a8_matmul_triton(xq, xs, packed, w_scale, 48, torch.float32)  # 48 does not divide 64
    with pytest.raises(ValueError):
        T.w4a8_matmul_triton(xq, xs, packed[:, :-1], w_scale, 32, torch.float32)
    with pytest.raises(ValueError):
        T.w4a8_matmul_triton(xq, xs, packed, w_scale[:, :1], 32, torch.float32)


def test_w4a4_codes_run_through_the_same_kernel():
    m, n, k = 5, 16, 64
    q, w_scale, _, _ = _w4_problem(m, n, k, 32, seed=4)
    xq, xs = G.quantize_per_token(torch.randn(m, k, generator=gen(4)), ActSpec(4))
    y = T.w4a8_matmul_triton(xq, xs, T.pack_w4_for_triton(q), w_scale, 32, torch.float32)
    torch.testing.assert_close(y, _reference(xq, xs, q, w_scale, 32, torch.float32, None), **FP32_TOL)


def test_linear_on_a_quantlinear_checkpoint_layer():
    """A 4-bit QuantLinear's packed weight and scales go in as stored; same output as its
    int8_act path (per-token int8 activations, int GEMM)."""
    n, k = 40, 128
    w = torch.randn(n, k, generator=gen(11)) * 0.05
    qw = rtn_quantize(w, WeightSpec(4, True, "group", 32))
    bias = torch.randn(n, generator=gen(12)) * 0.1
    layer = QuantLinear.from_quantized(qw, bias, act_spec=ActSpec(8))
    x = torch.randn(2, 3, k, generator=gen(13)).to(torch.bfloat16)
    with force_kernel("int8_act"):
        ref = layer(x)
    y = T.w4a8_linear_triton(x, layer.weight_packed, layer.weight_scale, 32, layer.bias)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)


@pytest.mark.parametrize("bits,strategy,gs,abits", [(4, "group", 32, 8), (3, "channel", None, 8), (4, "group", 64, 4)])
def test_quantlinear_dispatches_to_the_triton_kernel(bits, strategy, gs, abits):
    """QuantLinear's `triton_w4a8` path (chosen automatically on CUDA) equals its int8_act path."""
    n, k = 24, 128
    qw = rtn_quantize(torch.randn(n, k, generator=gen(21)) * 0.05, WeightSpec(bits, True, strategy, gs))
    layer = QuantLinear.from_quantized(qw, torch.randn(n, generator=gen(22)) * 0.1, act_spec=ActSpec(abits))
    x = torch.randn(5, k, generator=gen(23)).to(torch.bfloat16)
    with force_kernel("int8_act"):
        ref = layer(x)
    with force_kernel("triton_w4a8"):
        assert layer.kernel_for(x) == "triton_w4a8"
        y = layer(x)
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)
    weight_only = QuantLinear.from_quantized(qw)
    with force_kernel("triton_w4a8"), pytest.raises(RuntimeError, match="cannot run"):
        weight_only(x)


# ----------------------------------------------------------------------------- import behaviour


def _run(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_module_imports_without_triton():
    out = _run(
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch\n"
        "from dllmq.runtime import triton_kernels as T\n"
        "assert not T.triton_available()\n"
        "assert T.pack_w4_for_triton(torch.zeros(2, 8, dtype=torch.int32)).shape == (2, 1)\n"
        "try:\n"
        "    T.quantize_per_token_triton(torch.ones(2, 8))\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    assert "raised" in out and "pip install" in out


def test_interpreter_flag_may_be_set_after_triton_import():
    out = _run(
        "import triton, triton.language, torch, os\n"
        "from dllmq.runtime import triton_kernels as T\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "assert T.triton_available()\n"
        "from dllmq.quantization.grid import quantize_per_token\n"
        "from dllmq.quantization.spec import ActSpec\n"
        "x = torch.randn(3, 40)\n"
        "q, s = T.quantize_per_token_triton(x)\n"
        "rq, rs = quantize_per_token(x, ActSpec(8))\n"
        "print('same', torch.equal(q, rq) and torch.equal(s, rs))\n"
    )
    assert "same True" in out


def test_kernels_compile_for_nvidia_gpus():
    """No GPU here, but Triton can compile for one: build cubins for sm80 / sm90, which catches
    what the interpreter lets through (non-builtin calls, int8 dot shapes, types)."""
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("triton's nvidia backend is not installed")
    quant, mm = T._kernels(False)
    ptrs = dict(x_ptr="*bf16", smooth_ptr="*fp32", q_ptr="*i8", scale_ptr="*fp32")
    ints = dict(K="i32", stride_xm="i32", stride_qm="i32", clip_ratio="fp32")
    consts = dict(QMAX=127, HAS_SMOOTH=True, ROUND_SMOOTHED=2, BLOCK_K=1024)
    quant_src = ASTSource(quant, {**ptrs, **ints, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
    ptrs = dict(x_ptr="*i8", x_scale_ptr="*fp32", w_ptr="*i32", w_scale_ptr="*fp32", bias_ptr="*fp32", out_ptr="*bf16")
    names = ("M", "N", "group_size", "num_groups", "stride_xm", "stride_wn", "stride_wsn", "stride_om")
    consts = dict(HAS_BIAS=True, PER_CHANNEL=False, ROUND_OUT=2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    mm_sig = {**ptrs, **dict.fromkeys(names, "i32"), **dict.fromkeys(consts, "constexpr")}
    mm_src = ASTSource(mm, mm_sig, constexprs=consts)
    for cap in (80, 90):
        for src in (quant_src, mm_src):
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            assert compiled.asm["cubin"]
            assert "fma.rn.f32" not in ptx  # no contraction: same rounding as the torch reference
            if src is quant_src:
                assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
