"""Console output shared by the CLI and long-running library calls: progress bars with ETA on
stderr (so --json output on stdout stays clean), and result tables."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

err_console = Console(stderr=True)
# piped output (files, scripts) is not wrapped at rich's default 80 columns
out_console = Console(width=None if sys.stdout.isatty() else 200)


def progress(enabled: bool = True, console: Console | None = None) -> Progress:
    """A progress display on stderr (`console`, default err_console) with an ETA from the work done so far
    (:class:`EtaColumn`). Off when `enabled` is false (--json) or stderr is not a terminal. While it runs it is
    the *active* display: library code deep in a call adds its own lines with :func:`bar`."""
    console = console or err_console
    return _ActiveProgress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        EtaColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=False,
    )


def table(title: str, columns: list[str], rows: list[list], console: Console | None = None,
          justify: str = "right") -> None:
    """A table whose first column is left-aligned and the others `justify`-aligned (numbers: right)."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else justify)
    for r in rows:
        t.add_row(*[fmt(x) for x in r])
    (console or out_console).print(t)


def piped_width(default: int = 100) -> int | None:
    """Width for output that is not a terminal (a pipe, a file): $COLUMNS, else the width of the terminal
    the command runs in (stderr or stdin may still be one), else `default`. None on a terminal (rich measures)."""
    if sys.stdout.isatty():
        return None
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    for stream in (sys.stderr, sys.stdin):
        try:
            if stream is not None and stream.isatty():
                return os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            continue
    return default


def fitted_console() -> Console:
    """stdout sized to the terminal, or to `piped_width()` when piped (`dllmq info | less` stays readable)."""
    return Console(width=piped_width())


WORST_LAYERS = 10


def layer_table(title: str, layers: list[dict], verbose: bool = False, worst: int = WORST_LAYERS,
                console: Console | None = None) -> None:
    """Per-layer errors ({name, shape, rel_error, seconds}): by default the `worst` layers by error plus the
    mean and totals (LLaDA-8B has 224 layers); every layer, in model order, with verbose."""
    if not layers:
        return
    n = len(layers)
    shown = layers if verbose or n <= worst else sorted(layers, key=lambda r: -r["rel_error"])[:worst]
    summarized = len(shown) < n
    t = Table(title=title, title_justify="left", caption_justify="left",
              caption=f"the {worst} worst of {n} layers by rel. error; --verbose shows all" if summarized else None)
    for c in ("layer", "shape", "rel. error", "seconds"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for r in shown:
        t.add_row(r["name"], "x".join(map(str, r["shape"])), fmt(r["rel_error"]), f"{r['seconds']:.3f}")
    t.add_section()
    errs = sum(r["rel_error"] for r in layers)
    secs = sum(r["seconds"] for r in layers)
    params = sum(_prod(r["shape"]) for r in layers)
    t.add_row(f"mean of {n} layers", "", fmt(errs / n), f"{secs / n:.3f}")
    t.add_row(f"total of {n} layers", f"{human_count(params)} weights", "", f"{secs:.3f}")
    (console or out_console).print(t)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def fmt(x) -> str:
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3e}"
        return f"{x:.4f}"
    return str(x)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------------ progress
# (used by progress() above; module-level names are resolved when progress() runs)
import threading as _threading  # noqa: E402
import time as _time  # noqa: E402

from rich.progress import ProgressColumn as _ProgressColumn  # noqa: E402
from rich.text import Text as _Text  # noqa: E402

_active: list[Progress] = []  # the displays entered and not yet left, innermost last


class _ActiveProgress(Progress):
    """A Progress that registers itself as the active display while entered (see :func:`bar`)."""

    def __enter__(self):
        out = super().__enter__()
        _active.append(self)
        return out

    def __exit__(self, *exc):
        if self in _active:
            _active.remove(self)
        return super().__exit__(*exc)


def active_progress() -> Progress | None:
    """The innermost display entered with `progress()` (None when there is none)."""
    return _active[-1] if _active else None


def _clock(task) -> float:
    return task.get_time() if hasattr(task, "get_time") else _time.monotonic()


class EtaColumn(_ProgressColumn):
    """Time remaining = (remaining work) x (seconds per unit of work done so far), counting down between updates.

    rich's TimeRemainingColumn divides by a speed measured over the last 30 s of *updates*, and shows the value
    of the last update until the next one. When the units advance in bursts with long silent stretches between
    them (the linears of a block are quantized back to back after the block's forward passes), the 30-s window
    only holds the burst: it reported "eta 0:00:01" for the whole of the next block. Here the rate is the time
    from the task's start to its latest advance over the units done since the start (the task field
    ``done_before`` excludes units finished by an earlier, resumed run), and the estimate keeps counting down
    while the current unit runs, never below the units after it."""

    max_refresh = None

    def __init__(self, table_column=None):
        super().__init__(table_column=table_column)
        self._last: dict = {}  # task id -> (completed, time it was first seen)
        self._lock = _threading.Lock()

    def estimate(self, task, now: float | None = None) -> float | None:
        if task.finished:
            return 0.0
        if task.total is None or task.start_time is None:
            return None
        now = _clock(task) if now is None else now
        with self._lock:
            seen = self._last.get(task.id)
            if seen is None or seen[0] != task.completed:
                seen = self._last[task.id] = (task.completed, now)
        done = task.completed - float(task.fields.get("done_before", 0) or 0)
        if done <= 0:
            return None
        rate = max(seen[1] - task.start_time, 0.0) / done  # seconds per unit
        remaining = max(task.total - task.completed, 0.0)
        return max(rate * remaining - (now - seen[1]), rate * max(remaining - 1, 0.0), 0.0)

    def render(self, task) -> _Text:
        eta = self.estimate(task)
        if eta is None:
            return _Text("-:--:--", style="progress.remaining")
        m, s = divmod(int(round(eta)), 60)
        h, m = divmod(m, 60)
        return _Text(f"{h:d}:{m:02d}:{s:02d}", style="progress.remaining")


class Bar:
    """One line of the active progress display; every method is a no-op when there is no display, so
    library code can report progress unconditionally."""

    def __init__(self, prog: Progress | None, task_id=None):
        self.prog, self.id = prog, task_id

    def __bool__(self) -> bool:  # false when nothing is shown: callers may skip the work of reporting
        return self.prog is not None and not self.prog.disable

    def advance(self, n: float = 1, info: str | None = None) -> None:
        if self.prog is not None:
            kw = {} if info is None else {"info": info}
            self.prog.update(self.id, advance=n, **kw)

    def update(self, **kw) -> None:
        if self.prog is not None:
            self.prog.update(self.id, **kw)

    @property
    def completed(self) -> float:
        return self.prog.tasks[self._index()].completed if self.prog is not None else 0.0

    def _index(self) -> int:
        return next(i for i, t in enumerate(self.prog.tasks) if t.id == self.id)


@contextlib.contextmanager
def bar(description: str, total: float | None, info: str = "", keep: bool = True, prog: Progress | None = None,
        show: bool = False, **fields):
    """A line on `prog` (default: the active display) for the duration of the block; removed at the end
    unless `keep`. Without a display, `show=True` opens one (on stderr, when it is a terminal) for the block.
    Yields a :class:`Bar` (a no-op when there is no display)."""
    prog = prog if prog is not None else active_progress()
    if prog is None:
        if show:
            with progress(True) as own:
                with bar(description, total, info, keep, own, **fields) as b:
                    yield b
        else:
            yield Bar(None)
        return
    tid = prog.add_task(description, total=total, info=info, **fields)
    try:
        yield Bar(prog, tid)
    finally:
        if not keep:
            prog.remove_task(tid)
