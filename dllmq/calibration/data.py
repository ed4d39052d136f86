"""Calibration inputs: token sequences plus which positions a diffusion model may see masked.

Three kinds of item reach the encoder:

- chat items ``{"prompt", "response"}``: wrapped in the chat template, only the response
  maskable (as in LLaDA's SFT), EOS-padded to ``seq_len``; the padding after the response is
  marked invalid so it never enters Hessians, activation maxima or AWQ statistics;
- text windows: text sources (a .txt file, the "text" items of a .jsonl file, Hub text datasets)
  are concatenated into one token stream and cut into windows of exactly ``seq_len`` tokens at
  seeded random positions, as GPTQ and the QDLM study build their calibration sets (no padding);
- plain ``{"text"}`` items (the bundled mix): one item per sample, EOS-padded, padding invalid.

Window rules (:func:`resolve_windows`): documents are joined with the tokenizer's EOS token
(``sep="eos"``, for document collections: .jsonl, C4, the Pile) or with "\\n\\n" (``sep="\\n\\n"``,
line-level WikiText, as GPTQ's loader joins it). When the stream holds at least ``n * seq_len``
tokens the windows do not overlap; when it is shorter they overlap (evenly spread starts, so the
whole text is covered); when it is shorter than one window it becomes a single EOS-padded
sequence whose padding is marked invalid. The same seed always gives the same windows.

Defaults: the bundled source uses 32 samples x 128 tokens (``--calib-samples 32 --calib-seq-len
128``), small because the bundled model has 7M parameters and the tests must be fast. For 8B
models the papers' setting is recommended: QDLM calibrates GPTQ / SmoothQuant / QuaRot / DuQuant
on 128 x 2048-token WikiText-2 windows (AWQ: 128 x 512 PileVal); GPTQ itself uses 128 x 2048 C4
windows: ``--calib wikitext2 --calib-samples 128 --calib-seq-len 2048``.

The bundled offline source mixes the training split of dllmq's synthetic tasks (prompt /
response pairs wrapped in the chat template, only the response maskable, as in LLaDA's SFT)
with CPython stdlib text (every token maskable), one item per sample, as the bundled model saw
them in training. It never touches the held-out task files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.masking import forward_process


@dataclass(eq=False)
class TextCorpus:
    """Documents of one text source; items ``{"corpus": c}`` each ask for one window of it."""

    docs: list[str]
    name: str = ""
    sep: str = "eos"  # "eos" (the tokenizer's EOS between documents) or a literal string such as "\n\n"


def bundled_items(n: int, seed: int = 0) -> list[dict]:
    from ..data.synthetic import training_stream

    stream = training_stream(10_000 + seed)  # a stream offset from the bundled model's training seed
    return [next(stream) for _ in range(n)]


def _corpus_tokens(tok, corpus: TextCorpus) -> list[int]:
    docs = [d for d in corpus.docs if d]
    if not docs:
        return []
    enc = tok(docs, add_special_tokens=False, verbose=False).input_ids  # per document: no overlong-input warning
    if corpus.sep == "eos" and tok.eos_token_id is not None:
        sep = [tok.eos_token_id]
    else:
        sep = tok("\n\n" if corpus.sep == "eos" else corpus.sep, add_special_tokens=False).input_ids
    out: list[int] = []
    for i, e in enumerate(enc):
        if i:
            out.extend(sep)
        out.extend(e)
    return out


def window_starts(total: int, n: int, seq_len: int, gen: torch.Generator) -> list[int]:
    """Start offsets of n windows of seq_len tokens in a stream of `total` (>= seq_len) tokens.

    Enough text: n non-overlapping windows at random positions (the slack is spread by sorted
    random gaps). Too little: n evenly spread, overlapping windows. Order shuffled by `gen`."""
    if n * seq_len <= total:
        gaps = torch.randint(0, total - n * seq_len + 1, (n,), generator=gen).sort().values
        starts = [int(g) + k * seq_len for k, g in enumerate(gaps)]
    else:  # n >= 2 here, since total >= seq_len
        starts = [round(k * (total - seq_len) / (n - 1)) for k in range(n)]
    return [starts[int(i)] for i in torch.randperm(n, generator=gen)]


def resolve_windows(tok, items: list[dict], seq_len: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Replace every ``{"corpus": c}`` item by a window ``{"ids": [...]}`` of exactly seq_len tokens.

    -> (items, description). Other items pass through unchanged. A corpus shorter than one window
    gives a single ``{"ids": all its tokens}`` item (padded later), however many windows were asked."""
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if "corpus" in it:
            groups.setdefault(id(it["corpus"]), []).append(i)
    if not groups:
        return items, {}
    gen = torch.Generator().manual_seed(seed)
    repl: dict[int, dict | None] = {}
    desc = {"windows": 0, "corpus_tokens": 0, "overlapping": False, "short_corpus": False}
    for idx in groups.values():
        corpus = items[idx[0]]["corpus"]
        stream = _corpus_tokens(tok, corpus)
        desc["corpus_tokens"] += len(stream)
        if not stream:
            raise ValueError(f"calibration source {corpus.name or '?'} holds no tokens")
        if len(stream) < seq_len:
            desc["short_corpus"] = True
            desc["windows"] += 1
            repl[idx[0]] = {"ids": stream}
            repl.update({i: None for i in idx[1:]})
            continue
        desc["overlapping"] |= len(idx) * seq_len > len(stream)
        desc["windows"] += len(idx)
        for i, s in zip(idx, window_starts(len(stream), len(idx), seq_len, gen)):
            repl[i] = {"ids": stream[s : s + seq_len]}
    out = [repl[i] if i in repl else it for i, it in enumerate(items)]
    return [it for it in out if it is not None], desc


