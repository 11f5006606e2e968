"""Tests for curvlab.solvers.cubic_subproblem: the ARC subproblem against a dense solution."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.solvers import cubic_subproblem, minimize_cubic_dense
from curvlab.testing.solvers import (
    cubic_model,
    dense_cubic_solution,
    matvec_of,
    symmetric_with_spectrum,
)

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


@SETTINGS
@given(
    n=st.integers(1, 12),
    negative=st.integers(0, 12),
    sigma=st.sampled_from([0.01, 0.3, 1.0, 10.0]),
    ellipsoidal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_krylov_solve_matches_the_dense_solution(
    n: int, negative: int, sigma: float, ellipsoidal: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = 0.1 + 5.0 * torch.rand(n, generator=gen, dtype=F64)
    eigenvalues[: min(negative, n)] *= -1.0
    H = symmetric_with_spectrum(eigenvalues, gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    M = 0.2 + 3.0 * torch.rand(n, generator=gen, dtype=F64) if ellipsoidal else None
    result = cubic_subproblem(matvec_of(H), g, sigma, norm_matrix_diag=M, tol=0.0)
    expected, lam = dense_cubic_solution(H, g, sigma, M)
    assert result.status == "converged"
    torch.testing.assert_close(result.solution, expected, rtol=1e-7, atol=1e-9)
    assert result.info["lambda"] == pytest.approx(lam, rel=1e-7)
    assert result.model_decrease == pytest.approx(
        -cubic_model(H, g, sigma, expected, M), rel=1e-9, abs=1e-12
    )


def test_scr_stopping_rule_and_residual() -> None:
    gen = torch.Generator().manual_seed(0)
    n, sigma = 60, 1.0
    eigenvalues = torch.linspace(-1.0, 20.0, n, dtype=F64)
    H = symmetric_with_spectrum(eigenvalues, gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    g_norm = float(g.norm())
    result = cubic_subproblem(matvec_of(H), g, sigma, tol=0.1)
    assert result.status == "converged" and result.iterations < n
    s = result.solution
    s_norm = float(s.norm())
    model_gradient = g + H @ s + sigma * s_norm * s
    # residual_norm is the true model gradient ‖∇m(s)‖ (M = I), and satisfies the SCR rule
    assert result.residual_norm == pytest.approx(float(model_gradient.norm()), rel=1e-6)
    assert result.residual_norm <= min(0.1, s_norm / max(1.0, sigma)) * g_norm
    assert result.model_decrease == pytest.approx(-cubic_model(H, g, sigma, s), rel=1e-9)
    # a truncated Krylov solve is still a good step: within 1% of the optimal decrease
    best, _ = dense_cubic_solution(H, g, sigma)
    assert result.model_decrease is not None
    assert result.model_decrease >= 0.99 * -cubic_model(H, g, sigma, best)


def test_step_beats_the_cauchy_point() -> None:
    """After one Lanczos step the solution is the Cauchy point; later steps only improve."""
    gen = torch.Generator().manual_seed(1)
    n, sigma = 20, 2.0
    H = symmetric_with_spectrum(torch.linspace(-2.0, 5.0, n, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    g_norm = float(g.norm())
    # Cauchy point s = −α g, α the positive root of σ‖g‖³α² + gᵀHg α − ‖g‖² = 0 (CGT 2011)
    a, b, c = sigma * g_norm**3, float(g @ H @ g), -(g_norm**2)
    alpha = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    cauchy = -alpha * g
    one = cubic_subproblem(matvec_of(H), g, sigma, max_iters=1)
    torch.testing.assert_close(one.solution, cauchy)
    decreases = []
    for k in range(1, n + 1):
        decrease = cubic_subproblem(matvec_of(H), g, sigma, max_iters=k, tol=0.0).model_decrease
        assert decrease is not None
        decreases.append(decrease)
    assert all(b_ >= a_ - 1e-12 for a_, b_ in zip(decreases, decreases[1:], strict=False))


def test_dense_reduced_solver_handles_the_hard_case() -> None:
    """g ⊥ bottom eigenvector and ‖y(−θ_min)‖ < −θ_min/σ: λ = −θ_min, eigenvector added."""
    T = np.diag([-2.0, 1.0, 3.0])
    g = np.array([0.0, 0.3, 0.5])
    sigma = 1.0
    y, lam, hard = minimize_cubic_dense(T, g, sigma)
    assert hard and lam == pytest.approx(2.0)
    assert np.linalg.norm(y) == pytest.approx(lam / sigma)
    np.testing.assert_allclose((T + lam * np.eye(3)) @ y, -g, atol=1e-12)

    # both signs of the eigenvector part are global minimisers; compare with a brute force
    def model(v: np.ndarray) -> float:
        return float(g @ v + 0.5 * v @ T @ v + sigma / 3.0 * np.linalg.norm(v) ** 3)

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(20000, 3)) * 2.0
    assert model(y) <= min(model(v) for v in samples) + 1e-12


@SETTINGS
@given(
    n=st.integers(1, 8),
    sigma=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_reduced_solver_satisfies_the_optimality_conditions(
    n: int, sigma: float, seed: int
) -> None:
    """Cartis–Gould–Toint Thm 3.1: (T + λI)y = −g, T + λI ⪰ 0, λ = σ‖y‖."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    T = 0.5 * (A + A.T)
    g = rng.normal(size=n)
    y, lam, _ = minimize_cubic_dense(T, g, sigma)
    np.testing.assert_allclose((T + lam * np.eye(n)) @ y, -g, atol=1e-9)
    assert lam == pytest.approx(sigma * np.linalg.norm(y), rel=1e-9)
    assert np.linalg.eigvalsh(T + lam * np.eye(n))[0] >= -1e-9


def test_zero_gradient_gives_zero_step() -> None:
    result = cubic_subproblem(matvec_of(-torch.eye(3, dtype=F64)), torch.zeros(3, dtype=F64), 1.0)
    assert result.status == "converged" and result.model_decrease == 0.0
    assert torch.equal(result.solution, torch.zeros(3, dtype=F64))


def test_non_finite_inputs_give_a_zero_step() -> None:
    zero = torch.zeros(3, dtype=F64)
    H = torch.eye(3, dtype=F64)
    for result in (
        cubic_subproblem(matvec_of(H), torch.tensor([math.nan, 1.0, 0.0], dtype=F64), 1.0),
        cubic_subproblem(lambda v: v * math.nan, torch.ones(3, dtype=F64), 1.0),
        cubic_subproblem(
            matvec_of(H),
            torch.ones(3, dtype=F64),
            1.0,
            norm_matrix_diag=torch.tensor([1.0, math.nan, 1.0], dtype=F64),
        ),
    ):
        assert result.status == "non_finite" and torch.equal(result.solution, zero)


def test_float32_stays_float32() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 8
    H = symmetric_with_spectrum(torch.linspace(-1.0, 4.0, n, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    result = cubic_subproblem(matvec_of(H.float()), g.float(), 1.0, tol=0.0)
    assert result.solution.dtype == torch.float32
    expected, _ = dense_cubic_solution(H, g, 1.0)
    torch.testing.assert_close(result.solution.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "^sigma"),
        ({"sigma": math.nan}, "^sigma"),
        ({"tol": -1.0}, "^tol"),
        ({"max_iters": 0}, "^max_iters"),
        ({"norm_matrix_diag": torch.zeros(3, dtype=F64)}, "^norm_matrix_diag"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"sigma": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        cubic_subproblem(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), **arguments)  # type: ignore[arg-type]
