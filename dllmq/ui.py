"""Console output shared by the CLI and long-running library calls: progress bars with ETA on
stderr (so --json output on stdout stays clean), and result tables."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err_console = Console(stderr=True)
# piped output (files, scripts) is not wrapped at rich's default 80 columns
out_console = Console(width=None if sys.stdout.isatty() else 200)


def progress(enabled: bool = True) -> Progress | contextlib.nullcontext:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled or not sys.stderr.isatty(),
        transient=False,
    )


def table(title: str, columns: list[str], rows: list[list], console: Console | None = None) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[fmt(x) for x in r])
    (console or out_console).print(t)


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
