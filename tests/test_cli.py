"""End-to-end through the CLI: quantize -> save -> load -> eval -> generate, and every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cli_helpers import run_cli


@pytest.fixture(scope="module")
def llada_w4(tiny_llada, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "llada-w4"
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize
    from dllmq.quantization.spec import WeightSpec

    quantize(tiny_llada, QuantizationConfig("rtn", WeightSpec(4, True, "group", 32), ignore=[r"model\.transformer\.ff_out"]),
             out, show_progress=False)
    return out


@pytest.mark.parametrize("fixture,extra", [("tiny_llada", ["--group-size", "32"]),
                                           ("tiny_dream", ["--group-size", "-1", "--asym", "--w", "8"])])
def test_quantize_load_eval_generate(fixture, extra, request, tmp_path, capsys):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "q"
    code, stdout, err = run_cli(["quantize", src, "--method", "rtn", *extra, "--out", out, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["layers"] == 2 * 7
    assert summary["bytes"] < summary["source_bytes"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["method"] == "rtn"
    assert (out / "dllmq_manifest.json").exists() and (out / "tokenizer.json").exists()
    # no leftovers beside the target
    assert [p.name for p in out.parent.iterdir()] == ["q"]

    code, stdout, err = run_cli(["info", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["quantized_layers"] == 14

    code, stdout, err = run_cli(["eval", out, "--max-seqs", "2", "--seq-len", "32", "--mc-num", "2", "--prompts", "2",
                                 "--steps", "8", "--gen-length", "8", "--block-length", "8", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    labels = [m["label"] for m in res["models"]]
    assert labels == ["full precision", "quantized"]
    fp, q = res["models"]
    assert q["resident_weight_bytes"] < fp["resident_weight_bytes"]
    assert 0.0 <= q["agreement"] <= 1.0 and q["nll"] > 0

    code, stdout, err = run_cli(["generate", out, "hello", "--steps", "8", "--gen-length", "8", "--block-length", "8",
                                 "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(stdout)["outputs"]) == 1


def test_loaded_model_uses_quantlinear(llada_w4):
    import dllmq
    from dllmq.runtime.qlinear import QuantLinear

    m = dllmq.load(llada_w4)
    qs = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(qs) == 14 and "model.transformer.ff_out" not in qs
    assert type(m.get_submodule("model.transformer.ff_out")).__name__ == "Linear"


BAD = [
    (["quantize", "{src}", "--w", "5"], "weight bits"),
    (["quantize", "{src}", "--group-size", "48"], "group size"),
    (["quantize", "{src}", "--group-size", "512"], "does not divide"),
    (["quantize", "{src}", "--method", "magic"], "unknown method"),
    (["quantize", "{src}", "--a", "6"], "activation bits"),
    (["quantize", "{src}", "--ignore", "("], "regular expression"),
    (["quantize", "{nope}"], "not found"),
    (["generate", "{src}", "hi", "--gen-length", "10", "--block-length", "4"], "must divide"),
    (["quantize", "{src}", "--dtype", "int3"], "--dtype"),
    (["quantize", "{src}", "--method", "gptq", "--scale-search", "p99"], "--scale-search"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2(args, message, tiny_llada, tmp_path, capsys):
    args = [a.format(src=tiny_llada, nope=tmp_path / "nope") for a in args] + (["--out", tmp_path / "o"] if args[0] == "quantize" else [])
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_unsupported_model_type(tmp_path, tiny_llada, capsys):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_llada, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["quantize", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "supported: " in err and "llada" in err


def test_existing_output_needs_overwrite(tiny_llada, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(["quantize", tiny_llada, "--group-size", "32", "--out", out], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").exists()
    code, _, err = run_cli(["quantize", tiny_llada, "--group-size", "32", "--out", out, "--overwrite", "--json"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tiny_llada, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run_cli(["quantize", tiny_llada, "--out", ro / "x"], capsys)
    assert code == 2 and "permission" in err


def test_unwritable_output_path_is_file(tiny_llada, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli(["quantize", tiny_llada, "--group-size", "32", "--out", f / "sub"], capsys)
    assert code == 2 and "error" in err


def test_tampered_checkpoint_refused(llada_w4, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(llada_w4, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["generate", bad, "hi", "--steps", "8", "--gen-length", "8", "--block-length", "8"], capsys)
    assert code == 2 and "sha256" in err


def test_missing_shard_refused(llada_w4, tmp_path, capsys):
    bad = tmp_path / "missing"
    shutil.copytree(llada_w4, bad)
    sorted(bad.glob("model-*.safetensors"))[0].unlink()
    code, _, err = run_cli(["eval", bad, "--prompts", "0"], capsys)
    assert code == 2 and "missing" in err


def test_killed_run_leaves_no_checkpoint(tiny_llada, tmp_path):
    """SIGKILL mid-write: the target never appears; only a .partial folder may remain."""
    out = tmp_path / "killed"
    code = (
        "import os, signal\n"
        "import dllmq.checkpoint.writer as w\n"
        "orig = w.CheckpointWriter.finalize\n"
        "def boom(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.CheckpointWriter.finalize = boom\n"
        "from dllmq.cli.main import main\n"
        f"import sys; sys.argv = ['dllmq', 'quantize', {str(tiny_llada)!r}, '--group-size', '32', '--out', {str(out)!r}]\n"
        "main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -9
    assert not out.exists()


def test_help_explains_options(capsys):
    code, out, _ = run_cli(["quantize", "--help"], capsys)
    assert code == 0
    for flag in ("--method", "--w", "--a", "--group-size", "--sym", "--out", "--overwrite", "--device", "--dtype",
                 "Example"):
        assert flag in out
