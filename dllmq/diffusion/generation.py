"""Text in, text out: prompts -> (chat template) -> left-padded batch -> the family's sampler -> text.

LLaDA uses its semi-autoregressive low-confidence sampler; Dream its diffusion_generate
variants (`alg`). Both run one full-sequence forward per step, which is what dLLM inference
costs and what quantization must speed up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the models import this module's sampler at run time
    from ..models.base import DiffusionLM
from .sampling import dream_generate, llada_generate


@dataclass
class GenerationConfig:
    steps: int = 64
    gen_length: int = 64
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    alg: str = "entropy"  # Dream only
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    seed: int = 0
    # fast decoding (dllmq.diffusion.cache): approximate block KV cache and confidence-threshold commits
    cache: str = "none"  # none | prefix | dual
    threshold: float | None = None  # None: fixed schedule; e.g. 0.9: commit every token above it

    @property
    def fast(self) -> bool:
        return self.cache != "none" or self.threshold is not None

    @classmethod
    def fast_defaults(cls, **kw) -> "GenerationConfig":
        """`--fast`: dual cache + threshold 0.9, Fast-dLLM's default setting."""
        return cls(**{"cache": "dual", "threshold": 0.9, **kw})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def stop_ids(model: DiffusionLM, tok) -> list[int]:
    ids = {tok.eos_token_id, model.config.eos_token_id, *model.config.extra_stop_ids}
    for t in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def encode_prompts(tok, prompts: list[str], chat: bool | None) -> list[list[int]]:
    use_chat = bool(tok.chat_template) if chat is None else chat
    out = []
    for p in prompts:
        if use_chat:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        else:
            text = p
        ids = tok(text, add_special_tokens=False).input_ids
        out.append(ids)
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    return ids, (None if bool(mask.all()) else mask)


@torch.no_grad()
def generate_ids(model: DiffusionLM, prompt_ids: torch.Tensor, attention_mask, cfg: GenerationConfig,
                 on_step=None, logits_fn=None) -> torch.Tensor:
    """`logits_fn`: instead of `model.aligned_logits` (calibration's lockstep samplers pass theirs)."""
    dev = next(model.parameters()).device
    prompt_ids = prompt_ids.to(dev)
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    fn = logits_fn or model.aligned_logits
    if cfg.fast:
        if logits_fn is not None:
            raise ValueError("fast decoding calls the model itself: it takes no logits_fn")
        if cfg.temperature > 0 or cfg.cfg_scale > 0:
            raise ValueError("fast decoding (cache/threshold) is greedy and has no CFG: use temperature 0, cfg 0")
        from .cache import fast_generate

        return fast_generate(model, prompt_ids, steps=cfg.steps, gen_length=cfg.gen_length,
                             block_length=cfg.block_length, cache=cfg.cache, threshold=cfg.threshold,
                             attention_mask=attention_mask, on_step=on_step)
    if model.arch.family == "dream":
        return dream_generate(fn, prompt_ids, model.mask_token_id, max_new_tokens=cfg.gen_length, steps=cfg.steps,
                              temperature=cfg.temperature, alg=cfg.alg, attention_mask=attention_mask,
                              generator=gen, on_step=on_step)
    return llada_generate(fn, prompt_ids, model.mask_token_id, steps=cfg.steps, gen_length=cfg.gen_length,
                          block_length=cfg.block_length, temperature=cfg.temperature, cfg_scale=cfg.cfg_scale,
                          remasking=cfg.remasking, attention_mask=attention_mask, generator=gen, on_step=on_step)


def generate(model: DiffusionLM, tok, prompts: list[str], cfg: GenerationConfig, batch_size: int = 8,
             show_progress: bool = False) -> list[dict]:
    """Returns one dict per prompt: text (cut at the first stop token) and the generated ids.

    Progress: a bar advanced per denoising step, on the active display (dllmq.ui) or, with `show_progress`,
    on one of its own (stderr, when a terminal)."""
    from ..ui import bar

    results = []
    stops = set(stop_ids(model, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = encode_prompts(tok, prompts, cfg.chat)
    starts = list(range(0, len(prompts), batch_size))
    with bar("generate", total=len(starts) * cfg.steps, info="", show=show_progress) as pb:
        for k, b in enumerate(starts):
            seqs = encoded[b : b + batch_size]
            ids, mask = left_pad(seqs, pad)
            if len(starts) > 1:
                pb.update(info=f"batch {k + 1}/{len(starts)}")
            out = generate_ids(model, ids, mask, cfg, on_step=(lambda state: pb.advance(1)) if pb else None).cpu()
            pb.update(completed=(k + 1) * cfg.steps)  # a threshold sampler may finish in fewer steps
            for row in out[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                results.append({"text": tok.decode(row[:cut], skip_special_tokens=True), "ids": row})
    return results
