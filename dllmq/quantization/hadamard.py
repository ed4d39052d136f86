"""Hadamard matrices and fast (Walsh-)Hadamard transforms for rotation-based quantization (QuaRot).

Orders supported: n = k * 2**m where the base order k is built by one of
  * Sylvester: k in {1, 2} (so every power of two);
  * Paley I:  k = q + 1 for a prime q = 3 (mod 4)   (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, ...);
  * Paley II: k = 2 (q + 1) for a prime q = 1 (mod 4) (12, 28, 36, 60, 76, 108, 148, 164, 196, ...).
The dense matrix is `hadamard_matrix(n) = H_k (x) H_{2^m}` (Kronecker product), entries +-1, with
H H^T = n I. Prime powers (e.g. q = 27, 25) are not implemented, so orders such as 52 or 172 are
refused with a ValueError. The model sizes that matter are covered: 4096 = 2^12, 3584 = 28 * 128
(Paley II, q = 13), 12288 = 12 * 1024 (Paley I, q = 11), 18944 = 148 * 128 (Paley II, q = 73).

Convention used throughout: a "transform" by an orthogonal matrix M maps row vectors x -> x @ M.T
(i.e. M acts on column vectors). `fast_hadamard_transform(x)` is the transform by the normalised
H / sqrt(n); `random_hadamard(n, seed)` returns M = H diag(s) / sqrt(n) whose transform is
`fast_hadamard_transform(x * s)`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

__all__ = [
    "HadamardTransform",
    "block_diag_hadamard",
    "fast_hadamard_transform",
    "hadamard_factor",
    "hadamard_matrix",
    "is_hadamard_size",
    "random_hadamard",
    "random_hadamard_transform",
    "random_signs",
]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _base_rule(k: int) -> str | None:
    """How a base order k is constructed, or None when these rules cannot build it."""
    if k in (1, 2):
        return "sylvester"
    q = k - 1
    if _is_prime(q) and q % 4 == 3:
        return "paley1"
    if k % 2 == 0:
        q = k // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            return "paley2"
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    for x in range(1, q):
        chi[(x * x) % q] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def _paley1(q: int) -> torch.Tensor:
    # S = [[0, 1^T], [-1, Q]] is skew-symmetric with S S^T = q I, so (I + S)(I + S)^T = (q + 1) I.
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    # C = [[0, 1^T], [1, Q]] is a symmetric conference matrix (C C^T = q I); replacing its zeros by
    # B = [[1, 1], [1, -1]] and its +-1 entries by +-A, A = [[1, -1], [-1, -1]], gives
    # H H^T = q I (x) A A^T + I (x) B B^T = 2 (q + 1) I (the cross terms cancel since A B^T = -B A^T).
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


@lru_cache(maxsize=None)
def _base_matrix(k: int) -> torch.Tensor:
    rule = _base_rule(k)
    if rule == "sylvester":
        return _sylvester(k)
    if rule == "paley1":
        return _paley1(k - 1)
    if rule == "paley2":
        return _paley2(k // 2 - 1)
    raise ValueError(f"no Hadamard construction for base order {k}")


@lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int]:
    """(k, p) with n = k * p, p a power of two, k the smallest base order the rules can build."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        k = n // p
        if _base_rule(k) is not None:
            return k, p
        p //= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} can be built here: need n = k * 2^m with k in {{1, 2}}, "
        f"k = q + 1 (q prime, q = 3 mod 4) or k = 2 (q + 1) (q prime, q = 1 mod 4); "
        f"{n} = {n // (n & -n)} * {n & -n} has no such factor"
    )


