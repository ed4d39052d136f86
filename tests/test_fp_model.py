"""The calibration's full-precision model (TMAS sampler, CGQ confidences): bfloat16, streamed one block at a time
when it does not fit the device, exactly the whole model's forward; `--device auto`."""

import json
import subprocess
import sys

import pytest
import torch

from dllmq.calibration.fp_model import LayerwiseLM, forward_dtype, plan, run_lockstep
from dllmq.runtime.native import native_bf16
from dllmq.calibration.states import TMASConfig, build
from dllmq.models.loading import load_model, load_tokenizer

TMAS = TMASConfig(gen_length=16, block_length=8, steps=8, states_per_prompt=4)


def _requests():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0  # a left-padded row
    return [(ids, None), (ids[:1, :7], None), (ids, am)]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("whole", [False, True])
def test_layerwise_forward_equals_whole_model(family, whole, request):
    src = request.getfixturevalue(f"tiny_{family}")
    ref = load_model(src, dtype=torch.bfloat16)
    lm = LayerwiseLM(src, "cpu", whole=whole)
    reqs = _requests()
    got = list(lm.iter_logits(reqs))
    with torch.no_grad():
        for (ids, am), logits in zip(reqs, got):
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits, ref.aligned_logits(ids, am), rtol=1e-3, atol=1e-3)
    assert lm.stats.passes == 1 and lm.stats.forwards == 3  # every request through each block, one pass
    assert lm.stats.max_resident_blocks == (ref.config.num_layers if whole else 1)
    lm.close()
    assert all(p.device.type == "meta" for p in lm.model.blocks.parameters())


def test_streamed_tmas_and_confidences_match_the_whole_model(tiny_llada):
    """The lockstep samplers (one pass over the weights per step for every batch) give the same states and
    confidences as one sampler call per batch on the whole model."""
    from dllmq.calibration.sources import load_items

    tok = load_tokenizer(tiny_llada)
    items = load_items("bundled", 8, 0, seq_len=48)
    ref = load_model(tiny_llada, dtype=torch.bfloat16)
    lm = LayerwiseLM(tiny_llada, "cpu")
    for mode, conf in (("tmas", False), ("random", True)):
        a = build(items, tok, ref.mask_token_id, mode, 48, 0, 4, fp_model=ref, want_confidence=conf, tmas=TMAS)
        b = build(items, tok, lm.mask_token_id, mode, 48, 0, 4, fp_model=lm, want_confidence=conf, tmas=TMAS)
        assert a.description == b.description
        assert len(a.batches) == len(b.batches) > 0
        for x, y in zip(a.batches, b.batches):
            assert torch.equal(x.ids, y.ids) and torch.equal(x.masked, y.masked)
            torch.testing.assert_close(x.confidence, y.confidence, rtol=1e-3, atol=1e-4)
    assert lm.stats.passes == TMAS.steps + 1  # TMAS: one pass per denoising step for all batches; CGQ: one
    assert lm.stats.max_resident_blocks == 1


def test_lockstep_propagates_a_job_error(tiny_llada):
    lm = LayerwiseLM(tiny_llada, "cpu")
    ids = torch.randint(0, 200, (1, 8))

    def ok(fn):
        for _ in range(3):
            fn(ids, None)

    def bad(fn):
        fn(ids, None)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_lockstep(lm, [ok, bad, ok])


def test_quantize_calibration_holds_one_block_at_a_time(tiny_llada, tmp_path, monkeypatch):
    """Instrumented: whenever the calibration model reads a block, no other block of it is materialised;
    the manifest records the mode, the passes and what they cost."""
    from dllmq.calibration import fp_model
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import CalibOptions, quantize
    from dllmq.quantization.spec import WeightSpec

    seen = []
    orig = fp_model.LayerwiseLM._block

    def spy(self, i):
        blk = orig(self, i)
        seen.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.model.blocks))
        return blk

    monkeypatch.setattr(fp_model.LayerwiseLM, "_block", spy)
    qcfg = QuantizationConfig("gptq", WeightSpec(4, True, "group", 32), ignore=[r"model\.transformer\.ff_out"])
    res = quantize(tiny_llada, qcfg, tmp_path / "q", calib=CalibOptions(mask="tmas", tmas=TMAS, samples=8, seq_len=48,
                                                                        batch_size=4),
                   method_options={"cgq": True}, show_progress=False)
    assert seen and max(seen) == 1
    fwd = res.calibration["fp_forward"]
    assert fwd["mode"] == "stream" and fwd["device"] == "cpu"
    assert fwd["dtype"] == ("bfloat16" if native_bf16("cpu") else "float32")  # bf16 only where the CPU computes it
    assert fwd["passes"] == TMAS.steps and fwd["max_resident_blocks"] == 1
    assert fwd["seconds"] >= fwd["load_seconds"] >= 0
    manifest = json.loads((res.out / "dllmq_manifest.json").read_text())
    assert manifest["calibration"]["fp_forward"]["mode"] == "stream"


