"""DuQuant (Lin et al., 2024: "Rotation and Permutation for Advanced Outlier Management") as
pure tensor functions.

For a linear layer reading ``x`` [T, K] DuQuant quantizes ``x̃ = (x / s) · T`` and
``W̃ = (W · s) · T`` instead of ``x`` and ``W``; since ``T`` is orthogonal,
``x̃ W̃ᵀ = (x / s) T Tᵀ (W · s)ᵀ = x Wᵀ``. The parts:

* ``s`` [K]: optional SmoothQuant scales (`smoothquant.smooth_scales`, α = 0.5), moving part
  of the activation outliers into the weights first.
* ``T = R1 · P · R2``: two block-diagonal orthogonal matrices (blocks of ``b`` channels,
  default 128) around a channel permutation ``P``.

**Block rotation** (`rotation_block` / `rotation_blocks`). Fixed per block size ``b``, a
"spreading" orthogonal matrix ``Q = diag(1, O) · H`` (`spreading_rotation`):

* ``H = I - 2 v vᵀ / (vᵀ v)`` with ``v = e₀ - u``, ``u = 1/√b · (1, …, 1)``, the Householder
  reflection that swaps ``e₀`` and ``u`` (symmetric and orthogonal);
* ``O`` a random orthogonal (b-1)×(b-1) matrix (QR of a Gaussian drawn from a generator
  seeded by ``seed``, with the signs of R's diagonal folded in, so it is deterministic),
  acting on the channels 1…b-1.

Row 0 of ``Q`` is ``uᵀ``, so in ``y = x Q`` channel 0 of ``x`` is spread evenly over all ``b``
outputs (each gets ``x₀/√b``) while the other channels are scrambled by ``O`` then reflected.
Greedy step: take the channel ``j`` holding the largest |value| of the current block
activations (over all calibration rows), and multiply by ``P₀ⱼ Q`` (``P₀ⱼ`` swaps channels 0
and j, i.e. the rows ``0`` and ``j`` of ``Q`` are exchanged), which spreads channel ``j``.
Repeat up to ``steps`` times (default 256) on the rotated activations; the block's rotation
is the product of the prefix of steps with the smallest peak max|x| (the identity if no step
lowers it), so the peak never increases. Every block runs the same procedure independently
(vectorised over blocks). This mirrors DuQuant's construction (greedy from the largest
outlier, fixed orthogonal that spreads one coordinate, random orthogonal on the rest), with
our own choice of a Householder reflection for the spreading part.

**Zigzag permutation** (`zigzag_permutation`): channels sorted by max|x| (after R1, largest
first) are dealt to the blocks in the order 0, 1, …, B-1, B-1, …, 1, 0, 0, 1, …; the r-th
round fills position r of every block. Every block gets one channel of each "round" of B
channels, so big and small channels are balanced across blocks and R2 can spread what R1 could
not (outliers concentrated in one block).

Calibration uses the rows of ``X / s`` (at most ``max_rows`` evenly strided tokens). The
online cost of `apply_duquant` is two batched b×b block matmuls and one gather: O(T·K·b).
Quantization (per-token activations with clip 0.9, per-channel weights with clip 0.8 in
QDLM's setting) happens afterwards, with `smoothquant.fake_quant_act` and `rtn`.

Storage (`DuQuantTransform.to_tensors`): ``smooth_scale`` [K] (absent without smoothing),
``rot1`` [B, b, b], ``perm`` int64 [K] (``x_perm = x[..., perm]``), ``rot2`` [B, b, b].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..runtime import native
from .smoothquant import smooth_scales

TENSOR_NAMES = ("smooth_scale", "rot1", "perm", "rot2")


def block_size_for(k: int, block: int = 128) -> int:
    """Block size used for width ``k``: the largest divisor of ``k`` that is ≤ ``block``."""
    if k < 1 or block < 1:
        raise ValueError(f"width and block size must be positive, got k={k}, block={block}")
    b = min(block, k)
    while k % b:
        b -= 1
    return b


def spreading_rotation(b: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal ``Q = diag(1, O) · H`` [b, b] whose row 0 is ``1/√b · (1, …, 1)``.

    ``H`` is the Householder reflection swapping ``e₀`` and the uniform unit vector; ``O`` is a
    seeded random orthogonal matrix on the other b-1 coordinates (see the module docstring).
    """
    if b < 1:
        raise ValueError(f"block size must be positive, got {b}")
    u = torch.full((b,), 1.0 / b**0.5, dtype=torch.float64)
    v = -u
    v[0] += 1.0
    vv = float(v @ v)
    h = torch.eye(b, dtype=torch.float64)
    if vv > 0:  # b == 1: e₀ == u, H = I
        h -= (2.0 / vv) * torch.outer(v, v)
    rot = torch.eye(b, dtype=torch.float64)
    if b > 2:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(b - 1, b - 1, generator=gen, dtype=torch.float64)
        qm, rm = torch.linalg.qr(g)
        sign = torch.where(torch.diagonal(rm) < 0, -1.0, 1.0).to(torch.float64)
        rot[1:, 1:] = qm * sign  # unique QR (R with a positive diagonal): deterministic
    return (rot @ h).to(dtype)


