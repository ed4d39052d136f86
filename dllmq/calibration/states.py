"""What the model sees during calibration (--calib-mask none | random | tmas).

- none:   clean text, as the QDLM study calibrates (AR-style).
- random: one mask ratio t ~ U(0,1] per sequence, as in LLaDA's training.
- tmas:   DLLMQuant's temporal-mask adaptive sampling: the full-precision model runs its own
          sampler (semi-autoregressive blocks, low-confidence remasking) on the calibration
          prompts; the denoising steps are split into `segments` equal spans and states are
          drawn from each span in set `proportions` (paper: [0.3, 0.2, 0.2, 0.3]), so the
          calibration covers mask ratios from almost all masked to almost none.
          Choices the paper leaves open (documented here): segments are spans of denoising
          *steps* (not mask-ratio buckets); each prompt contributes `states_per_prompt` states;
          the prompt is the chat prompt (Instruct) or the first half of a text item.

Every state also carries the full-precision model's confidence per token (for CGQ): for a
masked position, the top-1 probability of its prediction; for a visible one, the probability
of the visible token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion.generation import GenerationConfig, generate_ids, left_pad
from ..errors import UserError
from .data import encode_items, random_masked

MASK_MODES = ("none", "random", "tmas")


@dataclass
class CalibBatch:
    ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L] or None
    masked: torch.Tensor  # bool [B, L]
    confidence: torch.Tensor | None = None  # [B, L], full-precision model confidence


@dataclass
class CalibrationSet:
    batches: list[CalibBatch]
    description: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(int(b.ids.numel()) for b in self.batches)


@dataclass
class TMASConfig:
    proportions: tuple[float, ...] = (0.3, 0.2, 0.2, 0.3)
    states_per_prompt: int = 4
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64

    def validate(self) -> None:
        if not self.proportions or any(p < 0 for p in self.proportions) or abs(sum(self.proportions) - 1) > 1e-6:
            raise UserError(f"--tmas-proportions must be non-negative and sum to 1, got {list(self.proportions)}")
        if self.gen_length % self.block_length or self.steps % (self.gen_length // self.block_length):
            raise UserError("TMAS: --tmas-block-length must divide --tmas-gen-length, and steps must be a multiple "
                            "of the number of blocks")
        if self.steps < len(self.proportions):
            raise UserError("TMAS: need at least one denoising step per segment")


def segment_steps(total: int, proportions: tuple[float, ...], n: int, gen: torch.Generator) -> list[int]:
    """Draw up to n distinct step indices: segment s (an equal span of steps) gets round(p_s * n) of them."""
    k = len(proportions)
    counts = [int(round(p * n)) for p in proportions]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < n:
        counts[max(range(k), key=lambda i: proportions[i] * n - counts[i])] += 1
    out = []
    for s, c in enumerate(counts):
        lo, hi = s * total // k, max(s * total // k + 1, (s + 1) * total // k)
        span = torch.randperm(hi - lo, generator=gen)[: min(c, hi - lo)]  # distinct steps within a segment
        out.extend(lo + int(i) for i in span)
    return sorted(out)


@torch.no_grad()
def confidence_of(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.max(-1).values
    vis = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(masked, top, vis)


def build(items: list[dict], tok, mask_id: int, mode: str, seq_len: int, seed: int = 0, batch_size: int = 8,
          fp_model=None, want_confidence: bool = False, tmas: TMASConfig | None = None,
          show_progress: bool = False) -> CalibrationSet:
    if mode not in MASK_MODES:
        raise UserError(f"--calib-mask must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    if mode == "tmas":
        if fp_model is None:
            raise UserError("TMAS needs the full-precision model to run its sampler")
        return _tmas(items, tok, fp_model, tmas or TMASConfig(), seq_len, seed, batch_size, show_progress)
    ids, maskable = encode_items(tok, items, seq_len)
    noisy = ids if mode == "none" else random_masked(ids, maskable, mask_id, seed)
    batches = []
    for b in range(0, len(items), batch_size):
        x = noisy[b : b + batch_size]
        cb = CalibBatch(ids=x, attention_mask=None, masked=x == mask_id)
        if want_confidence:
            if fp_model is None:
                raise UserError("CGQ needs the full-precision model's confidences")
            dev = next(fp_model.parameters()).device
            logits = fp_model.aligned_logits(x.to(dev)).cpu()
            cb.confidence = confidence_of(logits, ids[b : b + batch_size], cb.masked)
        batches.append(cb)
    return CalibrationSet(batches, {"mode": mode, "samples": len(items), "seq_len": seq_len, "seed": seed,
                                    "mask_ratio": float(noisy.eq(mask_id).float().mean())})


def _prompt_ids(tok, item: dict, seq_len: int) -> list[int]:
    if "prompt" in item:
        p = tok.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
        return tok(p, add_special_tokens=False).input_ids[-seq_len:]
    ids = tok(item["text"], add_special_tokens=False).input_ids[:seq_len]
    return ids[: max(1, len(ids) // 2)]


@torch.no_grad()
def _tmas(items, tok, model, cfg: TMASConfig, seq_len, seed, batch_size, show_progress) -> CalibrationSet:
    cfg.validate()
    gen = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_room = max(8, seq_len - cfg.gen_length)
    batches, ratios = [], []
    gcfg = GenerationConfig(steps=cfg.steps, gen_length=cfg.gen_length, block_length=cfg.block_length, seed=seed)
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        seqs = [_prompt_ids(tok, it, prompt_room) for it in chunk]
        ids, am = left_pad(seqs, pad)
        picks = segment_steps(cfg.steps, cfg.proportions, cfg.states_per_prompt, gen)
        captured: dict[int, tuple] = {}

        def on_step(state, picks=set(picks)):
            if state["step"] in picks:
                x = state["x_before"].cpu()
                mk = x == model.mask_token_id
                conf = confidence_of(state["logits"].cpu(), x, mk)
                captured[state["step"]] = (x, mk, conf, state.get("attention_mask"))

        generate_ids(model, ids, am, gcfg, on_step=on_step)
        for step in picks:
            x, mk, conf, m = captured[step]
            mask = None if m is None or bool(m.all()) else m.cpu()
            batches.append(CalibBatch(ids=x, attention_mask=mask, masked=mk, confidence=conf))
            ratios.append(float(mk[:, ids.shape[1]:].float().mean()))
    return CalibrationSet(batches, {"mode": "tmas", "samples": len(items), "seed": seed,
                                    "proportions": list(cfg.proportions), "states_per_prompt": cfg.states_per_prompt,
                                    "gen_length": cfg.gen_length, "block_length": cfg.block_length,
                                    "steps": cfg.steps, "mask_ratios": [round(r, 3) for r in ratios]})
