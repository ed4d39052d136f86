import math

import pytest
import torch

from dllmq.quantization.hadamard import (
    HadamardTransform,
    block_diag_hadamard,
    fast_hadamard_transform,
    hadamard_factor,
    hadamard_matrix,
    is_hadamard_size,
    random_hadamard,
    random_hadamard_transform,
    random_signs,
)

BASES = [1, 2, 4, 12, 20, 28, 36, 44, 60, 68, 76, 108, 148, 164]


@pytest.mark.parametrize("n", BASES + [12 * 64, 148 * 8, 28 * 16, 20 * 4])
def test_dense_is_hadamard(n):
    h = hadamard_matrix(n, dtype=torch.float32)  # +-1 integer sums are exact in fp32 at these sizes
    assert h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.t(), n * torch.eye(n))


@pytest.mark.parametrize(
    "n, factor",
    [(4096, (1, 4096)), (12288, (12, 1024)), (18944, (148, 128)), (3584, (28, 128)), (192, (12, 16)),
     (296, (148, 2)), (36, (36, 1)), (2, (1, 2))],
)
def test_factorization_of_model_sizes(n, factor):
    assert hadamard_factor(n) == factor
    assert is_hadamard_size(n)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 14, 52, 172, 344, 0])
def test_unsupported_sizes_raise(n):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 36, 148, 12 * 16, 148 * 4, 28 * 32, 64])
def test_fast_transform_matches_dense(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    h = hadamard_matrix(n)
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ h.t() / math.sqrt(n), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_hadamard_transform(x, inverse=True), x @ h / math.sqrt(n), rtol=1e-12, atol=1e-12)
    k, _ = hadamard_factor(n)
    hk = hadamard_matrix(k)
    torch.testing.assert_close(fast_hadamard_transform(x, hk), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_hadamard_transform(x, normalize=False), x @ h.t(), rtol=1e-12, atol=1e-10)


def test_fast_transform_bad_factor_matrix():
    with pytest.raises(ValueError):
        fast_hadamard_transform(torch.randn(2, 36), hadamard_matrix(12))  # 36 / 12 = 3: not a power of two


@pytest.mark.parametrize("n", [12288, 18944, 3584])
def test_fast_transform_model_sizes(n):
    """Columns of the (never materialised) n x n matrix: e_i -> e_i H^T / sqrt(n) = (H_k[:, a] (x) H_p[:, b]) / sqrt(n)."""
    k, p = hadamard_factor(n)
    hk, hp = hadamard_matrix(k), hadamard_matrix(p)
    idx = [0, 1, p - 1, p, n // 2 + 3, n - 1]
    e = torch.zeros(len(idx), n, dtype=torch.float64)
    e[torch.arange(len(idx)), idx] = 1.0
    rows = fast_hadamard_transform(e)
    want = torch.stack([torch.kron(hk[:, i // p], hp[:, i % p]) for i in idx]) / math.sqrt(n)
    torch.testing.assert_close(rows, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows @ rows.t(), torch.eye(len(idx), dtype=torch.float64), rtol=0, atol=1e-10)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    y = fast_hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(fast_hadamard_transform(y, inverse=True), x, rtol=1e-5, atol=1e-5)


def test_fast_transform_bf16_computes_in_fp32():
    x = torch.randn(4, 12 * 32, generator=torch.Generator().manual_seed(0))
    y32 = fast_hadamard_transform(x)
    y16 = fast_hadamard_transform(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)
    assert torch.equal(y16, fast_hadamard_transform(x.bfloat16().float()).bfloat16())


@pytest.mark.parametrize("n", [64, 12 * 8, 148])
def test_random_hadamard_dense_and_online_agree(n):
    m = random_hadamard(n, seed=3)
    torch.testing.assert_close(m @ m.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    s = random_signs(n, 3)
    torch.testing.assert_close(m, hadamard_matrix(n) @ torch.diag(s) / math.sqrt(n))
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = random_hadamard_transform(n, seed=3)
    torch.testing.assert_close(t(x), x @ m.t(), rtol=1e-12, atol=1e-12)
    inv = HadamardTransform(n, s, inverse=True)
    torch.testing.assert_close(inv(t(x)), x, rtol=1e-12, atol=1e-12)
    assert torch.equal(random_hadamard(n, seed=3), m)
    assert not torch.equal(random_hadamard(n, seed=4), m)
    assert t(x.float()).dtype == torch.float32
    with pytest.raises(ValueError):
        t(torch.randn(2, n + 4))


def test_plain_online_module_matches_fast_transform():
    x = torch.randn(3, 20 * 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(HadamardTransform(80)(x), fast_hadamard_transform(x))


def test_block_diag_hadamard_is_per_head_transform():
    n, block = 4 * 16, 16
    b = block_diag_hadamard(n, block)
    torch.testing.assert_close(b @ b.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_head = fast_hadamard_transform(x.view(3, n // block, block)).view(3, n)
    torch.testing.assert_close(x @ b.t(), per_head, rtol=1e-12, atol=1e-12)
    assert block_diag_hadamard(36, 12).shape == (36, 36)
    with pytest.raises(ValueError):
        block_diag_hadamard(60, 16)
