"""`dllmq push`: publish a checkpoint to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..ui import err_console, human_bytes, out_console, table
from .options import JsonOpt, _emit_json


def push(
    checkpoint: Path = typer.Argument(..., help="A dllmq checkpoint folder (the --out of `dllmq quantize`)."),
    repo_id: str = typer.Argument(..., help="Hub repo to push to, owner/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private. An existing repo keeps its visibility; pushing to an existing public repo with --private is refused."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to, created from main if missing (default: main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message (default: 'Upload W<w>A<a> <method> checkpoint (dllmq <version>)')."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, then show the files and the whole model card that would be uploaded; upload nothing (no token needed)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Eval results JSON (from `dllmq eval --output`) for the card's table and model-index; default: results.json or eval_results.json in the checkpoint folder. They must be this checkpoint's: a record naming this folder, or a checkpoint with the same base model and quantization settings."),
    force: bool = typer.Option(False, "--force", help="Use the results even when they cannot be matched to this checkpoint."),
    json_out: bool = JsonOpt,
):
    """Upload CHECKPOINT to the Hub as REPO_ID, with a model card (README.md) generated from it.

    The checkpoint's sha256 hashes are checked first; only its own files, the manifest, the card and the
    eval results are uploaded. The token comes from HF_TOKEN or `hf auth login` and is never printed.

    Examples:
      [bold]dllmq push ./LLaDA-8B-Instruct-w4 my-user/LLaDA-8B-Instruct-w4-rtn --dry-run[/bold]
      [bold]dllmq push ./LLaDA-8B-Instruct-w4 my-user/LLaDA-8B-Instruct-w4-rtn --private --results results.json[/bold]
    """
    _check_push_args(checkpoint, repo_id, revision, results)  # cheap, before torch and huggingface_hub load
    from ..hub.push import plan_push, token_available, upload

    plan = plan_push(checkpoint, repo_id, revision=revision, private=private, commit_message=commit_message,
                     results=results, force=force)
    if dry_run:
        if json_out:
            _emit_json({**plan.summary(), "dry_run": True, "token_found": token_available(),
                        "card_metadata": _card_metadata(plan.card), "card": plan.card})
            return
        _print_plan(plan, title=f"Dry run: would upload to {repo_id}")
        out_console.print("Model card (README.md):", style="bold")
        out_console.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        if not token_available():
            err_console.print("[yellow]note:[/yellow] no Hugging Face token found; run `hf auth login` or set "
                              "HF_TOKEN before pushing", highlight=False, soft_wrap=True)
        return
    res = upload(plan)
    if json_out:
        _emit_json({**res, "dry_run": False})
        return
    _print_plan(plan, title=f"Uploaded to {repo_id}")
    out_console.print(f"[green]pushed[/green] {len(res['files'])} files ({human_bytes(res['bytes'])}) to "
                      f"{res['url']}  commit {res['commit_url']}", highlight=False, soft_wrap=True)


def _check_push_args(checkpoint: Path, repo_id: str, revision: Optional[str], results: Optional[Path]) -> None:
    """The checks that need neither torch nor huggingface_hub (hub/push.py repeats them, and checks the rest)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"REPO_ID must be 'owner/name' (your user or organisation, then the model name), "
                        f"got {repo_id!r}")
    if revision is not None and not revision.strip():
        raise UserError("--revision must name a branch, e.g. --revision w4-g128")
    p = checkpoint.expanduser()
    if not p.exists():
        raise UserError(f"checkpoint folder {p} not found; pass the folder written by `dllmq quantize --out`")
    if not p.is_dir():
        raise UserError(f"{p} is a file; pass the checkpoint folder written by `dllmq quantize --out`")
    if results is not None and not results.expanduser().is_file():
        raise UserError(f"--results {results.expanduser()}: no such file; pass the JSON written by `dllmq eval --output`")


def _print_plan(plan, title: str) -> None:
    s = plan.summary()
    table(title, ["file", "size"], [[f["path"], human_bytes(f["bytes"])] for f in s["files"]]
          + [["total", human_bytes(s["bytes"])]])
    out_console.print(f"repo {s['repo_id']}  revision {s['revision']}  "
                      f"{'private' if s['private'] else 'public (unless the repo or organisation is private)'}",
                      highlight=False, soft_wrap=True)
    if s["not_uploaded"]:
        err_console.print(f"[dim]not uploaded (not part of the checkpoint; a README.md is replaced by the generated "
                          f"card): {', '.join(s['not_uploaded'])}[/dim]", highlight=False, soft_wrap=True)


def _card_metadata(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()
