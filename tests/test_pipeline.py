"""Calibrated block-by-block quantization: GPTQ / AWQ / CGQ / TMAS end to end, resume, offload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllmq.calibration.states import TMASConfig, segment_steps
from dllmq.checkpoint.format import QuantizationConfig
from dllmq.pipeline import CalibOptions, quantize, sequential_groups
from dllmq.quantization.spec import WeightSpec

CAL = dict(samples=8, seq_len=48, batch_size=4)
TMAS = TMASConfig(gen_length=16, block_length=8, steps=8, states_per_prompt=4)


def _q(src, out, method="gptq", mask="random", bits=4, opts=None, **kw):
    qcfg = QuantizationConfig(method, WeightSpec(bits, True, "group", 32), ignore=[r"model\.transformer\.ff_out", "lm_head"])
    return quantize(src, qcfg, out, calib=CalibOptions(mask=mask, tmas=TMAS, **CAL), method_options=opts or {},
                    show_progress=False, **kw)


def _shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors" or p.name.endswith(".json") and p.name != "dllmq_manifest.json"}


def test_sequential_groups_follow_feeds():
    from dllmq.models.dream import DREAM
    from dllmq.models.llada import LLADA

    assert sequential_groups(LLADA) == [["q_proj", "k_proj", "v_proj"], ["attn_out"], ["ff_proj", "up_proj"], ["ff_out"]]
    assert sequential_groups(DREAM)[-1] == ["mlp.down_proj"]


def test_tmas_segments_follow_proportions():
    g = torch.Generator().manual_seed(0)
    steps = segment_steps(100, (0.3, 0.2, 0.2, 0.3), 10, g)
    seg = [s * 4 // 100 for s in steps]
    assert [seg.count(i) for i in range(4)] == [3, 2, 2, 3]
    assert len(set(steps)) == 10


@pytest.mark.parametrize("mask", ["none", "random", "tmas"])
def test_gptq_beats_rtn_on_calibration_outputs(tiny_llada, tmp_path, mask):
    g = _q(tiny_llada, tmp_path / "g", "gptq", mask, bits=3)
    r = _q(tiny_llada, tmp_path / "r", "rtn", mask, bits=3)
    assert all(x.error_kind == "output" for x in g.layers)
    g_err = sum(x.rel_error for x in g.layers) / len(g.layers)
    r_w = sum(x.rel_error for x in r.layers) / len(r.layers)
    assert g_err < r_w  # output error of GPTQ below RTN's (weight-relative) error on average
    if mask == "tmas":
        ratios = g.calibration["mask_ratios"]
        assert max(ratios) > 0.7 and min(ratios) < 0.3  # states from early and late denoising
    if mask == "none":
        assert g.calibration["mask_ratio"] == 0.0


def test_cgq_changes_weights_and_loads(tiny_llada, tmp_path):
    import dllmq

    plain = _q(tiny_llada, tmp_path / "p", "gptq", "tmas")
    cgq = _q(tiny_llada, tmp_path / "c", "gptq", "tmas", opts={"cgq": True})
    assert _shards(plain.out) != _shards(cgq.out)
    m = dllmq.load(cgq.out, dtype=torch.float32)
    x = torch.randint(0, 200, (1, 16))
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("wq", ["rtn", "gptq"])
def test_awq_on_dream_loads(tiny_dream, tmp_path, wq):
    import dllmq

    res = _q(tiny_dream, tmp_path / "a", "awq", "random", opts={"w_quantizer": wq})
    m = dllmq.load(res.out, dtype=torch.float32)
    ref = dllmq.load(tiny_dream, dtype=torch.float32)
    x = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(x), ref(x)
    assert (a - b).norm() / b.norm() < 0.3
    # AWQ folded scales into the norms: they differ from the source, function preserved up to rounding
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["quantization_config"]["method"] == "awq"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_offload_dir_gives_identical_checkpoint(tiny_llada, tiny_dream, tmp_path, family):
    """In memory, sequential GPTQ runs each block in stages and keeps the state between groups; with --offload-dir
    it reruns the block from its input for every group. Both must give the same checkpoint, bit for bit."""
    src = {"llada": tiny_llada, "dream": tiny_dream}[family]
    a = _q(src, tmp_path / "mem", "gptq", "random", opts={"cgq": True})
    b = _q(src, tmp_path / "disk", "gptq", "random", opts={"cgq": True}, offload_dir=tmp_path / "off")
    assert _shards(a.out) == _shards(b.out)
    assert any((tmp_path / "off").rglob("*.safetensors"))


@pytest.mark.parametrize("family", ["llada", "dream", "llama"])
def test_block_stages_start_at_the_sequential_groups(family):
    """Stage k of a block's forward must begin with the k-th sequential group's linears and run no later group's:
    the staged pipeline reads group k's inputs at the start of stage k."""
    from dllmq.models.registry import arch_for
    from dllmq.models.tiny import dream_config, llada_config

    raw = {"llada": llada_config, "dream": dream_config}[family]() if family != "llama" else {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "rms_norm_eps": 1e-6}
    arch = arch_for(raw)
    model = arch.build(arch.parse_config(raw)).eval()
    blk = model.blocks[0]
    groups = sequential_groups(arch)
    assert blk.N_STAGES == len(groups)
    order: list[str] = []
    for lin in arch.block_linears:
        blk.get_submodule(lin).register_forward_pre_hook(lambda m, a, lin=lin: order.append(lin))
    ctx = model.block_context(torch.zeros(1, 6, dtype=torch.long))
    s = {"x": torch.randn(1, 6, model.config.hidden_size)}
    for k, group in enumerate(groups):
        order.clear()
        s = blk.stage(k, s, **ctx)
        assert order[: len(group)] == group and set(order) == set(group), (k, order)
    whole = blk(torch.ones(1, 6, model.config.hidden_size), **ctx)
    s = {"x": torch.ones(1, 6, model.config.hidden_size)}
    for k in range(blk.N_STAGES):
        s = blk.stage(k, s, **ctx)
    assert torch.equal(whole, s["x"])


