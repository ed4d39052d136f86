import pytest
import torch
from torch import nn

from dllmq.quantization.awq import fold_scales
from dllmq.quantization.rtn import fake_quantize
from dllmq.quantization.grid import fake_quant_act
from dllmq.quantization.smoothquant import smooth_scales
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.quantization.grid import quantize_per_token

K, T = 64, 128
OUTLIERS = [3, 17, 40]


def _inputs(seed=0, factor=50.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen)
    x[:, OUTLIERS] *= factor
    return x


def _weights(seed=0, rows=(32, 16)):
    gen = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(n, K, generator=gen) * 0.05 for n in rows]


def test_smooth_scales_formula_and_shared_weight_max():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(K, generator=gen) * 10 + 0.1
    ws = _weights(1)
    s = smooth_scales(a, ws, alpha=0.5)
    w_max = torch.maximum(ws[0].abs().amax(0), ws[1].abs().amax(0))
    torch.testing.assert_close(s, a.sqrt() / w_max.sqrt())
    s8 = smooth_scales(a, ws, alpha=0.8)
    torch.testing.assert_close(s8, a.pow(0.8) / w_max.pow(0.2))
    assert s.dtype == torch.float32 and s.shape == (K,)
    # alpha = 1: all of the activation range goes into the weights
    torch.testing.assert_close(smooth_scales(a, ws, alpha=1.0), a)


def test_smooth_scales_safe_on_dead_channels():
    a = torch.ones(K)
    a[5] = 0.0
    ws = _weights()
    ws[0][:, 7] = 0.0
    ws[1][:, 7] = 0.0
    a[7] = 1e9
    s = smooth_scales(a, ws)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s.min() >= 1e-5 and s.max() <= 1e5
    with pytest.raises(ValueError):
        smooth_scales(a, ws, alpha=1.5)
    with pytest.raises(ValueError):
        smooth_scales(a, [torch.zeros(4, K + 1)])
    with pytest.raises(ValueError):
        smooth_scales(a, [])


def test_fold_into_norm_preserves_output():
    torch.manual_seed(0)
    norm = nn.LayerNorm(K)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K) + 0.5)
        norm.weight[OUTLIERS] *= 50.0  # outlier channels come out of the norm's gain
        norm.bias.copy_(torch.randn(K) * 0.1)
    lins = [nn.Linear(K, 32), nn.Linear(K, 16)]
    h = torch.randn(T, K)
    with torch.no_grad():
        x = norm(h)
        before = [lin(x) for lin in lins]
        s = smooth_scales(x.abs().amax(0), [lin.weight for lin in lins], alpha=0.5)
        fold_scales(norm, lins, s)
        x2 = norm(h)
        after = [lin(x2) for lin in lins]
    torch.testing.assert_close(x2, x / s, rtol=1e-5, atol=1e-5)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # smoothing flattened the norm output's channel ranges
    r_before = x.abs().amax(0)
    r_after = x2.abs().amax(0)
    assert r_after.max() / r_after.median() < 0.5 * (r_before.max() / r_before.median())


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_act_matches_runtime(bits):
    x = _inputs(2, factor=5.0).reshape(4, T // 4, K)
    spec = ActSpec(bits, clip_ratio=0.9)
    y = fake_quant_act(x, spec)
    assert y.shape == x.shape and y.dtype == x.dtype
    q, scale = quantize_per_token(x, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    torch.testing.assert_close(y.reshape(-1, K), q.float() * scale)
    # per token: error bounded by half a step, except clipped values
    x2 = x.reshape(-1, K)
    step = x2.abs().amax(-1, keepdim=True) * 0.9 / spec.qmax
    inside = x2.abs() <= step * spec.qmax
    assert ((y.reshape(-1, K) - x2).abs()[inside] <= (step / 2 + 1e-6).expand_as(x2)[inside]).all()
    assert torch.equal(fake_quant_act(x, ActSpec(16)), x)
    assert fake_quant_act(x.to(torch.bfloat16), spec).dtype == torch.bfloat16


def _w8a8_error(x, ws, s=None):
    wspec, aspec = WeightSpec(8, True, "channel"), ActSpec(8)
    s = torch.ones(K) if s is None else s
    num = den = 0.0
    for w in ws:
        ref = x @ w.t()
        out = fake_quant_act(x / s, aspec) @ fake_quantize(w * s, wspec).t()
        num += (out - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return num / den


def test_smoothing_lowers_w8a8_error_with_outlier_channels():
    x, ws = _inputs(3), _weights(3)
    s = smooth_scales(x.abs().amax(0), ws, alpha=0.5)
    plain, smooth = _w8a8_error(x, ws), _w8a8_error(x, ws, s)
    assert smooth < 0.25 * plain, (smooth, plain)
    # outlier channels get the largest scales
    others = [i for i in range(K) if i not in OUTLIERS]
    assert s[OUTLIERS].min() > s[others].max()
