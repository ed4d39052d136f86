"""Run generated programs against their tests in a separate, sandboxed Python process.

Only called when the user opts in (--allow-code-execution): the code comes from a model.

What every run gets (any POSIX system):
  * a fresh temporary working directory, removed afterwards; HOME and TMPDIR point at it, the
    environment is minimal (PATH, HOME, TMPDIR, LANG: no tokens, no proxies), Python runs with -I;
  * its own session / process group: at the timeout, and also when the program exits, the whole
    group is killed (SIGKILL), so children and grandchildren that stayed in the group die with it;
  * resource limits: CPU seconds, address space, size of any file written, no core dumps, open files,
    and a process limit (RLIMIT_NPROC);
  * PR_SET_NO_NEW_PRIVS, so setuid programs cannot raise its privileges.

What it gets where the kernel allows it (root, or unprivileged user namespaces; probed per run, the
outcome is in SANDBOX and NETWORK_ISOLATED below):
  * a new network namespace: no interface but a down loopback, so every connect() fails;
  * a new PID namespace with its own /proc: the program sees only its own processes, cannot read other
    processes' environments (a parent's HF_TOKEN), and every process it started, including ones that
    called setsid() to leave the process group, dies when it exits or is killed;
  * a new mount namespace in which every mount is read-only except the working directory, and the
    entries of the home directories ($HOME, /root, /home/*) are hidden (empty read-only tmpfs / an
    empty file), except the directories holding the Python interpreter itself;
  * as root, a pids cgroup (cgroup v1 or v2, when writable) caps the number of processes, since the
    kernel does not apply RLIMIT_NPROC to root; all capabilities are dropped (bounding set emptied)
    before the program starts, so it cannot undo the mounts or leave the cgroup.

What is NOT isolated: the program runs as the same user (uid) as dllmq; without namespaces it can read
whatever that user can read (the home directory included), write wherever that user can write (outside
its folder too), and open network connections, and a process that leaves the process group with
setsid() can outlive the run; without a cgroup, root's process count is not limited. Kernel exploits,
CPU time of other processes, and side channels are out of scope. For untrusted models, still run
evaluation inside a container or VM.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

CPU_SECONDS = 10
MEMORY_BYTES = 1 << 30
FILE_BYTES = 1 << 20
MAX_PROCS = 32  # processes (threads count too) the program may have at once
OUTPUT_BYTES = 64 << 10  # of stdout / stderr kept

# What the most recent run got (see the module docstring); results can record it. Keys: network_isolated,
# pid_namespace, filesystem ("read-only, home hidden" or "not isolated"), process_limit, capabilities_dropped.
SANDBOX: dict = {}
NETWORK_ISOLATED: bool | None = None  # None until the first run (or isolation_status()) has probed it

_counter = itertools.count()

# Runs as `python -I -c _BOOTSTRAP CFG PROG` in the new session, single-threaded: sets up the sandbox,
# reports what it got on the status pipe, then execs `python -I PROG`.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1]); prog = sys.argv[2]; work = os.path.dirname(prog)
st = {"network_isolated": False, "pid_namespace": False, "filesystem": "not isolated",
      "process_limit": "RLIMIT_NPROC", "capabilities_dropped": False}
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def call(f, *a):
    if f(*a) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
def mount(src, dst, fs, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    call(libc.mount, enc(src), enc(dst), enc(fs), flags, enc(data))
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
root = os.geteuid() == 0
if cfg.get("cgroup"):
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        st["process_limit"] = "cgroup pids.max"
    except OSError:
        pass
uid, gid, got = os.geteuid(), os.getegid(), 0
for flags in ((NEWNS | NEWPID | NEWNET, NEWNET) if root else ()) + (
        NEWUSER | NEWNS | NEWPID | NEWNET, NEWUSER | NEWNET):
    try:
        call(libc.unshare, flags); got = flags; break
    except OSError:
        pass
if got & NEWUSER:
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass
st["network_isolated"] = bool(got & NEWNET)
if got & NEWNS:
    try:
        mount(None, "/", None, REC | PRIVATE)
        mount(work, work, None, BIND)  # its own mount: the one left writable
        failed = []
        for line in open("/proc/self/mountinfo").read().splitlines():
            parts = line.split()
            mp = parts[4].encode().decode("unicode_escape")
            if mp == work:
                continue
            opts = parts[5].split(",")
            keep = (NOSUID if "nosuid" in opts else 0) | (NODEV if "nodev" in opts else 0) | (
                NOEXEC if "noexec" in opts else 0) | (1 << 21 if "relatime" in opts else 0) | (
                1024 if "noatime" in opts else 0) | (2048 if "nodiratime" in opts else 0)
            try:
                mount(None, mp, None, REMOUNT | BIND | RDONLY | keep)
            except OSError:
                failed.append(mp)
        keep_paths = [p for p in cfg["needed"] if p]
        for home in cfg["homes"]:
            if not os.path.isdir(home) or os.path.islink(home):
                continue
            for entry in os.listdir(home):
                p = os.path.join(home, entry)
                if os.path.islink(p) or any(k == p or k.startswith(p + "/") for k in keep_paths):
                    continue
                try:
                    if os.path.isdir(p):
                        mount("tmpfs", p, "tmpfs", RDONLY | NOSUID | NODEV | NOEXEC, "size=4k,mode=555")
                    elif os.path.isfile(p):
                        mount("/dev/null", p, None, BIND)
                except OSError:
                    failed.append(p)
        st["filesystem"] = "read-only, home hidden" + (f" (failed: {len(failed)} mounts)" if failed else "")
    except OSError as e:
        st["filesystem"] = f"not isolated ({e.strerror})"
if got & NEWPID:
    pid = os.fork()
    if pid:  # stays outside the namespace, only to wait for its init: the program
        os.close(cfg["status_fd"])
        while True:
            try:
                _, status = os.waitpid(pid, 0); break
            except InterruptedError:
                pass
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    st["pid_namespace"] = True
    if got & NEWNS:
        try:
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
        except OSError:
            st["pid_namespace"] = "yes, but /proc is the host's"
os.chdir(work)
procs = cfg["max_procs"] + (0 if (got & NEWUSER) or root else cfg["user_tasks"])
for lim, value in ((resource.RLIMIT_CPU, cfg["cpu"]), (resource.RLIMIT_AS, cfg["memory"]),
                   (resource.RLIMIT_FSIZE, cfg["file"]), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_NPROC, procs)):
    try:
        soft, hard = resource.getrlimit(lim)
        v = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(lim, (v, v))
    except (ValueError, OSError):
        pass
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if root and not got & NEWUSER:
    try:  # empty the bounding set: after exec, root has no capability (no mount, no cgroup escape)
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            call(libc.prctl, 24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        st["capabilities_dropped"] = True
    except (OSError, ValueError):
        pass
elif got & NEWUSER:
    st["capabilities_dropped"] = True  # a non-root uid loses its namespace capabilities at exec
os.write(cfg["status_fd"], json.dumps(st).encode())
os.close(cfg["status_fd"])
os.execve(sys.executable, [sys.executable, "-I", prog], dict(os.environ))
"""


