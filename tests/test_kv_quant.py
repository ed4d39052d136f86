"""Asymmetric per-token activations, K/V quantization (QuaRot's q/k Hadamard, the --fast cache), IA-AQ's search."""

import json

import pytest
import torch
import torch.nn.functional as F

import dllmq
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.models.layers import AttentionCore
from dllmq.models.loading import load_model
from dllmq.quantization.rtn import rtn_quantize
from dllmq.quantization.grid import fake_quant_act
from dllmq.quantization.spec import ActSpec, KVCacheSpec, WeightSpec
from dllmq.runtime import kernels as K
from dllmq.quantization import grid as G
from dllmq.runtime.kv_quant import (
    IA_AQ_GRID, HeadDimHadamard, KVQuantizer, attention_probs, default_kv_spec, install_kv_quant, search_value_clip,
)
from dllmq.runtime.qlinear import QuantLinear, force_kernel

IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def _model(path):
    return load_model(path, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- item 6: asymmetric activations


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_beats_symmetric_on_shifted_rows(bits):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.5 + 2.0  # mostly positive rows
    err = {s: float((fake_quant_act(x, ActSpec(bits, symmetric=s)) - x).pow(2).sum()) for s in (True, False)}
    assert err[False] <= err[True]
    assert err[False] < 0.5 * err[True]  # roughly half the range is wasted by the symmetric grid


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_quantize_per_token_affine(bits, clip):
    spec = ActSpec(bits, symmetric=False, clip_ratio=clip)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) + torch.linspace(-3, 3, 6)[:, None]
    x[0] = 0.0  # degenerate row
    x[1] = x[1].abs() + 1.0  # a single-sign row: the range still holds 0
    x0 = x.clone()
    q, s, z = G.quantize_per_token_affine(x, spec)
    assert torch.equal(x, x0)  # quantized in place on a copy, never on the caller's fp32 tensor
    assert torch.equal(q, (torch.round(x / s) + z).clamp(spec.qmin, spec.qmax).to(torch.int8))  # the formula
    xb = x.bfloat16()
    qb, sb, zb = G.quantize_per_token_affine(xb, spec)
    assert torch.equal(qb, (torch.round(xb.float() / sb) + zb).clamp(spec.qmin, spec.qmax).to(torch.int8))
    assert q.dtype == torch.int8 and z.dtype == torch.int32 and s.shape == z.shape == (6, 1)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert int(z.min()) >= spec.qmin and int(z.max()) <= spec.qmax  # zero point fits the code range
    xh = G.dequantize_per_token(q, s, z)
    assert torch.equal(xh[0], torch.zeros(64))
    if clip == 1.0:  # no clipping: every value within half a step
        assert ((xh - x).abs() <= s / 2 * (1 + 1e-5) + 1e-6).all()
    # symmetric specs: same codes and scales as quantize_per_token, no zero point
    q2, s2, z2 = G.quantize_per_token_affine(x, ActSpec(bits, clip_ratio=clip))
    q3, s3 = G.quantize_per_token(x, ActSpec(bits, clip_ratio=clip))
    assert z2 is None and torch.equal(q2, q3) and torch.equal(s2, s3)


WSPECS = [WeightSpec(8, True, "channel", None), WeightSpec(8, False, "channel", None),
          WeightSpec(4, True, "group", 32), WeightSpec(4, False, "group", 32), WeightSpec(8, False, "group", 64)]


