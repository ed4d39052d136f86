"""The methods that run under the papers' names follow the papers: statistics captured from the block as it
will run, transforms function-preserving before rounding, one DuQuant transform per shared input, QuaRot's
full o_proj input rotation."""

import json

import pytest
import torch

import dllmq
import dllmq.pipeline as pl
from dllmq.calibration.block_transform import make_capture, transform_block
from dllmq.calibration.blocks import StopBlock
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.models.loading import load_model
from dllmq.pipeline import CalibOptions, quantize
from dllmq.quantization.hadamard import fast_hadamard_transform
from dllmq.quantization.methods import get_method
from dllmq.quantization.spec import ActSpec, WeightSpec
from dllmq.runtime.transforms import OnlineDuQuant

CAL = CalibOptions(mask="random", samples=8, seq_len=40, batch_size=4)
OPTS = {"smoothquant": {}, "duquant": {"steps": 16}, "awq": {"grid": 4}, "quarot": {}}


def _qcfg(method, w=8, a=8):
    m = get_method(method)
    return QuantizationConfig(method, WeightSpec(w, True, "group", 32), ActSpec(a if m.quantizes_activations else 16),
                              ignore=[r"model\.transformer\.ff_out", "lm_head"])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
@pytest.mark.parametrize("method", ["smoothquant", "duquant", "awq"])
def test_captured_statistics_equal_the_block_as_it_runs(fixture, method, request, tmp_path, monkeypatch):
    """Every group's statistics come through the transforms of the earlier groups. These transforms
    preserve the function, so what a method captures for a group before transforming it must equal the
    full-precision model's input to that group (the DuQuant bug: q/k/v folded, online half missing)."""
    src = request.getfixturevalue(fixture)
    seen: dict = {}
    real_build, real_capture = pl._build_calibration, pl.make_capture

    def build(*a, **k):
        cset = real_build(*a, **k)
        seen["batches"] = cset.batches
        return cset

    def capture_factory(blk, run, valid_of, seed):
        cap = real_capture(blk, run, valid_of, seed)

        def recording(names, max_tokens=4096, reduce=False):
            out = cap(names, max_tokens, reduce)
            if seed == 0 and len(names) == 1:  # block 0; single-group captures precede the group's transform
                seen.setdefault("captures", []).append((names[0], reduce, out[names[0]]))
            return out

        return recording

    monkeypatch.setattr(pl, "_build_calibration", build)
    monkeypatch.setattr(pl, "make_capture", capture_factory)
    quantize(src, _qcfg(method), tmp_path / "q", calib=CAL, method_options=OPTS[method], show_progress=False)

    fp = load_model(src, dtype=torch.float32)
    blk = fp.blocks[0]
    ref: dict = {}
    names = {n for n, _, _ in seen["captures"]}
    hooks = [blk.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: ref.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for b in seen["batches"]:
            before = {n: len(ref.get(n, [])) for n in names}
            fp(b.ids, b.attention_mask)
            v = pl._valid_rows(b)
            for n in names:
                if v is not None:
                    ref[n][before[n]] = ref[n][before[n]][v]
    for h in hooks:
        h.remove()
    assert len(seen["captures"]) >= 3
    for name, reduce, got in seen["captures"]:
        x = torch.cat(ref[name])
        if reduce:
            assert got["tokens"] == x.shape[0]  # every real token, no subsample
            torch.testing.assert_close(got["absmax"], x.abs().amax(0), rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert got.shape == x.shape, name
            torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4, msg=name)


def _transform_in_memory(model, method_name, ids):
    """The pipeline's transform step (same code: make_capture + transform_block) on an in-memory model."""
    method = get_method(method_name)(_qcfg(method_name), **OPTS[method_name])
    arch, cfg = model.arch, model.config
    outer = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith(arch.blocks_path + ".")}
    method.transform_nonblock(outer, arch, cfg)
    model.load_state_dict(outer, strict=False)
    kw = model.block_context(ids)
    h = model.embed(ids)
    for i, blk in enumerate(model.blocks):
        def run(on_batch, blk=blk, h=h):
            on_batch(0)
            try:
                blk(h, **kw)
            except StopBlock:
                pass

        capture = make_capture(blk, run, lambda j: None, seed=i)
        transform_block(method, blk, i, f"{arch.blocks_path}.{i}.", arch, cfg, capture)
        with torch.no_grad():
            h = blk(h, **kw)
    return model


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
@pytest.mark.parametrize("method", ["smoothquant", "quarot", "duquant", "awq"])
def test_every_transform_preserves_the_function_before_rounding(fixture, method, request):
    src = request.getfixturevalue(fixture)
    ids = torch.randint(0, 250, (3, 20), generator=torch.Generator().manual_seed(1))
    fp = load_model(src, dtype=torch.float32)
    with torch.no_grad():
        ref = fp(ids)
        out = _transform_in_memory(load_model(src, dtype=torch.float32), method, ids)(ids)
    assert _rel(out, ref) < 1e-4


def test_quarot_o_proj_input_gets_the_full_hadamard():
    """Per-head H_d (offline, through v_proj) then the online cross-head H_h = the full Hadamard H_(h*d)."""
    from dllmq.runtime.transforms import OnlineHeadHadamard

    heads, hd = 4, 16
    x = torch.randn(5, heads * hd, dtype=torch.float64)
    per_head = fast_hadamard_transform(x.reshape(5, heads, hd)).reshape(5, heads * hd)
    full = OnlineHeadHadamard(heads, hd)(per_head)
    torch.testing.assert_close(full, fast_hadamard_transform(x))


