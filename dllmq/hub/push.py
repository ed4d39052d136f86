"""Validate a checkpoint folder and upload it to the Hugging Face Hub.

Only files the manifest vouches for (sha256 checked first) are uploaded, plus the manifest, a freshly
generated model card and the eval results it quotes: a stray file in the folder (notes, a token in a
.env, a half-written shard) is never published. The user's folder is not modified.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.format import MANIFEST, QuantizationConfig
from ..checkpoint.structure import check_folder
from ..checkpoint.writer import verify_manifest
from ..errors import UserError
from ..ui import err_console
from .checkpoint_info import Checkpoint

RESULT_NAMES = ("results.json", "eval_results.json")  # looked for in the checkpoint folder, in this order
CARD = "README.md"
LOGIN_HINT = "run `hf auth login` (`huggingface-cli login` with older huggingface_hub) or set HF_TOKEN"


@dataclass
class PushPlan:
    checkpoint: Checkpoint
    repo_id: str
    revision: str | None
    private: bool
    commit_message: str
    card: str
    uploads: dict[str, Path | bytes]  # path in repo -> local file or generated content
    results_file: str | None = None
    results_matched: bool | None = None  # None: no results; False: pushed anyway with --force

    def files(self) -> list[tuple[str, int]]:
        return [(name, len(src) if isinstance(src, bytes) else src.stat().st_size)
                for name, src in self.uploads.items()]

    def summary(self) -> dict:
        files = self.files()
        return {
            "checkpoint": str(self.checkpoint.path), "repo_id": self.repo_id, "revision": self.revision or "main",
            "private": self.private, "commit_message": self.commit_message,
            "files": [{"path": n, "bytes": b} for n, b in files], "bytes": sum(b for _, b in files),
            "not_uploaded": self.checkpoint.extra, "results_file": self.results_file,
            "results_matched": self.results_matched,
        }


def validate_checkpoint(path: str | Path) -> Checkpoint:
    from ..models.loading import read_config
    from ..models.registry import arch_for

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint folder {p} not found; pass the folder written by `dllmq quantize --out`")
    if not p.is_dir():
        raise UserError(f"{p} is a file; pass the checkpoint folder written by `dllmq quantize --out`")
    if p.name.endswith(".partial") or (p / "progress.json").exists():
        raise UserError(f"{p} is an unfinished quantization run (a .partial folder); finish it with "
                        "`dllmq quantize ... --resume` (same arguments) and push the output folder")
    if not (p / "config.json").exists():
        raise UserError(f"{p} is not a dllmq checkpoint (no config.json); pass the folder written by `dllmq quantize`")
    raw = read_config(p)
    if "quantization_config" not in raw:
        raise UserError(f"{p} holds a full-precision model, not a dllmq checkpoint; quantize it first with "
                        f"`dllmq quantize {p} --out <folder>` and push that folder")
    try:
        qcfg = QuantizationConfig.from_dict(raw["quantization_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"the quantization_config in {p / 'config.json'} is malformed ({type(e).__name__}: {e}); "
                        "re-create the checkpoint with `dllmq quantize`") from None
    if not (p / MANIFEST).exists():
        raise UserError(f"{p} has no {MANIFEST}: it was not written by `dllmq quantize` or is incomplete; "
                        "re-create the checkpoint")
    manifest = verify_manifest(p)  # sha256 of every listed file; raises UserError on any mismatch
    check_folder(p, raw)  # and structure: every layer the config describes, with its shapes and dtypes
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not any(str(f).endswith(".safetensors") for f in listed):
        raise UserError(f"{p / MANIFEST} lists no safetensors files; re-create the checkpoint with `dllmq quantize`")
    for name in listed:
        # a manifest naming paths outside the folder must not make us upload them
        if "/" in name or "\\" in name or name.startswith(".") or name in (MANIFEST, CARD):
            raise UserError(f"{p / MANIFEST} lists an unexpected file name {name!r}; re-create the checkpoint")
    files = {name: (p / name).stat().st_size for name in sorted(listed)}
    files[MANIFEST] = (p / MANIFEST).stat().st_size
    extra = sorted(e.name for e in p.iterdir() if e.name not in files)
    return Checkpoint(p, raw, qcfg, manifest, arch_for(raw).family, files, extra)


def find_results(ckpt: Checkpoint, explicit: Path | None) -> tuple[Path | None, dict | None]:
    """The eval results for the card: --results, else results.json / eval_results.json in the folder."""
    if explicit is not None:
        f = Path(explicit).expanduser()
        if not f.is_file():
            raise UserError(f"--results {f}: no such file; pass the JSON written by `dllmq eval --output`")
        return f, _read_results(f, strict=True)
    for name in RESULT_NAMES:
        f = ckpt.path / name
        if f.is_file():
            doc = _read_results(f, strict=False)
            return (f, doc) if doc is not None else (None, None)
    return None, None


def _read_results(f: Path, strict: bool) -> dict | None:
    try:
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{f} is not a results JSON object ({str(e).splitlines()[0]})"
        if strict:
            raise UserError(f"--results: {msg}; pass the file written by `dllmq eval --output`") from None
        err_console.print(f"[yellow]warning:[/yellow] {msg}; the card will have no results table", highlight=False)
        return None


def match_results(ckpt: Checkpoint, doc: dict, source: Path) -> tuple[dict | None, str | None]:
    """-> (the record of this checkpoint, None) or (None, why the results do not belong to it).

    `dllmq eval --output` writes one record per model ({"label", "model", ...}, full precision first); a record
    is this checkpoint when its model is this folder, or a dllmq checkpoint with the same base model and the
    same quantization_config; a full-precision record must name the checkpoint's base model.
    """
    records = [m for m in doc.get("models", []) if isinstance(m, dict)] if isinstance(doc.get("models"), list) else []
    if not any(isinstance(r.get("model"), str) and r["model"] for r in records):
        return None, "it has no per-model records naming a model (not a file from `dllmq eval --output`)"
    own, problems = None, []
    for rec in records:
        name = rec.get("model")
        if not isinstance(name, str) or not name:
            continue
        folder = _resolve_model(name, source)
        qc = _quant_config(folder) if folder is not None else None
        if qc is not None:
            if folder.resolve() == ckpt.path.resolve():
                own = own or rec
                continue
            why = _qcfg_difference(ckpt, folder, qc)
            if why:
                problems.append(f"its record for {name} is a checkpoint with {why}")
            else:
                own = own or rec
        elif str(rec.get("label", "")).startswith("full precision") and not _is_base(ckpt, name, folder):
            problems.append(f"its full-precision record is {name}, but this checkpoint was made from "
                            f"{ckpt.manifest.get('base_model') or 'an unknown model'}")
    if problems:
        return None, problems[0]
    if own is None:
        names = ", ".join(str(r.get("model")) for r in records if r.get("model"))
        return None, (f"none of its models ({names}) is this checkpoint or a local checkpoint with the same base "
                      f"model and quantization settings")
    return own, None


def _resolve_model(name: str, source: Path) -> Path | None:
    p = Path(name).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, source.parent / p]):
        if cand.is_dir():
            return cand
    return None


def _quant_config(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def _manifest(folder: Path) -> dict:
    try:
        m = json.loads((folder / MANIFEST).read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def _qcfg_difference(ckpt: Checkpoint, folder: Path, qc: dict) -> str | None:
    try:
        theirs = QuantizationConfig.from_dict(qc).to_dict()
    except (KeyError, TypeError, ValueError, AttributeError):
        return "a malformed quantization_config"
    ours = ckpt.qcfg.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            return f"different {key}.{sub} ({b.get(sub)!r}, this checkpoint {a.get(sub)!r})"
        if isinstance(a, list) and isinstance(b, list) and len(a) + len(b) > 6:
            return f"different {key} ({len(b)} entries, this checkpoint {len(a)})"
        return f"different {key} ({b!r}, this checkpoint {a!r})"
    base, other = ckpt.manifest.get("base_model"), _manifest(folder).get("base_model")
    if other and base and other != base:
        return f"a different base model ({other}, this checkpoint {base})"
    return None


def _is_base(ckpt: Checkpoint, name: str, folder: Path | None) -> bool:
    bases = [b for b in (ckpt.manifest.get("base_model"), ckpt.manifest.get("base_model_path")) if isinstance(b, str)]
    if name in bases:
        return True
    if folder is not None:
        return any(Path(b).expanduser().is_dir() and Path(b).expanduser().resolve() == folder.resolve() for b in bases)
    return False


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UserError(f"REPO_ID must be 'owner/name' (your user or organisation, then the model name), "
                        f"got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"invalid REPO_ID {repo_id!r}: {str(e).splitlines()[0]}") from None
    return repo_id


def plan_push(checkpoint: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
              commit_message: str | None = None, results: Path | None = None, force: bool = False) -> PushPlan:
    """Everything up to the network: validation, the card, the list of files. Used by --dry-run too."""
    from .._version import __version__
    from .card import build_card, scheme

    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise UserError("--revision must name a branch, e.g. --revision w4-g128")
    ckpt = validate_checkpoint(checkpoint)
    results_path, results_doc = find_results(ckpt, results)
    own, matched = None, None
    if results_path is not None:
        own, why = match_results(ckpt, results_doc, results_path)
        matched = why is None
        if why and not force:
            raise UserError(f"{'--results ' if results is not None else ''}{results_path} does not belong to this "
                            f"checkpoint: {why}; pass the results of `dllmq eval {ckpt.path.name} --output`, "
                            "or --force to push them anyway")
    uploads: dict[str, Path | bytes] = {name: ckpt.path / name for name in ckpt.files}
    results_name = None
    if results_path is not None:
        # an in-folder file keeps its name; an outside one gets a fixed name that cannot clash
        in_folder = results_path.parent.resolve() == ckpt.path.resolve()
        results_name = results_path.name if in_folder and results_path.name not in uploads else "eval_results.json"
        uploads[results_name] = results_path
        if in_folder:
            ckpt.extra = [e for e in ckpt.extra if e != results_path.name]
    card = str(build_card(ckpt, repo_id, results_doc, results_name, record=own))
    uploads[CARD] = card.encode()
    message = commit_message or (f"Upload {scheme(ckpt).upper()} {ckpt.qcfg.method} checkpoint "
                                 f"(dllmq {__version__})")
    return PushPlan(ckpt, repo_id, revision, private, message, card, uploads, results_name, matched)


def upload(plan: PushPlan) -> dict:
    """Create the repo (and branch) if needed and upload everything in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to push "
                        "(or use --dry-run to check the upload)")
    token = _token()
    api = HfApi()
    repo = plan.repo_id
    with _hub_errors(repo, plan.revision, token):
        url = api.create_repo(repo, private=True if plan.private else None, exist_ok=True)
        if plan.private and api.repo_info(repo).private is False:
            # the Hub ignores `private` for an existing repo: never publish what was meant to be private
            raise UserError(f"{repo} already exists and is public; --private only applies to new repos: make it "
                            "private in its settings on the Hub first, or drop --private")
        if plan.revision and plan.revision != "main":
            api.create_branch(repo, branch=plan.revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for name, src in plan.uploads.items()]
        info = api.create_commit(repo, operations=ops, commit_message=plan.commit_message, revision=plan.revision)
    return {**plan.summary(), "url": str(url), "commit_url": info.commit_url, "commit": info.oid}