def is_hadamard_size(n: int) -> bool:
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The unnormalised +-1 Hadamard matrix H_k (x) H_{2^m} of order n (H H^T = n I)."""
    k, p = hadamard_factor(n)
    h = torch.kron(_base_matrix(k), _sylvester(p)) if k > 1 else _sylvester(p)
    return h.to(dtype=dtype, device=device)


_DEVICE_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _base_on(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (k, str(device), dtype)
    t = _DEVICE_CACHE.get(key)
    if t is None:
        t = _base_matrix(k).to(device=device, dtype=dtype)
        _DEVICE_CACHE[key] = t
    return t


def fast_hadamard_transform(
    x: torch.Tensor, had_k: torch.Tensor | None = None, *, inverse: bool = False, normalize: bool = True
) -> torch.Tensor:
    """x @ hadamard_matrix(n).T / sqrt(n) along the last dim (n = x.shape[-1]), without the n x n matrix.

    The last dim is viewed as [k, 2^m]: a butterfly Walsh-Hadamard transform over the 2^m part
    (log2 steps of add/sub) and a k x k matmul over the k part. `had_k` is the base matrix H_k
    (None: picked by `hadamard_factor(n)`). `inverse=True` gives x @ H / sqrt(n), the inverse of the
    normalised transform (H_k is not symmetric in general). Computes in fp32 (fp64 for fp64 input)
    and returns x's dtype. `normalize=False` drops the 1/sqrt(n).
    """
    n = x.shape[-1]
    if had_k is None:
        k, p = hadamard_factor(n)
        hk = _base_on(k, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32) if k > 1 else None
    else:
        k = had_k.shape[0]
        p = n // k
        if had_k.shape != (k, k) or n % k or p & (p - 1):
            raise ValueError(f"size {n} is not {tuple(had_k.shape)[0]} times a power of two")
        hk = had_k if k > 1 else None
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdtype).reshape(-1, k, p)
    rows = y.shape[0]
    h = 1
    while h < p:
        y = y.reshape(rows, k, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(rows, k, p)
    if hk is not None:
        hk = hk.to(device=y.device, dtype=cdtype)
        y = torch.matmul(hk.t() if inverse else hk, y)
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """n random +-1 values from a seeded generator (deterministic across machines)."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2.0 - 1.0
    return s.to(dtype=dtype, device=device)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Dense orthogonal M = H diag(s) / sqrt(n), s = random_signs(n, seed); x @ M.T = FHT(x * s)."""
    s = random_signs(n, seed)
    m = hadamard_matrix(n) * s[None, :] / math.sqrt(n)
    return m.to(dtype=dtype, device=device)


class HadamardTransform(nn.Module):
    """Online x -> fast_hadamard_transform(x * signs) (signs optional), i.e. x @ M.T for the M of
    `random_hadamard(n, seed)` (or the plain normalised Hadamard when there are no signs)."""

    def __init__(self, n: int, signs: torch.Tensor | None = None, inverse: bool = False):
        super().__init__()
        k, _ = hadamard_factor(n)
        self.n, self.inverse = n, inverse
        self.register_buffer("had_k", _base_matrix(k).float().clone() if k > 1 else None, persistent=False)
        self.register_buffer("signs", None if signs is None else signs.float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"HadamardTransform of size {self.n} applied to last dim {x.shape[-1]}")
        hk = None if self.had_k is None else self.had_k.to(x.device)
        if self.signs is None:
            return fast_hadamard_transform(x, hk, inverse=self.inverse)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = self.signs.to(device=x.device, dtype=cd)
        if self.inverse:  # M is orthogonal: x @ M^{-T} = x @ M = (x @ H / sqrt(n)) * s
            return (fast_hadamard_transform(x.to(cd), hk, inverse=True) * s).to(x.dtype)
        return fast_hadamard_transform(x.to(cd) * s, hk).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, random={self.signs is not None}, inverse={self.inverse}"


def random_hadamard_transform(n: int, seed: int = 0) -> HadamardTransform:
    """The online counterpart of `random_hadamard(n, seed)`: a module computing x @ M.T in O(n log n)."""
    return HadamardTransform(n, random_signs(n, seed))


def block_diag_hadamard(n: int, block: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Block-diagonal orthogonal matrix with n / block copies of hadamard_matrix(block) / sqrt(block)
    (per-head transforms: x @ result.T applies the normalised transform to each block of x)."""
    if block < 1 or n % block:
        raise ValueError(f"block size {block} does not divide {n}")
    hb = hadamard_matrix(block) / math.sqrt(block)
    return torch.block_diag(*([hb] * (n // block))).to(dtype=dtype, device=device)
