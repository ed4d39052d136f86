"""Samplers of masked diffusion LMs: LLaDA's (semi-autoregressive) `generate` and Dream's `diffusion_generate`.

Both are written against the logits-function contract of `dllmq.diffusion.masking` (aligned logits, so the Dream
wrapper has already undone Dream's shift) and return the full sequence ``[B, Lp + gen]``.

``on_step`` contract (both samplers): after every denoising step, ``on_step(state)`` is called with a dict

=================  ==========================================================================================
key                value
=================  ==========================================================================================
``step``           0-based global step index (``0 .. total_steps - 1``)
``total_steps``    number of steps of the whole generation (``steps``)
``x_before``       LongTensor [B, L]: the input of this step's forward (a copy)
``x``              LongTensor [B, L]: the sequence after this step's update (a copy)
``logits``         FloatTensor [B, L, V]: the logits used by the step (after CFG for LLaDA; before the
                   EOS / top-p / top-k edits). It is the tensor the logits function returned: read, don't modify.
``attention_mask`` the [B, L] attention mask given to the forward (left-padding mask extended by ones) or None
``mask_ratio``     float: fraction of generated positions (``x_before[:, Lp:]``) that were masked at the input
``transfer_index`` bool [B, L]: positions committed by this step
``prompt_len``     Lp
LLaDA only:        ``block`` (block index), ``block_step`` (step within the block), ``block_start``/``block_end``
                   (absolute positions of the current block)
Dream only:        ``t``, ``s`` (the noise levels of the step, floats)
=================  ==========================================================================================

Deviation from the references, on purpose: the mask token itself is never predicted (its logit is set to -inf
before choosing tokens), so every mask is filled even by a model that gives it some probability.

The per-step inputs (``x_before`` + ``attention_mask``) are exactly what a calibration pass needs to replay the
denoising trajectory through a model with hooks.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch

from .masking import LogitsFn, guided_logits, multinomial, rand

__all__ = [
    "llada_generate",
    "dream_generate",
    "decode_answer",
    "num_transfer_tokens",
    "sample_tokens",
    "top_p_filter",
    "top_k_filter",
]

OnStep = Callable[[dict], None]
_LLADA_REMASKING = ("low_confidence", "random")
_DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def _prep_prompt(prompt: torch.Tensor, attention_mask: Optional[torch.Tensor], gen: int, mask_id: int):
    prompt = torch.as_tensor(prompt)
    if prompt.dim() == 1:
        prompt = prompt[None, :]
        if attention_mask is not None and torch.as_tensor(attention_mask).dim() == 1:
            attention_mask = torch.as_tensor(attention_mask)[None, :]
    if prompt.dim() != 2:
        raise ValueError(f"prompt must have shape [B, Lp] or [Lp], got {tuple(prompt.shape)}")
    prompt = prompt.long()
    b, lp = prompt.shape
    x = torch.full((b, lp + gen), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    am = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=prompt.device)
        if tuple(attention_mask.shape) != (b, lp):
            raise ValueError(f"attention_mask must have the prompt's shape {(b, lp)}, got {tuple(attention_mask.shape)}")
        am = torch.cat([attention_mask.long(), torch.ones(b, gen, dtype=torch.long, device=prompt.device)], dim=1)
    return x, am, lp


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear schedule: split each row's masked count evenly over ``steps``, the remainder to the first steps.

    ``block_mask``: bool [B, n]. Returns LongTensor [B, steps] whose rows sum to the row's masked count.
    """
    n = block_mask.sum(dim=1, keepdim=True).long()
    base = n // steps
    rem = n % steps
    ar = torch.arange(steps, device=block_mask.device)[None, :]
    return base.expand(-1, steps) + (ar < rem).long()