@dataclass
class Execution:
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    sandbox: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.timed_out and self.returncode == 0


def execute(source: str, timeout: float = 5.0) -> Execution:
    """Run `source` as a Python program in the sandbox; see the module docstring."""
    global NETWORK_ISOLATED
    with tempfile.TemporaryDirectory(prefix="dllmq-exec-") as d, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        work = os.path.realpath(d)
        prog = os.path.join(work, "prog.py")
        with open(prog, "w") as fh:
            fh.write(source)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        if os.name != "posix":  # pragma: no cover - no sandbox beyond the folder and the timeout
            try:
                p = subprocess.run([sys.executable, "-I", prog], cwd=work, stdout=out, stderr=err, env=env,
                                   timeout=timeout)
                return Execution(p.returncode, False, _read(out), _read(err))
            except subprocess.TimeoutExpired:
                return Execution(None, True, _read(out), _read(err))
        cgroup = _make_cgroup()
        r, w = os.pipe()
        cfg = {"cpu": CPU_SECONDS, "memory": MEMORY_BYTES, "file": FILE_BYTES, "max_procs": MAX_PROCS,
               "user_tasks": 0 if os.geteuid() == 0 else _user_tasks(), "cgroup": cgroup, "status_fd": w,
               "homes": _homes(), "needed": _needed_paths(work)}
        timed_out, code = False, None
        try:
            p = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(cfg), prog], cwd=work,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, pass_fds=(w,),
                                 start_new_session=True)
        finally:
            os.close(w)
        try:
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            _kill_group(p.pid)  # whatever it left behind in its group, on success too
            if timed_out:
                code = p.wait()
            _remove_cgroup(cgroup)
            os.set_blocking(r, False)
            try:
                status = os.read(r, 4096)
            except BlockingIOError:
                status = b""
            os.close(r)
        sandbox = _status(status, cgroup)
        SANDBOX.clear()
        SANDBOX.update(sandbox)
        if sandbox:
            NETWORK_ISOLATED = bool(sandbox.get("network_isolated"))
        return Execution(None if timed_out else code, timed_out, _read(out), _read(err), sandbox)


