import warnings

import pytest
import torch

from dllmq.quantization.cgq import token_weights
from dllmq.quantization.gptq import HessianAccumulator, gptq_quantize
from dllmq.quantization.rtn import compute_qparams, dequantize, quantize, rtn_quantize
from dllmq.quantization.spec import WeightSpec

N, K, T = 24, 64, 256


def _layer(seed=0, n=N, k=K, t=T):
    """A weight and strongly correlated calibration inputs (low-rank signal plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    z = torch.randn(t, k // 2, generator=gen)
    x = z @ torch.randn(k // 2, k, generator=gen) / (k // 2) ** 0.5 + 0.2 * torch.randn(t, k, generator=gen)
    return w, x


def _hessian(x):
    acc = HessianAccumulator()
    acc.add(x)
    return acc.hessian


def _out_err(x, w, what):
    return (x @ w.t() - x @ what.t()).norm().item()


def _reference_gptq(w, h, spec, damp, act_order=False, static_groups=True):
    """Unoptimised column-by-column GPTQ: no lazy blocks, params looked up per column."""
    w = w.clone().double()
    h = h.clone().double()
    k = w.shape[1]
    gs = spec.group_size if spec.strategy == "group" else k
    if static_groups or spec.strategy != "group":
        scale, zp = compute_qparams(w.float(), spec)
    else:
        scale = torch.zeros(w.shape[0], k // gs)
        zp = None if spec.symmetric else torch.zeros(w.shape[0], k // gs, dtype=torch.int32)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(k)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros(w.shape, dtype=torch.int32)
    for j in range(k):
        g = int(perm[j]) // gs if spec.strategy == "group" else 0
        if not static_groups and spec.strategy == "group" and j % gs == 0:
            s_g, z_g = compute_qparams(w[:, j : j + gs].float(), spec)
            scale[:, g] = s_g[:, 0]
            if zp is not None:
                zp[:, g] = z_g[:, 0]
        s = scale[:, g : g + 1] if spec.strategy != "tensor" else scale.expand(w.shape[0], 1)
        z = None if zp is None else (zp[:, g : g + 1] if spec.strategy != "tensor" else zp.expand(w.shape[0], 1))
        col = w[:, j : j + 1].float()
        q[:, j : j + 1] = quantize(col, s, z, spec)
        err = (w[:, j : j + 1] - dequantize(q[:, j : j + 1], s, z, spec).double()) / u[j, j]
        w[:, j + 1 :] -= err @ u[j : j + 1, j + 1 :]
    return q[:, torch.argsort(perm)], scale


# ---------------------------------------------------------------------------- Hessian


def test_hessian_running_mean_matches_full_batch():
    _, x = _layer()
    acc = HessianAccumulator()
    for chunk in x.reshape(4, T // 4, K).unbind(0):
        acc.add(chunk.reshape(2, -1, K))  # leading dims are flattened
    full = 2.0 / T * x.t() @ x
    assert acc.n_tokens == T
    torch.testing.assert_close(acc.hessian, full, rtol=1e-4, atol=1e-4)


def test_hessian_token_weights_and_padding():
    _, x = _layer(t=32)
    gen = torch.Generator().manual_seed(1)
    tw = torch.rand(32, generator=gen) + 0.5
    tw[:4] = 0  # padding: excluded from n
    acc = HessianAccumulator(dtype=torch.float64)
    acc.add(x, token_weights=tw)
    expect = 2.0 / 28 * (x.double().t() * tw.double()) @ x.double()
    assert acc.n_tokens == 28
    torch.testing.assert_close(acc.hessian, expect)
    with pytest.raises(ValueError):
        acc.add(x, token_weights=tw[:5])


# ---------------------------------------------------------------------------- GPTQ vs RTN


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("strategy", ["group", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_calibration_inputs(bits, strategy, symmetric, act_order):
    w, x = _layer()
    spec = WeightSpec(bits, symmetric, strategy, 16 if strategy == "group" else None)
    qw, info = gptq_quantize(w, _hessian(x), spec, block_size=16, act_order=act_order)
    rtn = rtn_quantize(w, spec)
    assert qw.q.shape == (N, K) and qw.scale.shape == rtn.scale.shape
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    e_gptq, e_rtn = _out_err(x, w, qw.dequantize()), _out_err(x, w, rtn.dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert info["damp"] == 0.01 and info["loss"] > 0 and info["seconds"] >= 0


@pytest.mark.parametrize("bits", [2, 8])
def test_gptq_other_bit_widths(bits):
    w, x = _layer(seed=3)
    spec = WeightSpec(bits, False, "group", 32)
    qw, _ = gptq_quantize(w, _hessian(x), spec)
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    assert _out_err(x, w, qw.dequantize()) < _out_err(x, w, rtn_quantize(w, spec).dequantize())


@pytest.mark.parametrize(
    "spec",
    [WeightSpec(4, True, "group", 16), WeightSpec(3, False, "group", 32), WeightSpec(4, True, "channel"),
     WeightSpec(2, False, "tensor")],
    ids=lambda s: s.describe().replace(" ", "-"),
)
@pytest.mark.parametrize("static_groups", [True, False])
def test_identity_hessian_equals_rtn(spec, static_groups):
    w, _ = _layer(seed=1)
    qw, info = gptq_quantize(w, torch.eye(K), spec, damp=0.0, static_groups=static_groups)
    rtn = rtn_quantize(w, spec)
    assert torch.equal(qw.q, rtn.q)
    assert torch.equal(qw.scale, rtn.scale)
    assert (qw.zero_point is None) == (rtn.zero_point is None)
    if rtn.zero_point is not None:
        assert torch.equal(qw.zero_point, rtn.zero_point)
    assert info["damp"] == 0.0


@pytest.mark.parametrize(
    "spec,act_order,static_groups,block_size",
    [
        (WeightSpec(4, True, "group", 16), False, True, 16),
        (WeightSpec(4, True, "group", 16), False, True, 24),  # blocks straddle groups, K % bs != 0
        (WeightSpec(3, False, "group", 16), False, False, 8),  # dynamic groups, bs < group size
        (WeightSpec(3, False, "group", 16), True, True, 32),
        (WeightSpec(4, False, "channel"), True, True, 20),
        (WeightSpec(4, True, "tensor"), False, True, 16),
    ],
)
def test_lazy_batches_match_column_by_column_reference(spec, act_order, static_groups, block_size):
    w, x = _layer(seed=2)
    h = _hessian(x)
    damp = 0.05  # well conditioned
    qw, info = gptq_quantize(
        w, h, spec, block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups
    )
    q_ref, scale_ref = _reference_gptq(w, h, spec, damp, act_order, static_groups)
    mismatch = (qw.q != q_ref).float().mean().item()
    assert mismatch == 0.0, mismatch
    torch.testing.assert_close(qw.scale, scale_ref.float())
    # GPTQ's loss is exactly tr(ΔW (H + λI) ΔWᵀ)
    dw = (w - qw.dequantize()).double()
    hd = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(K, dtype=torch.float64)
    assert info["loss"] == pytest.approx(torch.trace(dw @ hd @ dw.t()).item(), rel=1e-3)


def test_act_order_static_groups_keep_original_group_scales():
    w, x = _layer(seed=4)
    # make diag(H) strongly non-monotonic so the permutation mixes groups
    x = x[:, torch.randperm(K, generator=torch.Generator().manual_seed(0))]
    h = _hessian(x)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    assert not torch.equal(perm // 16, torch.arange(K) // 16)
    spec = WeightSpec(4, False, "group", 16)
    qw, _ = gptq_quantize(w, h, spec, act_order=True, static_groups=True)
    scale, zp = compute_qparams(w, spec)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero_point, zp)
    assert _out_err(x, w, qw.dequantize()) < _out_err(x, w, rtn_quantize(w, spec).dequantize())
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, h, spec, act_order=True, static_groups=False)


def test_singular_hessian_raises_damp_with_warning():
    w, _ = _layer(seed=5)
    h = torch.ones(K, K)  # rank 1: Cholesky fails without dampening
    spec = WeightSpec(4, True, "group", 16)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.q_proj.*damp="):
        qw, info = gptq_quantize(w, h, spec, damp=0.0, name="model.layers.0.q_proj")
    assert info["damp"] > 0 and not info["rtn_fallback"]
    assert torch.isfinite(qw.dequantize()).all()


def test_non_finite_hessian_falls_back_to_rtn():
    w, x = _layer(seed=6)
    h = _hessian(x)
    h[3, 3] = float("nan")
    spec = WeightSpec(4, True, "channel")
    with pytest.warns(UserWarning, match="round-to-nearest"):
        qw, info = gptq_quantize(w, h, spec, name="blk.mlp")
    assert info["rtn_fallback"]
    assert torch.equal(qw.q, rtn_quantize(w, spec).q)


def test_dead_columns_are_zeroed():
    w, x = _layer(seed=7)
    x[:, [5, 40]] = 0
    spec = WeightSpec(4, True, "group", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qw, _ = gptq_quantize(w, _hessian(x), spec, damp=0.0)
    deq = qw.dequantize()
    assert (deq[:, [5, 40]] == 0).all()
    assert _out_err(x, w, deq) < _out_err(x, w, rtn_quantize(w, spec).dequantize())


def test_cgq_weighted_hessian_focuses_on_weighted_tokens():
    """GPTQ with token weights lowers the error on the heavily weighted tokens."""
    w, x = _layer(seed=8)
    gen = torch.Generator().manual_seed(8)
    masked = torch.zeros(1, T, dtype=torch.bool)
    masked[0, : T // 4] = True
    x[: T // 4] = x[: T // 4] @ torch.randn(K, K, generator=gen) / K**0.5 * 2  # different distribution
    tw = token_weights(masked, torch.full((1, T), 0.9), mask_weight=6.0)
    spec = WeightSpec(3, True, "group", 16)
    acc_plain, acc_cgq = HessianAccumulator(), HessianAccumulator()
    acc_plain.add(x[None])
    acc_cgq.add(x[None], token_weights=tw)
    q_plain, _ = gptq_quantize(w, acc_plain.hessian, spec)
    q_cgq, _ = gptq_quantize(w, acc_cgq.hessian, spec)
    xm = x[: T // 4]
    assert _out_err(xm, w, q_cgq.dequantize()) < _out_err(xm, w, q_plain.dequantize())


# ---------------------------------------------------------------------------- CGQ weights


def test_cgq_token_weights_formula_and_normalisation():
    masked = torch.tensor([[True, False, True, False], [False, False, True, True]])
    conf = torch.tensor([[0.81, 0.81, 0.25, 0.04], [1.0, 0.0, 0.49, 0.09]])
    w = token_weights(masked, conf)
    assert w.shape == (2, 4) and w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    a = 1.0 + masked.float() + conf.sqrt()  # defaults: base 1, mask_weight 2, conf_power 0.5
    torch.testing.assert_close(w, a**2 / (a**2).mean())
    # masked beats unmasked at equal confidence; weight grows with confidence
    assert w[0, 0] > w[0, 1]
    assert w[0, 0] > w[0, 2] > 0
    raw = token_weights(masked, conf, normalize=False, square=False)
    torch.testing.assert_close(raw, a)


def test_cgq_token_weights_valid_mask():
    masked = torch.tensor([[True, False, False, True]])
    conf = torch.tensor([[0.5, 0.5, 0.9, 0.1]])
    valid = torch.tensor([[True, True, True, False]])
    w = token_weights(masked, conf, valid=valid)
    assert w[0, 3] == 0
    assert w[0, :3].mean().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        token_weights(masked, conf[:, :2])


@pytest.mark.parametrize("spec", [WeightSpec(4, True, "group", 16), WeightSpec(3, False, "group", 32),
                                  WeightSpec(4, True, "channel", None), WeightSpec(8, True, "tensor", None)])
def test_mse_scale_search_picks_a_grid_ratio_per_group_and_never_loses_to_minmax(spec):
    from dllmq.quantization.rtn import _grouped, mse_qparams

    w, _ = _layer(3)
    w[:, 5] *= 6  # a few large weights per row: min-max wastes steps on them
    s, z = mse_qparams(w, spec, grid=11, min_ratio=0.5, norm=2.0)
    s0, z0 = compute_qparams(w, spec)
    assert s.shape == s0.shape and (z is None) == (z0 is None)

    def group_err(scale, zp, p=2.0):
        return _grouped((dequantize(quantize(w, scale, zp, spec), scale, zp, spec) - w).abs() ** p, spec).sum(-1)

    e, e0 = group_err(s, z), group_err(s0, z0)
    assert (e <= e0 + 1e-12).all()
    s24, z24 = mse_qparams(w, spec, grid=11, min_ratio=0.5)  # default exponent 2.4: optimal in its own norm
    assert (group_err(s24, z24, 2.4) <= group_err(s0, z0, 2.4) * (1 + 1e-6) + 1e-12).all()
    if spec.num_bits <= 4:  # at 8 bits the steps are fine already; clipping rarely pays
        assert e.sum() < 0.95 * e0.sum()  # the search does find better clippings here
    # every group's parameters are exactly compute_qparams' at one of the grid's ratios
    cands = [compute_qparams(w, spec, 1.0 - 0.05 * i) for i in range(11)]
    hit = torch.zeros_like(s, dtype=torch.bool)
    for cs, cz in cands:
        hit |= (cs == s) & (True if z is None else (cz == z))
    assert hit.all()


def test_gptq_with_mse_scales_lowers_output_error():
    w, x = _layer(4, n=64, k=128, t=512)
    w[:, 7] *= 5
    h = _hessian(x)
    spec = WeightSpec(4, True, "group", 32)
    errs = {}
    for search in ("minmax", "mse"):
        qw, _ = gptq_quantize(w, h, spec, scale_search=search)
        errs[search] = _out_err(x, w, dequantize(qw.q, qw.scale, qw.zero_point, spec))
    assert errs["mse"] < errs["minmax"]
    with pytest.raises(ValueError, match="scale_search"):
        gptq_quantize(w, h, spec, scale_search="percentile")


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_hessian_factorisation_is_reused_and_exact(act_order, monkeypatch):
    """Linears fed one Hessian (q/k/v, gate/up) reuse its damped inverse Cholesky factor through the accumulator's
    solve_cache: one factorisation instead of one per linear, and the same codes as solving afresh. New inputs clear
    the cache."""
    import dllmq.quantization.gptq as G

    torch.manual_seed(0)
    acc = HessianAccumulator()
    acc.add(torch.randn(256, 64))
    spec = WeightSpec(4, True, "group", 32)
    ws = [torch.randn(48, 64) for _ in range(3)]
    calls = {"n": 0}
    real = G._inverse_cholesky

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(G, "_inverse_cholesky", counted)
    shared = [gptq_quantize(w, acc.hessian, spec, act_order=act_order, solve_cache=acc.solve_cache)[0] for w in ws]
    assert calls["n"] == 1
    fresh = [gptq_quantize(w, acc.hessian, spec, act_order=act_order)[0] for w in ws]
    assert calls["n"] == 4
    assert all(torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) for a, b in zip(shared, fresh))
    acc.add(torch.randn(16, 64))
    assert acc.solve_cache == {}
