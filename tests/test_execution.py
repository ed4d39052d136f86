"""The sandbox for model-generated code (issue 16): timeouts kill everything, forks are capped, the
working folder is a throwaway, and (where the kernel allows) no network, no writes outside, no home."""

import os
import socket
import time
import uuid

import pytest

from dllmq.evaluation import execution
from dllmq.evaluation.execution import check_function, execute, isolation_status, run_program


def _alive(token: str) -> list[int]:
    """Pids whose command line contains token (zombies have an empty one)."""
    pids = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        pids.append(int(e))
            except OSError:
                pass
    return pids


def _gone(token: str, wait: float = 3.0) -> bool:
    deadline = time.monotonic() + wait
    while _alive(token):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def token():
    t = f"dllmq-test-{uuid.uuid4().hex}"
    yield t
    for pid in _alive(t):  # never leave anything behind, even when a test fails
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def test_correct_solution_passes_wrong_one_fails():
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    assert check_function("def add(a, b):\n    return a + b\n", test, "add") == (True, "passed")
    ok, reason = check_function("def add(a, b):\n    return a - b\n", test, "add")
    assert not ok and "AssertionError" in reason
    assert run_program("while True:\n    pass\n", timeout=1) == (False, "timeout")


@pytest.mark.parametrize("setsid", [False, True])
@pytest.mark.parametrize("main_exits", [False, True])
def test_grandchild_dies_at_timeout(token, setsid, main_exits):
    # a child that forks a grandchild sleeping past the timeout; with setsid the grandchild also leaves
    # the process group (only the PID namespace or the cgroup catch it)
    if setsid and not (isolation_status().get("pid_namespace") or "cgroup" in _limit()):
        pytest.skip("no PID namespace or cgroup here: a setsid() grandchild can escape (documented)")
    src = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # {token}"], start_new_session={setsid})
time.sleep(0.3)
{"" if main_exits else "time.sleep(60)"}
"""
    t0 = time.monotonic()
    res = execute(src, timeout=2)
    assert time.monotonic() - t0 < 10
    assert res.timed_out is (not main_exits)
    assert _gone(token), "a grandchild outlived the run"


def _limit() -> str:
    return str(isolation_status().get("process_limit", ""))


def test_fork_bomb_is_contained(token):
    # each child sleeps, so they pile up: the limit must stop the loop long before 300
    src = f"""
import os, sys, time  # {token}
n = 0
for _ in range(300):
    try:
        if os.fork() == 0:
            time.sleep(20)
            os._exit(0)
    except OSError:
        break
    n += 1
print(n)
sys.exit(0 if n < 100 else 1)
"""
    res = execute(src, timeout=10)
    assert res.passed, (res.stdout, res.stderr[-300:])
    assert int(res.stdout.split()[-1]) <= execution.MAX_PROCS
    assert _gone(token), "forked children outlived the run"


def test_cwd_is_a_throwaway_temp_dir():
    res = execute("import os\nopen('scratch.txt', 'w').write('x')\n"
                  "print(os.getcwd()); print(os.environ['HOME']); print(sorted(os.environ))\n")
    assert res.passed, res.stderr
    cwd, home, keys = res.stdout.splitlines()
    assert os.path.basename(cwd).startswith("dllmq-exec-") and home == cwd
    assert not os.path.exists(cwd)  # removed afterwards
    assert "HF_TOKEN" not in keys and len(eval(keys)) <= 4


def test_no_secrets_in_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    res = execute("import os\nprint(dict(os.environ))\n")
    assert res.passed and "hf_secret_for_test" not in res.stdout


def _needs(key):
    st = isolation_status()
    if not st.get(key) or st.get(key) == "not isolated" or str(st.get(key)).startswith("not isolated"):
        pytest.skip(f"{key} isolation is not available here: {st}")


def test_network_connect_fails():
    _needs("network_isolated")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        res = execute(f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n")
    finally:
        srv.close()
    assert not res.passed and ("unreachable" in res.stderr or "refused" in res.stderr), res.stderr
    assert execution.NETWORK_ISOLATED is True


def test_cannot_write_outside_or_read_home(tmp_path, monkeypatch):
    _needs("filesystem")
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("hf_secret_in_home")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    monkeypatch.setenv("HOME", str(home))
    outside = tmp_path / "escape.txt"
    res = execute(f"""
import os
for p in [{str(outside)!r}, {str(home / 'new.txt')!r}, '/tmp/dllmq-escape-test.txt']:
    try:
        open(p, 'w').write('x')
        print('WROTE', p)
    except OSError as e:
        print('refused', p, e.errno)
print(repr(open({str(home / 'secret.txt')!r}).read()))
print(os.path.exists({str(home / '.ssh' / 'id_rsa')!r}))
""")
    assert res.passed, res.stderr
    assert "WROTE" not in res.stdout and not outside.exists() and not (home / "new.txt").exists()
    assert "hf_secret_in_home" not in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "False"
