"""Tests for curvlab.solvers.lanczos: the tridiagonal matrix reproduces Qᵀ H Q."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.solvers import lanczos
from curvlab.testing.solvers import matvec_of, symmetric_with_spectrum

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    off = betas[:-1]
    return torch.diag(alphas) + torch.diag(off, 1) + torch.diag(off, -1)


@SETTINGS
@given(
    n=st.integers(2, 20),
    k=st.integers(1, 20),
    reorthogonalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_tridiagonal_reproduces_projected_matrix(
    n: int, k: int, reorthogonalize: bool, seed: int
) -> None:
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    H = symmetric_with_spectrum(torch.randn(n, generator=gen, dtype=F64), gen)
    v0 = torch.randn(n, generator=gen, dtype=F64)
    if not reorthogonalize:
        k = min(k, 6)  # plain Lanczos keeps orthogonality only for a few steps
    alphas, betas, Q = lanczos(matvec_of(H), v0, k, reorthogonalize=reorthogonalize)
    m = alphas.numel()
    assert 1 <= m <= k and betas.shape == (m,) and Q.shape == (n, m)
    T = tridiagonal(alphas, betas)
    torch.testing.assert_close(Q.T @ H @ Q, T, rtol=0, atol=1e-10)
    torch.testing.assert_close(Q.T @ Q, torch.eye(m, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(Q[:, 0], v0 / v0.norm())
    # H Q = Q T + β_m q_{m+1} e_mᵀ: the remainder lives in the last column and has norm β_m
    remainder = H @ Q - Q @ T
    torch.testing.assert_close(
        remainder[:, :-1], torch.zeros(n, m - 1, dtype=F64), atol=1e-10, rtol=0
    )
    assert float(remainder[:, -1].norm()) == pytest.approx(float(betas[-1]), abs=1e-10)


def test_full_run_has_the_spectrum_of_h() -> None:
    gen = torch.Generator().manual_seed(0)
    eigenvalues = torch.linspace(-4.0, 6.0, 12, dtype=F64)
    H = symmetric_with_spectrum(eigenvalues, gen)
    alphas, betas, _ = lanczos(matvec_of(H), torch.randn(12, generator=gen, dtype=F64), 12)
    assert alphas.numel() == 12
    ritz = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
    torch.testing.assert_close(ritz, eigenvalues, rtol=0, atol=1e-10)


def test_invariant_subspace_stops_early() -> None:
    gen = torch.Generator().manual_seed(1)
    eigenvalues = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, 5.0, 5.0, 5.0], dtype=F64)
    H = symmetric_with_spectrum(eigenvalues, gen)  # 3 distinct eigenvalues
    alphas, betas, _ = lanczos(matvec_of(H), torch.randn(8, generator=gen, dtype=F64), 8)
    assert alphas.numel() == 3
    assert float(betas[-1]) <= 1e-12
    ritz = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
    torch.testing.assert_close(ritz, torch.tensor([-2.0, 1.0, 5.0], dtype=F64))


def test_float32_stays_float32() -> None:
    gen = torch.Generator().manual_seed(2)
    H = symmetric_with_spectrum(torch.randn(10, generator=gen, dtype=F64), gen)
    alphas, betas, Q = lanczos(matvec_of(H.float()), torch.randn(10, generator=gen), 5)
    assert alphas.dtype == betas.dtype == Q.dtype == torch.float32
    Qd = Q.double()
    torch.testing.assert_close(
        Qd.T @ H @ Qd, tridiagonal(alphas, betas).double(), rtol=0, atol=1e-5
    )


def test_zero_or_non_finite_start_gives_an_empty_basis() -> None:
    H = torch.eye(4, dtype=F64)
    for v0 in (torch.zeros(4, dtype=F64), torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=F64)):
        alphas, betas, Q = lanczos(matvec_of(H), v0, 3)
        assert alphas.numel() == 0 and betas.numel() == 0 and Q.shape == (4, 0)


def test_non_finite_product_drops_the_step() -> None:
    calls = []
    diag = torch.arange(1.0, 7.0, dtype=F64)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return diag * v * (math.nan if len(calls) == 3 else 1.0)

    alphas, _, Q = lanczos(matvec, torch.ones(6, dtype=F64), 5)
    assert alphas.numel() == 2 and Q.shape == (6, 2)
    assert torch.isfinite(alphas).all() and torch.isfinite(Q).all()


def test_invalid_k() -> None:
    with pytest.raises(ValueError, match="^k"):
        lanczos(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), 0)
