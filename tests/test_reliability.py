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
    from dllmq import validation as validate
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
    from dllmq.models.tiny import write_tiny_llada

    out = tmp_path / "q"
    # a deep model: many blocks left after the first one, between the moment the test sees it done and SIGSTOP
    src = write_tiny_llada(tmp_path / "deep", n_layers=16, d_model=384, n_heads=6, n_kv_heads=6, mlp_hidden_size=1024)
    args = [sys.executable, "-m", "dllmq.cli.main", "quantize", str(src), "--method", "gptq", "--calib-samples", "16",
            "--calib-seq-len", "128", "--calib-mask", "none", "--dtype", "float32", "--out", str(out), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # SIGINT back to its default in the child: a job started in the background by a shell inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler (this is how a user's Ctrl-C arrives: default handling)
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        # frozen (SIGSTOP) while the concurrent run starts (a fresh interpreter: seconds, more on a cold cache),
        # so it cannot finish first; the interrupt is pending when it resumes
        p.send_signal(signal.SIGSTOP)
        assert p.poll() is None, "the run ended before it could be interrupted"
        second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert second.returncode == 2 and "another dllmq run" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
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
    assert sorted(x.name for x in tmp_path.iterdir() if x != src) == ["q"]


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


# ---------------------------------------------------------------------------------------------
# Structure: a checkpoint is checked against its config (every layer, shapes, dtypes) before the final
# rename, by `push` (also --dry-run) and by `info`; not only its hashes


def _rehash(path):
    """Re-sign every listed file, as someone editing a checkpoint by hand would."""
    def fn(m):
        for name in m["files"]:
            f = path / name
            m["files"][name] = {"sha256": _sha(f), "bytes": f.stat().st_size}
        return m
    _edit_manifest(path, fn)


def _edit_config(path, fn, rehash=True):
    f = path / "config.json"
    c = json.loads(f.read_text())
    c = fn(c)
    f.write_text(json.dumps(c))
    if rehash and (path / "dllmq_manifest.json").exists():
        _rehash(path)


def _q(fn):
    def edit(c):
        fn(c["quantization_config"])
        return c
    return edit


STRUCTURE = {
    "bits-4-to-8": _q(lambda q: q["weights"].update(num_bits=8)),
    "bits-4-to-2": _q(lambda q: q["weights"].update(num_bits=2)),
    "group-32-to-64": _q(lambda q: q["weights"].update(group_size=64)),
    "per-channel": _q(lambda q: q["weights"].update(strategy="channel", group_size=None)),
    "sym-to-asym": _q(lambda q: q["weights"].update(symmetric=False)),
    "layer-not-linear": _q(lambda q: q["quantized_layers"].append("model.transformer.blocks.0.attn_norm")),
    "layer-unknown": _q(lambda q: q["quantized_layers"].append("model.transformer.blocks.99.q_proj")),
    "layer-unquantized": _q(lambda q: q["quantized_layers"].append("model.transformer.ff_out")),
    "no-layers": _q(lambda q: q.update(quantized_layers=[])),
    "more-blocks": lambda c: {**c, "n_layers": c["n_layers"] + 1},
    "wider-vocab": lambda c: {**c, "embedding_size": c["embedding_size"] * 2},
}


@pytest.mark.parametrize("command", ["push", "info"])
@pytest.mark.parametrize("case", list(STRUCTURE))
def test_structure_mismatch_is_refused_even_with_valid_hashes(case, command, copy, capsys):
    _edit_config(copy, STRUCTURE[case])
    args = ["push", copy, "me/model", "--dry-run"] if command == "push" else ["info", copy]
    code, out, err = run_cli(args, capsys)
    _one_line(code, err)
    assert "does not match its config.json" in err or "no quantized layers" in err, err


def test_structure_check_reads_weight_shape_values(copy, capsys):
    """A weight_shape tensor whose values were changed (shapes and dtypes fine) is caught too."""
    from safetensors.torch import load_file, save_file

    shard = sorted(copy.glob("model-*.safetensors"))[1]  # the first block
    t = load_file(str(shard))
    key = next(k for k in t if k.endswith(".weight_shape") and t[k][0] != t[k][1])
    t[key] = t[key].flip(0)
    save_file(t, str(shard), metadata={"format": "pt"})
    _rehash(copy)
    code, out, err = run_cli(["push", copy, "me/model", "--dry-run"], capsys)
    _one_line(code, err)
    assert key in err and "holds" in err


def test_clean_checkpoint_passes_the_structure_check(copy):
    from dllmq.checkpoint.structure import check_folder

    check_folder(copy)


def test_transform_prefix_matches_the_runtime():
    from dllmq.checkpoint.structure import TRANSFORM_PREFIX
    from dllmq.runtime.transforms import TENSOR_PREFIX

    assert TRANSFORM_PREFIX == TENSOR_PREFIX


def _stop_after_blocks(monkeypatch, n):
    """Ctrl-C once `n` blocks of a quantize run are saved."""
    from dllmq.checkpoint import writer

    real = writer.CheckpointWriter.save_progress

    def save_progress(self, progress):
        real(self, progress)
        if progress.get("blocks_done") == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer.CheckpointWriter, "save_progress", save_progress)


