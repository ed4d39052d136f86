"""`dllmq export --format compressed-tensors`: the export, read back by the compressed-tensors library
itself (its config parser and compressors), gives exactly the weights dllmq dequantizes from the source
checkpoint; what compressed-tensors cannot express is refused with one line and exit code 2."""

import json
import os
import shutil

import pytest
import torch

from cli_helpers import run_cli

pytest.importorskip("compressed_tensors", reason="compressed-tensors is part of the dev extras: pip install -e .[dev]")

HEAD = "model.transformer.ff_out"

# name: (method, weight bits, symmetric, group size (-1: per channel, 0: per tensor), activation bits, format)
CASES = {
    "rtn-w4-g32-sym": ("rtn", 4, True, 32, 16, "pack-quantized"),
    "rtn-w4-g32-asym": ("rtn", 4, False, 32, 16, "pack-quantized"),
    "rtn-w3-channel-asym": ("rtn", 3, False, -1, 16, "pack-quantized"),  # values straddle int32 words
    "rtn-w8-channel-sym": ("rtn", 8, True, -1, 16, "pack-quantized"),
    "rtn-w4-tensor-asym": ("rtn", 4, False, 0, 16, "pack-quantized"),  # scale and zero point of shape [1]
    # W8A8: per-channel int8 weights, dynamic per-token int8 activations. On LLaDA (no GQA) SmoothQuant folds
    # every scale into a norm or the preceding linear, so nothing is left to apply online.
    "rtn-w8a8": ("rtn", 8, True, -1, 8, "int-quantized"),
    "smoothquant-w8a8": ("smoothquant", 8, True, -1, 8, "int-quantized"),
}
CALIB = dict(mask="none", samples=2, seq_len=16)  # the smallest calibration that exercises the methods


