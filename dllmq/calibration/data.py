"""Calibration inputs: token sequences plus which positions a diffusion model may see masked.

The bundled offline source mixes the training split of dllmq's synthetic tasks (prompt /
response pairs wrapped in the chat template, only the response maskable, as in LLaDA's SFT)
with CPython stdlib text (every token maskable). It never touches the held-out task files.
"""

from __future__ import annotations

import torch

from ..diffusion.masking import forward_process


def bundled_items(n: int, seed: int = 0) -> list[dict]:
    from ..data.synthetic import training_stream

    stream = training_stream(10_000 + seed)  # a stream offset from the bundled model's training seed
    return [next(stream) for _ in range(n)]


def encode_items(tok, items: list[dict], seq_len: int, chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [n, seq_len] (EOS-padded, as LLaDA pads answers) and maskable [n, seq_len]."""
    eos = tok.eos_token_id
    ids = torch.full((len(items), seq_len), eos, dtype=torch.long)
    maskable = torch.zeros((len(items), seq_len), dtype=torch.bool)
    for i, it in enumerate(items):
        if "text" in it or not chat:
            x = tok(it.get("text") or (it["prompt"] + "\n" + it["response"]), add_special_tokens=False).input_ids
            x = x[:seq_len]
            ids[i, : len(x)] = torch.tensor(x)
            maskable[i, :] = True
            continue
        p = tok.apply_chat_template([{"role": "user", "content": it["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
        p_ids = tok(p, add_special_tokens=False).input_ids[:seq_len]
        r_ids = tok(it["response"], add_special_tokens=False).input_ids
        x = (p_ids + r_ids)[:seq_len]
        ids[i, : len(x)] = torch.tensor(x)
        maskable[i, len(p_ids):] = True
    return ids, maskable


def random_masked(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, seed: int = 0) -> torch.Tensor:
    """One uniform mask ratio per sequence (LLaDA's training distribution)."""
    g = torch.Generator().manual_seed(seed)
    noisy, _, _ = forward_process(ids, mask_id, maskable=maskable, generator=g)
    return noisy