def _to_float(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _ban_mask_token(logits: torch.Tensor, mask_id: int) -> None:
    """In place: the mask token itself can never be predicted (a committed mask would never be filled).

    The reference samplers do not do this; trained models give the mask token ~zero probability anyway.
    """
    if 0 <= mask_id < logits.shape[-1]:
        logits[:, mask_id] = float("-inf")


def _row_topk_mask(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool [B, L] with the top-``k[j]`` entries of row j of ``conf`` set."""
    out = torch.zeros_like(conf, dtype=torch.bool)
    for j in range(conf.shape[0]):
        kj = int(k[j])
        if kj > 0:
            out[j, torch.topk(conf[j], kj).indices] = True
    return out


# --------------------------------------------------------------------------------------------------------------
# LLaDA
# --------------------------------------------------------------------------------------------------------------


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """argmax of ``exp(logits) / (-log u)^temperature`` in float64 (LLaDA's Gumbel-max sampling).

    Computed as ``argmax(logits - temperature * log(-log u))``, the same ordering without exp overflow.
    """
    l64 = logits.double()
    u = rand(l64.shape, generator=generator, device=l64.device, dtype=torch.float64)
    g = -torch.log(u)  # Exp(1); u == 0 gives +inf, i.e. the token is never picked (as exp(l)/inf = 0)
    return (l64 - temperature * torch.log(g)).argmax(dim=-1)


def llada_generate(
    logits_fn: LogitsFn,
    prompt: torch.Tensor,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    eot_id: Optional[int] = None,
    confidence_eos_eot_inf: bool = False,
    return_history: bool = False,
    on_step: Optional[OnStep] = None,
):
    """LLaDA's sampler (``generate.py``): block-wise (semi-autoregressive) low-confidence remasking.

    ``x = [prompt | gen_length x mask]``. The generation is split into ``gen_length // block_length`` blocks that
    are denoised left to right, ``steps // num_blocks`` steps each. Per block the number of tokens committed at
    each step follows a linear schedule (`num_transfer_tokens`). Each step runs one full-sequence forward (two
    with ``cfg_scale > 0``: ``un + (cfg + 1)(cond - un)``, prompt replaced by masks in the unconditional copy),
    predicts ``x0 = argmax`` (Gumbel-max in float64 when ``temperature > 0``), scores masked positions by
    ``softmax(logits)[x0]`` (``remasking="low_confidence"``) or U(0,1) (``"random"``), excludes positions after
    the current block, and commits the top-k per row. Committed tokens are never remasked.

    Args:
        prompt: LongTensor [B, Lp] (or [Lp]); left-padded batches use ``attention_mask`` (extended with ones).
        eos_id / logits_eos_inf: forbid ``eos_id`` (logit -inf) before the argmax.
        eot_id / confidence_eos_eot_inf: after the argmax, give tokens predicted as ``eos_id`` / ``eot_id``
            zero confidence (they are committed last) — the documented intent of LLaDA's flag.
        return_history: also return the list of sequences after every step.
        on_step: callback, see the module docstring.

    Returns:
        LongTensor [B, Lp + gen_length], or ``(x, history)`` with ``return_history``.
    """
    steps, gen_length, block_length = int(steps), int(gen_length), int(block_length)
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(f"steps, gen_length and block_length must be positive (got {steps}, {gen_length}, {block_length})")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks (gen_length/block_length = {num_blocks})"
        )
    if remasking not in _LLADA_REMASKING:
        raise ValueError(f"remasking must be one of {_LLADA_REMASKING}, got {remasking!r}")
    if logits_eos_inf and eos_id is None:
        raise ValueError("logits_eos_inf=True needs eos_id")
    if confidence_eos_eot_inf and eos_id is None and eot_id is None:
        raise ValueError("confidence_eos_eot_inf=True needs eos_id and/or eot_id")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    steps_per_block = steps // num_blocks

    x, am, lp = _prep_prompt(prompt, attention_mask, gen_length, mask_id)
    b, total_len = x.shape
    device = x.device
    prompt_index = x != mask_id  # positions replaced by masks in the CFG unconditional copy
    pos = torch.arange(total_len, device=device)
    conf_ban = [t for t in (eos_id, eot_id) if t is not None] if confidence_eos_eot_inf else []
    history: List[torch.Tensor] = []
    global_step = 0

    with torch.no_grad():
        for nb in range(num_blocks):
            b_start = lp + nb * block_length
            b_end = b_start + block_length
            schedule = num_transfer_tokens(x[:, b_start:b_end] == mask_id, steps_per_block)
            for i in range(steps_per_block):
                mask_index = x == mask_id
                x_before = x.clone() if on_step is not None else None
                logits = guided_logits(logits_fn, x, am, prompt_index, mask_id, cfg_scale)
                # only masked positions up to the end of the current block can be committed
                cand = mask_index & (pos < b_end)[None, :]
                cl = _to_float(logits[cand])  # [N, V] (boolean indexing copies)
                _ban_mask_token(cl, mask_id)
                if logits_eos_inf:
                    cl[:, eos_id] = float("-inf")
                if temperature > 0:
                    x0 = _gumbel_argmax(cl, temperature, generator)
                else:
                    x0 = cl.argmax(dim=-1)
                if remasking == "low_confidence":
                    if conf_ban:
                        cl[:, conf_ban] = float("-inf")
                    conf = torch.softmax(cl, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
                else:
                    conf = rand((x0.numel(),), generator=generator, device=device)
                confidence = torch.full((b, total_len), float("-inf"), dtype=torch.float64, device=device)
                confidence[cand] = conf.double()
                transfer = _row_topk_mask(confidence, schedule[:, i]) & cand
                x0_full = x.clone()
                x0_full[cand] = x0
                x[transfer] = x0_full[transfer]
                if return_history:
                    history.append(x.clone())
                if on_step is not None:
                    gen_part = x_before[:, lp:]
                    on_step({
                        "step": global_step,
                        "total_steps": steps,
                        "block": nb,
                        "block_step": i,
                        "block_start": b_start,
                        "block_end": b_end,
                        "prompt_len": lp,
                        "x_before": x_before,
                        "x": x.clone(),
                        "logits": logits,
                        "attention_mask": am,
                        "mask_ratio": float((gen_part == mask_id).float().mean()) if gen_part.numel() else 0.0,
                        "transfer_index": transfer,
                    })
                global_step += 1
                del logits, cl  # not alive while the next step's forward runs (lockstep samplers share memory)
    return (x, history) if return_history else x


# --------------------------------------------------------------------------------------------------------------
# Dream
# --------------------------------------------------------------------------------------------------------------


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches ``top_p`` (the top-1 is
    always kept); the rest get -inf. ``logits``: [N, V]."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cum > top_p
    # shift right: a token is dropped only if the mass *before* it already exceeds top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row; the rest get -inf."""
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    confidence: str = "prob",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dream's token sampler on ``logits`` [N, V]: temperature, then top-p, then top-k, then softmax.

    ``temperature > 0`` samples from the filtered distribution, 0 takes the argmax. Returns ``(confidence, x0)``
    where confidence is the chosen token's probability (``"prob"``), top1 - top2 probability (``"margin"``) or
    the negative entropy ``sum p log p`` (``"neg_entropy"``).
    """
    logits = _to_float(logits)
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = multinomial(probs, 1, generator=generator).squeeze(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if confidence == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        conf = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    elif confidence == "neg_entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    elif confidence != "prob":
        raise ValueError(f"unknown confidence {confidence!r}")
    return conf, x0


def dream_generate(
    logits_fn: LogitsFn,
    prompt: torch.Tensor,
    mask_id: int,
    max_new_tokens: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    alg: str = "origin",
    alg_temp: Optional[float] = 0.0,
    eps: float = 1e-3,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_history: bool = False,
    on_step: Optional[OnStep] = None,
):
    """Dream's ``diffusion_generate``: the whole generation region is denoised jointly.

    ``timesteps = linspace(1, eps, steps + 1)``; step i goes from ``t = timesteps[i]`` to ``s = timesteps[i+1]``.

    * ``alg="origin"``: every masked position is revealed with probability ``1 - s/t`` (all on the last step),
      with a token drawn by `sample_tokens`.
    * ``"maskgit_plus"`` / ``"topk_margin"`` / ``"entropy"``: confidence = top-1 probability / top1 - top2 margin /
      negative entropy; ``int(n_mask * (1 - s/t))`` positions are revealed (all on the last step): the top-k of
      confidence, or a multinomial draw without replacement from ``softmax(confidence / alg_temp)`` when
      ``alg_temp > 0``. The count is computed per row (Dream averages it over the batch; identical when every
      row has the same number of masks, which is the case unless the prompt itself contains masks).

    Tokens are sampled with ``temperature`` / ``top_p`` / ``top_k`` (temperature 0 = greedy). With a left-padded
    batch, pass ``attention_mask``; it is extended with ones, and the logits function (model wrapper) derives
    position ids from it as Dream does.

    Returns LongTensor [B, Lp + max_new_tokens], or ``(x, history)`` with ``return_history``.
    """
    steps, max_new_tokens = int(steps), int(max_new_tokens)
    if steps <= 0 or max_new_tokens <= 0:
        raise ValueError(f"steps and max_new_tokens must be positive (got {steps}, {max_new_tokens})")
    if alg not in _DREAM_ALGS:
        raise ValueError(f"alg must be one of {_DREAM_ALGS}, got {alg!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    conf_kind = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}.get(alg)

    x, am, lp = _prep_prompt(prompt, attention_mask, max_new_tokens, mask_id)
    b, total_len = x.shape
    device = x.device
    timesteps = torch.linspace(1.0, eps, steps + 1)  # float32, as the reference
    history: List[torch.Tensor] = []

    with torch.no_grad():
        for i in range(steps):
            mask_index = x == mask_id
            x_before = x.clone() if on_step is not None else None
            logits = logits_fn(x, am)
            t, s = timesteps[i], timesteps[i + 1]
            last = i == steps - 1
            n_masked = int(mask_index.sum())
            transfer = torch.zeros_like(mask_index)
            if n_masked > 0:
                ml = _to_float(logits[mask_index])  # [N, V], row-major order of the masked positions
                _ban_mask_token(ml, mask_id)
                if alg == "origin":
                    p_transfer = 1.0 if last else float(1.0 - s / t)
                    reveal = rand((n_masked,), generator=generator, device=device) < p_transfer
                    if bool(reveal.any()):
                        _, tok = sample_tokens(ml[reveal], temperature, top_p, top_k, "prob", generator)
                        new = torch.full((n_masked,), mask_id, dtype=torch.long, device=device)
                        new[reveal] = tok
                        x[mask_index] = new
                        transfer[mask_index] = reveal
                else:
                    conf, x0 = sample_tokens(ml, temperature, top_p, top_k, conf_kind, generator)
                    full_conf = torch.full((b, total_len), float("-inf"), dtype=conf.dtype, device=device)
                    full_conf[mask_index] = conf
                    proposal = x.clone()
                    proposal[mask_index] = x0
                    ratio = 1.0 - s / t  # float32 tensor, as the reference
                    row_masks = mask_index.sum(dim=1)
                    for j in range(b):
                        nj = int(row_masks[j])
                        k = nj if last else int((torch.tensor(float(nj)) * ratio).item())
                        if k <= 0:
                            continue
                        if alg_temp is None or alg_temp == 0:
                            idx = torch.topk(full_conf[j], k).indices
                        else:
                            probs = torch.softmax(full_conf[j] / alg_temp, dim=-1)
                            idx = multinomial(probs, k, replacement=False, generator=generator)
                        transfer[j, idx] = True
                    transfer &= mask_index
                    x[transfer] = proposal[transfer]
            if return_history:
                history.append(x.clone())
            if on_step is not None:
                gen_part = x_before[:, lp:]
                on_step({
                    "step": i,
                    "total_steps": steps,
                    "prompt_len": lp,
                    "x_before": x_before,
                    "x": x.clone(),
                    "logits": logits,
                    "attention_mask": am,
                    "mask_ratio": float((gen_part == mask_id).float().mean()),
                    "transfer_index": transfer,
                    "t": float(t),
                    "s": float(s),
                })
            logits = ml = None  # not alive while the next step's forward runs
    return (x, history) if return_history else x


# --------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------


def decode_answer(
    tokens: torch.Tensor,
    prompt_len: int,
    eos_ids: Union[None, int, Iterable[int]] = None,
) -> List[List[int]]:
    """The generated ids of each row (``tokens[:, prompt_len:]``), cut before the first EOS/EOT in ``eos_ids``."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None, :]
    if eos_ids is None:
        stop = set()
    elif isinstance(eos_ids, int):
        stop = {int(eos_ids)}
    else:
        stop = {int(e) for e in eos_ids}
    out: List[List[int]] = []
    for row in tokens[:, int(prompt_len):].tolist():
        cut = len(row)
        for i, tok in enumerate(row):
            if tok in stop:
                cut = i
                break
        out.append(row[:cut])
    return out
