"""Certainty-guided quantization (CGQ, DLLMQuant): per-token weights for the GPTQ Hessian.

The paper (DLLMQuant, Eq. 10; survey Eq. 125) replaces GPTQ's ``H = X Xᵀ`` with

    H = [X ⊙ (1[x_t = MASK] + √sc_t)] · [X ⊙ (1[x_t = MASK] + √sc_t)]ᵀ

i.e. every token's input row is multiplied by ``a_t = m_t + sc_t^(1/2)`` where ``m_t`` is a
"custom weighted indicator" of the token being masked at that step and ``sc_t`` is the
full-precision model's final confidence for the token. Masked, confident tokens decide the
next denoising step, so their errors are weighted most.

Formula implemented here (per position t):

    a_t = base + (mask_weight - 1) · masked_t + confidence_t ** conf_power
    w_t = a_t ** 2                      (square=True, the default)
    w_t = w_t / mean(w over valid positions)   (normalize=True)

``w_t`` is what `HessianAccumulator.add(x, token_weights=w)` multiplies ``x_t x_tᵀ`` by.
Because the paper scales X (not XXᵀ) the Hessian weight is the *square* of the row factor;
``square=False`` uses ``a_t`` directly. With the defaults (base 1, mask_weight 2, conf_power
0.5) the row factor is ``2 + √c`` for masked and ``1 + √c`` for visible tokens.

What the paper leaves open, and what we chose:

* The indicator's values. Reviewers quote "1 and 0.7" ("0.7 weight for unmasked tokens"),
  which suggests masked → 1.0 and unmasked → 0.7. Our defaults use 2.0 / 1.0 (a stronger
  mask preference); the reviewers' reading is ``base=0.7, mask_weight=1.3`` in this formula.
* What "confidence" is. The caller passes it: for masked positions the full-precision
  model's max probability (or the probability of the token finally decoded there), for
  visible positions the probability of the visible token.
* Whether the factor multiplies X (→ squared weight in H) or H directly: we follow the
  equation as written (squared), switchable with ``square``.
* Normalisation: not mentioned. We rescale to mean 1 over the valid positions of the call so
  that H keeps plain GPTQ's scale (dampening is relative anyway, so this only matters when
  mixing weighted and unweighted batches in one accumulator). Positions with
  ``valid == False`` (padding) get weight 0 and are skipped by the accumulator.
"""

from __future__ import annotations

import torch


def token_weights(
    masked: torch.Tensor,
    confidence: torch.Tensor,
    mask_weight: float = 2.0,
    conf_power: float = 0.5,
    base: float = 1.0,
    normalize: bool = True,
    square: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CGQ weights [B, L] (float32) for the Hessian from the mask state and FP confidences.

    ``masked``: bool [B, L], True where the input token is the mask token.
    ``confidence``: [B, L] probabilities in [0, 1] (see module docstring).
    ``valid``: optional bool [B, L]; False positions (padding) get weight 0.
    """
    if masked.shape != confidence.shape:
        raise ValueError(f"masked {tuple(masked.shape)} and confidence {tuple(confidence.shape)} differ in shape")
    if conf_power < 0 or base < 0 or mask_weight < 0:
        raise ValueError("mask_weight, conf_power and base must be >= 0")
    conf = confidence.detach().float().clamp(0.0, 1.0)
    a = base + (mask_weight - 1.0) * masked.float() + conf.pow(conf_power)
    a = a.clamp_min(0.0)
    w = a * a if square else a
    if valid is not None:
        if valid.shape != masked.shape:
            raise ValueError(f"valid {tuple(valid.shape)} and masked {tuple(masked.shape)} differ in shape")
        w = torch.where(valid.bool(), w, torch.zeros_like(w))
    if normalize:
        n = w.numel() if valid is None else int(valid.bool().sum())
        total = w.sum()
        if n > 0 and total > 0:
            w = w * (n / total)
    return w