def encode_batch(tok, items: list[dict], seq_len: int, chat: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [n, seq_len] (EOS-padded, as LLaDA pads answers), maskable [n, seq_len] and
    valid [n, seq_len] (False at padding). Window items (``{"ids"}``) must be resolved first."""
    eos = tok.eos_token_id
    ids = torch.full((len(items), seq_len), eos, dtype=torch.long)
    maskable = torch.zeros((len(items), seq_len), dtype=torch.bool)
    valid = torch.zeros((len(items), seq_len), dtype=torch.bool)
    for i, it in enumerate(items):
        if "corpus" in it:
            raise ValueError("encode_batch: resolve text windows first (resolve_windows)")
        if "ids" in it or "text" in it or not chat:
            x = it["ids"] if "ids" in it else tok(it.get("text") or (it["prompt"] + "\n" + it["response"]),
                                                   add_special_tokens=False).input_ids
            x = list(x)[:seq_len]
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            maskable[i, :] = True
            valid[i, : len(x)] = True
            continue
        p = tok.apply_chat_template([{"role": "user", "content": it["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
        p_ids = tok(p, add_special_tokens=False).input_ids[:seq_len]
        r_ids = tok(it["response"], add_special_tokens=False).input_ids
        x = (p_ids + r_ids)[:seq_len]
        ids[i, : len(x)] = torch.tensor(x)
        maskable[i, len(p_ids):] = True
        valid[i, : len(x)] = True  # the EOS padding after the response is padding
    return ids, maskable, valid


def encode_items(tok, items: list[dict], seq_len: int, chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [n, seq_len] (EOS-padded, as LLaDA pads answers) and maskable [n, seq_len].
    Text-window items are resolved with seed 0; see :func:`encode_batch` for the valid mask."""
    items, _ = resolve_windows(tok, items, seq_len)
    ids, maskable, _ = encode_batch(tok, items, seq_len, chat)
    return ids, maskable


def random_masked(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, seed: int = 0) -> torch.Tensor:
    """One uniform mask ratio per sequence (LLaDA's training distribution)."""
    g = torch.Generator().manual_seed(seed)
    noisy, _, _ = forward_process(ids, mask_id, maskable=maskable, generator=g)
    return noisy
