"""Bad input, interrupts, concurrency and tampering (issue 16): every case gives one clear line with
exit 2 (130 for Ctrl-C), never a traceback, and nothing half-written."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _one_line(code, err, expect=2):
    assert code == expect, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# 1. usage errors: a short usage message and exit 2, for both click flavours


USAGE = [
    (["info"], "Missing argument"),
    (["generate", "tiny"], "Missing argument"),
    (["eval"], "Missing argument"),
    (["nope"], "No such command"),
    (["quantize", "tiny", "--w", "abc"], "Invalid value"),
    (["quantize", "tiny", "--group-size", "x"], "Invalid value"),
    (["quantize", "tiny", "--damp", "lots"], "Invalid value"),
    (["generate", "tiny", "hi", "--steps", "many"], "Invalid value"),
    (["quantize", "tiny", "--bogus"], "No such option"),
    (["info", "x", "--bogus"], "No such option"),
    (["--bogus"], "No such option"),
    (["quantize", "tiny", "--out"], "requires an argument"),
]


@pytest.mark.parametrize("args,message", USAGE)
def test_usage_error_exit_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err + out
    assert message in err and ("Usage:" in err or "Try 'dllmq --help'" in err)
    assert len(err.strip().splitlines()) <= 5


def test_bare_command_shows_help_exit_2(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2 and "Traceback" not in out + err
    assert "Usage:" in out + err and "quantize" in out + err


def test_version(capsys):
    from dllmq import __version__

    code, out, err = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"dllmq {__version__}"


def _flavours():
    """(UsageError, Abort) of typer's own click copy and, when installed, of click itself."""
    import typer._click.exceptions as tc
    import typer.exceptions as te

    out = [pytest.param(tc.UsageError, getattr(tc, "Abort", te.Abort), id="typer._click")]
    try:
        import click.exceptions as cc

        out.append(pytest.param(cc.UsageError, cc.Abort, id="click"))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("usage,abort", _flavours())
def test_both_click_flavours_are_usage_errors(usage, abort, monkeypatch, capsys):
    import dllmq.cli.main as cli

    def boom(**kw):
        raise usage("bad flag")

    monkeypatch.setattr(cli, "app", boom)
    code, out, err = run_cli(["x"], capsys)
    assert code == 2 and "bad flag" in err and "Traceback" not in err


@pytest.mark.parametrize("usage,abort", _flavours())
def test_both_click_flavours_abort_is_130(usage, abort, monkeypatch, capsys):
    import dllmq.cli.main as cli

    def boom(**kw):
        raise abort()

    monkeypatch.setattr(cli, "app", boom)
    code, out, err = run_cli(["x"], capsys)
    assert code == 130 and "interrupted" in err


# ---------------------------------------------------------------------------------------------
# Bad values: one line, exit 2, answered before torch is imported