def run_program(source: str, timeout: float = 5.0) -> tuple[bool, str]:
    """-> (passed, reason). Passed means the process exited 0 within the timeout."""
    res = execute(source, timeout)
    if res.timed_out:
        return False, "timeout"
    if res.returncode == 0:
        return True, "passed"
    lines = res.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit {res.returncode}"


def check_function(completion: str, test: str, entry_point: str, timeout: float = 5.0) -> tuple[bool, str]:
    return run_program(f"{completion}\n\n{test}\n\ncheck({entry_point})\n", timeout)


def isolation_status() -> dict:
    """What the sandbox gets on this machine (runs a trivial program once if nothing ran yet)."""
    if not SANDBOX:
        execute("pass\n", timeout=10)
    return dict(SANDBOX)


# ---------------------------------------------------------------------------------------------- helpers
def _read(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - OUTPUT_BYTES))
    return f.read().decode(errors="replace")


def _status(raw: bytes, cgroup: str | None) -> dict:
    try:
        st = json.loads(raw.decode())
        return st if isinstance(st, dict) else {}
    except ValueError:  # the bootstrap failed before it got there (its error is on stderr)
        return {}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _homes() -> list[str]:
    homes = [os.environ.get("HOME") or "", os.path.expanduser("~"), "/root"]
    try:
        homes += [os.path.join("/home", e) for e in os.listdir("/home")]
    except OSError:
        pass
    return list(dict.fromkeys(os.path.realpath(h) for h in homes if h))


def _needed_paths(work: str) -> list[str]:
    """Paths the program needs, so they are not hidden with the home directories around them."""
    paths = {work, sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(os.path.realpath(p) for p in paths if p)


def _user_tasks() -> int:
    """Processes and threads of this user now: RLIMIT_NPROC counts them all, so the limit is set above."""
    uid, n = os.getuid(), 0
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if os.stat(f"/proc/{e}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{e}/task"))
            except OSError:
                pass
    return n


def _make_cgroup() -> str | None:
    """A pids cgroup (v1, or v2 with the pids controller delegated) capping the process count, or None."""
    name = f"dllmq-exec-{os.getpid()}-{next(_counter)}"
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    bases = []
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "pids" in ctrls.split(","):
            bases.append("/sys/fs/cgroup/pids" + path)
        elif ctrls == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            parent = "/sys/fs/cgroup" + path
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                    if "pids" in f.read().split():
                        bases.append(parent)
            except OSError:
                pass
    for base in bases:
        cg = os.path.join(base, name)
        try:
            os.mkdir(cg)
        except OSError:
            continue
        try:
            with open(os.path.join(cg, "pids.max"), "w") as f:
                f.write(str(MAX_PROCS))
            return cg
        except OSError:
            _remove_cgroup(cg)
    return None


def _remove_cgroup(cg: str | None) -> None:
    if not cg:
        return
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(cg)
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
