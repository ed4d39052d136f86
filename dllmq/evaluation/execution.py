"""Run generated programs against their tests in a separate, isolated Python process.

Only called when the user opts in (--allow-code-execution): the code comes from a model.
Each program runs with `python -I` (no site, no env vars, no cwd on sys.path) in a fresh
temporary directory, with a wall-clock timeout and CPU/memory limits; network access is not
blocked by this module, so run untrusted models inside a container or VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def _limits():  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def run_program(source: str, timeout: float = 5.0) -> tuple[bool, str]:
    """-> (passed, reason). Passed means the process exited 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="dllmq-exec-") as d:
        f = os.path.join(d, "prog.py")
        with open(f, "w") as fh:
            fh.write(source)
        try:
            p = subprocess.run([sys.executable, "-I", f], cwd=d, capture_output=True, timeout=timeout,
                               preexec_fn=_limits if os.name == "posix" else None, env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return False, "timeout"
        if p.returncode == 0:
            return True, "passed"
        err = p.stderr.decode(errors="replace").strip().splitlines()
        return False, err[-1] if err else f"exit {p.returncode}"


def check_function(completion: str, test: str, entry_point: str, timeout: float = 5.0) -> tuple[bool, str]:
    return run_program(f"{completion}\n\n{test}\n\ncheck({entry_point})\n", timeout)