def _apply_blocks(x: torch.Tensor, rots: torch.Tensor) -> torch.Tensor:
    """``x`` [M, B·b] times block-diag(rots [B, b, b]) -> [M, B·b]."""
    m = x.shape[0]
    nb, b, _ = rots.shape
    y = torch.bmm(x.reshape(m, nb, b).transpose(0, 1), rots)  # [B, M, b]
    return y.transpose(0, 1).reshape(m, nb * b)


def rotation_blocks(x: torch.Tensor, block: int, steps: int = 256, seed: int = 0) -> torch.Tensor:
    """Greedy DuQuant rotations [B, b, b] (float64) for the ``K / block`` blocks of ``x`` [M, K].

    ``x`` holds calibration rows (tokens; a single row such as per-channel max|x| also works).
    Each block gets the best prefix of the greedy product ``∏ P₀ⱼ Q`` (module docstring).
    """
    if x.dim() == 1:
        x = x.reshape(1, -1)
    if x.dim() != 2:
        raise ValueError(f"expected calibration rows [M, K], got shape {tuple(x.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    m, k = x.shape
    if block < 1 or k % block:
        raise ValueError(f"block size {block} does not divide width {k}")
    nb, b = k // block, block
    device = x.device
    q64 = spreading_rotation(b, seed).to(device)
    eye = torch.eye(b, dtype=torch.float64, device=device)
    if m == 0 or b == 1 or steps == 0:
        return eye.expand(nb, b, b).clone()
    # Float32 throughout (2x the float64 speed): the search only compares peaks. The product is rebuilt
    # from the recorded channel choices for each block's best prefix only, then replaced by its polar factor
    # (the nearest orthogonal matrix, a ~1e-7 change) so the result is orthogonal in float64.
    q = q64.float()
    cur = x.detach().float().reshape(m, nb, b).transpose(0, 1).contiguous()  # [B, M, b]
    best_peak = cur.abs().amax(dim=(1, 2))
    best_len = torch.zeros(nb, dtype=torch.long, device=device)
    ar = torch.arange(b, device=device)
    rows = torch.arange(nb, device=device)
    chosen = []
    for t in range(steps):
        j = cur.abs().amax(dim=1).argmax(dim=1)  # [B]: channel holding the block's peak
        chosen.append(j)
        idx = ar.expand(nb, b).clone()
        idx[:, 0] = j
        idx[rows, j] = 0
        cur = torch.bmm(cur, q[idx])  # rows 0 and j of Q exchanged = P₀ⱼ · Q
        peak = cur.abs().amax(dim=(1, 2))
        better = peak < best_peak
        best_peak = torch.where(better, peak, best_peak)
        best_len = torch.where(better, torch.full_like(best_len, t + 1), best_len)
    rot = eye.float().expand(nb, b, b).clone()
    for t in range(int(best_len.max())):
        idx = ar.expand(nb, b).clone()
        idx[:, 0] = chosen[t]
        idx[rows, chosen[t]] = 0
        live = best_len > t  # blocks whose best prefix includes step t
        rot[live] = torch.bmm(rot[live], q[idx[live]])
    u, _, vh = torch.linalg.svd(rot.double())  # the nearest orthogonal matrix (polar factor): exact in float64
    return u @ vh


def rotation_block(x_block: torch.Tensor, steps: int = 256, seed: int = 0) -> torch.Tensor:
    """Greedy rotation [b, b] (float64) for one block's calibration rows ``x_block`` [M, b] (or [b])."""
    xb = x_block.reshape(1, -1) if x_block.dim() == 1 else x_block
    return rotation_blocks(xb, xb.shape[-1], steps, seed)[0]


def zigzag_permutation(channel_max: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Permutation [K] (int64) balancing channel magnitudes over ``n_blocks`` equal blocks.

    Channels sorted by ``channel_max`` (descending, stable) are dealt in zigzag order
    0, 1, …, B-1, B-1, …, 0, 0, 1, …; round r fills position r of every block. Apply as
    ``x[..., perm]`` (new channel i is old channel ``perm[i]``).
    """
    c = channel_max.detach().reshape(-1)
    k = c.numel()
    if n_blocks < 1 or k % n_blocks:
        raise ValueError(f"{n_blocks} blocks do not divide {k} channels")
    b = k // n_blocks
    order = torch.argsort(c.float().cpu(), descending=True, stable=True)
    i = torch.arange(k)
    rnd, pos = i // n_blocks, i % n_blocks
    blk = torch.where(rnd % 2 == 0, pos, n_blocks - 1 - pos)
    perm = torch.empty(k, dtype=torch.int64)
    perm[blk * b + rnd] = order
    return perm.to(channel_max.device)


def _block_diag(rots: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*rots.unbind(0))


# On CPUs with AMX, oneDNN's bf16 bmm runs on AMX tiles, faster than the fused kernel's AVX512-BF16 dot products at
# many rows (not measured: no AMX CPU in the sessions that built it); there the kernel takes only inputs this small,
# where the torch ops' fixed costs dominate.
NATIVE_MAX_ROWS_AMX = 64


@dataclass
class DuQuantTransform:
    """``x ↦ (x / s) · R1 · P · R2`` for one linear input of width K (see module docstring).

    ``smooth_scale`` [K] or None; ``rot1`` / ``rot2`` [B, b, b] (block-diagonal factors);
    ``perm`` int64 [K] (``P``: ``x[..., perm]``).
    """

    smooth_scale: torch.Tensor | None
    rot1: torch.Tensor
    perm: torch.Tensor
    rot2: torch.Tensor

    def __post_init__(self) -> None:
        if self.rot1.dim() != 3 or self.rot1.shape[1] != self.rot1.shape[2] or self.rot1.shape != self.rot2.shape:
            raise ValueError(
                f"rotations must be [B, b, b] and alike, got {tuple(self.rot1.shape)}, {tuple(self.rot2.shape)}"
            )
        k = self.in_features
        self.perm = self.perm.to(torch.int64).reshape(-1)
        if self.perm.numel() != k or not torch.equal(torch.sort(self.perm.cpu()).values, torch.arange(k)):
            raise ValueError(f"perm must be a permutation of {k} channels")
        if self.smooth_scale is not None:
            s = self.smooth_scale.reshape(-1)
            if s.numel() != k or not torch.isfinite(s).all() or (s <= 0).any():
                raise ValueError(f"smooth_scale must hold {k} finite positive values")
            self.smooth_scale = s

    @property
    def block_size(self) -> int:
        return int(self.rot1.shape[1])

    @property
    def n_blocks(self) -> int:
        return int(self.rot1.shape[0])

    @property
    def in_features(self) -> int:
        return self.n_blocks * self.block_size

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense orthogonal ``T = R1 · P · R2`` [K, K] (without the smoothing scales)."""
        r1 = _block_diag(self.rot1.to(dtype))
        r2 = _block_diag(self.rot2.to(dtype))
        return r1[:, self.perm.to(r1.device)] @ r2.to(r1.device)

    def _key(self, dev: torch.device, dt: torch.dtype) -> tuple:
        # versions: an in-place load into the stored tensors (load_state_dict) invalidates the converted copies
        return (dev, dt, *(None if t is None or t.is_inference() else t._version
                           for t in (self.rot1, self.rot2, self.perm, self.smooth_scale)))

    def _as(self, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rot1, rot2, perm, 1-D smooth_scale) on dev in dt, converted once per (device, dtype): the smoothing scales
        are stored in fp32 and would otherwise be cast on every forward."""
        cache = self.__dict__.setdefault("_converted", {})
        key = self._key(dev, dt)
        if key not in cache:
            s = None if self.smooth_scale is None else self.smooth_scale.to(device=dev, dtype=dt).contiguous()
            cache[key] = (self.rot1.to(device=dev, dtype=dt), self.rot2.to(device=dev, dtype=dt),
                          self.perm.to(dev).contiguous(), s)
        return cache[key]

    def native_args(self, x: torch.Tensor) -> tuple | None:
        """The arguments of `native.duquant_rows` (rotations packed once per version) when the fused CPU kernel runs
        x [..., K]: bf16 on a CPU with AVX512-BF16 dot products, block size a multiple of 16, and, on AMX CPUs, at
        most `NATIVE_MAX_ROWS_AMX` rows. None otherwise (the torch ops of `apply`)."""
        if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.requires_grad or self.block_size % 16
                or (native.has_amx() and x.numel() > NATIVE_MAX_ROWS_AMX * self.in_features)
                or not native.bf16_dot_available()):
            return None
        cache = self.__dict__.setdefault("_pairs", {})
        key = self._key(x.device, x.dtype)
        if key not in cache:
            r1, r2, perm, s = self._as(x.device, x.dtype)
            p1, p2 = native.pack_bf16_pairs(r1), native.pack_bf16_pairs(r2)
            cache[key] = None if p1 is None or p2 is None else (s, p1, perm, p2, self.block_size)
        return cache[key]

    def _rotate(self, x2: torch.Tensor) -> torch.Tensor:
        r1, r2, perm, _ = self._as(x2.device, x2.dtype)
        y = _apply_blocks(x2, r1)
        # P is a column gather, which PyTorch's indexing runs 10-30x slower than a row copy on CPU (1.1 ms at
        # 256 x 4096 bf16, a third of the online transform): a plain copy loop when the CPU kernels are there
        yp = native.gather_columns(y, perm)
        return _apply_blocks(y[:, perm] if yp is None else yp, r2)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Online activation transform ``(x / s) · T`` for ``x`` [..., K], in x's dtype, O(T·K·b)."""
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} channels, transform expects {k}")
        x2 = x.reshape(-1, k)
        args = self.native_args(x2)
        if args is not None:  # CPU bf16: the ops below fused into one pass (runtime/cpu_kernels.c)
            y = native.duquant_rows(x2, *args)
            if y is not None:
                return y.reshape(x.shape)
        s = self._as(x.device, x.dtype)[3]
        if s is not None:
            x2 = x2 / s
        return self._rotate(x2).reshape(x.shape)

    def apply_quantized(self, x: torch.Tensor, act_spec, args: tuple | None = None) -> tuple | None:
        """``grid.quantize_per_token_affine(apply(x), act_spec)`` in one pass, the transformed rows never written:
        the same codes, scales and zero points (the kernel quantizes the bf16 values `apply` returns with the same
        code). ``args``: `native_args(x)` if already at hand. None where the kernel does not run (`native_args`)."""
        args = args or self.native_args(x)
        if args is None or x.shape[-1] != self.in_features:
            return None
        return native.duquant_rows(x.reshape(-1, self.in_features), *args,
                                   quantize=(act_spec.qmin, act_spec.qmax, act_spec.clip_ratio, not act_spec.symmetric))

    def quantized_plan(self, x: torch.Tensor, act_spec):
        """`apply_quantized` for inputs shaped like ``x``, checked once: a callable x -> (codes, scale, zero point), or
        None where the kernel does not run (`native_args`)."""
        args = self.native_args(x)
        if args is None or x.shape[-1] != self.in_features:
            return None
        k = self.in_features
        run = native.duquant_rows_plan(k, *args, quantize=(act_spec.qmin, act_spec.qmax, act_spec.clip_ratio,
                                                           not act_spec.symmetric))
        return None if run is None else (lambda x: run(x.reshape(-1, k)))

    def fold_into(self, w: torch.Tensor) -> torch.Tensor:
        """Offline weight transform ``(W · s) · T⁻ᵀ`` for ``W`` [N, K], computed in float64, in W's dtype.

        ``apply(x) @ fold_into(W).T == x @ W.T`` up to rounding. For an orthogonal ``T`` (float64
        rotations) ``T⁻ᵀ = T``; with rotations rounded to a storage dtype (`rounded`) the inverse keeps
        the product exact, so the stored rotation is the one the weights are folded against.
        """
        k = self.in_features
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match {k} input channels")
        w2 = w.detach().to(torch.float64)
        if self.smooth_scale is not None:
            w2 = w2 * self.smooth_scale.to(device=w.device, dtype=torch.float64)
        r1 = torch.linalg.inv(self.rot1.to(device=w.device, dtype=torch.float64)).transpose(1, 2)
        r2 = torch.linalg.inv(self.rot2.to(device=w.device, dtype=torch.float64)).transpose(1, 2)
        y = _apply_blocks(w2, r1)[:, self.perm.to(w.device)]
        return _apply_blocks(y, r2).to(w.dtype)

    def rounded(self, dtype: torch.dtype) -> "DuQuantTransform":
        """The transform with scales and rotations rounded to ``dtype`` (kept in float64): what a
        checkpoint storing them in ``dtype`` holds. Fold weights against this one (`fold_into`)."""
        def rd(t):
            return None if t is None else t.to(dtype).to(torch.float64)

        return DuQuantTransform(rd(self.smooth_scale), rd(self.rot1), self.perm, rd(self.rot2))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "DuQuantTransform":
        """Copy on ``device``; ``dtype`` applies to the scales and rotations, not the permutation."""
        def cv(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return DuQuantTransform(cv(self.smooth_scale), cv(self.rot1), self.perm.to(device), cv(self.rot2))

    def to_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: ``smooth_scale`` (only with smoothing), ``rot1``, ``perm``, ``rot2``."""
        out = {
            "rot1": self.rot1.detach().to(dtype).contiguous(),
            "perm": self.perm.detach().to(torch.int64).contiguous(),
            "rot2": self.rot2.detach().to(dtype).contiguous(),
        }
        if self.smooth_scale is not None:
            out["smooth_scale"] = self.smooth_scale.detach().to(dtype).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "DuQuantTransform":
        missing = [n for n in ("rot1", "perm", "rot2") if n not in tensors]
        if missing:
            raise ValueError(f"DuQuant transform tensors missing: {', '.join(missing)}")
        return cls(tensors.get("smooth_scale"), tensors["rot1"], tensors["perm"], tensors["rot2"])


def apply_duquant(x: torch.Tensor, transform: DuQuantTransform) -> torch.Tensor:
    """``transform.apply(x)``: ``(x / s) · R1 · P · R2`` for ``x`` [..., K]."""
    return transform.apply(x)


def duquant_transform(
    X: torch.Tensor,
    weights: Sequence[torch.Tensor] = (),
    block: int = 128,
    steps: int = 256,
    alpha: float | None = 0.5,
    *,
    max_rows: int = 256,
    seed: int = 0,
    act_absmax: torch.Tensor | None = None,
) -> DuQuantTransform:
    """Calibrate DuQuant's transform for a linear input from calibration activations ``X`` [..., K].

    ``act_absmax`` [K]: per-channel max|x| over every calibration token for the smoothing scales
    (default: over the rows of ``X``). ``weights`` ([N_i, K], all linears reading this input) are only
    used for the smoothing scales (``alpha`` None: no smoothing, weights may be empty). The block size is
    `block_size_for(K, block)`. The rotations and permutation are fitted on at most
    ``max_rows`` evenly strided rows of ``X / s``: R1 greedily, then the zigzag permutation of
    the channels' max|x| after R1, then R2 greedily. Deterministic for a given ``seed``.
    """
    k = X.shape[-1]
    x = X.detach().reshape(-1, k).to(torch.float64)
    if x.shape[0] == 0:
        raise ValueError("need at least one calibration row")
    s = None
    if alpha is not None:
        amax = x.abs().amax(dim=0) if act_absmax is None else act_absmax.to(x.device, torch.float64)
        s = smooth_scales(amax, list(weights), alpha=alpha).to(torch.float64)
        x = x / s
    if max_rows > 0 and x.shape[0] > max_rows:
        idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
        x = x[idx]
    b = block_size_for(k, block)
    nb = k // b
    r1 = rotation_blocks(x, b, steps, seed)
    y = _apply_blocks(x, r1)
    perm = zigzag_permutation(y.abs().amax(dim=0), nb)
    y = y[:, perm]
    r2 = rotation_blocks(y, b, steps, seed + 1)
    return DuQuantTransform(smooth_scale=s, rot1=r1, perm=perm, rot2=r2)