def test_duquant_stores_one_transform_per_shared_input_and_computes_it_once(tiny_llada, tmp_path):
    res = quantize(tiny_llada, _qcfg("duquant"), tmp_path / "q", calib=CAL, method_options=OPTS["duquant"],
                   show_progress=False)
    cfg = json.loads((res.out / "config.json").read_text())["quantization_config"]
    owners = {k for k, v in cfg["transforms"].items() if "shared_with" not in v}
    assert {k.rsplit(".", 1)[1] for k in owners} == {"q_proj", "attn_out", "ff_proj", "ff_out"}
    for k, v in cfg["transforms"].items():
        if "shared_with" in v:
            assert v["shared_with"] in owners and k.rsplit(".", 1)[0] == v["shared_with"].rsplit(".", 1)[0]
    from safetensors import safe_open

    names = set()
    for f in res.out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names |= {n for n in sf.keys() if ".input_transform." in n}
            dtypes = {sf.get_tensor(n).dtype for n in sf.keys() if n.endswith((".rot1", ".rot2"))}
            assert dtypes <= {torch.bfloat16}  # storage dtype chosen by measured output error (docs/methods.md)
    assert {n.split(".input_transform.")[0] for n in names} == owners

    from dllmq.quantization.duquant import DuQuantTransform

    # fp32: the torch ops; bf16: on CPUs with AVX512-BF16 one fused transform-and-quantize pass per shared input
    for dtype in (torch.float32, torch.bfloat16):
        model = dllmq.load(res.out, dtype=dtype)
        mods = [m for m in model.modules() if isinstance(m, OnlineDuQuant)]
        assert len(mods) == 8  # 2 blocks x (q/k/v, attn_out, gate/up, down): the shared ones are one module
        products = {"n": 0}

        def counting(orig):
            def run(self, *a, **kw):
                products["n"] += 1
                return orig(self, *a, **kw)
            return run

        def counting_plan(orig):  # QuantLinear's call plans: the fused pass runs through the planned callable
            def plan(self, *a, **kw):
                run = orig(self, *a, **kw)
                if run is None:
                    return None

                def counted(x):
                    products["n"] += 1
                    return run(x)
                return counted
            return plan

        with pytest.MonkeyPatch.context() as mp:
            for name in ("apply", "apply_quantized"):
                mp.setattr(DuQuantTransform, name, counting(getattr(DuQuantTransform, name)))
            mp.setattr(DuQuantTransform, "quantized_plan", counting_plan(DuQuantTransform.quantized_plan))
            with torch.no_grad():
                model(torch.randint(0, 250, (1, 12)))
        assert products["n"] == 8, dtype  # 14 consumers, 8 products (one per input per block)
        assert all(m._memo is None for m in mods)  # released after the last consumer


def test_duquant_bf16_storage_folds_against_the_stored_rotation():
    """Weights folded against the rounded rotation's inverse: x̃ W̃ᵀ = x Wᵀ exactly whatever the storage dtype."""
    from dllmq.quantization.duquant import duquant_transform

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g, dtype=torch.float64)
    x[:, 3] *= 40
    w = torch.randn(32, 256, generator=g, dtype=torch.float64)
    t = duquant_transform(x, [w], block=64, steps=8).rounded(torch.bfloat16)
    assert t.rot1.dtype == torch.float64 and torch.equal(t.rot1, t.rot1.to(torch.bfloat16).to(torch.float64))
    torch.testing.assert_close(t.apply(x) @ t.fold_into(w).T, x @ w.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_dream"])
def test_qk_smoothing_preserves_attention_and_tames_key_outliers(fixture, request):
    """K / s and Q · s with one scale per RoPE pair (and per KV head under GQA): the block computes the same
    function, and a key outlier channel shrinks relative to the others."""
    from dllmq.quantization.smoothquant import fold_qk_scales, qk_smooth_scales

    model = load_model(request.getfixturevalue(fixture), dtype=torch.float64)
    arch, cfg = model.arch, model.config
    blk = model.blocks[0]
    qkv = next(f for f in arch.feeds if f.kind == "norm" and len(f.targets) == 3)
    q_proj, k_proj = blk.get_submodule(qkv.targets[0]), blk.get_submodule(qkv.targets[1])
    with torch.no_grad():
        k_proj.weight[3] *= 30  # a key outlier channel (head 0, channel 3)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(2))
    kw, h = model.block_context(ids), model.embed(ids)
    x = blk.get_submodule(qkv.source)(h)
    with torch.no_grad():
        ref = blk(h, **kw)
        k_before = k_proj(x)
        s = qk_smooth_scales(q_proj(x), k_before, cfg.head_dim)
        fold_qk_scales(q_proj, k_proj, s)
        torch.testing.assert_close(blk(h, **kw), ref, rtol=1e-5, atol=1e-6)  # RoPE runs in fp32
        k_after = k_proj(x)
    ratio = lambda k: float(k[..., 3].abs().max() / k.abs().amax(0).median())
    assert ratio(k_after) < 0.5 * ratio(k_before)