def test_resume_after_a_block_file_was_deleted_is_refused(tiny_llada, tmp_path, monkeypatch, capsys):
    """Quantize used to report success on an unloadable result; the structural check before the rename stops it."""
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llada), "--group-size", "32", "--out", out, "--json"]
    with monkeypatch.context() as m:
        _stop_after_blocks(m, 1)
        code, _, err = run_cli(args, capsys)
    assert code == 130, err
    partial = tmp_path / ".q.partial"
    (partial / "block-00000.safetensors").unlink()
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "blocks.0." in last and "is missing" in last and "without --resume" in last
    assert not out.exists() and not partial.exists() and not (tmp_path / ".q.lock").exists()


# ---------------------------------------------------------------------------------------------
# Disk full while writing a checkpoint: one line, the partial run kept and resumable


def _disk_full_at(monkeypatch, n, kind="oserror"):
    import errno

    from dllmq.checkpoint import writer

    real = writer.save_file
    calls = [0]

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == n:
            if kind == "safetensors":
                from safetensors import SafetensorError

                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                      '"No space left on device" })')
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", save_file)


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_keeps_the_partial_run_and_resume_finishes(kind, tiny_llada, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llada), "--group-size", "32", "--out", out, "--json"]
    with monkeypatch.context() as m:
        _disk_full_at(m, 3, kind)  # a-nonblock and block 0 are written, block 1 fails
        code, _, err = run_cli(args, capsys)
    _one_line(code, err)
    assert "disk full" in err and "free" in err and "--resume" in err and "kept" in err
    partial = tmp_path / ".q.partial"
    assert not out.exists() and (partial / "progress.json").exists() and not (tmp_path / ".q.lock").exists()
    assert not list(partial.glob("*.tmp"))  # the half-written shard is gone
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert "resuming" in err and (out / "dllmq_manifest.json").exists() and not partial.exists()


def test_disk_full_before_any_block_keeps_nothing(tiny_llada, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    _disk_full_at(monkeypatch, 1)
    code, _, err = run_cli(["quantize", str(tiny_llada), "--group-size", "32", "--out", out], capsys)
    _one_line(code, err)
    assert "disk full" in err and "nothing was kept" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad --calib files: one line, exit 2, before any model is loaded


CALIB = {
    "binary.txt": (b"\x00\x01\x02\xff\xfe\x89PNG\r\n", "binary"),
    "latin1.txt": ("caf\u00e9 na\u00efve\n".encode("latin-1"), "not UTF-8"),
    "latin1.jsonl": ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    "numbers.jsonl": (b"1\n2\n3\n", "JSON number"),
    "strings.jsonl": (b'"a"\n"b"\n', "JSON string"),
    "list.jsonl": (b'{"text": "ok"}\n[1, 2]\n', "JSON list"),
    "null.jsonl": (b'null\n', "JSON null"),
    "broken.jsonl": (b'{"text": \n', "not valid JSON"),
    "folder": (None, "is a folder"),
}


@pytest.mark.parametrize("name", list(CALIB))
def test_bad_calib_file_one_line(name, tmp_path, capsys):
    data, message = CALIB[name]
    src = tmp_path / name
    if data is None:
        src.mkdir()
    else:
        src.write_bytes(data)
    code, _, err = run_cli(["quantize", "tiny", "--method", "gptq", "--calib", src, "--calib-samples", "2",
                            "--out", tmp_path / "o"], capsys)
    _one_line(code, err)
    assert message in err and "--calib" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_good_calib_file_passes_the_check(tmp_path):
    from dllmq.validation import check_calib_source

    for name, text in (("a.txt", "caf\u00e9 au lait\n"), ("b.jsonl", '{"text": "x"}\n\n{"prompt": "p", "response": "r"}\n')):
        (tmp_path / name).write_text(text, encoding="utf-8")
        check_calib_source(str(tmp_path / name))
    check_calib_source("bundled")
    check_calib_source("wikitext2")  # a Hub dataset: checked when it is loaded


# ---------------------------------------------------------------------------------------------
# A bad model config.json: one line, exit 2, refused before anything is allocated


def _model_with_config(tmp_path, fn):
    src = ROOT / "dllmq" / "bundled" / "tiny-llada"
    dst = tmp_path / "m"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, dst / f.name)
    c = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(fn(c)))
    return dst


