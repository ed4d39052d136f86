"""AWQ: activation-aware weight quantization (Lin et al., 2023) as pure tensor functions.

AWQ protects the weights that multiply large activations by a per-input-channel scale ``s``:
``y = x Wᵀ = (x / s)(W · s)ᵀ``. Quantizing ``W · s`` instead of ``W`` shrinks the relative
rounding error of the scaled-up (salient) columns; ``1 / s`` is folded into the previous op
(a norm's weight or a previous linear's output rows), so the model is unchanged before
quantization (`fold_scales`).

* `awq_search_scales`: grid search over ``r ∈ {0, 1/grid, …, (grid-1)/grid}`` of
  ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` (duo scaling) or ``s = x_mean^r``, clamped to
  ≥ 1e-4 and normalised by ``sqrt(max(s)·min(s))``. ``x_mean`` is the mean |x| per input
  channel; ``w_mean`` is the mean over output rows (of all linears sharing the input) of
  ``|W|`` normalised by its quantization group's max |W|. The loss is either the caller's
  (``block_fn(s)``, e.g. the MSE of a whole block's output) or the summed output MSE of the
  linears on calibration inputs ``X``. Unlike the reference implementations we also score
  ``s = 1`` and keep it if no grid point beats it (``include_identity``), so the search never
  increases the calibration loss.
* `awq_search_clip`: per quantization group, shrink the clipping range
  ``max |W_g| · (1 - i/grid)`` for ``i < grid · max_shrink`` and keep the value minimising the
  group's contribution to the output, ``‖X_g W_gᵀ - X_g Q(clip(W_g))ᵀ‖²`` (llm-awq's auto-clip).
  ``i = 0`` is no clipping, so the error never increases. `apply_clip` clamps the weight.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .grid import _expand, _grouped, fake_quantize
from .spec import WeightSpec


def _w_mean(weights: Sequence[torch.Tensor], spec: WeightSpec) -> torch.Tensor:
    """Mean over output rows of |W| normalised by the max |W| of its quantization group."""
    w = torch.cat([wi.detach().float() for wi in weights], dim=0)
    n, k = w.shape
    g = _grouped(w.abs(), spec)  # tensor: [1, 1, n*k]; channel: [n, 1, k]; group: [n, G, gs]
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.reshape(n, k).mean(dim=0)


def _candidate(x_mean: torch.Tensor, w_mean: torch.Tensor | None, r: float) -> torch.Tensor:
    s = x_mean.pow(r)
    if w_mean is not None:
        s = s / (w_mean.pow(1.0 - r) + 1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(
    x_stats: torch.Tensor,
    weights: Sequence[torch.Tensor],
    spec: WeightSpec,
    X: torch.Tensor | None = None,
    *,
    block_fn: Callable[[torch.Tensor], float] | None = None,
    grid: int = 20,
    duo_scaling: bool = True,
    include_identity: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Grid-search AWQ's per-input-channel scales for the linears in ``weights`` ([N_i, K]).

    ``x_stats`` [K]: mean |x| per input channel over calibration tokens. Give either ``X``
    [T, K] (calibration inputs; the loss is the output MSE of all linears, reference = the
    unquantized weights) or ``block_fn(scales) -> loss`` (the caller scales, quantizes and
    runs whatever it wants to score). Returns ``(scales [K] float32, info)`` with
    ``info = {"ratios", "losses", "best_ratio" (None: identity kept), "best_loss", "identity_loss"}``.
    The weights are multiplied by the returned scales, the previous op divided (`fold_scales`).
    """
    if (X is None) == (block_fn is None):
        raise ValueError("give exactly one of X (calibration inputs) or block_fn")
    if not weights:
        raise ValueError("weights must hold at least one linear weight")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    k = x_stats.shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match {k} input channels")
    spec.check_layer("weight", k)
    device = weights[0].device
    x_mean = x_stats.detach().to(device=device, dtype=torch.float32).reshape(k)
    w_mean = _w_mean(weights, spec).to(device) if duo_scaling else None

    if block_fn is not None:
        loss_fn = lambda s: float(block_fn(s))  # noqa: E731
    else:
        Xf = X.detach().to(device=device, dtype=torch.float32).reshape(-1, k)  # type: ignore[union-attr]
        ws = [w.detach().float() for w in weights]
        refs = [Xf @ w.t() for w in ws]
        numel = sum(r.numel() for r in refs)

        def loss_fn(s: torch.Tensor) -> float:
            total = 0.0
            for w, ref in zip(ws, refs):
                w_eff = fake_quantize(w * s, spec) / s
                total += float((Xf @ w_eff.t() - ref).pow(2).sum())
            return total / numel

    ratios = [i / grid for i in range(grid)]
    losses: list[float] = []
    best_loss, best_ratio, best_s = float("inf"), None, None
    for r in ratios:
        s = _candidate(x_mean, w_mean, r)
        loss = loss_fn(s)
        losses.append(loss)
        if loss < best_loss:  # NaN never wins
            best_loss, best_ratio, best_s = loss, r, s
    identity_loss = None
    ones = torch.ones(k, dtype=torch.float32, device=device)
    if include_identity or best_s is None:
        identity_loss = loss_fn(ones)
        if best_s is None or not identity_loss >= best_loss:
            best_loss, best_ratio, best_s = identity_loss, None, ones
    info = {
        "ratios": ratios,
        "losses": losses,
        "best_ratio": best_ratio,
        "best_loss": best_loss,
        "identity_loss": identity_loss,
    }
    return best_s.clone(), info


