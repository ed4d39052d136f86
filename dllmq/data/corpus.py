"""Bundled offline text corpus: chunks of the CPython standard library sources.

Every Python install carries its standard library as ``.py`` source, so this
corpus needs no download and no network.  It is used

* as the plain-text part of the tiny model's training mixture
  (:func:`dllmq.data.synthetic.training_stream`), and
* as the default offline calibration set (:func:`calibration_texts`).

Selection rule (deterministic for a given Python installation):

* root: ``sysconfig.get_paths()["stdlib"]``;
* only ``*.py`` files; any path with a component named ``test``, ``tests``,
  ``site-packages``, ``idlelib``, ``lib2to3``, ``encodings`` (codec tables),
  ``__pycache__``, ``lib-dynload`` or ``config-*`` is skipped, as are the
  generated ``_sysconfigdata*`` modules;
* files are sorted by relative path (POSIX form), then visited in an order
  shuffled by ``seed`` until ``max_total_chars`` characters have been read
  (each file contributes at most ``max_chars_per_file``);
* each file is cut into chunks of at most ``max_chars_per_doc`` characters at
  blank-line boundaries (long blocks are cut at line boundaries), chunks shorter
  than ``min_chars`` are dropped, and the final list is shuffled by ``seed``.

The text differs between Python versions (the stdlib changes), so results are
identical only for the same interpreter version.
"""

from __future__ import annotations

import functools
import os
import random
import sysconfig
from pathlib import Path

__all__ = [
    "stdlib_dir",
    "stdlib_files",
    "stdlib_documents",
    "calibration_texts",
    "EXCLUDED_DIRS",
]

#: Directory names whose contents are never read.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "encodings",
        "__pycache__",
        "lib-dynload",
    }
)

DEFAULT_MAX_CHARS_PER_DOC = 1200
DEFAULT_MAX_TOTAL_CHARS = 6_000_000
DEFAULT_MAX_CHARS_PER_FILE = 120_000
DEFAULT_MIN_CHARS = 120


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    for part in rel.parts[:-1]:
        if part in EXCLUDED_DIRS or part.startswith("config-"):
            return True
    name = rel.name
    return name.startswith("_sysconfigdata") or not name.endswith(".py")


@functools.lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[Path, ...]:
    """All eligible stdlib ``.py`` files, sorted by relative POSIX path."""
    base = Path(root) if root is not None else stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # prune excluded directories early (in place, so os.walk skips them)
        dirnames[:] = [
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")
        ]
        for fn in filenames:
            path = Path(dirpath) / fn
            rel = path.relative_to(base)
            if not _excluded(rel):
                found.append((rel.as_posix(), path))
    found.sort(key=lambda t: t[0])
    return tuple(p for _, p in found)


def _split_blocks(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at blank lines, else at lines."""
    blocks: list[str] = []
    for block in text.split("\n\n"):
        block = block + "\n\n"
        if len(block) <= max_chars:
            blocks.append(block)
            continue
        cur = ""
        for line in block.splitlines(keepends=True):
            while len(line) > max_chars:  # pathological very long line
                if cur:
                    blocks.append(cur)
                    cur = ""
                blocks.append(line[:max_chars])
                line = line[max_chars:]
            if len(cur) + len(line) > max_chars:
                blocks.append(cur)
                cur = ""
            cur += line
        if cur:
            blocks.append(cur)
    return blocks


def _chunk_file(text: str, max_chars: int, min_chars: int) -> list[str]:
    chunks: list[str] = []
    cur = ""
    for block in _split_blocks(text, max_chars):
        if cur and len(cur) + len(block) > max_chars:
            chunks.append(cur)
            cur = ""
        cur += block
    if cur:
        chunks.append(cur)
    out = []
    for c in chunks:
        c = c.strip("\n") + "\n"
        if len(c.strip()) >= min_chars:
            out.append(c)
    return out


@functools.lru_cache(maxsize=8)
def _documents_cached(
    max_chars_per_doc: int,
    seed: int,
    max_total_chars: int,
    max_chars_per_file: int,
    min_chars: int,
    root: str | None,
) -> tuple[str, ...]:
    files = list(stdlib_files(root))
    rng = random.Random(f"stdlib-files-{seed}")
    rng.shuffle(files)
    docs: list[str] = []
    total = 0
    for path in files:
        if total >= max_total_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n")[:max_chars_per_file]
        total += len(text)
        docs.extend(_chunk_file(text, max_chars_per_doc, min_chars))
    random.Random(f"stdlib-docs-{seed}").shuffle(docs)
    return tuple(docs)


def stdlib_documents(
    max_chars_per_doc: int = DEFAULT_MAX_CHARS_PER_DOC,
    seed: int = 0,
    max_total_chars: int = DEFAULT_MAX_TOTAL_CHARS,
    max_chars_per_file: int = DEFAULT_MAX_CHARS_PER_FILE,
    min_chars: int = DEFAULT_MIN_CHARS,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Chunks of stdlib source text (code and docstrings), shuffled by ``seed``.

    Deterministic for a given interpreter; cached per argument set.  With the
    defaults about 6 M characters are read (well under a few seconds).
    """
    if max_chars_per_doc < 16:
        raise ValueError("max_chars_per_doc must be at least 16")
    docs = _documents_cached(
        int(max_chars_per_doc),
        int(seed),
        int(max_total_chars),
        int(max_chars_per_file),
        int(min_chars),
        None if root is None else str(root),
    )
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {root or stdlib_dir()}")
    return list(docs)


def calibration_texts(
    n: int = 128,
    seed: int = 0,
    max_chars_per_doc: int = DEFAULT_MAX_CHARS_PER_DOC,
) -> list[str]:
    """``n`` stdlib text samples: the default offline calibration set.

    Samples are distinct chunks while the corpus has enough (it holds thousands);
    beyond that they repeat in a seeded order.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    docs = stdlib_documents(max_chars_per_doc=max_chars_per_doc, seed=seed)
    rng = random.Random(f"calibration-{seed}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[str] = []
    while len(out) < n:
        out.extend(docs[i] for i in order[: n - len(out)])
    return out
