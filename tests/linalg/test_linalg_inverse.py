"""Tests for curvlab.linalg.inverse: damped Cholesky inverses / solves and their retry policy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import DecompositionError, DecompositionInfo, damped_inverse, damped_solve

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def spd(d: int, cond: float, seed: int, smallest: float | None = None) -> torch.Tensor:
    """U diag(eigs) Uᵀ with Haar-random orthogonal U and eigenvalues log-spaced in [1/cond, 1]."""
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    eigs = torch.logspace(0.0, -math.log10(cond), d, dtype=torch.float64)
    if smallest is not None:
        eigs[-1] = smallest
    return (Q * eigs) @ Q.T


@SETTINGS
@given(
    d=st.integers(1, 12),
    log_cond=st.floats(0.0, 8.0),
    damping=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_damped_inverse_is_inverse(d: int, log_cond: float, damping: float, seed: int) -> None:
    M = spd(d, 10.0**log_cond, seed)
    inv, info = damped_inverse(M, damping)
    assert info == DecompositionInfo(damping=damping, attempts=1, float64=True)
    assert inv.dtype == torch.float64
    assert torch.equal(inv, inv.T)
    Md = M + damping * torch.eye(d, dtype=M.dtype)
    # Backward-stable Cholesky: residual ~ eps · cond(M + λI).
    cond = torch.linalg.cond(Md).item()
    torch.testing.assert_close(Md @ inv, torch.eye(d, dtype=M.dtype), rtol=0, atol=1e-13 * cond)


def test_damped_inverse_float32_stays_float32() -> None:
    M = spd(6, 10.0, 0).float()
    inv, info = damped_inverse(M, 1e-3)
    assert inv.dtype == torch.float32 and info.attempts == 1 and not info.float64
    torch.testing.assert_close(
        (M.double() + 1e-3 * torch.eye(6, dtype=torch.float64)) @ inv.double(),
        torch.eye(6, dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )


def test_damped_inverse_batched() -> None:
    M = torch.stack([spd(4, 10.0, s) for s in range(3)])
    inv, info = damped_inverse(M, 0.1)
    assert inv.shape == (3, 4, 4) and info.attempts == 1
    for b in range(3):
        torch.testing.assert_close(inv[b], torch.linalg.inv(M[b] + 0.1 * torch.eye(4).double()))


def test_retry_rank_deficient_float32_at_zero_damping() -> None:
    # An exactly singular PSD matrix: Cholesky fails in float32, again in float64 at damping 0,
    # and succeeds at the start damping 1e-8 · mean diag on the third attempt.
    B = spd(3, 10.0, 1)
    M = torch.zeros(4, 4, dtype=torch.float64)
    M[:3, :3] = B
    M32 = M.float()
    inv, info = damped_inverse(M32, 0.0)
    assert info.attempts == 3 and info.float64
    mean_diag = torch.diagonal(M32).double().mean().item()
    assert info.damping == pytest.approx(1e-8 * mean_diag)
    assert inv.dtype == torch.float32 and torch.isfinite(inv).all()
    assert torch.equal(inv, inv.T)
    expected = torch.linalg.inv(M32.double() + info.damping * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(inv.double(), expected, rtol=1e-5, atol=0)


def test_retry_slightly_indefinite_float64() -> None:
    M = spd(5, 100.0, 2, smallest=-1e-10)
    inv, info = damped_inverse(M, 0.0)
    assert info.attempts > 1 and info.float64 and info.damping > 0.0
    Md = M + info.damping * torch.eye(5, dtype=M.dtype)
    torch.testing.assert_close(inv, torch.linalg.inv(Md), rtol=1e-6, atol=0)


def test_retry_growth_of_positive_damping() -> None:
    # Eigenvalue -0.5: damping 0.1 (attempt 1) fails, 1.0 (attempt 2) succeeds (float64 input).
    M = spd(4, 10.0, 3, smallest=-0.5)
    inv, info = damped_inverse(M, 0.1, growth=10.0)
    assert info.attempts == 2 and info.damping == pytest.approx(1.0) and info.float64
    assert torch.isfinite(inv).all()


def test_retries_exhausted_raise() -> None:
    M = spd(4, 10.0, 4, smallest=-1.0)
    with pytest.raises(DecompositionError):
        damped_inverse(M, 1e-6, retries=2)
    with pytest.raises(DecompositionError):
        damped_solve(M, torch.ones(4, dtype=M.dtype), 1e-6, retries=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_raises_without_retry(bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.linalg.cholesky_ex

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    M = torch.eye(3, dtype=torch.float32)
    M[1, 1] = bad
    with pytest.raises(DecompositionError, match="not finite"):
        damped_inverse(M, 1e-3)
    assert len(calls) == 1
    with pytest.raises(DecompositionError, match="not finite"):
        damped_solve(M, torch.ones(3), 1e-3)
    assert len(calls) == 2


@SETTINGS
@given(
    d=st.integers(1, 10),
    k=st.integers(1, 3),
    log_cond=st.floats(0.0, 6.0),
    damping=st.sampled_from([0.0, 1e-3, 1.0]),
)
def test_damped_solve_matches_inverse(d: int, k: int, log_cond: float, damping: float) -> None:
    M = spd(d, 10.0**log_cond, d * 7 + k)
    gen = torch.Generator().manual_seed(k)
    B = torch.randn(d, k, generator=gen, dtype=torch.float64)
    X, info = damped_solve(M, B, damping)
    assert X.shape == (d, k) and info.attempts == 1
    inv, _ = damped_inverse(M, damping)
    scale = torch.linalg.cond(M + damping * torch.eye(d, dtype=M.dtype)).item()
    torch.testing.assert_close(X, inv @ B, rtol=0, atol=1e-12 * scale * B.abs().max().item())
    x, _ = damped_solve(M, B[:, 0], damping)
    assert x.shape == (d,)
    torch.testing.assert_close(x, X[:, 0])


def test_invalid_arguments() -> None:
    M = torch.eye(2)
    with pytest.raises(ValueError):
        damped_inverse(M, -1.0)
    with pytest.raises(ValueError):
        damped_inverse(M, 0.1, growth=1.0)
    with pytest.raises(ValueError):
        damped_inverse(M, 0.1, retries=-1)
    with pytest.raises(ValueError):
        damped_inverse(torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError):
        damped_solve(M, torch.ones(3), 0.1)