def apply_clip(W: torch.Tensor, max_val: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Clamp each quantization group of ``W`` [N, K] to ``[-max_val, max_val]`` (max_val [N, G])."""
    n, k = W.shape
    m = max_val.to(device=W.device, dtype=torch.float32)
    if spec.strategy == "tensor":
        m = m.reshape(1, 1).expand(n, 1)
    lim = _expand(m, k)
    w = W.float()
    return torch.maximum(torch.minimum(w, lim), -lim).to(W.dtype)


def awq_search_clip(
    W: torch.Tensor,
    X: torch.Tensor,
    spec: WeightSpec,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    max_chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Per-group clipping maxima [N, G] ([1, 1] per tensor) minimising each group's output error.

    ``X`` [..., K] are calibration inputs; at most ``n_sample_tokens`` evenly strided tokens are
    used. Quantize with ``fake_quantize(apply_clip(W, max_val, spec), spec)`` (or rtn on it).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    n, k = W.shape
    spec.check_layer("weight", k)
    Xf = X.detach().reshape(-1, k).to(device=W.device, dtype=torch.float32)
    step = max(1, Xf.shape[0] // max(1, n_sample_tokens))
    Xf = Xf[::step][:n_sample_tokens]
    t = Xf.shape[0]
    w = W.detach().float()
    org_max = _grouped(w, spec).abs().amax(dim=-1)  # [N, G] or [1, 1]
    n_steps = max(1, int(grid * max_shrink))

    if spec.strategy == "tensor":
        best_err, best = None, org_max
        for i in range(n_steps):
            mv = org_max * (1 - i / grid)
            err = (Xf @ (w - fake_quantize(apply_clip(w, mv, spec), spec)).t()).pow(2).sum()
            if best_err is None or err < best_err:
                best_err, best = err, mv
        return best.clone()

    groups = org_max.shape[1]
    gl = k // groups
    xg = Xf.reshape(t, groups, gl)
    best = org_max.clone()
    rows = max(1, max_chunk_elems // max(1, t * groups))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        wc = w[r0:r1]
        om = org_max[r0:r1]
        best_err = torch.full_like(om, float("inf"))
        for i in range(n_steps):
            mv = om * (1 - i / grid)
            diff = (wc - fake_quantize(apply_clip(wc, mv, spec), spec)).reshape(r1 - r0, groups, gl)
            err = torch.einsum("tgk,ngk->tng", xg, diff).pow(2).sum(dim=0)  # [rows, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r1] = torch.where(better, mv, best[r0:r1])
    return best


@torch.no_grad()
def fold_scales(prev: nn.Module, nexts: Sequence[nn.Module], scales: torch.Tensor) -> None:
    """Fold AWQ scales in place: ``prev``'s output channels ÷ s, ``nexts``' input columns × s.

    ``prev`` is a norm with an elementwise ``.weight`` [K] (and optional ``.bias``), e.g.
    RMSNorm / LayerNorm, or an ``nn.Linear`` whose K output rows (and bias) are divided.
    ``nexts`` are the linears that read that output. The composed function is unchanged.
    """
    s = scales.detach().float().reshape(-1)
    k = s.numel()
    pw = getattr(prev, "weight", None)
    if not isinstance(pw, torch.Tensor):
        raise ValueError(f"cannot fold scales into {type(prev).__name__}: it has no weight")
    if pw.shape[0] != k or pw.dim() not in (1, 2):
        raise ValueError(f"{type(prev).__name__} weight {tuple(pw.shape)} does not produce {k} channels")
    for m in nexts:
        nw = getattr(m, "weight", None)
        if not isinstance(nw, torch.Tensor) or nw.dim() != 2 or nw.shape[1] != k:
            raise ValueError(f"{type(m).__name__} does not read {k} input channels")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("scales must be finite and positive")

    def _scale(p: torch.Tensor, factor: torch.Tensor) -> None:
        p.copy_((p.float() * factor.to(p.device)).to(p.dtype))

    inv = 1.0 / s
    _scale(pw, inv[:, None] if pw.dim() == 2 else inv)
    pb = getattr(prev, "bias", None)
    if isinstance(pb, torch.Tensor):
        _scale(pb, inv)
    for m in nexts:
        _scale(m.weight, s[None, :])
