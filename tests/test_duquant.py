import pytest
import torch

from dllmq.quantization.duquant import (
    DuQuantTransform,
    apply_duquant,
    block_size_for,
    duquant_transform,
    rotation_block,
    rotation_blocks,
    spreading_rotation,
    zigzag_permutation,
)
from dllmq.quantization.rtn import fake_quantize
from dllmq.quantization.grid import fake_quant_act
from dllmq.quantization.smoothquant import smooth_scales
from dllmq.quantization.spec import ActSpec, WeightSpec

K, T, BLOCK = 128, 256, 32
OUTLIERS = [3, 5, 9, 70]  # three share the first block: R1 alone cannot separate them


def _inputs(seed=0, factor=50.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64)
    x[:, OUTLIERS] *= factor
    return x.to(dtype)


def _weights(seed=0, rows=(48, 16), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed + 100)
    return [(torch.randn(n, K, generator=gen, dtype=torch.float64) * 0.05).to(dtype) for n in rows]


def _orth_err(m):
    return (m @ m.t() - torch.eye(m.shape[0], dtype=m.dtype)).abs().max().item()


def _peak_ratio(z):
    return (z.abs().max() / z.abs().mean()).item()


@pytest.fixture(scope="module")
def calibrated():
    x, ws = _inputs(), _weights()
    return x, ws, duquant_transform(x, ws, block=BLOCK, steps=256, alpha=0.5)


def test_block_size_for():
    assert block_size_for(4096) == 128
    assert block_size_for(96) == 96
    assert block_size_for(48, 32) == 24
    assert block_size_for(12288) == 128


@pytest.mark.parametrize("b", [1, 2, 3, 32])
def test_spreading_rotation(b):
    q = spreading_rotation(b, seed=0)
    assert _orth_err(q) < 1e-12
    torch.testing.assert_close(q[0], torch.full((b,), b**-0.5, dtype=torch.float64))
    assert torch.equal(q, spreading_rotation(b, seed=0))


def test_rotation_block_spreads_a_spike_and_never_raises_the_peak():
    b = 32
    gen = torch.Generator().manual_seed(4)
    xb = torch.randn(64, b, generator=gen, dtype=torch.float64)
    xb[:, 7] *= 40.0
    r = rotation_block(xb, steps=256)
    assert _orth_err(r) < 1e-10
    before, after = xb.abs().max().item(), (xb @ r).abs().max().item()
    assert after < 0.3 * before, (after, before)
    # a single row (e.g. per-channel max|x|) with one spike is flattened to ~ spike / sqrt(b)
    v = torch.ones(b, dtype=torch.float64)
    v[11] = 100.0
    rv = v @ rotation_block(v, steps=16)
    assert rv.abs().max().item() < 100.0 / b**0.5 * 1.5
    # nothing to gain on a flat block: the identity (best prefix) is kept
    flat = torch.ones(4, b, dtype=torch.float64)
    torch.testing.assert_close(rotation_block(flat, steps=8), torch.eye(b, dtype=torch.float64))
    assert torch.equal(rotation_block(torch.zeros(3, b), steps=8), torch.eye(b, dtype=torch.float64))