@pytest.mark.parametrize("wspec", WSPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_path_matches_fake_quant_with_asymmetric_activations(wspec, bits):
    gen = torch.Generator().manual_seed(3)
    n, k = 48, 128
    qw = rtn_quantize(torch.randn(n, k, generator=gen) * 0.05, wspec)
    bias = torch.randn(n, generator=gen) * 0.1
    act = ActSpec(bits, symmetric=False)
    layer = QuantLinear.from_quantized(qw, bias, act_spec=act, compute_dtype=torch.float32)
    x = torch.randn(3, 7, k, generator=gen) + 0.7  # shifted, so zero points are non-trivial
    ref = F.linear(fake_quant_act(x, act).double(), qw.dequantize(torch.float64), bias.double())
    for path in ("int8_act", "dequant"):
        with force_kernel(path):
            y = layer(x)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-5, path
    # the zero-point correction matters: dropping it is far off
    xq, xs, xz = G.quantize_per_token_affine(x.reshape(-1, k), act)
    assert int(xz.abs().max()) > 0
    w, ws, wzp = layer._int8_act_state(x.device)
    y_nozp = K.int8_linear(xq, xs, w, ws, torch.float32, bias, w_zero_point=wzp)
    assert float((y_nozp.double() - ref.reshape(-1, n)).norm() / ref.norm()) > 1e-2


def test_triton_falls_back_for_asymmetric_activations():
    qw = rtn_quantize(torch.randn(32, 64) * 0.05, WeightSpec(4, True, "group", 32))
    layer = QuantLinear.from_quantized(qw, act_spec=ActSpec(8, symmetric=False))
    x = torch.randn(4, 64)
    assert not layer._supported("triton_w4a8", x)
    assert layer.kernel_for(x) in ("int8_act", "int8_vnni")  # the fused CPU kernel where the CPU has VNNI


# ----------------------------------------------------------------------------- item 5: K/V quantization


def test_kv_spec_dict_and_defaults():
    from dllmq.quantization.methods import get_method

    assert KVCacheSpec.from_dict(None) == KVCacheSpec() and not KVCacheSpec().enabled
    s = KVCacheSpec(4, rotate_qk=True)
    assert KVCacheSpec.from_dict(s.to_dict()) == s
    assert s.to_dict()["strategy"] == "token_head"
    # old checkpoints (no kv_cache field) load as 16 bits
    d = QuantizationConfig("rtn", WeightSpec()).to_dict()
    d.pop("kv_cache")
    assert QuantizationConfig.from_dict(d).kv_cache.num_bits == 16
    quarot, duquant, sq, rtn = (get_method(m) for m in ("quarot", "duquant", "smoothquant", "rtn"))
    assert default_kv_spec(quarot, 4) == KVCacheSpec(4, rotate_qk=True)
    assert default_kv_spec(quarot, 4, 16) == KVCacheSpec(16)  # no rotation without quantized keys
    assert default_kv_spec(duquant, 4).num_bits == 4 and default_kv_spec(sq, 8).num_bits == 8
    assert default_kv_spec(rtn, 16).num_bits == 16 and default_kv_spec(rtn, 16, 8).num_bits == 8
    assert (sq.default_act_symmetric, duquant.default_act_symmetric, quarot.default_act_symmetric) == (False, False, True)


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_kv_quant_changes_outputs_at_4_bits_and_is_identity_at_16(fixture, request):
    m = _model(request.getfixturevalue(fixture))
    with torch.no_grad():
        ref = m(IDS)
        assert install_kv_quant(m, m.arch, KVCacheSpec(16), rotate_qk=False) == m.config.num_layers
        assert torch.equal(m(IDS), ref)
        install_kv_quant(m, m.arch, KVCacheSpec(4), rotate_qk=False)
        core = m.blocks[0].get_submodule(m.arch.attn_core)
        assert isinstance(core.key_quant, KVQuantizer) and isinstance(core.value_quant, KVQuantizer)
        y4 = m(IDS)
        install_kv_quant(m, m.arch, KVCacheSpec(8), rotate_qk=False)
        y8 = m(IDS)
    e4, e8 = float((y4 - ref).norm() / ref.norm()), float((y8 - ref).norm() / ref.norm())
    assert e4 > 1e-3 and e8 < e4


def test_kv_quantizer_is_per_token_and_head():
    x = torch.randn(2, 3, 5, 16)
    x[0, 1, 2] *= 100.0  # one token of one head: other rows' scales must not move
    spec = ActSpec(4, symmetric=False)
    y = KVQuantizer(spec)(x)
    ref = fake_quant_act(x.reshape(-1, 16), spec).reshape(x.shape)
    assert torch.equal(y, ref)
    y2 = KVQuantizer(spec)(torch.where(torch.arange(2)[:, None, None, None] == 0, 0 * x, x))
    assert torch.equal(y2[1], y[1])


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_quarot_qk_hadamard_is_function_preserving(fixture, request):
    m = _model(request.getfixturevalue(fixture))
    with torch.no_grad():
        ref = m(IDS)
        install_kv_quant(m, m.arch, KVCacheSpec(16), rotate_qk=True)
        core = m.blocks[0].get_submodule(m.arch.attn_core)
        assert isinstance(core.qk_rotate, HeadDimHadamard)
        y = m(IDS)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # keys after the rotation really are rotated (the slot is not a no-op)
    q = torch.randn(1, 2, 3, core.head_dim)
    assert not torch.allclose(core.qk_rotate(q), q)


def test_kv_quant_with_fast_cache(tiny_llada):
    from dllmq.diffusion.cache import fast_generate, kv_cache

    m = _model(tiny_llada)
    install_kv_quant(m, m.arch, KVCacheSpec(4), rotate_qk=True)
    core = m.blocks[0].get_submodule(m.arch.attn_core)
    seen = {}
    h = core.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    with torch.no_grad(), kv_cache(m) as cache:
        full = m(IDS)
        qh, kh, vh = core.heads(*seen["args"][:4])
        stored_k, stored_v = cache.store[id(core)]
        assert torch.equal(stored_k, kh) and torch.equal(stored_v, vh)  # the cache holds quantized K/V
        # a window covering every position splices nothing stale: same logits as the full forward
        from dllmq.diffusion.cache import _window_forward

        win = _window_forward(m, IDS, None, cache, 0, IDS.shape[1])
    h.remove()
    torch.testing.assert_close(win, full, rtol=1e-5, atol=1e-5)
    prompt = IDS[:1, :8]
    with torch.no_grad():
        out = fast_generate(m, prompt, gen_length=16, block_length=8, cache="dual", threshold=0.9)
    assert out.shape == (1, 24) and not bool((out == m.mask_token_id).any())


def test_checkpoint_records_kv_bits_and_loader_quantizes_kv(tiny_llada, tmp_path, capsys):
    from cli_helpers import run_cli

    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", tiny_llada, "--method", "rtn", "--w", "8", "--group-size", "-1",
                            "--kv-bits", "4", "--out", out, "--json"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache"]["num_bits"] == 4 and cfg["kv_cache"]["symmetric"] is False
    assert cfg["kv_cache"]["rotate_qk"] is False
    m = dllmq.load(out, dtype=torch.float32)
    assert m.quant_config.kv_cache.num_bits == 4
    cores = [c for c in m.modules() if isinstance(c, AttentionCore)]
    assert cores and all(isinstance(c.key_quant, KVQuantizer) and c.key_quant.spec.num_bits == 4 for c in cores)
    calls = []
    hk = cores[0].key_quant.register_forward_hook(lambda mod, a, o: calls.append(o.shape))
    with torch.no_grad():
        y4 = m(IDS)
        hk.remove()
        install_kv_quant(m, m.arch, KVCacheSpec(16), rotate_qk=False)
        y16 = m(IDS)
    assert calls and float((y4 - y16).norm() / y16.norm()) > 1e-3


def test_cli_asymmetric_activation_default_and_flags(tiny_llada, tmp_path, capsys):
    from cli_helpers import run_cli

    base = ["quantize", tiny_llada, "--method", "smoothquant", "--w", "8", "--a", "4", "--group-size", "-1",
            "--calib-mask", "random", "--calib-samples", "4", "--calib-seq-len", "24", "--json"]
    code, _, err = run_cli(base + ["--out", tmp_path / "a"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg["input_activations"]["symmetric"] is False  # SmoothQuant's reference: asymmetric per token
    assert cfg["kv_cache"]["num_bits"] == 4  # paper protocol: K/V at the activation bits
    m = dllmq.load(tmp_path / "a", dtype=torch.float32)
    ql = next(x for x in m.modules() if isinstance(x, QuantLinear))
    assert not ql.act_spec.symmetric
    with torch.no_grad():
        assert torch.isfinite(m(IDS)).all()
    code, _, err = run_cli(base + ["--a-sym", "--kv-bits", "16", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert cfg["input_activations"]["symmetric"] is True and cfg["kv_cache"]["num_bits"] == 16


# ----------------------------------------------------------------------------- item 8: IA-AQ


def test_attention_probs_reproduce_sdpa():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in range(3))
    bias = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    bias[1, ..., :2] = False
    p = attention_probs(q, k, bias)
    torch.testing.assert_close(p @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_ia_aq_search_picks_alpha_in_range_with_lower_pv_error(fixture, request):
    m = _model(request.getfixturevalue(fixture))
    blk = m.blocks[0]
    core = blk.get_submodule(m.arch.attn_core)
    with torch.no_grad():  # give V a few outlier channels, where clipping pays off
        v = blk.get_submodule(m.arch.attn_core.replace("sdpa", "v_proj"))
        v.weight[:2] *= 30.0
    ctx = m.block_context(IDS)
    h = m.embed(IDS)
    meter = search_value_clip(core, lambda: blk(h, **ctx), ActSpec(4, symmetric=False))
    alpha = meter.best()
    assert alpha in IA_AQ_GRID and 0.8 <= alpha <= 1.0
    i = IA_AQ_GRID.index(alpha)
    assert meter.err[i] <= meter.err[0]  # α = 1 is IA_AQ_GRID[0]
    assert meter.tokens == IDS.numel()
    # the meter's error for α = 1 is ‖P·V − P·Q(V)‖² with P, V from the core, computed independently
    seen = {}
    hook = core.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    with torch.no_grad():
        blk(h, **ctx)
    hook.remove()
    q, k, vv, rope, bias = seen["args"]
    qh, kh, vh = core.heads(q, k, vv, rope, quantize_values=False)
    rep = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, -1)
    direct = float((p @ vh - p @ fake_quant_act(vh, ActSpec(4, symmetric=False))).pow(2).sum())
    assert float(meter.err[0]) == pytest.approx(direct, rel=1e-4)


def test_export_refuses_quantized_kv(tmp_path):
    from dllmq.checkpoint.export_ct import check_exportable
    from dllmq.errors import UserError

    q = QuantizationConfig("rtn", WeightSpec(4, True, "group", 32), kv_cache=KVCacheSpec(8))
    with pytest.raises(UserError, match="--kv-bits"):
        check_exportable(q, tmp_path)
    check_exportable(QuantizationConfig("rtn", WeightSpec(4, True, "group", 32)), tmp_path)