def token_available() -> bool:
    try:
        return _token() is not None
    except UserError:
        return False


def _token() -> str:
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as e:  # e.g. a failed OIDC exchange in CI
        raise UserError(f"cannot get a Hugging Face token ({type(e).__name__}); {LOGIN_HINT}") from None
    if not token:
        raise UserError(f"no Hugging Face token found: {LOGIN_HINT} to a token with write access "
                        "(--dry-run needs none)")
    return token


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, token: str):
    """Turn huggingface_hub / network failures into one-line UserErrors that never contain the token."""
    from huggingface_hub.utils import HfHubHTTPError

    try:
        yield
    except UserError:
        raise
    except HfHubHTTPError as e:
        raise UserError(_scrub(_http_message(e, repo, revision), token)) from None
    except ValueError as e:  # e.g. the Hub rejected the card's YAML, or answered with a malformed response
        raise UserError(_scrub(f"upload to {repo} failed: {_one_line(e)}", token)) from None
    except Exception as e:  # network failures come in many types (httpx, requests, OSError)
        raise UserError(_scrub(f"pushing to {repo} failed ({type(e).__name__}: {_one_line(e)}); "
                               "check your network, proxy or HF_ENDPOINT and try again", token)) from None


def _http_message(e, repo: str, revision: str | None) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    server = _first_line(getattr(e, "server_message", None) or "")
    detail = f": {server}" if server else ""
    owner = repo.split("/")[0]
    if code == 401:
        return f"the Hub rejected the token (401 Unauthorized{detail}); {LOGIN_HINT} to a valid token"
    if code == 403:
        return (f"no write access to {repo} (403 Forbidden{detail}); use a token with write permission for "
                f"'{owner}' (fine-grained tokens need write access to that namespace)")
    if code == 404:
        if type(e).__name__ == "RevisionNotFoundError" and revision:
            return f"branch {revision!r} not found in {repo} (404){detail}; check --revision"
        return (f"{repo} not found (404{detail}); check the owner name and that your token can write to "
                f"'{owner}'")
    if code == 409:
        return f"the Hub refused the change to {repo} (409 Conflict{detail}); try again"
    if code == 413:
        return f"the upload to {repo} is too large for the Hub (413{detail})"
    if code == 429:
        return f"the Hub is rate-limiting this account (429{detail}); wait a few minutes and try again"
    return f"the Hub returned HTTP {code} while pushing {repo}{detail or ': ' + _first_line(e)}; try again later"


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _one_line(e, limit: int = 400) -> str:
    """All of a multi-line message (e.g. the Hub's list of card YAML errors) on one line."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
