"""Write a checkpoint atomically: everything goes into a temporary folder beside the target,
which is renamed into place only after the last file and the manifest (with sha256 of every
file) are written. An interrupted or failed run leaves no folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import UserError
from .format import MANIFEST

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


class CheckpointWriter:
    """Writes named safetensors shards into `.<name>.partial` beside the target, then renames.

    The partial folder has a fixed name so an interrupted run can be resumed: progress (which
    blocks are done, plus any state the pipeline needs) is saved there atomically after each
    shard. Without --resume a stale partial folder is discarded.
    """

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False, run_key: str | None = None):
        self.out = Path(out)
        check_target(self.out, overwrite)
        self.overwrite = overwrite
        self.tmp = self.out.resolve().parent / f".{self.out.name}.partial"
        self.run_key = run_key
        self.progress: dict = {}
        if self.tmp.exists():
            prog = self._read_progress()
            if resume and prog.get("run_key") == run_key:
                self.progress = prog
            else:
                shutil.rmtree(self.tmp)
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
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.tmp / f"{name}.safetensors")

    def finalize(self, config: dict, source: Path, manifest: dict) -> Path:
        shards = sorted(p.name for p in self.tmp.glob("*.safetensors"))
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
                shutil.copy2(source / f, self.tmp / f)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        (self.tmp / "progress.json").unlink(missing_ok=True)
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file())
        manifest = {
            "tool": "dllmq",
            "tool_version": __version__,
            "created": self.progress.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "files": {f: {"sha256": sha256_file(self.tmp / f), "bytes": (self.tmp / f).stat().st_size} for f in files},
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        self._commit()
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

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # keep a resumable partial folder after an interruption; drop one that holds nothing yet
        if exc_type is not None and not self.progress.get("blocks_done"):
            self.abort()
        return False


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def verify_manifest(path: Path) -> dict:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    mf = path / MANIFEST
    if not mf.exists():
        raise UserError(f"{path} has no {MANIFEST}; it was not written by dllmq or is incomplete")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{mf} is corrupt; re-create the checkpoint") from None
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise UserError(f"{name} is missing from {path}; the checkpoint is incomplete")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise UserError(f"{name} in {path} does not match its sha256 in {MANIFEST}: the file was modified or "
                            "corrupted; re-create or re-download the checkpoint")
    return manifest
