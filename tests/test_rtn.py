import pytest
import torch

from dllmq.errors import UserError
from dllmq.quantization.qweight import QuantizedWeight
from dllmq.quantization.rtn import compute_qparams, dequantize, fake_quantize, quantize, rtn_quantize
from dllmq.quantization.spec import WeightSpec

N, K = 48, 256


def _weight(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.02
    w[5, 17] = 0.5  # an outlier, as in real LLM weights
    w[7] = w[7].abs()  # an all-positive row (asymmetric range must still include 0)
    return w


def _specs():
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            yield WeightSpec(bits, sym, "group", 32)
            yield WeightSpec(bits, sym, "group", 128)
            yield WeightSpec(bits, sym, "channel")
            yield WeightSpec(bits, sym, "tensor")


SPECS = list(_specs())


def _expanded(t, k):
    return t.repeat_interleave(k // t.shape[1], dim=1) if t.shape[1] not in (1, k) else t


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_rtn_error_bound_and_shapes(spec):
    w = _weight()
    qw = rtn_quantize(w, spec)
    groups = {"group": K // (spec.group_size or 1), "channel": 1, "tensor": 1}[spec.strategy]
    rows = 1 if spec.strategy == "tensor" else N
    assert isinstance(qw, QuantizedWeight)
    assert qw.q.dtype == torch.int32 and qw.q.shape == (N, K)
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (rows, groups)
    assert int(qw.q.min()) >= spec.qmin and int(qw.q.max()) <= spec.qmax
    if spec.symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == torch.int32 and qw.zero_point.shape == (rows, groups)
        assert int(qw.zero_point.min()) >= spec.qmin and int(qw.zero_point.max()) <= spec.qmax
    w_hat = qw.dequantize()
    assert w_hat.shape == (N, K) and w_hat.dtype == torch.float32
    # Round-to-nearest without clipping: every weight is within half a step.
    step = _expanded(qw.scale, K).expand(N, K)
    err = (w - w_hat).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-8).all(), float((err / step).max())
    # The full range is used: the extreme code is hit in every group.
    if spec.symmetric:
        assert int(qw.q.abs().max()) == spec.qmax


@pytest.mark.parametrize("sym", [True, False])
def test_zero_stays_exact(sym):
    spec = WeightSpec(4, sym, "group", 32)
    w = _weight()
    w[3] = 0.0  # an all-zero row (pruned / padding)
    w[9, :32] = 0.0  # an all-zero group
    w[11, 40] = 0.0
    qw = rtn_quantize(w, spec)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    w_hat = qw.dequantize()
    assert torch.equal(w_hat[3], torch.zeros(K))
    assert torch.equal(w_hat[9, :32], torch.zeros(32))
    assert w_hat[11, 40] == 0.0


def test_asymmetric_range_contains_zero():
    spec = WeightSpec(4, False, "channel")
    w = torch.rand(4, 64) + 1.0  # strictly positive: min forced to 0
    scale, zp = compute_qparams(w, spec)
    assert torch.equal(zp, torch.full((4, 1), spec.qmin, dtype=torch.int32))
    torch.testing.assert_close(scale, w.amax(dim=1, keepdim=True) / 15)


def test_symmetric_scale_formula():
    spec = WeightSpec(4, True, "channel")
    w = _weight()
    scale, zp = compute_qparams(w, spec, clip_ratio=0.9)
    assert zp is None
    torch.testing.assert_close(scale, 0.9 * w.abs().amax(dim=1, keepdim=True) / 7)


def test_asymmetric_beats_symmetric_on_skewed_weights():
    w = torch.rand(N, K) * 0.1 - 0.01  # mostly positive
    sym = rtn_quantize(w, WeightSpec(4, True, "channel")).dequantize()
    asym = rtn_quantize(w, WeightSpec(4, False, "channel")).dequantize()
    assert (w - asym).pow(2).mean() < 0.5 * (w - sym).pow(2).mean()


def test_error_shrinks_with_bits_and_groups():
    w = _weight()
    mse = {b: (w - rtn_quantize(w, WeightSpec(b, True, "group", 32)).dequantize()).pow(2).mean() for b in (2, 3, 4, 8)}
    assert mse[2] > mse[3] > mse[4] > mse[8]
    g32 = (w - rtn_quantize(w, WeightSpec(4, True, "group", 32)).dequantize()).pow(2).mean()
    ch = (w - rtn_quantize(w, WeightSpec(4, True, "channel")).dequantize()).pow(2).mean()
    tensor = (w - rtn_quantize(w, WeightSpec(4, True, "tensor")).dequantize()).pow(2).mean()
    assert g32 < ch < tensor


def test_clipping_clamps_only_outliers():
    spec = WeightSpec(4, True, "channel")
    w = _weight()
    qw = rtn_quantize(w, spec, clip_ratio=0.5)
    step = qw.scale.expand(N, K)
    over = (w - qw.dequantize()).abs() > step / 2 * (1 + 1e-5)
    assert over.any()
    assert ((qw.q[over] == spec.qmin) | (qw.q[over] == spec.qmax)).all()


@pytest.mark.parametrize("sym", [True, False])
def test_column_by_column_matches_full(sym):
    # GPTQ quantizes one column at a time with its group's [N, 1] parameters.
    spec = WeightSpec(3, sym, "group", 32)
    w = _weight()
    scale, zp = compute_qparams(w, spec)
    full = quantize(w, scale, zp, spec)
    for j in (0, 31, 32, 200, K - 1):
        g = j // 32
        s, z = scale[:, g : g + 1], None if zp is None else zp[:, g : g + 1]
        col = quantize(w[:, j : j + 1], s, z, spec)
        assert col.shape == (N, 1)
        assert torch.equal(col, full[:, j : j + 1])
        assert torch.equal(dequantize(col, s, z, spec), dequantize(full, scale, zp, spec)[:, j : j + 1])
        torch.testing.assert_close(fake_quantize(w[:, j : j + 1], spec, s, z), dequantize(col, s, z, spec))


def test_fake_quantize_matches_rtn_and_keeps_dtype():
    spec = WeightSpec(4, False, "group", 64)
    w = _weight()
    torch.testing.assert_close(fake_quantize(w, spec), rtn_quantize(w, spec).dequantize(), rtol=0, atol=0)
    wb = w.bfloat16()
    out = fake_quantize(wb, spec)
    assert out.dtype == torch.bfloat16 and out.shape == wb.shape


def test_dequantize_dtypes_and_group_expansion():
    spec = WeightSpec(4, True, "group", 32)
    q = torch.ones(2, 64, dtype=torch.int32)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = dequantize(q, scale, None, spec, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64)
    assert out[0, :32].eq(1).all() and out[0, 32:].eq(2).all() and out[1, 32:].eq(4).all()
    zp = torch.tensor([[1, 0], [0, -1]], dtype=torch.int32)
    out = dequantize(q, scale, zp, WeightSpec(4, False, "group", 32))
    assert out[0, :32].eq(0).all() and out[1, 32:].eq(8).all()


def test_bad_inputs():
    with pytest.raises(UserError):
        rtn_quantize(torch.randn(4, 48), WeightSpec(4, True, "group", 32))  # 32 does not divide 48
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(4, 4, 4), WeightSpec(4, True, "channel"))
