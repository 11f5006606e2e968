"""Tests for curvlab.linalg.roots: damped inverse p-th roots and eigendecompositions."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import (
    DecompositionError,
    coupled_newton_inverse_root,
    damped_inverse_root,
    symmetric_eigh,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
PS = [1, 2, 4, 6]
Method = Literal["eigh", "coupled_newton"]


def spd(d: int, cond: float, seed: int, low: float | None = None) -> torch.Tensor:
    """U diag(eigs) Uᵀ with Haar-random orthogonal U and eigenvalues log-spaced in [1/cond, 1]
    (or in [low, 1] when ``low`` is given)."""
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    bottom = math.log10(low) if low is not None else -math.log10(cond)
    eigs = torch.logspace(0.0, bottom, d, dtype=torch.float64)
    return (Q * eigs) @ Q.T


def rel_err(X: torch.Tensor, Y: torch.Tensor) -> float:
    return ((X - Y).norm() / Y.norm()).item()


@SETTINGS
@given(
    d=st.integers(1, 12),
    log_cond=st.floats(0.0, 8.0),
    p=st.sampled_from(PS),
    damping=st.sampled_from([0.0, 1e-6, 1e-2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_eigh_root_power_recovers_matrix(
    d: int, log_cond: float, p: int, damping: float, seed: int
) -> None:
    M = spd(d, 10.0**log_cond, seed)
    R, info = damped_inverse_root(M, damping, p)
    assert info.attempts == 1 and info.float64 and info.damping == damping
    assert torch.equal(R, R.T)
    Md = M + damping * torch.eye(d, dtype=M.dtype)
    # R^{-p} = (R^{-1})^p; R^{-1} has condition number cond^{1/p}.
    assert rel_err(torch.linalg.matrix_power(torch.linalg.inv(R), p), Md) < 1e-8


@SETTINGS
@given(
    d=st.integers(1, 12),
    log_cond=st.floats(0.0, 6.0),
    p=st.sampled_from(PS),
    damping=st.sampled_from([0.0, 1e-4, 1e-1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_eigh_and_coupled_newton_agree(
    d: int, log_cond: float, p: int, damping: float, seed: int
) -> None:
    M = spd(d, 10.0**log_cond, seed)
    R_eigh, _ = damped_inverse_root(M, damping, p)
    R_newton, info = damped_inverse_root(M, damping, p, method="coupled_newton")
    assert info.attempts == 1 and info.float64
    assert torch.equal(R_newton, R_newton.T)
    assert rel_err(R_newton, R_eigh) < 1e-6
    # The public iteration at its default tolerance 1e-6 on max|M_k - I|.
    Md = M + damping * torch.eye(d, dtype=M.dtype)
    assert rel_err(coupled_newton_inverse_root(Md, p), R_eigh) < 1e-5
    assert rel_err(coupled_newton_inverse_root(Md, p, tol=1e-12), R_eigh) < 1e-9


@pytest.mark.parametrize("p", PS)
def test_coupled_newton_float32(p: int) -> None:
    M = spd(30, 100.0, p)
    R = coupled_newton_inverse_root(M.float(), p)
    assert R.dtype == torch.float32
    R_ref, _ = damped_inverse_root(M, 0.0, p)
    assert rel_err(R.double(), R_ref) < 1e-5


def test_coupled_newton_batched_and_validation() -> None:
    M = torch.stack([spd(5, 10.0, s) for s in range(3)])
    R = coupled_newton_inverse_root(M, 2)
    for b in range(3):
        R_ref, _ = damped_inverse_root(M[b], 0.0, 2)
        assert rel_err(R[b], R_ref) < 1e-5
    R_eigh, _ = damped_inverse_root(M, 0.0, 2)
    assert R_eigh.shape == (3, 5, 5)
    with pytest.raises(ValueError):
        coupled_newton_inverse_root(M[0], 0)
    with pytest.raises(ValueError):
        damped_inverse_root(M[0], 0.0, 2.5, method="coupled_newton")
    with pytest.raises(ValueError):
        damped_inverse_root(M[0], 0.0, 0.0)
    with pytest.raises(ValueError):
        damped_inverse_root(M[0], 0.0, 2, method="svd")  # type: ignore[arg-type]


def test_fractional_p_eigh() -> None:
    M = spd(6, 1e3, 9)
    R, _ = damped_inverse_root(M, 1e-3, 1.5)
    mu, V = torch.linalg.eigh(M + 1e-3 * torch.eye(6, dtype=M.dtype))
    torch.testing.assert_close(R, (V * mu.pow(-1.0 / 1.5)) @ V.T)


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
@pytest.mark.parametrize("p", PS)
def test_rank_deficient_gives_finite(method: Method, p: int) -> None:
    gen = torch.Generator().manual_seed(p)
    X = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    M = X @ X.T  # rank 3 of 8
    for damping in [0.0, 1e-6]:
        R, info = damped_inverse_root(M, damping, p, method=method)
        assert torch.isfinite(R).all() and torch.equal(R, R.T)
        assert info.damping >= damping
    if method == "coupled_newton":
        # A singular matrix never converges at damping 0: more damping is needed.
        _, info = damped_inverse_root(M, 0.0, p, method="coupled_newton")
        assert info.attempts > 1 and info.damping > 0.0
    # Float32 at damping 0: fails in float32, recovered by the float64 / damping retries.
    R32, info32 = damped_inverse_root(M.float(), 0.0, p, method=method)
    assert R32.dtype == torch.float32 and torch.isfinite(R32).all()
    assert info32.attempts > 1 and info32.float64


def test_zero_matrix_retries_with_damping() -> None:
    M = torch.zeros(4, 4, dtype=torch.float64)
    R, info = damped_inverse_root(M, 0.0, 2)
    assert info.attempts == 2 and info.damping == pytest.approx(1e-8)
    torch.testing.assert_close(R, torch.eye(4, dtype=M.dtype) * 1e4)


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
@pytest.mark.parametrize("p", PS)
def test_huge_dynamic_range_gives_finite(method: Method, p: int) -> None:
    M = spd(20, 1.0, p, low=1e-24) * 1e12  # eigenvalues from 1e-12 to 1e12
    for damping in [0.0, 1e-8]:
        R, _ = damped_inverse_root(M, damping, p, method=method)
        assert torch.isfinite(R).all()
    # Whatever damping the retries settled on, the result is the root at that damping.
    R_f, info = damped_inverse_root(M, 1e-8, p, method=method)
    R_ref, _ = damped_inverse_root(M, info.damping, p)
    assert rel_err(R_f, R_ref) < 1e-6
    # 1e-8 .. 1e8, rounded to float32: entry errors ~1e8 · 6e-8 make M32 indefinite, with
    # eigenvalues down to about -5. eigh clamps them; coupled Newton diverges on them until the
    # damping (floor 1e-8 · mean diag, then ×10 per retry) exceeds them, which takes 5 retries.
    M32 = (spd(20, 1.0, p, low=1e-16) * 1e8).float()
    retries = 3 if method == "eigh" else 5
    R32, info = damped_inverse_root(M32, 0.0, p, method=method, retries=retries)
    assert R32.dtype == torch.float32 and torch.isfinite(R32).all()
    assert info.float64 and info.attempts > 1


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_non_finite_root_input_raises(method: Method) -> None:
    M = torch.eye(3)
    M[0, 2] = M[2, 0] = math.nan
    with pytest.raises(DecompositionError):
        damped_inverse_root(M, 1e-3, 2, method=method)


def test_symmetric_eigh() -> None:
    M = spd(7, 1e4, 11)
    mu, V = symmetric_eigh(M)
    torch.testing.assert_close((V * mu) @ V.T, M)
    mu32, V32 = symmetric_eigh(M.float())
    assert mu32.dtype == V32.dtype == torch.float32
    torch.testing.assert_close(mu32.double(), mu, atol=1e-5, rtol=0)
    bad = M.clone()
    bad[3, 3] = math.inf
    with pytest.raises(DecompositionError):
        symmetric_eigh(bad)


def test_eigh_root_decomposes_the_damped_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    # Numerically low-rank statistics can make float32 syevd fail on M itself (seen on the
    # thesis autoencoder's Shampoo factors); the damped M + λI is decomposed instead.
    seen: list[torch.Tensor] = []
    eigh = torch.linalg.eigh

    def recording_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(A.clone())
        return eigh(A)

    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    M = spd(5, 1e3, seed=1)
    damped_inverse_root(M, 0.25, 4)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], M + 0.25 * torch.eye(5, dtype=M.dtype), rtol=0, atol=0)


def test_eigh_root_of_a_large_matrix_is_exact_and_symmetric() -> None:
    # d ≥ 192 takes the blocked (one block triangle) product V diag(w) Vᵀ.
    M = spd(256, 1e4, seed=2)
    R, info = damped_inverse_root(M, 1e-3, 4)
    assert info.attempts == 1 and torch.equal(R, R.T)
    mu, V = torch.linalg.eigh(M + 1e-3 * torch.eye(256, dtype=M.dtype))
    torch.testing.assert_close(R, (V * mu.pow(-0.25)) @ V.T, rtol=1e-10, atol=1e-12)
