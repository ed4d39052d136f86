import pytest
import torch
from torch import nn

from dllmq.quantization.awq import apply_clip, awq_search_clip, awq_search_scales, fold_scales
from dllmq.quantization.rtn import fake_quantize
from dllmq.quantization.spec import WeightSpec

K, T = 64, 256
OUTLIERS = [3, 17, 40]


def _inputs(seed=0, t=T):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, K, generator=gen)
    x[:, OUTLIERS] *= 25.0  # a few activation outlier channels, as in LLM norms' outputs
    return x


def _weights(seed=0, rows=(32, 16, 16)):
    gen = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(n, K, generator=gen) * 0.05 for n in rows]


def _mse(x, weights, spec, scales=None):
    s = torch.ones(K) if scales is None else scales
    num = den = 0.0
    for w in weights:
        w_eff = fake_quantize(w * s, spec) / s
        num += (x @ w.t() - x @ w_eff.t()).pow(2).sum().item()
        den += x.shape[0] * w.shape[0]
    return num / den


@pytest.mark.parametrize("duo_scaling", [True, False])
@pytest.mark.parametrize(
    "spec", [WeightSpec(4, True, "group", 16), WeightSpec(3, False, "group", 32), WeightSpec(4, True, "channel")],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_scale_search_beats_rtn_with_outlier_channels(spec, duo_scaling):
    x, ws = _inputs(), _weights()
    scales, info = awq_search_scales(x.abs().mean(0), ws, spec, x, grid=10, duo_scaling=duo_scaling)
    assert scales.shape == (K,) and torch.isfinite(scales).all() and (scales > 0).all()
    assert info["best_ratio"] is not None and info["best_ratio"] > 0
    assert (scales.max() * scales.min()).item() == pytest.approx(1.0, rel=1e-4)  # normalised
    assert len(info["losses"]) == len(info["ratios"]) == 10
    rtn, awq = _mse(x, ws, spec), _mse(x, ws, spec, scales)
    assert awq < 0.8 * rtn, (awq, rtn)
    assert info["best_loss"] == pytest.approx(awq, rel=1e-4)
    assert info["identity_loss"] == pytest.approx(rtn, rel=1e-4)
    # salient (outlier) input channels are scaled up relative to the rest
    assert scales[OUTLIERS].min() > scales[[i for i in range(K) if i not in OUTLIERS]].max()


def test_scale_search_with_block_fn_matches_direct_loss():
    x, ws = _inputs(seed=1), _weights(seed=1)
    spec = WeightSpec(4, True, "group", 16)
    calls = []

    def block_fn(s):
        calls.append(s.clone())
        return _mse(x, ws, spec, s)

    s_fn, info_fn = awq_search_scales(x.abs().mean(0), ws, spec, block_fn=block_fn, grid=8)
    s_x, info_x = awq_search_scales(x.abs().mean(0), ws, spec, x, grid=8)
    assert len(calls) == 9  # 8 grid points + identity
    torch.testing.assert_close(s_fn, s_x)
    assert info_fn["best_ratio"] == info_x["best_ratio"]
    with pytest.raises(ValueError):
        awq_search_scales(x.abs().mean(0), ws, spec)


def test_scale_search_keeps_identity_when_nothing_helps():
    x, ws = _inputs(), _weights()
    spec = WeightSpec(4, True, "group", 16)
    # a loss that only the identity minimises
    s, info = awq_search_scales(x.abs().mean(0), ws, spec, block_fn=lambda s: float((s - 1).abs().sum()), grid=5)
    assert torch.equal(s, torch.ones(K)) and info["best_ratio"] is None


def _heavy_tailed_weight(seed=0, n=32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, K, generator=gen) * 0.05
    w += (torch.rand(n, K, generator=gen) < 0.02) * torch.randn(n, K, generator=gen) * 0.4  # rare big weights
    return w


@pytest.mark.parametrize(
    "spec",
    [WeightSpec(3, True, "group", 16), WeightSpec(4, False, "group", 32), WeightSpec(3, True, "channel"),
     WeightSpec(3, True, "tensor")],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_clip_search_never_increases_error(spec):
    w = _heavy_tailed_weight()
    x = torch.randn(300, K, generator=torch.Generator().manual_seed(5))
    max_val = awq_search_clip(w, x, spec, grid=20, max_shrink=0.5, n_sample_tokens=512, max_chunk_elems=4096)
    g = {"group": K // (spec.group_size or 1), "channel": 1}.get(spec.strategy)
    assert max_val.shape == ((w.shape[0], g) if g else (1, 1))
    org = w.abs().amax() if spec.strategy == "tensor" else None
    if org is not None:
        assert 0.5 * org <= max_val.max() <= org
    w_clip = fake_quantize(apply_clip(w, max_val, spec), spec)
    err_clip = (x @ (w - w_clip).t()).pow(2).sum().item()
    err_rtn = (x @ (w - fake_quantize(w, spec)).t()).pow(2).sum().item()
    assert err_clip <= err_rtn * (1 + 1e-6)
    if spec.strategy != "tensor" and spec.num_bits == 3:
        assert err_clip < 0.97 * err_rtn, (err_clip, err_rtn)  # heavy tails: clipping pays off


def test_apply_clip_clamps_each_group():
    w = torch.arange(-16.0, 16.0).reshape(2, 16)
    spec = WeightSpec(4, True, "group", 8)
    mv = torch.tensor([[2.0, 100.0], [0.5, 3.0]])
    c = apply_clip(w, mv, spec)
    assert c[0, :8].abs().max() == 2 and torch.equal(c[0, 8:], w[0, 8:])
    assert c[1, :8].abs().max() == 0.5 and c[1, 8:].abs().max() == 3
    assert c.dtype == w.dtype


def _scales(seed=0):
    return torch.rand(K, generator=torch.Generator().manual_seed(seed)) * 4 + 0.1


@pytest.mark.parametrize("norm_cls", ["rms", "layernorm"])
def test_fold_scales_norm_to_linears_preserves_output(norm_cls):
    torch.manual_seed(0)
    norm = nn.RMSNorm(K) if norm_cls == "rms" else nn.LayerNorm(K)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.2, 0.2)
    lins = [nn.Linear(K, 24), nn.Linear(K, 8, bias=False)]
    x = torch.randn(5, K)
    before = [lin(norm(x)) for lin in lins]
    fold_scales(norm, lins, _scales())
    after = [lin(norm(x)) for lin in lins]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fold_scales_linear_to_linear_preserves_output():
    torch.manual_seed(1)
    prev, nxt = nn.Linear(32, K), nn.Linear(K, 16)
    x = torch.randn(7, 32)
    before = nxt(prev(x))
    old_prev_w = prev.weight.detach().clone()
    fold_scales(prev, [nxt], _scales(1))
    torch.testing.assert_close(nxt(prev(x)), before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(prev.weight, old_prev_w)
    with pytest.raises(ValueError):
        fold_scales(prev, [nn.Linear(K + 1, 4)], _scales(1))
    with pytest.raises(ValueError):
        fold_scales(prev, [nxt], -_scales(1))


def test_awq_pipeline_fold_then_quantize():
    """Search on a norm -> linear pair, fold, then plain RTN: lower error than RTN alone."""
    torch.manual_seed(2)
    norm, lin = nn.RMSNorm(K), nn.Linear(K, 32, bias=False)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[OUTLIERS] = 25.0
    x = torch.randn(T, K)
    h = norm(x).detach()
    y_ref = lin(h).detach()
    spec = WeightSpec(4, True, "group", 16)
    s, _ = awq_search_scales(h.abs().mean(0), [lin.weight.detach()], spec, h, grid=10)
    rtn_err = (h @ (lin.weight - fake_quantize(lin.weight.detach(), spec)).t()).pow(2).mean().item()
    fold_scales(norm, [lin], s)
    with torch.no_grad():
        lin.weight.copy_(fake_quantize(lin.weight, spec))
        awq_err = (lin(norm(x)) - y_ref).pow(2).mean().item()
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)