def test_sequential_gptq_runs_each_block_once(tiny_llada, tmp_path, monkeypatch):
    """Sequential GPTQ (the default) costs one attention pass per batch and block (the staged forward); rerunning
    the block for each of the four groups would cost four."""
    from dllmq.models.layers import AttentionCore

    calls = {"n": 0}
    orig = AttentionCore.forward

    def counted(self, *a, **kw):
        calls["n"] += 1
        return orig(self, *a, **kw)

    monkeypatch.setattr(AttentionCore, "forward", counted)
    res = _q(tiny_llada, tmp_path / "q", "gptq", "none")
    n_blocks = json.loads((Path(tiny_llada) / "config.json").read_text())["n_layers"]
    assert calls["n"] == n_blocks * (CAL["samples"] // CAL["batch_size"])
    assert len(res.layers) == n_blocks * 7


@pytest.mark.parametrize("opts", [{}, {"cgq": True}])
def test_early_stop_and_shared_hessians_change_nothing(tiny_llada, tmp_path, monkeypatch, opts):
    """The statistics pass stops blocks early and shares q/k/v and gate/up Hessians; a plain pass
    (whole block, one accumulator per linear) must give the same checkpoint, bit for bit."""
    import dllmq.pipeline as pl

    fast = _q(tiny_llada, tmp_path / "fast", "gptq", "tmas", opts=opts)
    calls = {"n": 0}

    def plain_collect(run, blk, batches, stats, method):
        weights = [method.token_weights(b) for b in batches]
        cur = {}

        def add(n, x):  # every real token of the batch (padding never enters the Hessian)
            x, w, v = x.reshape(-1, x.shape[-1]), cur["w"], pl._valid_rows(batches[cur["j"]])
            w = None if w is None else w.reshape(-1)
            if v is not None:
                x, w = x[v], (None if w is None else w[v])
            stats[n].add(x, w)

        hs = [blk.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: add(n, a[0]))
              for n, s in stats.items() if s is not None]
        with torch.no_grad():
            run(on_batch=lambda j: cur.update(w=weights[j], j=j))
        for h in hs:
            h.remove()
        calls["n"] += 1

    monkeypatch.setattr(pl, "_collect", plain_collect)
    plain = _q(tiny_llada, tmp_path / "plain", "gptq", "tmas", opts=opts)
    assert calls["n"] > 0
    assert _shards(fast.out) == _shards(plain.out)


