"""The `dllmq` command line: the app, its commands (one module each) and the error handling every command shares.

Every command takes MODEL as a local folder, a Hub id, or `tiny` (the bundled model), prints
tables for people and `--json` for scripts, and turns any user error into one line on stderr
with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import Interrupted, UserError
from ..ui import err_console, out_console
from .bench import bench
from .demo import demo
from .evaluate import eval_cmd
from .export import export as export_cmd
from .generate import generate
from .info import info
from .inspect_model import inspect
from .push import push as push_cmd
from .quantize import quantize

app = typer.Typer(
    name="dllmq",
    help="Quantize diffusion language models (LLaDA, Dream) into deployable low-bit checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# In the order `dllmq --help` lists them.
app.command()(quantize)
app.command()(info)
app.command(context_settings={"allow_extra_args": True})(generate)  # extra words: refused with a hint to quote
app.command("eval")(eval_cmd)
app.command()(inspect)
app.command()(bench)
app.command()(demo)


def _export_with_overwrite(cmd):
    """cli/export.py's command plus --overwrite, as on `dllmq quantize`: a non-empty --out is moved aside, the
    export written, and the old folder deleted only once the new one is complete (restored on any failure)."""
    import functools
    import inspect as pyinspect

    @functools.wraps(cmd)
    def export(*args, overwrite: bool = False, **kw):
        out, src = Path(kw["out"]).expanduser(), Path(kw["checkpoint"]).expanduser()
        if not (out.is_dir() and any(out.iterdir())):
            return cmd(*args, **kw)
        if not overwrite:  # as quantize says it
            raise UserError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it or "
                            "choose another --out")
        if src.exists() and (src.resolve() == out.resolve() or out.resolve() in src.resolve().parents):
            raise UserError(f"--out {out} holds the checkpoint itself; --overwrite would delete it: give another --out")
        if out.resolve() in (Path.cwd(), *Path.cwd().parents, Path.home()):
            raise UserError(f"--out {out} is the current folder, one above it or your home; --overwrite would delete "
                            "it: give the export's own folder")
        import shutil

        old = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        try:
            res = cmd(*args, **kw)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True) if out.exists() else None
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return res

    sig = pyinspect.signature(cmd, eval_str=True)
    params = list(sig.parameters.values())
    at = [q.name for q in params].index("out") + 1
    params.insert(at, pyinspect.Parameter(
        "overwrite", pyinspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool,
        default=typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty (the old "
                             "folder is deleted only once the new export is complete).")))
    export.__signature__ = sig.replace(parameters=params)
    export.__annotations__ = {**{q.name: q.annotation for q in params}, "return": sig.return_annotation}
    return export


app.command("export")(_export_with_overwrite(export_cmd))
app.command("push")(push_cmd)


def _show_version(value: bool) -> None:
    if value:
        from .._version import __version__

        out_console.print(f"dllmq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Quantize diffusion language models (LLaDA, Dream) into deployable low-bit checkpoints."""


def _is_click(e: BaseException, kind: str) -> bool:
    """Is `e` click's `kind` (ClickException, Exit, Abort)? typer >= 0.29 ships its own copy of click
    (`typer._click`, with Exit and Abort in `typer.exceptions`), older typer uses click itself; both
    flavours are handled so that a usage error never escapes as a traceback."""
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        mod = sys.modules.get(name)
        cls = getattr(mod, kind, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def _interrupted() -> None:
    err_console.print("[yellow]interrupted[/yellow]: stopped before any checkpoint file was written; nothing was "
                      "kept, rerun the command", highlight=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except Interrupted as e:  # Ctrl-C during quantize: says what was kept and how to continue
        err_console.print(f"[yellow]interrupted:[/yellow] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except UserError as e:  # escaped: a message may hold brackets (pip install 'dllmq[plot]', a regex)
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        if isinstance(e, typer.Exit) or _is_click(e, "Exit"):
            sys.exit(getattr(e, "exit_code", 0))
        if _is_click(e, "ClickException"):  # usage errors: usage line, hint, message
            e.show()
            if getattr(e, "ctx", None) is None:
                err_console.print("Try 'dllmq --help' for help.", highlight=False)
            sys.exit(2)
        if _is_click(e, "Abort"):
            _interrupted()  # older click turns Ctrl-C into Abort
        raise
    # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, returns the code
    if rc == 130:
        _interrupted()
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
