"""Where calibration text comes from: --calib bundled | PATH.txt | PATH.jsonl | HUB_DATASET[:config][:split].

Items are either {"text": ...} (all tokens maskable) or {"prompt": ..., "response": ...}
(Instruct models: wrapped in the chat template, only the response is masked).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import UserError

# Hub datasets with known layouts: name -> (path, config, split, text field or (prompt, response) fields)
KNOWN = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "pile-val": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "gsm8k": ("openai/gsm8k", "main", "train", ("question", "answer")),
}


def load_items(calib: str, n: int, seed: int = 0) -> list[dict]:
    if n <= 0:
        raise UserError("--calib-samples must be positive")
    if calib in ("bundled", "tiny", "offline"):
        from .data import bundled_items

        return bundled_items(n, seed)
    p = Path(calib).expanduser()
    if p.exists():
        return _from_file(p, n, seed)
    return _from_hub(calib, n, seed)


def _from_file(p: Path, n: int, seed: int) -> list[dict]:
    if p.suffix == ".jsonl":
        items = []
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{p}:{i + 1} is not valid JSON; a .jsonl file needs one object per line") from None
            if "prompt" in d and "response" in d:
                items.append({"prompt": str(d["prompt"]), "response": str(d["response"])})
            elif "text" in d:
                items.append({"text": str(d["text"])})
            else:
                raise UserError(f"{p}:{i + 1} needs a 'text' field or 'prompt' and 'response' fields")
    else:
        text = p.read_text(errors="replace")
        paras = [t for t in text.split("\n\n") if t.strip()]
        items = [{"text": t} for t in paras]
    if not items:
        raise UserError(f"calibration file {p} holds no text")
    random.Random(seed).shuffle(items)
    return (items * (n // len(items) + 1))[:n]


def _from_hub(name: str, n: int, seed: int) -> list[dict]:
    parts = name.split(":")
    if parts[0] in KNOWN:
        path, config, split, field = KNOWN[parts[0]]
    else:
        path, config, split, field = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train"), "text"
    try:
        from datasets import load_dataset

        ds = load_dataset(path, config, split=split, streaming=True)
        rows = []
        for row in ds:
            if isinstance(field, tuple):
                rows.append({"prompt": row[field[0]], "response": row[field[1]]})
            elif len(str(row.get(field, "")).strip()) > 64:
                rows.append({"text": row[field]})
            if len(rows) >= 20 * n:
                break
    except Exception as e:  # offline, unknown dataset, missing field: one clear line
        raise UserError(
            f"cannot load calibration dataset {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use --calib bundled (offline), a local .txt/.jsonl file, or connect to the Hub"
        ) from None
    if not rows:
        raise UserError(f"calibration dataset {path!r} gave no usable rows")
    random.Random(seed).shuffle(rows)
    return rows[:n]
