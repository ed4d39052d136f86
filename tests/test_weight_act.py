"""Weight-activation methods end to end: transforms folded offline, applied online, int8 GEMM at run time."""

import json

import pytest
import torch

import dllmq
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime.qlinear import QuantLinear

CAL = CalibOptions(mask="random", samples=8, seq_len=48, batch_size=4)


def _q(src, out, method, w=8, a=8, **opts):
    qcfg = QuantizationConfig(method, WeightSpec(w, True, "group", 32), ActSpec(a),
                              ignore=[r"model\.transformer\.ff_out", "lm_head"])
    base = {"steps": 16} if method == "duquant" else {}
    return quantize(src, qcfg, out, calib=CAL, method_options={**base, **opts}, show_progress=False)


def _rel_logit_error(q_path, fp_path):
    q = dllmq.load(q_path, dtype=torch.float32)
    fp = dllmq.load(fp_path, dtype=torch.float32)
    x = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(x), fp(x)
    return float((a - b).norm() / b.norm()), q


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
@pytest.mark.parametrize("method", ["smoothquant", "quarot", "duquant"])
def test_w8a8_close_to_full_precision(fixture, method, request, tmp_path):
    src = request.getfixturevalue(fixture)
    res = _q(src, tmp_path / "q", method)
    err, model = _rel_logit_error(res.out, src)
    assert err < 0.08, err  # W8A8 is near-lossless when the transforms are right
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    x = torch.randn(16, qls[0].in_features)
    assert qls[0].kernel_for(x) in ("int8_act", "int8_vnni", "dequant")
    assert qls[0].act_spec.num_bits == 8
    cfg = json.loads((res.out / "config.json").read_text())["quantization_config"]
    if method == "quarot":
        down = [k for k, v in cfg["transforms"].items() if v.get("type") == "hadamard"]
        assert len(down) == 2  # one online Hadamard per block, before the FFN down projection
    if method == "duquant":
        assert all(v["type"] == "duquant" for v in cfg["transforms"].values())
        assert len(cfg["transforms"]) == 14


def test_transforms_tame_injected_outliers(tmp_path):
    """Injected outliers wreck plain 4-bit activations; every transform recovers most of the loss, and
    DuQuant (smoothing, then rotations) is at least as good as SmoothQuant alone.

    QuaRot is deliberately not asserted to beat SmoothQuant here: the injected outliers are persistent
    per-channel scales, exactly what SmoothQuant's scales invert, while a rotation spreads their energy
    into every channel's quantization step (measured: SmoothQuant 0.40, QuaRot 0.62, DuQuant 0.36).
    The paper's ordering is checked on the trained bundled model (benchmarks/wa_matrix.py)."""
    from dllmq.models.tiny import write_tiny_llada
    from dllmq.models.loading import outlier_variant

    src = outlier_variant(write_tiny_llada(tmp_path / "base", d_model=128, n_heads=4, mlp_hidden_size=384),
                                tmp_path / "outl", factor=256.0, channels=2)
    errs = {}
    for m in ("rtn", "smoothquant", "quarot", "duquant"):
        res = _q(src, tmp_path / m, m, w=8, a=4)
        errs[m] = _rel_logit_error(res.out, src)[0]
    assert errs["rtn"] > 1.5 * max(errs[m] for m in ("smoothquant", "quarot", "duquant")), errs
    assert errs["duquant"] <= 1.05 * errs["smoothquant"], errs


def test_weight_act_method_requires_activation_bits(tiny_llada, tmp_path, capsys):
    from cli_helpers import run_cli

    code, _, err = run_cli(["quantize", tiny_llada, "--method", "quarot", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--a 8" in err


def test_inspect_before_after_quarot(tmp_path, capsys):
    """QuaRot shrinks the injected down-projection outliers as the quantized layers see them."""
    from cli_helpers import run_cli

    from dllmq.models.tiny import write_tiny_llada
    from dllmq.models.loading import outlier_variant

    src = outlier_variant(write_tiny_llada(tmp_path / "b", d_model=64, mlp_hidden_size=192), tmp_path / "o")
    code, out, err = run_cli(["inspect", src, "--calib-samples", "4", "--calib-seq-len", "32", "--method", "quarot", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    before = {r["linear"]: r for r in res["summary"]}
    after = {r["linear"]: r for r in res["after"]["summary"]}
    assert after["ff_out"]["channel_ratio"] < before["ff_out"]["channel_ratio"] / 2


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_ia_aq_quantizes_values_with_searched_clip(tiny_llada, tmp_path, kv_bits):
    """IA-AQ (DLLMQuant): V is quantized (at --kv-bits, or at the activation bits when K/V stay 16-bit) with a
    per-layer clip α ∈ [0.8, 1] minimising ‖P·V − P·Q(V; α)‖; the loaded model's value quantizer uses it."""
    from dllmq.models.layers import AttentionCore
    from dllmq.quantization.spec import KVCacheSpec
    from dllmq.runtime.kv_quant import IA_AQ_GRID, KVQuantizer

    qcfg = QuantizationConfig("smoothquant", WeightSpec(8, True, "group", 32), ActSpec(4),
                              ignore=[r"model\.transformer\.ff_out"], kv_cache=KVCacheSpec(kv_bits))
    res = quantize(tiny_llada, qcfg, tmp_path / "q", calib=CAL, method_options={"ia_aq": True}, show_progress=False)
    cfg = json.loads((res.out / "config.json").read_text())["quantization_config"]
    entries = {k: v for k, v in cfg["transforms"].items() if "v_clip" in v}
    assert len(entries) == 2 and all(k.endswith("attn_out") for k in entries)
    assert all(v["v_clip"] in IA_AQ_GRID and 0.8 <= v["v_clip"] <= 1.0 for v in entries.values())
    assert all(v["v_bits"] == (4 if kv_bits == 16 else kv_bits) for v in entries.values())
    assert not any("act_clip" in v for v in cfg["transforms"].values())  # no longer a clip of attn_out's input
    m = dllmq.load(res.out, dtype=torch.float32)
    for i, core in enumerate(c for c in m.modules() if isinstance(c, AttentionCore)):
        e = entries[f"model.transformer.blocks.{i}.attn_out"]
        assert isinstance(core.value_quant, KVQuantizer)
        assert core.value_quant.spec.clip_ratio == pytest.approx(e["v_clip"])
        assert core.value_quant.spec.num_bits == e["v_bits"]
        assert isinstance(core.key_quant, KVQuantizer) == (kv_bits < 16)
    x = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
