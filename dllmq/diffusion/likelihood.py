"""Monte-Carlo ELBO likelihoods of masked diffusion LMs.

* `mc_loglikelihood` / `mc_loglikelihood_batch`: LLaDA's conditional estimator of ``log p(answer | prompt)``
  (only answer tokens are masked; the number masked per row is stratified over each batch of samples).
  For a one-token answer every sample masks that token with ``p_mask = 1``, so the estimate is exact.
* `masked_token_nll`: the per-token negative ELBO of whole sequences (every token maskable; the noise level t is
  stratified over the ``mc_num`` samples), an upper bound on the NLL that is used to score a model on plain text.

All logits functions follow the contract in `dllmq.diffusion.masking` (aligned logits, optional attention mask).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .masking import LogitsFn, forward_process, guided_logits, mask_by_count, rand, stratified_mask_counts

__all__ = ["mc_loglikelihood", "mc_loglikelihood_batch", "masked_token_nll"]


def _check_mc(mc_num: int, batch_size: int) -> int:
    if int(mc_num) < 1:
        raise ValueError(f"mc_num must be >= 1, got {mc_num}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b = min(int(batch_size), int(mc_num))
    if mc_num % b != 0:
        raise ValueError(
            f"mc_num ({mc_num}) must be a multiple of batch_size ({b}); "
            f"use e.g. mc_num={((mc_num + b - 1) // b) * b}, or a batch_size that divides {mc_num}"
        )
    return b


def mc_loglikelihood(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> float:
    """LLaDA's Monte-Carlo lower bound on ``log p(answer | prompt)``.

    ``mc_num // batch_size`` forwards of ``batch_size`` rows each; in each batch the number of masked answer
    tokens is stratified (`stratified_mask_counts`), the loss of a row is ``sum CE(masked) / (count / La)`` and the
    result is ``-mean`` over the ``mc_num`` rows. ``batch_size`` is capped at ``mc_num`` (so ``mc_num=1`` runs one
    row); otherwise ``mc_num`` must be a multiple of it. With ``cfg_scale > 0`` an unconditional copy (prompt
    replaced by masks) runs in the same forward and ``logits = un + (cfg + 1) (cond - un)``.
    """
    return mc_loglikelihood_batch(
        logits_fn, [(prompt_ids, answer_ids)], mask_id, pad_id=None, mc_num=mc_num, batch_size=batch_size,
        cfg_scale=cfg_scale, generator=generator,
    )[0]


def mc_loglikelihood_batch(
    logits_fn: LogitsFn,
    pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    mask_id: int,
    pad_id: Optional[int] = None,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: Optional[torch.Generator] = None,
    max_rows: Optional[int] = None,
) -> List[float]:
    """`mc_loglikelihood` for several (prompt_ids, answer_ids) requests, packing their rows into shared forwards.

    The random masks of every request are drawn first, request by request in the given order, exactly as
    `mc_loglikelihood` would draw them with the same generator (so, for a logits function that ignores padding,
    the results equal sequential `mc_loglikelihood` calls). Rows are then grouped longest-first into forwards of
    at most ``max_rows`` rows (default ``batch_size``); shorter rows are right-padded with ``pad_id`` and the
    forward gets an ``attention_mask`` with zeros on the padding (None when a forward needs no padding).
    Right padding keeps every real token at its unpadded position. ``pad_id`` is required only if padding occurs.

    Returns one float per request, in the order of ``pairs``.
    """
    b = _check_mc(mc_num, batch_size)
    max_rows = int(max_rows) if max_rows is not None else b
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if len(pairs) == 0:
        return []

    # ---- draw every mask (request by request, so the RNG stream does not depend on the packing) ----
    rows = []  # (request index, noisy [L], masked [L], p_mask, target [L], prompt_len)
    for r, (prompt_ids, answer_ids) in enumerate(pairs):
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        answer_ids = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1).to(prompt_ids.device)
        lp, la = prompt_ids.numel(), answer_ids.numel()
        if la == 0:
            raise ValueError(f"request {r}: the answer is empty; the likelihood needs at least one answer token")
        seq = torch.cat([prompt_ids, answer_ids])
        maskable = torch.zeros(lp + la, dtype=torch.bool, device=seq.device)
        maskable[lp:] = True
        for _ in range(mc_num // b):
            counts = stratified_mask_counts(la, b, generator=generator)
            noisy, masked = mask_by_count(seq, counts, mask_id, maskable=maskable, generator=generator)
            for j in range(b):
                rows.append((r, noisy[j], masked[j], float(counts[j]) / la, seq, lp))

    # ---- forwards, longest rows first ----
    order = sorted(range(len(rows)), key=lambda i: -rows[i][1].numel())  # stable: keeps request order on ties
    totals = [0.0] * len(pairs)
    with torch.no_grad():
        for start in range(0, len(order), max_rows):
            chunk = [rows[i] for i in order[start:start + max_rows]]
            n = len(chunk)
            lmax = max(c[1].numel() for c in chunk)
            device = chunk[0][1].device
            needs_pad = any(c[1].numel() < lmax for c in chunk)
            if needs_pad and pad_id is None:
                raise ValueError("requests of different lengths share a forward: pass pad_id (the EOS/pad token id)")
            fill = pad_id if pad_id is not None else mask_id
            x = torch.full((n, lmax), fill, dtype=torch.long, device=device)
            tgt = torch.full((n, lmax), fill, dtype=torch.long, device=device)
            masked = torch.zeros((n, lmax), dtype=torch.bool, device=device)
            prompt_pos = torch.zeros((n, lmax), dtype=torch.bool, device=device)
            am = torch.zeros((n, lmax), dtype=torch.long, device=device) if needs_pad else None
            p = torch.empty(n, dtype=torch.float32, device=device)
            for i, (_, noisy, m, pm, seq, lp) in enumerate(chunk):
                li = noisy.numel()
                x[i, :li] = noisy
                tgt[i, :li] = seq
                masked[i, :li] = m
                prompt_pos[i, :lp] = True
                p[i] = pm
                if am is not None:
                    am[i, :li] = 1
            logits = guided_logits(logits_fn, x, am, prompt_pos, mask_id, cfg_scale)
            row_idx = masked.nonzero(as_tuple=True)[0]
            ce = F.cross_entropy(logits[masked].float(), tgt[masked], reduction="none") / p[row_idx]
            per_row = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, row_idx, ce.double())
            for i, c in enumerate(chunk):
                totals[c[0]] += float(per_row[i])
    return [-(t / mc_num) for t in totals]


def masked_token_nll(
    logits_fn: LogitsFn,
    ids: torch.Tensor,
    mask_id: int,
    mc_num: int = 8,
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-3,
    attention_mask: Optional[torch.Tensor] = None,
    batch_size: int = 16,
) -> Tuple[float, int]:
    """Negative ELBO of whole sequences, for a text "NLL" / perplexity score.

    For sequence i and sample j, ``t = (u_i + j / mc_num) mod 1`` (``u_i ~ U[0,1)``, stratified over the samples),
    ``p_mask = (1 - eps) t + eps``, every real token is masked iid with ``p_mask`` (`forward_process`) and the
    sample's loss is ``sum_masked CE / p_mask``. The sequence's negative ELBO is the mean over its samples.

    Args:
        ids: LongTensor [B, L].
        attention_mask: optional [B, L] (1 = real token, 0 = padding): padding is never masked, is not counted
            and the mask is passed to ``logits_fn``.
        batch_size: rows per forward.

    Returns:
        ``(total_weighted_nll, n_tokens)``: the sum over sequences of their negative ELBO (nats) and the number of
        real tokens, so ``total / n_tokens`` is the per-token NLL bound and ``exp`` of it a perplexity bound.
    """
    if ids.dim() != 2:
        raise ValueError(f"masked_token_nll expects ids of shape [B, L], got {tuple(ids.shape)}")
    if int(mc_num) < 1:
        raise ValueError(f"mc_num must be >= 1, got {mc_num}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bsz, l = ids.shape
    device = ids.device
    am = None if attention_mask is None else attention_mask.to(device=device).long()
    real = torch.ones(bsz, l, dtype=torch.bool, device=device) if am is None else am.bool()
    n_tokens = int(real.sum())

    u = rand((bsz,), generator=generator, device=device)
    offs = torch.arange(mc_num, device=device, dtype=torch.float32) / mc_num
    t = torch.remainder(u[:, None] + offs[None, :], 1.0).reshape(-1)  # [B * mc]
    x_rep = ids.repeat_interleave(mc_num, dim=0)
    real_rep = real.repeat_interleave(mc_num, dim=0)
    am_rep = None if am is None else am.repeat_interleave(mc_num, dim=0)
    noisy, masked, p_mask = forward_process(x_rep, mask_id, t=t, eps=eps, maskable=real_rep, generator=generator)

    total = 0.0
    with torch.no_grad():
        for s in range(0, noisy.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            m = masked[sl]
            if not bool(m.any()):
                continue
            logits = logits_fn(noisy[sl], None if am_rep is None else am_rep[sl])
            ce = F.cross_entropy(logits[m].float(), x_rep[sl][m], reduction="none") / p_mask[sl][m]
            total += float(ce.double().sum())
    return total / mc_num, n_tokens