def _quantize(src, out, method, bits, sym, group, a_bits, **options):
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import CalibOptions, quantize
    from dllmq.quantization.spec import ActSpec, WeightSpec

    strategy = {-1: "channel", 0: "tensor"}.get(group, "group")
    spec = WeightSpec(bits, sym, strategy, group if strategy == "group" else None)
    qcfg = QuantizationConfig(method, spec, ActSpec(a_bits), ignore=[r"model\.transformer\.ff_out"])
    quantize(src, qcfg, out, calib=CalibOptions(**CALIB), method_options=options, show_progress=False)
    return out


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _dllmq_weights(ckpt):
    """Dequantized weight of every quantized linear, through dllmq's own unpacking (QuantLinear)."""
    from dllmq.checkpoint.format import QUANT_SUFFIXES, QuantizationConfig
    from dllmq.models.loading import ShardReader
    from dllmq.runtime.qlinear import QuantLinear

    qcfg = QuantizationConfig.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    reader = ShardReader(ckpt)
    out = {}
    for name in qcfg.quantized_layers:
        t = {s: reader.get(f"{name}.{s}") for s in QUANT_SUFFIXES if f"{name}.{s}" in reader}
        out[name] = QuantLinear.from_state(t, qcfg.weights, name=name).dequantized_weight(torch.float32)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_dllmq_dequantization(case, tiny_llada, tmp_path, capsys):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    method, bits, sym, group, a_bits, fmt = CASES[case]
    ckpt = _quantize(tiny_llada, tmp_path / "q", method, bits, sym, group, a_bits)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["transforms"] == {}
    capsys.readouterr()
    out = tmp_path / "ct"
    code, stdout, err = run_cli(["export", ckpt, "--format", "compressed-tensors", "--out", out, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["format"] == fmt and summary["quantized_layers"] == 14 and summary["ignore"] == [HEAD]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "q"]  # no temporary folder left behind

    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((ckpt / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        {k: v for k, v in src_cfg.items() if k != "quantization_config"}  # the model's own config, unchanged
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == [HEAD]
    assert qc["config_groups"]["group_0"]["targets"] == [
        r"re:^model\.transformer\.blocks\.\d+\.(?:q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)$"]
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    ct_cfg = QuantizationConfig.model_validate(qc)
    scheme = ct_cfg.config_groups["group_0"]
    assert infer_module_format(torch.nn.Linear, scheme).value == fmt  # CT would pick this compressor itself
    if a_bits == 8:
        acts = scheme.input_activations
        assert acts.num_bits == 8 and acts.strategy == "token" and acts.dynamic is True

    expected = _dllmq_weights(ckpt)
    assert len(expected) == 14
    tensors = _tensors(out)
    src_tensors = _tensors(ckpt)

    # 1) CT's model-free reader: config.json -> schemes -> compressor.decompress on the safetensors state dict;
    #    validate() also fails on any quantization parameter left over (untargeted or orphan tensors).
    deq = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(dict(tensors))
    for name, w in expected.items():
        assert torch.equal(deq[f"{name}.weight"], w), name
    # embeddings, norms and the full-precision LM head are copied bit for bit
    for k, v in src_tensors.items():
        if not k.rsplit(".", 1)[0] in expected:
            assert v.dtype == tensors[k].dtype and torch.equal(v, tensors[k]), k

    # 2) the path transformers' CompressedTensorsHfQuantizer takes: quantization applied to the module tree,
    #    compress_model() lays out the parameters, the checkpoint loads strictly into them, decompress_model().
    #    Skipped for asymmetric group/channel weights: compressed-tensors 0.20 declares an unpacked [N, G] zero
    #    point on the meta device, while its own compressor writes (and decompress reads) the packed
    #    [ceil(N*bits/32), G] (see docs/format.md).
    if sym or group == 0:
        from dllmq.models.loading import build_empty, parse

        model = build_empty(*parse(out))
        apply_quantization_config(model, ct_cfg)
        compressor = ModelCompressor(quantization_config=ct_cfg)
        compressor.compress_model(model)
        model.load_state_dict(tensors, assign=True, strict=True)
        compressor.decompress_model(model)
        for name, w in expected.items():
            assert torch.equal(model.get_submodule(name).weight.float(), w), name


def _with_config(ckpt, dst, edit):
    """A copy of `ckpt` (hard links) whose quantization_config is edited, manifest updated to match."""
    from dllmq.checkpoint.writer import sha256_file

    shutil.copytree(ckpt, dst, copy_function=os.link)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    mf = json.loads((dst / "dllmq_manifest.json").read_text())
    mf["files"]["config.json"] = {"sha256": sha256_file(dst / "config.json"), "bytes": (dst / "config.json").stat().st_size}
    (dst / "dllmq_manifest.json").unlink()
    (dst / "dllmq_manifest.json").write_text(json.dumps(mf, indent=2))
    return dst


def _edit(method, transforms=None, a_bits=8, a_clip=1.0):
    """What `method` records in quantization_config (see docs/format.md). QuaRot itself is not run here:
    rotating the 126k-row embedding of the tiny fixtures takes minutes on a 2-core CPU."""
    def edit(q):
        q["method"] = method
        q["input_activations"] = {"num_bits": a_bits, "symmetric": True, "strategy": "token", "dynamic": True,
                                  "clip_ratio": a_clip, "type": "int"}
        q["transforms"] = {f"model.transformer.blocks.{i}.ff_out": transforms for i in range(2)} if transforms else {}
    return edit


REFUSED = {
    "quarot": (_edit("quarot", {"type": "hadamard", "size": 256}), "online Hadamard rotations (QuaRot) on 2 layers"),
    "smoothquant-online": (_edit("smoothquant", {"type": "scale"}), "online smoothing scales"),
    "ia-aq": (_edit("smoothquant", {"act_clip": 0.8}), "activation clipping (IA-AQ)"),
    "w8a4": (_edit("rtn", a_bits=4), "W8A4 is not exportable"),
    "a-clip": (_edit("rtn", a_clip=0.9), "--a-clip"),
}


@pytest.fixture(scope="module")
def w8_ckpt(tiny_llada, tmp_path_factory):
    return _quantize(tiny_llada, tmp_path_factory.mktemp("w8") / "q", "rtn", 8, True, -1, 16)


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_what_compressed_tensors_cannot_express(case, w8_ckpt, tmp_path, capsys):
    edit, words = REFUSED[case]
    ckpt = _with_config(w8_ckpt, tmp_path / "q", edit)
    code, stdout, err = run_cli(["export", ckpt, "--out", tmp_path / "ct"], capsys)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "cannot export" in err and words in err, err
    assert "re-quantize" in err or "dllmq format" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_refuses_a_real_duquant_checkpoint(tiny_llada, tmp_path, capsys):
    ckpt = _quantize(tiny_llada, tmp_path / "q", "duquant", 4, True, -1, 8, steps=2, block=32)
    capsys.readouterr()  # the calibration note
    code, stdout, err = run_cli(["export", ckpt, "--format", "compressed-tensors", "--out", tmp_path / "ct"], capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert "DuQuant rotations" in err and "on 14 layers" in err and "re-quantize with --method rtn" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_refuses_existing_out_and_non_checkpoints(w8_ckpt, tmp_path, capsys):
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(["export", w8_ckpt, "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, _, err = run_cli(["export", "tiny", "--out", tmp_path / "x"], capsys)  # full precision
    assert code == 2 and "not quantized" in err
    code, _, err = run_cli(["export", w8_ckpt, "--format", "gguf", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--format" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
