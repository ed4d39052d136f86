"""The scoring engine behind every evaluation: Monte-Carlo likelihoods and diffusion generation on strings.

lm-eval's LM class (`harness.py`) is a thin adapter over it, and the bundled tiny tasks run through that
class, so a tiny-task score and a benchmark score come from the same code.

Choices (LLaDA's `eval_llada.py` is the reference):
* loglikelihood = the Monte-Carlo ELBO of the continuation given the context (`mc_num` mask draws; LLaDA uses
  128, and 1 for single-token multiple choice such as MMLU). Context/continuation are split as lm-eval does:
  trailing spaces of the context move to the continuation, the pair is encoded whole and the context's tokens
  are cut off, so a BPE merge across the boundary cannot shift tokens.
* is_greedy = the continuation is the argmax at every position when all of it is masked (one extra forward).
* loglikelihood_rolling = the ELBO of the whole text (a lower bound, so perplexities are upper bounds).
* generation = the family's sampler with a fixed gen_length (dLLMs generate a canvas, not a prefix); the text
  is cut at the first stop token and then at the first `until` string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion.generation import GenerationConfig, generate_ids, left_pad, stop_ids
from ..diffusion.likelihood import mc_loglikelihood_batch
from ..models.base import DiffusionLM


@dataclass
class EngineConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mc_num: int = 128
    batch_size: int = 16
    seed: int = 0
    add_bos: bool = False  # LLaDA's tokenizer has add_bos_token false and its eval adds none
    check_greedy: bool = True


class _Chunk:
    """Progress inside a chunk of n requests: `on_batch` (the number of requests done, possibly fractional) gets
    shares of n as the forwards (likelihood) or denoising steps (generation) go by, and exactly n in all."""

    def __init__(self, on_batch, n: int):
        self.on_batch, self.n, self.sent = on_batch, n, 0.0

    def add(self, x: float) -> None:
        x = min(x, 0.999 * self.n - self.sent)  # the rest comes with finish()
        if x > 0:
            self.sent += x
            self.on_batch(x)

    def logits(self, fn, rows_per_request: int):
        def wrapped(x, attention_mask=None):
            out = fn(x, attention_mask)
            self.add(x.shape[0] / rows_per_request)
            return out
        return wrapped

    def step(self, steps: int):
        return lambda state: self.add(self.n / steps)

    def finish(self) -> None:
        if self.n - self.sent > 0:
            self.on_batch(self.n - self.sent)
        self.sent = self.n


class DiffusionEvaluator:
    def __init__(self, model: DiffusionLM, tok, config: EngineConfig | None = None):
        self.model = model
        self.tok = tok
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self._stops = set(stop_ids(model, tok))
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _prefix(self) -> list[int]:
        bos = self.tok.bos_token_id
        return [bos] if self.config.add_bos and bos is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[: len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
            return self._prefix() + ctx, self.encode(continuation)
        return self._prefix() + ctx, whole[len(ctx):]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[str, str]], on_batch=None) -> list[tuple[float, bool]]:
        """Sum log-likelihood estimate of each continuation given its context, and whether it is greedy."""
        enc = [self.encode_pair(c, x) for c, x in pairs]
        return self.loglikelihood_ids(enc, on_batch=on_batch)

    @torch.no_grad()
    def loglikelihood_ids(self, enc: list[tuple[list[int], list[int]]], on_batch=None) -> list[tuple[float, bool]]:
        cfg = self.config
        out: list[tuple[float, bool]] = []
        # chunks of requests keep memory bounded and let a progress bar advance
        chunk = max(1, cfg.batch_size)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        mc_batch = max(1, min(cfg.mc_num, cfg.batch_size))
        while cfg.mc_num % mc_batch:
            mc_batch -= 1
        for i in range(0, len(enc), chunk):
            part = enc[i : i + chunk]
            tensors = [(torch.tensor(c, device=self.device), torch.tensor(x, device=self.device)) for c, x in part]
            tick = _Chunk(on_batch, len(part)) if on_batch else None
            fn = tick.logits(self.model.aligned_logits, cfg.mc_num) if tick else self.model.aligned_logits
            lls = mc_loglikelihood_batch(fn, tensors, self.model.mask_token_id,
                                         pad_id=self._pad, mc_num=cfg.mc_num, batch_size=mc_batch, generator=g,
                                         max_rows=max(cfg.batch_size, mc_batch))
            greedy = self._greedy(part) if cfg.check_greedy else [False] * len(part)
            out.extend(zip(lls, greedy))
            if tick:
                tick.finish()
        return out

    def _greedy(self, part: list[tuple[list[int], list[int]]]) -> list[bool]:
        rows = [c + [self.model.mask_token_id] * len(x) for c, x in part]
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), self._pad, dtype=torch.long)
        attn = torch.zeros((len(rows), L), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            attn[j, : len(r)] = 1
        padded = bool((attn == 0).any())
        logits = self.model.aligned_logits(ids.to(self.device), attn.to(self.device) if padded else None)
        res = []
        for j, (c, x) in enumerate(part):
            pred = logits[j, len(c) : len(c) + len(x)].argmax(-1).cpu().tolist()
            res.append(pred == x)
        return res

    @torch.no_grad()
    def loglikelihood_rolling(self, texts: list[str], on_batch=None) -> list[float]:
        bos = self.tok.bos_token_id
        prefix = [bos] if bos is not None else [self.tok.eos_token_id]
        enc = [(prefix, self.encode(t)) for t in texts]
        saved = self.config.check_greedy
        self.config.check_greedy = False
        try:
            return [ll for ll, _ in self.loglikelihood_ids(enc, on_batch=on_batch)]
        finally:
            self.config.check_greedy = saved

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, contexts: list[str], until: list[list[str]] | None = None,
                 gcfg: GenerationConfig | None = None, on_batch=None) -> list[str]:
        """Generate after each (already templated) context; batches group prompts of similar length."""
        gcfg = gcfg or self.config.generation
        until = until or [[] for _ in contexts]
        enc = [self._prefix() + self.encode(c) for c in contexts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        texts: list[str | None] = [None] * len(enc)
        bs = max(1, self.config.batch_size)
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            ids, mask = left_pad([enc[i] for i in idx], self._pad)
            tick = _Chunk(on_batch, len(idx)) if on_batch else None
            out = generate_ids(self.model, ids, mask, gcfg, on_step=tick.step(gcfg.steps) if tick else None).cpu()
            for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in self._stops), len(row))
                text = self.tok.decode(row[:cut], skip_special_tokens=True)
                for s in until[i]:
                    if s and s in text:
                        text = text[: text.index(s)]
                texts[i] = text
            if tick:
                tick.finish()
        return texts  # type: ignore[return-value]
