"""The lock that keeps two runs from writing the same output folder (no torch: the CLI checks it
before its heavy imports)."""

from __future__ import annotations

import atexit
import os
import socket
import time
from pathlib import Path

from ..errors import UserError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to someone else
        return True
    return True


class RunLock:
    """`.<name>.lock` beside the output, created with O_EXCL and holding `pid host`.

    A second run on the same output is refused; a lock left by a dead process on this host (or by
    this very process, e.g. an earlier in-process run that failed) is taken over.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.resolve().parent / f".{out.name}.lock"
        self.held = False

    def _owner(self, path: Path) -> tuple[int, str] | None:
        try:
            pid, _, host = path.read_text().strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _stale(self, owner: tuple[int, str] | None) -> bool:
        if owner is None:  # empty or garbled: a writer that died between create and write
            return True
        pid, host = owner
        if host and host != socket.gethostname():
            return False  # cannot tell whether a process on another machine is alive
        return pid == os.getpid() or not _pid_alive(pid)

    def _refuse(self, owner: tuple[int, str] | None) -> None:
        who = f"pid {owner[0]} on {owner[1] or 'this machine'}" if owner else "unknown process"
        raise UserError(f"another dllmq run ({who}) is writing {self.out}; wait for it to finish or choose another "
                        f"--out (if no such run is active, delete {self.path})")

    def check(self) -> None:
        """Refuse at once if a live run holds the lock (cheap; `acquire` is what makes it safe)."""
        if self.path.exists():
            owner = self._owner(self.path)
            if owner is not None and not self._stale(owner):
                self._refuse(owner)

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner(self.path)
                if owner is None:  # maybe just created and not yet written: look again
                    time.sleep(0.2)
                    owner = self._owner(self.path)
                if not self._stale(owner):
                    self._refuse(owner)
                # take the stale lock over: move it aside first, so that only one taker wins
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = self._owner(aside)
                if moved != owner and not self._stale(moved):  # someone else took it over meanwhile: give it back
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        pass
                aside.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path}: {e.strerror}; choose a writable --out") \
                    from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            atexit.register(self.release)  # a run that fails before its writer's `with` still lets go
            return
        raise UserError(f"could not take the lock {self.path}; another dllmq run is probably writing {self.out}")

    def release(self) -> None:
        if self.held:
            self.held = False
            atexit.unregister(self.release)
            if self._owner(self.path) == (os.getpid(), socket.gethostname()):
                self.path.unlink(missing_ok=True)