def test_low_precision_calibration_quantizes_the_stored_weights(tiny_llada, tmp_path):
    """With --dtype bfloat16 on an fp32 checkpoint, GPTQ/RTN still quantize the fp32 weights on disk
    (only the calibration forwards run in bf16): RTN, which ignores activations, is unchanged."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp32"
    shutil.copytree(tiny_llada, src)
    for f in src.glob("*.safetensors"):
        g = torch.Generator().manual_seed(0)  # fp32 values that bf16 cannot hold exactly
        save_file({k: v.float() * (1 + 1e-3 * torch.randn(v.shape, generator=g)) for k, v in load_file(str(f)).items()},
                  str(f), metadata={"format": "pt"})
    qcfg = QuantizationConfig("rtn", WeightSpec(4, True, "group", 32), ignore=[r"model\.transformer\.ff_out"])
    a = quantize(src, qcfg, tmp_path / "f32", dtype=torch.float32, show_progress=False)
    b = quantize(src, qcfg, tmp_path / "bf16", dtype=torch.bfloat16, show_progress=False)
    ta = {k: v for f in sorted(a.out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.endswith(("weight_packed", "weight_scale")))
    g = _q(src, tmp_path / "gptq-bf16", "gptq", "random", dtype=torch.bfloat16)
    assert all(r.rel_error < 0.5 for r in g.layers)


def test_killed_run_resumes_byte_identical(tmp_path):
    from dllmq.models.tiny import write_tiny_llada

    src = write_tiny_llada(tmp_path / "src4", n_layers=4)
    ref = _q(src, tmp_path / "ref", "gptq", "random")
    out = tmp_path / "resumed"
    script = (
        "import os, signal, sys\n"
        "import dllmq.checkpoint.writer as w\n"
        "orig = w.CheckpointWriter.save_progress\n"
        "def save(self, p):\n"
        "    orig(self, p)\n"
        "    if p.get('blocks_done') == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.CheckpointWriter.save_progress = save\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_pipeline import _q\n"
        f"_q({str(src)!r}, {str(out)!r}, 'gptq', 'random')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert not out.exists()  # nothing that looks complete
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / "progress.json").read_text())["blocks_done"] == 2
    res = _q(src, out, "gptq", "random", resume=True)
    assert not partial.exists()
    assert _shards(res.out) == _shards(ref.out)
    m_ref = json.loads((ref.out / "dllmq_manifest.json").read_text())
    m_res = json.loads((res.out / "dllmq_manifest.json").read_text())
    assert {k: v for k, v in m_res["files"].items()} == m_ref["files"]


def test_resume_with_other_settings_starts_over(tiny_llada, tmp_path):
    out = tmp_path / "o"
    partial = tmp_path / ".o.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"blocks_done": 1, "run_key": "other"}))
    res = _q(tiny_llada, out, "gptq", "none", resume=True)
    assert res.out.exists() and not partial.exists()


def test_auto_calibration_dtype_follows_method_and_hardware(tiny_llada, tmp_path, monkeypatch):
    """--dtype auto: GPTQ calibrates in bf16 where the hardware has native bf16 (as AutoGPTQ runs the 16-bit model),
    float32 elsewhere; methods that rewrite weights always get float32. The manifest records the dtype used."""
    import dllmq.pipeline as pl

    def used(res):
        return json.loads((res.out / "dllmq_manifest.json").read_text())["calibration_dtype"]

    monkeypatch.setattr(pl, "native_bf16", lambda device: True)
    assert used(_q(tiny_llada, tmp_path / "g", "gptq", "none")) == "bfloat16"
    assert used(_q(tiny_llada, tmp_path / "a", "awq", "none")) == "float32"
    assert used(_q(tiny_llada, tmp_path / "f", "gptq", "none", dtype=torch.float32)) == "float32"
    monkeypatch.setattr(pl, "native_bf16", lambda device: False)
    assert used(_q(tiny_llada, tmp_path / "g2", "gptq", "none")) == "float32"
    assert pl.native_bf16("mps") is False
