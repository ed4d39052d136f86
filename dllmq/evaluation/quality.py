"""Quality of a (quantized) model without benchmarks: masked-token NLL on text, and token
agreement with the full-precision model under the same sampler and seed."""

from __future__ import annotations

import time

import torch

from ..diffusion.generation import GenerationConfig, encode_prompts, generate_ids, left_pad
from ..diffusion.likelihood import masked_token_nll
from ..models.base import DiffusionLM
from ..ui import Bar

_NO_BAR = Bar(None)
GEN_BATCH = 8  # prompts per generation batch in `sample_ids`


def chunk_texts(tok, texts: list[str], seq_len: int, max_seqs: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False).input_ids)
        ids.append(tok.eos_token_id)
        if len(ids) >= seq_len * max_seqs:
            break
    n = min(max_seqs, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens of text, got {len(ids)}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def text_nll(model: DiffusionLM, seqs: torch.Tensor, mc_num: int = 4, seed: int = 0, batch_size: int = 8,
             bar: Bar = _NO_BAR) -> float:
    """Masked-diffusion NLL per token (the ELBO bound, nats), averaged over Monte-Carlo mask draws.
    `bar` advances by one per sequence."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, seqs.shape[0], batch_size):
        g = torch.Generator().manual_seed(seed + b)
        s, n = masked_token_nll(model.aligned_logits, seqs[b : b + batch_size].to(dev), model.mask_token_id,
                                mc_num=mc_num, generator=g)
        total += float(s)
        count += int(n)
        bar.advance(min(batch_size, seqs.shape[0] - b))
    return total / max(count, 1)


@torch.no_grad()
def sample_ids(model: DiffusionLM, tok, prompts: list[str], cfg: GenerationConfig, batch_size: int = GEN_BATCH,
               bar: Bar = _NO_BAR):
    """Greedy/seeded generations of `prompts` (ids after the prompt) and their seconds; `bar` advances by one
    per denoising step of each batch."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = encode_prompts(tok, prompts, cfg.chat)
    outs, t0 = [], time.time()
    for b in range(0, len(enc), batch_size):
        ids, mask = left_pad(enc[b : b + batch_size], pad)
        outs.append(generate_ids(model, ids, mask, cfg, on_step=(lambda *a, **k: bar.advance()) if bar else None)
                    [:, ids.shape[1]:].cpu())
    return torch.cat(outs), time.time() - t0


@torch.no_grad()
def masked_predictions(model: DiffusionLM, seqs: torch.Tensor, seed: int = 0, batch_size: int = 8,
                       bar: Bar = _NO_BAR) -> torch.Tensor:
    """Top-1 predictions at the masked positions of one seeded mask draw per sequence (ratio t ~ U(0, 1],
    LLaDA's forward process): what one denoising step would fill in. Flat [n_masked]."""
    from ..diffusion.masking import forward_process

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(0, seqs.shape[0], batch_size):
        x = seqs[b : b + batch_size]
        noisy, masked, _ = forward_process(x, model.mask_token_id, generator=g)
        logits = model.aligned_logits(noisy.to(dev)).float().cpu()
        out.append(logits.argmax(-1)[masked])
        bar.advance(x.shape[0])
    return torch.cat(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of generated positions where two models produced the same token."""
    return float((a == b).float().mean())
