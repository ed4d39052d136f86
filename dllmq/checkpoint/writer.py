"""Write a checkpoint atomically: everything goes into a temporary folder beside the target,
which is renamed into place only after the last file and the manifest (with sha256 of every
file) are written. An interrupted or failed run leaves no folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import UserError
from .format import MANIFEST

SHARD_BYTES = 2 * 1024**3
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
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the parent folder {parent}: {e.strerror}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write into {parent}: permission denied; choose a writable --out")


class CheckpointWriter:
    """Collects tensors into size-capped safetensors shards inside a temporary sibling folder."""

    def __init__(self, out: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES):
        self.out = Path(out)
        check_target(self.out, overwrite)
        self.overwrite = overwrite
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.resolve().parent))
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self._pending[name] = t
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"model-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(self.tmp / fname), metadata={"format": "pt"})
        self._shards.append((fname, list(self._pending)))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def finalize(self, config: dict, source: Path, manifest: dict) -> Path:
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (fname, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / fname).rename(self.tmp / final)
            weight_map.update({k: final for k in names})
        (self.tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
        )
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES:
            if (source / f).exists():
                shutil.copy2(source / f, self.tmp / f)
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file())
        manifest = {
            "tool": "dllmq",
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
        if exc_type is not None:
            self.abort()
        return False


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