BAD_VALUES = [
    (["generate", "tiny", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "tiny", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "tiny", "hi", "--temperature", "inf"], "--temperature"),
    (["generate", "tiny", "hi", "--dtype", "int3"], "--dtype"),
    (["generate", "tiny", "hi", "--device", "tpu"], "--device"),
    (["generate", "tiny", "hi", "--remasking", "sometimes"], "--remasking"),
    (["generate", "tiny", "hi", "--alg", "magic"], "--alg"),
    (["generate", "tiny", "hi", "--steps", "0"], "must be positive"),
    (["generate", "tiny", "hi", "--threshold", "2"], "--threshold"),
    (["generate", "tiny", "hi", "--fast", "--temperature", "0.5"], "greedily"),
    (["quantize", "tiny", "--tmas-block-length", "0", "--method", "gptq"], "--tmas-block-length"),
    (["quantize", "tiny", "--tmas-gen-length", "0", "--method", "gptq"], "--tmas-gen-length"),
    (["quantize", "tiny", "--tmas-steps", "0", "--method", "gptq"], "--tmas-steps"),
    (["quantize", "tiny", "--tmas-states", "-1", "--method", "gptq"], "--tmas-states"),
    (["quantize", "tiny", "--tmas-proportions", "nan,0.5,0.5", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--tmas-proportions", "inf,0", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--tmas-proportions", "0.5,0.6", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--tmas-proportions", "-0.5,1.5", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--tmas-proportions", "a,b", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--tmas-proportions", "", "--method", "gptq"], "--tmas-proportions"),
    (["quantize", "tiny", "--calib-samples", "0"], "--calib-samples"),
    (["quantize", "tiny", "--calib-seqlen", "-4"], "--calib-seqlen"),
    (["quantize", "tiny", "--damp", "1"], "--damp"),
    (["quantize", "tiny", "--damp", "nan"], "--damp"),
    (["quantize", "tiny", "--w-clip", "0"], "--w-clip"),
    (["quantize", "tiny", "--w-clip", "1.5"], "--w-clip"),
    (["quantize", "tiny", "--alpha", "nan"], "--alpha"),
    (["quantize", "tiny", "--a-clip", "nan", "--a", "8", "--method", "smoothquant"], "--a-clip"),
    (["quantize", "tiny", "--a-clip", "0", "--a", "8", "--method", "smoothquant"], "clip ratio"),
    (["quantize", "tiny", "--duquant-block", "0", "--a", "8", "--method", "duquant"], "--duquant-block"),
    (["quantize", "tiny", "--device", "tpu"], "--device"),
    (["quantize", "tiny", "--dtype", "int3"], "--dtype"),
    (["quantize", "tiny", "--method", "magic"], "unknown method"),
    (["quantize", "tiny", "--method", "duquant"], "--a 8"),
    (["quantize", "tiny", "--calib-mask", "half"], "--calib-mask"),
    (["quantize", "tiny", "--w-quantizer", "awq", "--method", "awq"], "--w-quantizer"),
    (["quantize", "tiny", "--cgq"], "--cgq"),
    (["quantize", "tiny", "--scale-search", "p99"], "--scale-search"),
    (["quantize", "tiny", "--w", "5"], "weight bits"),
    (["quantize", "tiny", "--w", "0"], "weight bits"),
    (["quantize", "tiny", "--a", "6"], "activation bits"),
    (["quantize", "tiny", "--group-size", "48"], "group size"),
    (["quantize", "tiny", "--group-size", "0"], "group size"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES)
def test_bad_value_one_line_exit_2(args, message, tmp_path, capsys):
    extra = ["--out", tmp_path / "o"] if args[0] == "quantize" else []
    code, out, err = run_cli(args + extra, capsys)
    _one_line(code, err)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_offload_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    code, out, err = run_cli(["quantize", "tiny", "--method", "gptq", "--offload-dir", f, "--out", tmp_path / "o"],
                             capsys)
    _one_line(code, err)
    assert "--offload-dir" in err


FAST = [
    ["quantize", "tiny", "--w", "5"],
    ["quantize", "tiny", "--tmas-block-length", "0", "--method", "gptq"],
    ["quantize", "tiny", "--method", "magic"],
    ["generate", "tiny", "hi", "--temperature", "-1"],
    ["generate", "tiny", "hi", "--gen-length", "10", "--block-length", "4"],
]


@pytest.mark.parametrize("args", FAST, ids=lambda a: " ".join(a[:4]))
def test_simple_mistakes_answer_before_torch(args, tmp_path):
    code = ("import sys\nfrom dllmq.cli.main import main\n"
            f"sys.argv = ['dllmq', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 30  # generous under load; typically well under a second


def test_cheap_lists_match_their_modules():
    from dllmq.calibration.states import MASK_MODES
    from dllmq.cli import validate
    from dllmq.quantization.methods import METHODS
    from dllmq.quantization.rtn import SCALE_SEARCHES

    assert sorted(validate.METHOD_NAMES) == sorted(METHODS)
    assert sorted(validate.WEIGHT_ACT_METHODS) == sorted(n for n, m in METHODS.items() if m.quantizes_activations)
    assert tuple(validate.MASK_MODES) == tuple(MASK_MODES)
    assert tuple(validate.SCALE_SEARCHES) == tuple(SCALE_SEARCHES)


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C and partial runs; 4. the lock


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _writer(out, **kw):
    from dllmq.checkpoint.writer import CheckpointWriter

    return CheckpointWriter(out, **kw)


def _interrupt_after(out, blocks_done):
    """Ctrl-C inside a writer that has saved `blocks_done` blocks; returns the Interrupted it raises."""
    from dllmq.errors import Interrupted

    w = _writer(out, run_key="k")
    with pytest.raises(Interrupted) as ei:
        with w:
            w.save_progress({"blocks_done": blocks_done})
            raise KeyboardInterrupt
    return ei


def test_interrupt_after_a_block_keeps_partial_and_says_resume(tmp_path):
    out = tmp_path / "o"
    ei = _interrupt_after(out, 1)
    assert ei.value.exit_code == 130
    assert "--resume" in str(ei.value) and "kept 1" in str(ei.value)
    assert (tmp_path / ".o.partial" / "progress.json").exists()
    assert not out.exists() and not (tmp_path / ".o.lock").exists()


def test_interrupt_before_any_block_keeps_nothing(tmp_path):
    ei = _interrupt_after(tmp_path / "o", 0)
    assert "nothing was kept" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resume,key,kept,note", [
    (False, "k", False, "pass --resume"),
    (True, "other", False, "different arguments"),
    (True, "k", True, "resuming"),
])
def test_rerun_says_what_happens_to_a_partial_run(resume, key, kept, note, tmp_path, capsys):
    from dllmq.errors import Interrupted

    out = tmp_path / "o"
    w = _writer(out, run_key="k")
    with pytest.raises(Interrupted):
        with w:
            w.save_progress({"blocks_done": 2})
            raise KeyboardInterrupt
    capsys.readouterr()
    w2 = _writer(out, resume=resume, run_key=key)
    err = capsys.readouterr().err
    assert note in err
    assert (w2.progress.get("blocks_done") == 2) is kept
    if not kept:
        assert "discarding" in err
    w2.abort()


def test_resume_without_partial_says_so(tmp_path, capsys):
    w = _writer(tmp_path / "o", resume=True, run_key="k")
    assert "no interrupted run" in capsys.readouterr().err
    w.abort()


def test_second_writer_on_same_out_is_refused(tmp_path):
    from dllmq.errors import UserError

    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process that is not us
    with pytest.raises(UserError, match="another dllmq run") as ei:
        _writer(out)
    assert "\n" not in str(ei.value)
    assert lock.read_text().split()[0] == str(os.getppid())  # left alone


@pytest.mark.parametrize("content", ["dead", "", "garbage", "self"])
def test_stale_lock_is_taken_over(content, tmp_path):
    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    text = {"dead": f"{_dead_pid()} {socket.gethostname()}", "self": f"{os.getpid()} {socket.gethostname()}"}
    lock.write_text(text.get(content, content))
    w = _writer(out)
    assert lock.read_text().split()[0] == str(os.getpid())
    w.abort()
    assert not lock.exists()


def test_quantize_refuses_locked_out_before_loading(tmp_path, capsys):
    lock = tmp_path / ".o.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    code, out, err = run_cli(["quantize", "tiny", "--out", tmp_path / "o"], capsys)
    _one_line(code, err)
    assert "another dllmq run" in err and not (tmp_path / "o").exists()


def test_interrupt_outside_writer_exits_130(monkeypatch, capsys):
    import dllmq.models.loading as loading

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "resolve_model_path", boom)
    code, out, err = run_cli(["info", "tiny"], capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_ctrl_c_during_quantize(tmp_path):
    """SIGINT to a real `dllmq quantize tiny --method gptq` once a block is done: exit 130, the partial run
    is kept and resumable, a concurrent run on the same --out is refused meanwhile, and --resume finishes."""
    out = tmp_path / "q"
    args = [sys.executable, "-m", "dllmq.cli.main", "quantize", "tiny", "--method", "gptq", "--calib-samples", "2",
            "--calib-seqlen", "32", "--tmas-steps", "8", "--tmas-gen-length", "16", "--tmas-block-length", "8",
            "--tmas-states", "1", "--out", str(out), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    prog = tmp_path / ".q.partial" / "progress.json"
    try:
        deadline = time.time() + 600
        while p.poll() is None and time.time() < deadline:
            try:
                if json.loads(prog.read_text()).get("blocks_done", 0) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be interrupted"
        second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert second.returncode == 2 and "another dllmq run" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "--resume" in last and "kept" in last
    assert not out.exists() and prog.exists() and not (tmp_path / ".q.lock").exists()
    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    assert (out / "dllmq_manifest.json").exists() and not (tmp_path / ".q.partial").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q"]


# ---------------------------------------------------------------------------------------------
# 5. manifest verification does not trust the manifest; 8. file modes


@pytest.fixture(scope="module")
def ckpt(tiny_llada, tmp_path_factory):
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize
    from dllmq.quantization.spec import WeightSpec

    out = tmp_path_factory.mktemp("rel") / "w4"
    quantize(tiny_llada, QuantizationConfig("rtn", WeightSpec(4, True, "group", 32),
                                            ignore=[r"model\.transformer\.ff_out"]), out, show_progress=False)
    return out


@pytest.fixture
def copy(ckpt, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


def _edit_manifest(path, fn):
    mf = path / "dllmq_manifest.json"
    m = json.loads(mf.read_text())
    m = fn(m)
    mf.write_text(m if isinstance(m, str) else json.dumps(m))


def _first_shard(path):
    return sorted(path.glob("model-*.safetensors"))[0].name


def _drop(name_fn):
    def fn(m):
        m["files"].pop(name_fn(m))
        return m
    return fn


def _add(name, info=None):
    def fn(m):
        m["files"][name] = info or {"sha256": "0" * 64, "bytes": 1}
        return m
    return fn


TAMPER = {
    # dropping an entry no longer hides a modified file
    "drop-shard-entry": (lambda p: _edit_manifest(p, _drop(lambda m: _first_shard(p))), "not listed"),
    "drop-config-entry": (lambda p: _edit_manifest(p, _drop(lambda m: "config.json")), "not listed"),
    "drop-index-entry": (lambda p: _edit_manifest(p, _drop(lambda m: "model.safetensors.index.json")), "not listed"),
    "drop-tokenizer-entry": (lambda p: _edit_manifest(p, _drop(lambda m: "tokenizer.json")), "not listed"),
    "extra-shard": (lambda p: (p / "model-extra.safetensors").write_bytes(b"x"), "not listed"),
    "extra-json": (lambda p: (p / "generation_config.json").write_text("{}"), "not listed"),
    "index-names-unlisted-shard": (lambda p: _index_add(p, "model-99999-of-99999.safetensors"), "does not list"),
    # names outside the folder are refused before anything is read
    "parent": (lambda p: _edit_manifest(p, _add("../config.json")), "not a plain file name"),
    "dotdot": (lambda p: _edit_manifest(p, _add("..")), "not a plain file name"),
    "dot": (lambda p: _edit_manifest(p, _add(".")), "not a plain file name"),
    "absolute": (lambda p: _edit_manifest(p, _add("/etc/passwd")), "not a plain file name"),
    "dev-zero": (lambda p: _edit_manifest(p, _add("/dev/zero")), "not a plain file name"),
    "subfolder": (lambda p: _edit_manifest(p, _add("sub/x.bin")), "not a plain file name"),
    "backslash": (lambda p: _edit_manifest(p, _add("..\\x")), "not a plain file name"),
    "empty-name": (lambda p: _edit_manifest(p, _add("")), "not a plain file name"),
    # non-regular files are refused before hashing (a device or fifo would hang)
    "symlink-to-dev-zero": (lambda p: (os.symlink("/dev/zero", p / "zero.bin"), _edit_manifest(p, _add("zero.bin"))),
                            "not a regular file"),
    "fifo": (lambda p: (os.mkfifo(p / "pipe.bin"), _edit_manifest(p, _add("pipe.bin"))), "not a regular file"),
    "directory": (lambda p: ((p / "d.bin").mkdir(), _edit_manifest(p, _add("d.bin"))), "not a regular file"),
    # malformed manifests: one line
    "not-json": (lambda p: (p / "dllmq_manifest.json").write_text("{nope"), "corrupt"),
    "binary": (lambda p: (p / "dllmq_manifest.json").write_bytes(b"\xff\xfe\x00"), "corrupt"),
    "list": (lambda p: _edit_manifest(p, lambda m: [m]), "malformed"),
    "string": (lambda p: _edit_manifest(p, lambda m: '"files"'), "malformed"),
    "no-files": (lambda p: _edit_manifest(p, lambda m: {k: v for k, v in m.items() if k != "files"}), "malformed"),
    "files-list": (lambda p: _edit_manifest(p, lambda m: {**m, "files": list(m["files"])}), "malformed"),
    "missing-bytes": (lambda p: _edit_manifest(p, lambda m: _set_entry(m, "config.json", {"sha256": "0" * 64})),
                      "malformed"),
    "string-bytes": (lambda p: _edit_manifest(p, lambda m: _set_entry(m, "config.json",
                                                                      {"sha256": "0" * 64, "bytes": "12"})),
                     "malformed"),
    "entry-not-object": (lambda p: _edit_manifest(p, lambda m: _set_entry(m, "config.json", 7)), "malformed"),
    "missing-sha": (lambda p: _edit_manifest(p, lambda m: _set_entry(m, "config.json", {"bytes": 3})), "malformed"),
    # the plain cases still hold
    "modified-shard": (lambda p: _flip(p / _first_shard(p)), "sha256"),
    "missing-shard": (lambda p: (p / _first_shard(p)).unlink(), "missing"),
    "corrupt-index": (lambda p: (p / "model.safetensors.index.json").write_text("[]"), None),
}


def _set_entry(m, name, info):
    m["files"][name] = info
    return m


def _flip(f):
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _index_add(p, shard):
    f = p / "model.safetensors.index.json"
    idx = json.loads(f.read_text())
    idx["weight_map"]["extra.tensor"] = shard
    f.write_text(json.dumps(idx))
    _edit_manifest(p, lambda m: _set_entry(m, f.name, {"sha256": _sha(f), "bytes": f.stat().st_size}))


def _sha(f):
    import hashlib

    return hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_checkpoint_one_line(case, copy, monkeypatch, capsys):
    import dllmq.checkpoint.writer as writer

    make, message = TAMPER[case]
    make(copy)
    hashed = []
    real = writer.sha256_file
    monkeypatch.setattr(writer, "sha256_file", lambda f, *a: hashed.append(Path(f).name) or real(f, *a))
    code, out, err = run_cli(["info", copy], capsys)
    _one_line(code, err)
    if message:
        assert message in err
    if message in ("not a plain file name", "not a regular file", "malformed", "not listed", "does not list"):
        assert hashed == []  # refused before anything is hashed
    assert "/etc/passwd" not in hashed


def test_load_refuses_dropped_entry(copy):
    import dllmq
    from dllmq.errors import UserError

    _flip(copy / _first_shard(copy))
    _edit_manifest(copy, _drop(lambda m: _first_shard(copy)))
    with pytest.raises(UserError, match="not listed"):
        dllmq.load(copy)


def test_info_says_whether_it_verified(copy, capsys):
    code, out, err = run_cli(["info", copy, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["verified"].startswith("yes")
    _flip(copy / _first_shard(copy))
    code, out, err = run_cli(["info", copy, "--no-verify", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["verified"].startswith("no")
    code, out, err = run_cli(["info", copy], capsys)
    _one_line(code, err)
    assert "sha256" in err
    (copy / "dllmq_manifest.json").unlink()
    code, out, err = run_cli(["info", copy, "--json"], capsys)
    assert code == 0 and "missing" in json.loads(out)["verified"]


def test_clean_checkpoint_verifies(copy):
    from dllmq.checkpoint.writer import verify_manifest

    assert "files" in verify_manifest(copy)
    (copy / "README.md").write_text("card")  # files beside the checkpoint that are not loaded are allowed
    (copy / "results.json").write_text("{}")
    verify_manifest(copy)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_shards_have_the_mode_of_the_other_files(umask, tiny_llada, tmp_path):
    from dllmq.checkpoint.format import QuantizationConfig
    from dllmq.pipeline import quantize
    from dllmq.quantization.spec import WeightSpec

    old = os.umask(umask)
    try:
        out = tmp_path / "m"
        quantize(tiny_llada, QuantizationConfig("rtn", WeightSpec(4, True, "group", 32)), out, show_progress=False)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    written = {k: v for k, v in modes.items() if k.endswith((".safetensors", ".json"))}
    assert set(written.values()) == {0o666 & ~umask}, modes


def test_ignore_that_leaves_nothing_to_quantize_is_refused(tiny_llada, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", str(tiny_llada), "--ignore", ".*", "--out", out], capsys)
    _one_line(code, err)
    assert "leaves no layer to quantize" in err and not out.exists()


def test_tokenizer_ids_beyond_the_vocabulary_are_one_line(tmp_path, capsys):
    """A tokenizer that does not match the model (ids beyond the embedding table) is refused, not an IndexError."""
    from dllmq.models.tiny import write_tiny_llada

    src = write_tiny_llada(tmp_path / "m", vocab_size=512, embedding_size=512, mask_token_id=511,
                           eos_token_id=510, pad_token_id=510)  # its tokenizer keeps LLaDA's ids (126081, ...)
    code, _, err = run_cli(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--calib-mask", "none",
                            "--calib-samples", "2", "--out", tmp_path / "q"], capsys)
    assert code == 2 and "Traceback" not in err  # (the calibration progress line precedes the error)
    assert "beyond the model's embedding table" in err.strip().splitlines()[-1] and not (tmp_path / "q").exists()