def test_rotation_blocks_reduce_every_block_peak():
    x = _inputs(dtype=torch.float64)
    rots = rotation_blocks(x, BLOCK, steps=64)
    assert rots.shape == (K // BLOCK, BLOCK, BLOCK)
    y = (x.reshape(T, -1, BLOCK).transpose(0, 1) @ rots).transpose(0, 1)
    before = x.reshape(T, -1, BLOCK).abs().amax(dim=(0, 2))
    after = y.abs().amax(dim=(0, 2))
    assert (after <= before + 1e-12).all()
    assert after[0] < 0.5 * before[0] and after[2] < 0.5 * before[2]  # the blocks holding outliers
    with pytest.raises(ValueError):
        rotation_blocks(x, 48)


def test_zigzag_permutation_balances_blocks():
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(256, generator=gen).exp() * 3  # log-normal magnitudes
    c[[0, 1, 2, 3]] = torch.tensor([400.0, 300.0, 200.0, 100.0])  # outliers all in block 0 initially
    nb = 8
    perm = zigzag_permutation(c, nb)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(256))
    # each of the 4 outliers lands in its own block
    assert (c[perm].reshape(nb, -1) >= 100).sum(1).max() == 1
    # on a smooth spread of magnitudes, every block gets nearly the same total
    body = torch.randn(256, generator=gen).abs() + 0.5
    body[:32] *= 4.0  # the first 32 channels (one naive block) are larger
    sums = body[zigzag_permutation(body, nb)].reshape(nb, -1).sum(1)
    naive = body.reshape(nb, -1).sum(1)
    assert (sums.max() - sums.min()) / sums.mean() < 0.1, sums
    assert (naive.max() - naive.min()) / naive.mean() > 1.0
    # the exact dealing order: 0,1,...,B-1 then B-1,...,0
    ordered = torch.arange(8, 0, -1, dtype=torch.float32)  # channel i has magnitude 8 - i
    torch.testing.assert_close(zigzag_permutation(ordered, 4), torch.tensor([0, 7, 1, 6, 2, 5, 3, 4]))