def test_plan_whole_or_stream(tiny_llada, monkeypatch):
    p = plan(tiny_llada, "cpu")
    assert p.mode == "stream" and p.model_bytes > p.block_bytes > 0
    monkeypatch.setenv("DLLMQ_CALIB_FORWARD", "whole")
    assert plan(tiny_llada, "cpu").mode == "whole"
    monkeypatch.setenv("DLLMQ_CALIB_FORWARD", "sometimes")
    from dllmq.errors import UserError

    with pytest.raises(UserError, match="DLLMQ_CALIB_FORWARD"):
        plan(tiny_llada, "cpu")
    monkeypatch.delenv("DLLMQ_CALIB_FORWARD")
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (p.model_bytes // 2, 10 * p.model_bytes))
        assert plan(tiny_llada, "cuda").mode == "stream"
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (100 * p.model_bytes, 100 * p.model_bytes))
        assert plan(tiny_llada, "cuda").mode == "whole"


def test_device_auto_is_the_quantize_default():
    import typer

    from dllmq.cli.main import app
    from dllmq.validation import resolve_device as _device

    assert _device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = typer.main.get_command(app)
    quantize = cmd.commands["quantize"]
    assert next(p for p in quantize.params if p.name == "device").default == "auto"


PEAK = r"""
import sys
from pathlib import Path
from dllmq.calibration.states import TMASConfig
from dllmq.pipeline import CalibOptions, _build_calibration
from dllmq.models.loading import parse
from dllmq.runtime.memory import peak_rss_bytes
src = Path(sys.argv[1])
arch, _ = parse(src)
calib = CalibOptions(samples=4, seq_len=32, batch_size=4,
                     tmas=TMASConfig(gen_length=8, block_length=8, steps=4, states_per_prompt=1))
_build_calibration(src, arch, calib, True, "cpu", None)
print(peak_rss_bytes())
"""


@pytest.mark.slow
def test_calibration_peak_memory_does_not_grow_with_depth(tmp_path):
    """TMAS + confidences on LLaDA-layout models of the same width (blocks of 34 MB in bf16), 2 vs 8 blocks:
    the whole model in fp32 would add ~400 MB at 8 blocks; streamed, the peak stays put."""
    from dllmq.models.tiny import write_tiny_llada

    peaks = {}
    for n in (2, 8):
        src = write_tiny_llada(tmp_path / f"m{n}", n_layers=n, d_model=1024, n_heads=16, n_kv_heads=16,
                               mlp_hidden_size=4096, small_vocab=320, shards=2)
        p = subprocess.run([sys.executable, "-c", PEAK, str(src)], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
        peaks[n] = int(p.stdout.split()[-1])
    print({n: p // 2**20 for n, p in peaks.items()})
    assert peaks[8] / peaks[2] < 1.15, peaks


def test_forward_dtype_follows_the_cpu(monkeypatch, tiny_llada):
    """The calibration model computes in bfloat16 where the CPU has it natively, in float32 where bf16 is emulated
    (5x slower there); the plan reports which, and its byte counts are in that dtype."""
    from dllmq.calibration import fp_model

    sizes = {}
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(fp_model, "native_bf16", lambda device, v=native: v)
        assert forward_dtype("cpu") == want
        p = plan(tiny_llada, "cpu")
        assert p.dtype == str(want).replace("torch.", "") and p.mode == "stream"
        sizes[native] = p.model_bytes
    assert sizes[False] == 2 * sizes[True]