BAD_CONFIG = {
    "list": (lambda c: [c], "JSON object"),
    "string": (lambda c: "llada", "JSON object"),
    "negative-d_model": (lambda c: {**c, "d_model": -256}, "d_model = -256 is not positive"),
    "zero-heads": (lambda c: {**c, "n_heads": 0}, "n_heads = 0 is not positive"),
    "string-layers": (lambda c: {**c, "n_layers": "6"}, "n_layers must be a whole number"),
    "float-layers": (lambda c: {**c, "n_layers": 2.5}, "n_layers must be a whole number"),
    "bool-layers": (lambda c: {**c, "n_layers": True}, "n_layers must be a whole number"),
    "vocab-1e12": (lambda c: {**c, "embedding_size": 10 ** 12}, "absurdly large"),
    "d_model-1e7": (lambda c: {**c, "d_model": 10 ** 7}, "absurdly large"),
    "mlp-1e9": (lambda c: {**c, "mlp_hidden_size": 10 ** 9}, "absurdly large"),
    "kv-heads-not-dividing": (lambda c: {**c, "n_kv_heads": 4}, "does not divide"),
    "rope-theta-string": (lambda c: {**c, "rope_theta": "fast"}, "wrong type"),
}


@pytest.mark.parametrize("command", ["info", "quantize"])
@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_model_config_one_line(case, command, tmp_path, capsys):
    import resource

    fn, message = BAD_CONFIG[case]
    src = _model_with_config(tmp_path, fn)
    args = ["info", src] if command == "info" else ["quantize", src, "--out", tmp_path / "o"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_cli(args, capsys)
    _one_line(code, err)
    assert message in err
    assert not (tmp_path / "o").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: nothing huge allocated


# ---------------------------------------------------------------------------------------------
# A malformed quantization_config: one line for info, eval, generate, export, push and dllmq.load


BAD_QCFG = {
    "no-method": (_q(lambda q: q.pop("method")), "no 'method'"),
    "method-number": (_q(lambda q: q.update(method=4)), "not a method name"),
    "bits-string": (_q(lambda q: q["weights"].update(num_bits="four")), "num_bits must be a number"),
    "bits-null": (_q(lambda q: q["weights"].update(num_bits=None)), "no 'num_bits'"),
    "no-weights": (_q(lambda q: q.pop("weights")), "'weights' as an object"),
    "weights-list": (_q(lambda q: q.update(weights=[4])), "'weights' as an object"),
    "layers-string": (_q(lambda q: q.update(quantized_layers="all")), "list of names"),
    "version-string": (_q(lambda q: q.update(format_version="one")), "format_version"),
    "qcfg-list": (lambda c: {**c, "quantization_config": [1]}, "must be an object"),
}


@pytest.mark.parametrize("command", ["info", "generate", "eval", "export", "push"])
@pytest.mark.parametrize("case", list(BAD_QCFG))
def test_malformed_quantization_config_one_line(case, command, copy, tmp_path, capsys):
    fn, message = BAD_QCFG[case]
    _edit_config(copy, fn)
    args = {"info": ["info", copy],
            "generate": ["generate", copy, "hi", "--steps", "8", "--gen-length", "8", "--block-length", "8"],
            "eval": ["eval", copy, "--max-seqs", "1", "--prompts", "0"],
            "export": ["export", copy, "--out", tmp_path / "ct"],
            "push": ["push", copy, "me/model", "--dry-run"]}[command]
    code, _, err = run_cli(args, capsys)
    _one_line(code, err)
    assert message in err and "quantization_config" in err


@pytest.mark.parametrize("case", ["no-method", "bits-string"])
def test_malformed_quantization_config_load(case, copy):
    import dllmq
    from dllmq.errors import UserError

    _edit_config(copy, BAD_QCFG[case][0])
    with pytest.raises(UserError, match="quantization_config"):
        dllmq.load(copy)


# ---------------------------------------------------------------------------------------------
# generate: a prompt beyond the model's maximum sequence length is refused (documented in --help)


def test_generate_refuses_a_prompt_beyond_the_max_sequence_length(capsys):
    code, out, err = run_cli(["generate", "tiny", "word " * 600, "--steps", "8", "--gen-length", "8",
                              "--block-length", "8"], capsys)
    _one_line(code, err)
    assert "maximum sequence length of 512" in err and "at most 504 tokens" in err and out == ""


def test_generate_refuses_a_gen_length_beyond_the_max_sequence_length(capsys):
    code, out, err = run_cli(["generate", "tiny", "hi", "--steps", "16", "--gen-length", "512",
                              "--block-length", "32"], capsys)
    _one_line(code, err)
    assert "--gen-length 512" in err and "maximum sequence length" in err


def test_generate_help_documents_the_prompt_limit(capsys):
    code, out, err = run_cli(["generate", "--help"], capsys)
    assert code == 0 and "refused" in " ".join(out.split())


# ---------------------------------------------------------------------------------------------
# Early checks in eval, inspect, bench, export and push: one line, exit 2, before torch is imported


EARLY = [
    (["eval", "tiny", "--device", "tpu"], "--device"),
    (["eval", "tiny", "--dtype", "int3"], "--dtype"),
    (["eval", "tiny", "--seq-len", "0"], "--seq-len"),
    (["eval", "tiny", "--max-seqs", "0"], "--max-seqs"),
    (["eval", "tiny", "--prompts", "-1"], "--prompts"),
    (["eval", "tiny", "--num-fewshot", "-1"], "--num-fewshot"),
    (["eval", "tiny", "--output", "/"], "--output"),
    (["eval", "tiny", "--limit", "0"], "--limit"),
    (["eval", "tiny", "--batch-size", "0"], "--batch-size"),
    (["eval", "tiny", "--gen-length", "10", "--block-length", "4"], "--block-length"),
    (["eval", "tiny", "--cache", "half"], "--cache"),
    (["eval", "tiny", "--text", "/nonexistent.txt"], "--text"),
    (["eval", "a", "b"], "--compare"),
    (["inspect", "tiny", "--samples", "0"], "--samples"),
    (["inspect", "tiny", "--k-sigma", "nan"], "--k-sigma"),
    (["inspect", "tiny", "--k-sigma", "0"], "--k-sigma"),
    (["inspect", "tiny", "--method", "gptq"], "does not transform activations"),
    (["inspect", "tiny", "--method", "magic"], "unknown method"),
    (["inspect", "tiny", "--device", "tpu"], "--device"),
    (["inspect", "tiny", "--dtype", "int3"], "--dtype"),
    (["inspect", "tiny", "--plot", "/etc/hostname"], "--plot"),
    (["bench", "tiny", "--batch", "0"], "--batch"),
    (["bench", "tiny", "--repeats", "0"], "--repeats"),
    (["bench", "tiny", "--dtype", "int3"], "--dtype"),
    (["bench", "tiny", "--device", "tpu"], "--device"),
    (["bench", "tiny", "--gen-length", "10", "--block-length", "4"], "--block-length"),
    (["export", "x", "--format", "gguf", "--out", "o"], "--format"),
    (["export", "/etc/hostname", "--out", "o"], "is a file"),
    (["export", ".", "--out", "/etc/hostname"], "--out"),
    (["push", ".", "noslash"], "owner/name"),
    (["push", ".", "a/b/c"], "owner/name"),
    (["push", ".", "/b"], "owner/name"),
    (["push", ".", "a/b", "--revision", " "], "--revision"),
    (["push", "/nonexistent-ckpt", "a/b"], "not found"),
    (["push", "/etc/hostname", "a/b"], "is a file"),
    (["push", ".", "a/b", "--results", "/nonexistent.json"], "--results"),
]


@pytest.mark.parametrize("args,message", EARLY, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_early_checks_answer_before_torch(args, message, tmp_path):
    code = ("import sys\nfrom dllmq.cli.main import main\n"
            f"sys.argv = ['dllmq', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