def test_transform_is_orthogonal_and_factored_form_matches_dense(calibrated):
    x, ws, tr = calibrated
    assert tr.n_blocks == K // BLOCK and tr.block_size == BLOCK and tr.in_features == K
    m = tr.matrix()
    assert _orth_err(m) < 1e-5
    for blocks in (tr.rot1, tr.rot2):
        assert max(_orth_err(r) for r in blocks) < 1e-10
    # factored online application == (x / s) @ T
    torch.testing.assert_close(tr.apply(x.double()), (x.double() / tr.smooth_scale) @ m)
    torch.testing.assert_close(apply_duquant(x, tr), tr.apply(x))
    # leading dims are kept
    x3 = x.reshape(4, T // 4, K)
    torch.testing.assert_close(tr.apply(x3).reshape(T, K), tr.apply(x))


def test_function_preservation(calibrated):
    x, ws, tr = calibrated
    for w in ws:
        ref64 = x.double() @ w.double().t()
        out64 = tr.apply(x.double()) @ tr.fold_into(w.double()).t()
        assert (out64 - ref64).abs().max().item() <= 1e-10 * ref64.abs().max().item()
        ref = x @ w.t()
        out = tr.apply(x) @ tr.fold_into(w).t()
        assert tr.fold_into(w).dtype == torch.float32
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, rel
    # also without smoothing, and after a float32 checkpoint round trip
    tr0 = duquant_transform(x, block=BLOCK, steps=32, alpha=None)
    assert tr0.smooth_scale is None
    tr32 = DuQuantTransform.from_tensors(tr.to_tensors(torch.float32))
    assert _orth_err(tr32.matrix(torch.float32)) < 1e-5
    for t in (tr0, tr32):
        ref = x @ ws[0].t()
        rel = ((t.apply(x) @ t.fold_into(ws[0]).t() - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, rel


def test_transform_flattens_outliers(calibrated):
    x, ws, tr = calibrated
    before = _peak_ratio(x)
    smooth_only = _peak_ratio(x / tr.smooth_scale)
    after = _peak_ratio(tr.apply(x))
    assert after < 0.1 * before, (after, before)
    assert after < 0.5 * smooth_only, (after, smooth_only)
    no_smooth = duquant_transform(x, block=BLOCK, steps=256, alpha=None)
    assert _peak_ratio(no_smooth.apply(x)) < 0.1 * before


def _error(x, ws, wbits, abits, xform=None, wclip=0.8, aclip=0.9):
    wspec, aspec = WeightSpec(wbits, True, "channel"), ActSpec(abits, clip_ratio=aclip)
    xin, fold = (x, lambda w: w) if xform is None else xform
    num = den = 0.0
    for w in ws:
        ref = x @ w.t()
        out = fake_quant_act(xin, aspec) @ fake_quantize(fold(w), wspec, clip_ratio=wclip).t()
        num += (out - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return num / den


@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("clips", [(1.0, 1.0), (0.8, 0.9)], ids=["noclip", "qdlm-clip"])
def test_low_bit_error_beats_rtn_and_smoothing(calibrated, abits, clips):
    x, ws, tr = calibrated
    wclip, aclip = clips
    s = smooth_scales(x.abs().amax(0), ws, alpha=0.5)
    rtn = _error(x, ws, 4, abits, None, wclip, aclip)
    smooth = _error(x, ws, 4, abits, (x / s, lambda w: w * s), wclip, aclip)
    duq = _error(x, ws, 4, abits, (tr.apply(x), tr.fold_into), wclip, aclip)
    assert duq < 0.3 * rtn, (duq, rtn)
    assert duq < 0.5 * smooth, (duq, smooth)


def test_deterministic_and_storage_round_trip(calibrated):
    x, ws, tr = calibrated
    again = duquant_transform(x, ws, block=BLOCK, steps=256, alpha=0.5)
    for name in ("smooth_scale", "rot1", "perm", "rot2"):
        assert torch.equal(getattr(tr, name), getattr(again, name))
    d = tr.to_tensors()
    assert set(d) == {"smooth_scale", "rot1", "perm", "rot2"}
    assert d["rot1"].dtype == torch.float32 and d["perm"].dtype == torch.int64
    assert d["rot1"].shape == (K // BLOCK, BLOCK, BLOCK) and d["perm"].shape == (K,) and d["smooth_scale"].shape == (K,)
    back = DuQuantTransform.from_tensors(tr.to_tensors(torch.float64))
    torch.testing.assert_close(back.apply(x.double()), tr.apply(x.double()))
    assert "smooth_scale" not in duquant_transform(x, block=BLOCK, steps=4, alpha=None).to_tensors()
    with pytest.raises(ValueError):
        DuQuantTransform.from_tensors({"rot1": d["rot1"], "rot2": d["rot2"]})
    with pytest.raises(ValueError):
        DuQuantTransform(None, d["rot1"], torch.zeros(K, dtype=torch.int64), d["rot2"])


def test_small_and_odd_widths():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(32, 48, generator=gen)
    w = torch.randn(8, 48, generator=gen)
    tr = duquant_transform(x, [w], block=128, steps=16)  # block shrinks to the width
    assert tr.block_size == 48 and tr.n_blocks == 1
    torch.testing.assert_close(tr.apply(x) @ tr.fold_into(w).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    tr = duquant_transform(x, [w], block=32, steps=16)  # 24 = largest divisor of 48 <= 32
    assert tr.block_size == 24 and tr.n_blocks == 2
    torch.testing.assert_close(tr.apply(x) @ tr.fold_into(w).t(), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_transform_conversions_follow_in_place_updates():
    """The per-(device, dtype) converted rotations and scales are rebuilt after an in-place load into the stored
    tensors (as load_state_dict does), and inference-mode tensors work."""
    from dllmq.quantization.duquant import DuQuantTransform

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(2, 8, 8, generator=g, dtype=torch.float64))[0].to(torch.bfloat16)
    t = DuQuantTransform(torch.rand(16, generator=g) + 0.5, q.clone(), torch.randperm(16, generator=g), q.clone())
    x = torch.randn(3, 16, generator=g)
    before = t.apply(x)
    with torch.no_grad():
        t.rot1.copy_(q.flip(1))
    after = t.apply(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, DuQuantTransform(t.smooth_scale, q.flip(1), t.perm, q.clone()).apply(x))
    with torch.inference_mode():
        ti = DuQuantTransform(torch.rand(16) + 0.5, q.clone(), torch.randperm(16), q.clone())
        assert ti.apply(torch.randn(3, 16)).shape == (3, 16)
