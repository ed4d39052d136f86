"""Where calibration text comes from: --calib bundled | PATH.txt | PATH.jsonl | HUB_DATASET[:config][:split].

:func:`load_items` returns one item per calibration sample:

- ``{"prompt": ..., "response": ...}``: a chat item (Instruct models: wrapped in the chat
  template, only the response is masked), from .jsonl files and chat datasets (gsm8k);
- ``{"corpus": TextCorpus}``: one window of a text source. All the text of a .txt file, of the
  "text" items of a .jsonl file, or of a Hub text dataset forms one corpus, which
  :func:`dllmq.calibration.data.resolve_windows` (called by ``build``, which knows the
  tokenizer) concatenates and cuts into seeded random windows of exactly ``--calib-seq-len``
  tokens, as GPTQ and the QDLM study do (QDLM: 128 x 2048 WikiText-2 tokens; GPTQ: 128 x 2048 C4);
- ``{"text": ...}``: the bundled offline mix, one short item per sample (padded, padding invalid).

A .jsonl file mixing both kinds keeps the mix: samples are drawn from its items, and each text
item drawn becomes a window of the corpus of all its text items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import UserError
from .data import TextCorpus

# Hub datasets with known layouts: name -> (path, config, split, text field or (prompt, response) fields)
KNOWN = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "pile-val": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "gsm8k": ("openai/gsm8k", "main", "train", ("question", "answer")),
}
# line-level datasets, read whole and joined with "\n\n" as GPTQ's WikiText-2 loader does; other
# text datasets are documents, joined with EOS, read until about 8 characters per needed token
LINE_DATASETS = {"wikitext"}


def load_items(calib: str, n: int, seed: int = 0, seq_len: int = 2048) -> list[dict]:
    """n calibration items (see the module docstring). `seq_len` only sizes how much of a
    streamed Hub text dataset is read (enough for n windows of seq_len tokens)."""
    if n <= 0:
        raise UserError("--calib-samples must be positive")
    if calib in ("bundled", "tiny", "offline"):
        from .data import bundled_items

        return bundled_items(n, seed)
    p = Path(calib).expanduser()
    if p.exists():
        return _from_file(p, n, seed)
    return _from_hub(calib, n, seed, seq_len)


def _from_file(p: Path, n: int, seed: int) -> list[dict]:
    if p.suffix == ".jsonl":
        items, texts = [], []
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
                if str(d["text"]).strip():
                    texts.append(str(d["text"]))
                    items.append({"text": None})  # a placeholder: becomes a window of the corpus
            else:
                raise UserError(f"{p}:{i + 1} needs a 'text' field or 'prompt' and 'response' fields")
        if not items:
            raise UserError(f"calibration file {p} holds no text")
        random.Random(seed).shuffle(items)
        picked = (items * (n // len(items) + 1))[:n]
        corpus = TextCorpus(texts, name=str(p), sep="eos")
        return [{"corpus": corpus} if "text" in it else dict(it) for it in picked]
    text = p.read_text(errors="replace")
    if not text.strip():
        raise UserError(f"calibration file {p} holds no text")
    corpus = TextCorpus([text], name=str(p))  # one document: its paragraphs keep their own separators
    return [{"corpus": corpus} for _ in range(n)]


def _from_hub(name: str, n: int, seed: int, seq_len: int) -> list[dict]:
    parts = name.split(":")
    if parts[0] in KNOWN:
        path, config, split, field = KNOWN[parts[0]]
    else:
        path, config, split, field = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train"), "text"
    whole = path in LINE_DATASETS
    budget = 8 * n * seq_len  # characters: about twice what n windows need at ~4 characters per token
    try:
        from datasets import load_dataset

        ds = load_dataset(path, config, split=split, streaming=True)
        rows, chars = [], 0
        for row in ds:
            if isinstance(field, tuple):
                rows.append({"prompt": row[field[0]], "response": row[field[1]]})
                if len(rows) >= 20 * n:
                    break
            else:
                t = str(row.get(field) or "")
                if t.strip():
                    rows.append(t)
                    chars += len(t)
                if not whole and chars >= budget:
                    break
    except Exception as e:  # offline, unknown dataset, missing field: one clear line
        raise UserError(
            f"cannot load calibration dataset {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use --calib bundled (offline), a local .txt/.jsonl file, or connect to the Hub"
        ) from None
    if not rows:
        raise UserError(f"calibration dataset {path!r} gave no usable rows")
    if isinstance(field, tuple):
        random.Random(seed).shuffle(rows)
        return rows[:n]
    if not whole:
        random.Random(seed).shuffle(rows)  # documents in a seeded order; lines of an article stay in order
    corpus = TextCorpus(rows, name=name, sep="\n\n" if whole else "eos")
    return [{"corpus": corpus} for _ in range(n)]
