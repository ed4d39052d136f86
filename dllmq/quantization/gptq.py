"""GPTQ: second-order, error-compensating weight quantization (Frantar et al., 2022).

For one linear layer ``y = x Wᵀ`` (W [N, K]) GPTQ minimises the output error on calibration
inputs, ``Σ_t ‖x_t (W - Ŵ)ᵀ‖² = tr(ΔW · XᵀX · ΔWᵀ)``, one input column at a time: column
``j`` is rounded to the grid, and its rounding error is pushed onto the not-yet-quantized
columns through the inverse Hessian so that later columns can compensate for it.

Implementation notes (written from the math, matching the usual conventions):

* ``H = (2/n) Σ_t w_t x_t x_tᵀ`` is accumulated as a running mean (`HessianAccumulator`), so
  its scale does not depend on the number of calibration tokens. ``w_t`` are optional per
  token weights (1 for plain GPTQ; CGQ's mask/confidence weights, see `cgq.py`).
* Dead inputs (``H_ii == 0``: the channel was always zero) get ``H_ii = 1`` and ``W[:, i] = 0``.
* Dampening ``λ = damp · mean(diag H)`` is added to the diagonal. If a Cholesky factorisation
  fails, damp is raised ×10 (up to 100) with a warning naming the layer; if even that fails
  (e.g. non-finite H) the layer falls back to round-to-nearest, again with a warning.
* ``U = chol(H⁻¹)`` upper, i.e. ``H⁻¹ = UᵀU``. Quantizing column j with error
  ``e_j = (w_j - q_j) / U_jj`` updates ``W[:, j+1:] -= e_j · U[j, j+1:]``. Updates are applied
  lazily: inside a block of ``block_size`` columns column by column, then to all later
  columns with one matmul (identical result, far fewer memory passes).
* Because ``W - Ŵ = E · U`` (E the matrix of scaled errors e), the reported loss
  ``Σ (w - q)² / d²`` (d = U_jj) is exactly ``tr(ΔW · H_damped · ΔWᵀ)``; with the running-mean
  H that is ``(2/n) ‖X ΔWᵀ‖²`` plus the dampening term.
* Quantization parameters: per tensor / per channel they are computed once, up front, on the
  (dead-column-zeroed) weight. Per group, ``static_groups=True`` (default, as llm-compressor
  and AutoGPTQ's static groups) computes every group's scale up front on the original
  columns; ``static_groups=False`` (original GPTQ) computes a group's scale from the already
  updated weights when the column loop reaches the group's first column. The block size is
  rounded up to a multiple of the group size in that mode so the group lies inside the
  current block and its weights are fully up to date.
* ``act_order=True`` processes columns by descending ``diag(H)``. It requires static groups
  for the group strategy: the group scales are then those of the original column order, so
  the stored [N, G] scales stay aligned with storage order and no ``g_idx`` is needed. The
  returned codes are always in the original column order.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from .qweight import QuantizedWeight
from .rtn import choose_qparams
from .spec import WeightSpec

_MAX_DAMP = 100.0


class HessianAccumulator:
    """Running-mean GPTQ Hessian ``H = (2/n) Σ_t w_t x_t x_tᵀ`` of a linear layer's inputs.

    ``add(x)`` takes inputs of shape [..., K] (any leading dims) and optional per-token weights
    of shape [...] (the leading dims). Tokens with weight 0 (padding) are not counted in ``n``.
    With weights whose mean over the counted tokens is 1 the scale of H matches plain GPTQ.
    """

    shareable = True  # linears fed the same tensor (q/k/v, gate/up) may share one accumulator

    def __init__(
        self,
        in_features: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self._h: torch.Tensor | None = None
        self.n_tokens = 0
        self.solve_cache: dict = {}  # gptq_quantize's factorisation of this Hessian, shared by the linears it feeds

    def add(self, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
        k = x.shape[-1]
        if self.in_features is None:
            self.in_features = k
        elif k != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {k}")
        if self._h is None:
            device = self.device if self.device is not None else x.device
            self._h = torch.zeros(k, k, dtype=self.dtype, device=device)
        xs = x.reshape(-1, k).to(device=self._h.device, dtype=self.dtype)
        if token_weights is not None:
            if token_weights.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_weights shape {tuple(token_weights.shape)} does not match inputs {tuple(x.shape[:-1])}"
                )
            tw = token_weights.reshape(-1).to(device=self._h.device, dtype=self.dtype)
            if (tw < 0).any() or not torch.isfinite(tw).all():
                raise ValueError("token weights must be finite and non-negative")
            keep = tw > 0
            xs = xs[keep] * tw[keep].sqrt()[:, None]
        m = xs.shape[0]
        if m == 0:
            return
        self.solve_cache.clear()
        n = self.n_tokens
        self._h.mul_(n / (n + m))
        self._h.addmm_(xs.t(), xs, alpha=2.0 / (n + m))
        self.n_tokens = n + m

    @property
    def hessian(self) -> torch.Tensor:
        if self._h is None:
            raise RuntimeError("no inputs were added to this Hessian accumulator")
        return self._h


def _lower_triangular_inverse(m: torch.Tensor, base: int = 256) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by recursive halving ([[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1,
    C^-1]]): the work is in two matrix products per level, ~2x faster than a triangular solve against the identity."""
    n = m.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype, device=m.device), upper=False)
    h = n // 2
    a_inv, c_inv = _lower_triangular_inverse(m[:h, :h], base), _lower_triangular_inverse(m[h:, h:], base)
    out = torch.zeros_like(m)
    out[:h, :h], out[h:, h:] = a_inv, c_inv
    out[h:, :h] = -(c_inv @ (m[h:, :h] @ a_inv))
    return out


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹), raising damp on failure. None: give up (use RTN).

    The reference computes chol(H), its inverse product, and the upper Cholesky of that: three O(K³) factorisations.
    With J the order-reversing permutation and JHJ = MMᵀ (lower Cholesky), U = J M⁻¹ J: one factorisation and one
    triangular inverse, the same factor up to rounding (1.6x faster at K = 12288, LLaDA-8B's down_proj)."""
    mean_diag = torch.diagonal(h).mean().item()
    d = damp
    while True:
        hd = h.flip(0, 1)
        if d > 0:
            hd.diagonal().add_(d * mean_diag)
        m, info = torch.linalg.cholesky_ex(hd)
        # a non-finite entry of a Cholesky factor reaches its own row's diagonal entry: checking the diagonal is
        # enough, and costs K reads instead of K^2
        if info.item() == 0 and torch.isfinite(torch.diagonal(m)).all():
            u = _lower_triangular_inverse(m).flip(0, 1)
            if torch.isfinite(torch.diagonal(u)).all():
                if d != damp:
                    warnings.warn(
                        f"GPTQ: Hessian of {name} is not positive definite with damp={damp:g}; "
                        f"used damp={d:g} (consider more calibration data)",
                        stacklevel=3,
                    )
                return u, d
        if not math.isfinite(mean_diag) or d >= _MAX_DAMP:
            warnings.warn(
                f"GPTQ: Cholesky failed for {name} even with damp={d:g}; "
                "falling back to round-to-nearest for this layer",
                stacklevel=3,
            )
            return None, d
        d = d * 10 if d > 0 else 1e-4


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    clip_ratio: float = 1.0,
    name: str = "layer",
    scale_search: str = "minmax",
    solve_cache: dict | None = None,
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``W`` [N, K] with GPTQ given the Hessian ``H`` [K, K] of its inputs.

    Returns the QuantizedWeight (original column order) and
    ``{"damp": damp used, "loss": Σ (w - q)² / U_jj², "seconds": wall time, "rtn_fallback": bool}``.
    ``clip_ratio`` < 1 shrinks the min/max range of every scale (as in `compute_qparams`);
    ``scale_search="mse"`` searches each group's clipping below it (`rtn.mse_qparams`), on the
    original weights for static groups and on the error-updated ones for dynamic groups.
    ``solve_cache``: a dict kept with ``H`` (HessianAccumulator.solve_cache); layers quantized against the same
    Hessian reuse its damped inverse Cholesky factor instead of recomputing it.
    """
    t0 = time.perf_counter()
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    n, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight in_features={k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    spec.check_layer(name, k)
    grouped = spec.strategy == "group"
    gs: int = spec.group_size if grouped else k  # type: ignore[assignment]
    if grouped and act_order and not static_groups:
        raise ValueError(
            "act_order with dynamic (non-static) groups would need a g_idx permutation in the "
            "checkpoint; use static_groups=True"
        )

    device = W.device
    W = W.detach().to(torch.float32).clone()
    hdtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    # The factorisation depends only on H, damp and act_order: linears that share a Hessian (q/k/v, gate/up) share
    # it through `solve_cache` (three O(K^3) factorisations per layer, 37 s for LLaDA-8B's down_proj on one core).
    key = (damp, act_order, hdtype, str(device))
    solved = solve_cache.get(key) if solve_cache is not None else None
    if solved is None:
        H = H.detach().to(device=device, dtype=hdtype).clone()
        dead = torch.diagonal(H) == 0
        if dead.any():
            H[dead, dead] = 1
    else:
        dead = solved[0]
    if dead.any():
        W[:, dead] = 0

    # Up-front parameters (all but dynamic groups), always on the ORIGINAL column order.
    dynamic_groups = grouped and not static_groups
    if dynamic_groups:
        scale = torch.empty(n, k // gs, dtype=torch.float32, device=device)
        zp = None if spec.symmetric else torch.empty(n, k // gs, dtype=torch.int32, device=device)
    else:
        scale, zp = choose_qparams(W, spec, clip_ratio, scale_search)

    if solved is None:
        perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
        if perm is not None:
            H = H[perm][:, perm]
        U, used_damp = _inverse_cholesky(H, damp, name)
        fallback = U is None
        if fallback:  # identity "inverse Hessian": no error propagation = round-to-nearest
            U = torch.eye(k, dtype=torch.float32, device=device)
        U = U.to(torch.float32)
        del H
        if solve_cache is not None:
            solve_cache[key] = (dead, perm, U, used_damp, fallback)
    else:
        _, perm, U, used_damp, fallback = solved
    if perm is not None:
        W = W[:, perm]

    # Column (in processing order) -> group index in the original order.
    orig_col = perm if perm is not None else torch.arange(k, device=device)
    col_group = orig_col // gs if grouped else torch.zeros(k, dtype=torch.long, device=device)

    if dynamic_groups:
        block_size = -(-block_size // gs) * gs  # whole groups per block
    Q = torch.empty(n, k, dtype=torch.int32, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)

    # Per-column scale / zero point as floats, one row per column in processing order (the column
    # loop is Python: keep each step to a handful of vector ops; the arithmetic is rtn.quantize's).
    if dynamic_groups:  # filled group by group as GPTQ reaches them
        St = torch.empty(k, n, dtype=torch.float32, device=device)
        Zt = None if zp is None else torch.empty(k, n, dtype=torch.float32, device=device)
    else:  # [N, G] (or [N, 1] / [1, 1]) -> [K, N] through each column's group
        St = scale.float().expand(n, -1)[:, col_group].t().contiguous()
        Zt = None if zp is None else zp.float().expand(n, -1)[:, col_group].t().contiguous()
    qmin, qmax = float(spec.qmin), float(spec.qmax)

    # Work on Wᵀ: a column of W is then a contiguous row, and the rank-1 updates below touch a
    # contiguous slab (several times faster than strided column slices).
    Wt = W.t().contiguous()
    del W
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        Q1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic_groups and c % gs == 0:
                s_g, z_g = choose_qparams(W1[i : i + gs].t(), spec, clip_ratio, scale_search)
                scale[:, c // gs] = s_g[:, 0]
                St[c : c + gs] = s_g.t()
                if zp is not None:
                    zp[:, c // gs] = z_g[:, 0]  # type: ignore[index]
                    Zt[c : c + gs] = z_g.t().float()  # type: ignore[index]
            w = W1[i]
            s = St[c]
            x = w / s
            if Zt is not None:
                x = x + Zt[c]
            q = torch.round(x).clamp_(qmin, qmax)
            Q1[i] = q
            wq = (q - Zt[c]) * s if Zt is not None else q * s
            err = (w - wq) / U1[i, i]
            Err1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        Q[:, i1:i2] = Q1.t().to(torch.int32)
        loss += (Err1.double() ** 2).sum()
        if i2 < k:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qw = QuantizedWeight(q=Q.contiguous(), scale=scale.contiguous(), zero_point=zp, spec=spec)
    info = {
        "damp": used_damp,
        "loss": float(loss.item()),
        "seconds": time.perf_counter() - t0,
        "rtn_fallback": fallback,
    }
    return qw, info
