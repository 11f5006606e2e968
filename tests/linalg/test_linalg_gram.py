"""Tests for curvlab.linalg.gram: Gram matrices and exponential moving averages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import ema_, gram

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 40),
    scale=st.sampled_from([1.0, 0.5, 1.0 / 3.0, 1e-3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gram_small_matches_and_is_symmetric(n: int, d: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    R = gram(X, scale)
    assert R.shape == (d, d) and R.dtype == X.dtype
    torch.testing.assert_close(R, scale * (X.T @ X), rtol=1e-12, atol=1e-12)
    assert torch.equal(R, R.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "d"), [(7, 1001), (40, 785), (33, 501), (5, 256), (20, 300), (3, 513), (1000, 7)]
)
def test_gram_blocked_and_plain_paths(n: int, d: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + d)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    R = gram(X.to(dtype), 1.0 / n)
    assert R.dtype == dtype
    assert torch.equal(R, R.T)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(R.double(), X.T @ X / n, rtol=tol, atol=tol)


def test_gram_non_contiguous_input() -> None:
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    X = Y.T  # (20, 300), column-major strides
    R = gram(X, 2.0)
    assert torch.equal(R, R.T)
    torch.testing.assert_close(R, 2.0 * (Y @ Y.T))
    X2 = torch.randn(50, 600, generator=gen, dtype=torch.float64)[:, ::2]
    torch.testing.assert_close(gram(X2), X2.T @ X2)


def test_gram_differentiable() -> None:
    X = torch.randn(10, 300, dtype=torch.float64, requires_grad=True)
    gram(X, 0.1).sum().backward()
    assert X.grad is not None
    torch.testing.assert_close(X.grad, 0.2 * X.detach() @ torch.ones(300, 300, dtype=X.dtype))


def test_gram_rejects_non_matrix() -> None:
    with pytest.raises(ValueError):
        gram(torch.zeros(3))


@SETTINGS
@given(decay=st.floats(0.0, 1.0), d=st.integers(1, 6))
def test_ema_formula(decay: float, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    avg = torch.randn(d, d, generator=gen, dtype=torch.float64)
    new = torch.randn(d, d, generator=gen, dtype=torch.float64)
    expected = decay * avg + (1.0 - decay) * new
    out = ema_(avg, new, decay)
    assert out is avg
    torch.testing.assert_close(avg, expected, rtol=1e-12, atol=1e-12)


def test_ema_edges_and_symmetry() -> None:
    S = torch.randn(5, 5, dtype=torch.float64)
    S = S + S.T
    T = torch.randn(5, 5, dtype=torch.float64)
    T = T + T.T
    avg = S.clone()
    ema_(avg, T, 0.95)
    assert torch.equal(avg, avg.T)
    assert torch.equal(ema_(S.clone(), T, 1.0), S)
    assert torch.equal(ema_(S.clone(), T, 0.0), T)
    with pytest.raises(ValueError):
        ema_(S.clone(), T, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "d"), [(30, 7), (20, 40), (7, 300), (50, 513)])
def test_gram_accumulates_into_out(n: int, d: int, dtype: torch.dtype) -> None:
    # out ← β out + scale XᵀX on both paths (gemm + symmetrise for d < 192, blocked above),
    # exactly symmetric when out is: the fused EMA of TNT's and Shampoo's statistics.
    gen = torch.Generator().manual_seed(n * d)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
    M = gram(Y.to(dtype), 1.0 / (3 * d))
    expected = 0.9 * M.double() + 0.1 / n * (X.T @ X)
    R = gram(X.to(dtype), 0.1 / n, out=M, beta=0.9)
    assert R.data_ptr() == M.data_ptr() and torch.equal(R, R.T)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(R.double(), expected, rtol=tol, atol=tol)


def test_gram_accumulation_needs_out() -> None:
    with pytest.raises(ValueError, match="beta"):
        gram(torch.ones(3, 2), beta=0.5)
