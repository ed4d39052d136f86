"""Write a checkpoint atomically: everything goes into a temporary folder beside the target,
which is renamed into place only after the last file and the manifest (with sha256 of every
file) are written. An interrupted or failed run leaves no folder that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..errors import Interrupted, UserError
from .format import MANIFEST
from .lock import RunLock

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def check_target(out: Path, overwrite: bool) -> None:
    """Fail before any work if the output folder cannot be (over)written."""
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; choose a folder path with --out")
    check_parent_writable(out)


def check_parent_writable(out: Path) -> None:
    """Create the folder that will hold `out` and check it is writable, with a one-line error if not."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the parent folder {parent}: {e.strerror}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write into {parent}: permission denied; choose a writable --out")


def _file_mode() -> int:
    """The mode a plain `open(..., "w")` would give a new file (0o666 less the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class CheckpointWriter:
    """Writes named safetensors shards into `.<name>.partial` beside the target, then renames.

    The partial folder has a fixed name so an interrupted run can be resumed: progress (which
    blocks are done, plus any state the pipeline needs) is saved there atomically after each
    shard. Without --resume (or with different arguments) a partial folder is discarded, with
    a message. A lock file beside the target refuses a second run on the same output.
    """

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False, run_key: str | None = None):
        self.out = Path(out)
        check_target(self.out, overwrite)
        self.overwrite = overwrite
        self.tmp = self.out.resolve().parent / f".{self.out.name}.partial"
        self.run_key = run_key
        self.progress: dict = {}
        self.lock = RunLock(self.out)
        self.lock.acquire()
        try:
            check_target(self.out, overwrite)  # again: another run may have finished while we waited for the lock
            self._open_partial(resume)
        except BaseException:
            self.lock.release()
            raise

    def _open_partial(self, resume: bool) -> None:
        from ..ui import err_console

        if self.tmp.exists():
            prog = self._read_progress()
            done = prog.get("blocks_done", 0)
            if resume and prog.get("run_key") == self.run_key:
                self.progress = prog
                err_console.print(f"resuming the interrupted run in {self.tmp} after {done} finished block(s)",
                                  highlight=False)
            else:
                why = ("it was started with different arguments" if resume else
                       "pass --resume with the same arguments to continue such a run instead")
                err_console.print(f"[yellow]note:[/yellow] found an interrupted run in {self.tmp} ({done} finished "
                                  f"block(s)); discarding it and starting over ({why})", highlight=False)
                shutil.rmtree(self.tmp)
        elif resume:
            err_console.print(f"[yellow]note:[/yellow] --resume: no interrupted run to continue for {self.out}; "
                              "starting from the beginning", highlight=False)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.tmp / "state"
        self.state_dir.mkdir(exist_ok=True)

    @property
    def resumed(self) -> bool:
        return bool(self.progress)

    def _read_progress(self) -> dict:
        f = self.tmp / "progress.json"
        try:
            return json.loads(f.read_text()) if f.exists() else {}
        except json.JSONDecodeError:
            return {}

    def save_progress(self, progress: dict) -> None:
        self.progress = {**progress, "run_key": self.run_key}
        f = self.tmp / "progress.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.progress, indent=2))
        os.replace(tmp, f)

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard (sorted into the final file order by `name`)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tmp = self.tmp / f"{name}.safetensors.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, _file_mode())  # safetensors creates 0600 files; the others follow the umask
            os.replace(tmp, self.tmp / f"{name}.safetensors")
        except Exception as e:
            if not is_disk_full(e):
                raise
            tmp.unlink(missing_ok=True)
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise DiskFull(self.tmp, f"writing {name}", need) from None

    def finalize(self, config: dict, source: Path, manifest: dict) -> Path:
        from .structure import check_structure, read_headers

        shards = sorted(p.name for p in self.tmp.glob("*.safetensors"))
        # structural check before anything is renamed: every layer the config describes, with its shapes
        # and dtypes; an unloadable result (e.g. a --resume after a block file was deleted) is never committed
        try:
            check_structure(config, read_headers(self.tmp, shards), self.out,
                            hint="nothing was written; rerun the command without --resume", folder=self.tmp)
        except UserError as e:
            self.abort()  # the partial run cannot produce a loadable checkpoint: do not offer to resume it
            raise UserError(f"{e} (the partial run in {self.tmp} was damaged and has been discarded)") from None
        n = len(shards)
        weight_map, total = {}, 0
        for i, fname in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            from safetensors import safe_open

            with safe_open(self.tmp / fname, "pt") as f:
                for k in f.keys():
                    weight_map[k] = final
                    sl = f.get_slice(k)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    total += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
            (self.tmp / fname).rename(self.tmp / final)
        weight_map = dict(sorted(weight_map.items()))
        (self.tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES:
            if (source / f).exists():
                shutil.copyfile(source / f, self.tmp / f)  # mode from the umask, like the shards
        # progress.json and the state folder stay until the manifest is written: a disk that fills up here
        # leaves a partial run that --resume can still finish
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file() and p.name != "progress.json")
        manifest = {
            "tool": "dllmq",
            "tool_version": __version__,
            "created": self.progress.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "files": {f: {"sha256": sha256_file(self.tmp / f), "bytes": (self.tmp / f).stat().st_size} for f in files},
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        (self.tmp / "progress.json").unlink(missing_ok=True)
        self._commit()
        self.lock.release()
        return self.out

    def _commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # keep a resumable partial folder after an interruption; drop one that holds nothing yet
        kept = exc_type is not None and bool(self.progress.get("blocks_done")) and self.tmp.exists()
        if exc_type is not None and not kept:
            self.abort()
        self.lock.release()
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            if kept:
                msg = (f"kept {self.progress['blocks_done']} finished block(s) in {self.tmp}; to continue, rerun "
                       "the same command with --resume (same arguments)")
            else:
                msg = f"no block had finished, so nothing was kept and {self.out} was not written; rerun the command"
            raise Interrupted(msg) from None
        if exc is not None and is_disk_full(exc):
            what = exc.what if isinstance(exc, DiskFull) else "writing the checkpoint"
            need = f"at least {_human(exc.need)} for it, " if isinstance(exc, DiskFull) and exc.need else ""
            free = _free_bytes(self.tmp.parent)
            head = (f"disk full while {what} in {self.tmp.parent}"
                    + (f" ({_human(free)} free)" if free is not None else ""))
            if kept:
                msg = (f"{head}; the partial run ({self.progress['blocks_done']} finished block(s)) is kept in "
                       f"{self.tmp}: free space ({need}more for the remaining blocks) and rerun the same command "
                       "with --resume to continue")
            else:
                msg = (f"{head}; nothing was kept and {self.out} was not written: free space ({need}about the size "
                       "of the model's weights at the chosen bits in all) and rerun the command")
            raise UserError(msg) from None
        return False


class DiskFull(UserError):
    """No space left while writing into the partial folder; CheckpointWriter.__exit__ words the message."""

    def __init__(self, folder: Path, what: str, need: int = 0):
        super().__init__(f"disk full while {what} in {folder}")
        self.what, self.need = what, need


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT as an OSError, or as the message of safetensors' own error (it does not raise OSError)."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return type(e).__name__ == "SafetensorError" and ("StorageFull" in text or "No space left" in text
                                                       or "code: 28," in text)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _human(n: int) -> str:
    from ..ui import human_bytes

    return human_bytes(n)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _listed_name(mf: Path, name) -> str:
    """A manifest entry must name a plain file inside the checkpoint folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or ":" in name):
        raise UserError(f"{mf} lists {name!r}, which is not a plain file name inside the checkpoint; the manifest "
                        "was tampered with: re-create or re-download the checkpoint")
    return name


# Files that must all be covered by the manifest: what loading reads (weights, config, index, tokenizer).
# Other files beside them (README.md, a results.json for `push`) carry nothing that is loaded.
def _guarded(name: str) -> bool:
    return (name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json")
            or name in TOKENIZER_FILES)


def verify_manifest(path: Path) -> dict:
    """Check the checkpoint folder against its manifest; returns the manifest.

    The manifest is not trusted: every entry must be a plain file name whose file is a regular file,
    the listed files must be exactly the folder's weight, config and tokenizer files (so dropping an
    entry does not hide a modified file) and include every shard of the index; only then is each
    file's size and sha256 checked. Every problem is a one-line `UserError`.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise UserError(f"{path} has no {MANIFEST}; it was not written by dllmq or is incomplete")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{mf} is corrupt; re-create the checkpoint") from None
    except OSError as e:
        raise UserError(f"cannot read {mf}: {e.strerror}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise UserError(f"{mf} is malformed (no 'files' object); re-create or re-download the checkpoint")
    for name, info in files.items():
        _listed_name(mf, name)
        if (not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or isinstance(info["bytes"], bool)
                or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64):
            raise UserError(f"{mf} is malformed: the entry for {name} needs 'bytes' (an integer) and 'sha256'; "
                            "re-create or re-download the checkpoint")
    # every file that matters must be listed, and every shard of the index too
    present = {f.name for f in path.iterdir() if _guarded(f.name) and f.name != MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise UserError(f"{unlisted[0]} in {path} is not listed in {MANIFEST}: the checkpoint was modified; "
                        "re-create or re-download it")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            shards = set(wmap.values())
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            raise UserError(f"{index} is corrupt; re-create or re-download the checkpoint") from None
        missing = sorted(str(x) for x in shards - set(files))
        if missing:
            raise UserError(f"the index of {path} names {missing[0]}, which {MANIFEST} does not list: the checkpoint "
                            "was modified; re-create or re-download it")
    # regular files only (a device or a fifo would hang the hash), before anything is hashed
    for name in files:
        f = path / name
        try:
            st = f.stat()
        except FileNotFoundError:
            raise UserError(f"{name} is missing from {path}; the checkpoint is incomplete") from None
        except OSError as e:
            raise UserError(f"cannot read {name} in {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{name} in {path} is not a regular file; the checkpoint was tampered with: re-create or "
                            "re-download it")
    for name, info in files.items():
        f = path / name
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise UserError(f"{name} in {path} does not match its sha256 in {MANIFEST}: the file was modified or "
                            "corrupted; re-create or re-download the checkpoint")
    return manifest
