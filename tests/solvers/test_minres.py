"""Tests for curvlab.solvers.minres: seed 000's k-step MINRES against dense float64 solves."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.solvers import minres
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


def indefinite(n: int, gen: torch.Generator, low: float = 1.0, high: float = 10.0) -> torch.Tensor:
    """Symmetric, nonsingular, with eigenvalues ±[low, high] of random signs."""
    magnitudes = low + (high - low) * torch.rand(n, generator=gen, dtype=F64)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return symmetric_with_spectrum(magnitudes * signs, gen)


@SETTINGS
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_k_equal_n_is_the_exact_solve_of_an_indefinite_system(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    result = minres(matvec_of(A), b, max_iters=n)
    expected = torch.linalg.solve(A, b)
    assert result.status in ("converged", "max_iterations")
    assert result.iterations == n
    assert float((result.solution - expected).norm() / expected.norm()) <= 1e-8
    assert result.residual_norm <= 1e-8 * float(b.norm())


def test_more_iterations_reach_round_off_on_a_larger_system() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    result = minres(matvec_of(A), b, max_iters=3 * n)
    expected = torch.linalg.solve(A, b)
    assert float((result.solution - expected).norm() / expected.norm()) <= 1e-11


@SETTINGS
@given(
    n=st.integers(2, 12),
    k=st.integers(1, 12),
    shift=st.sampled_from([0.0, 0.5, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_iterate_minimises_the_residual_over_the_krylov_space(
    n: int, k: int, shift: float, seed: int
) -> None:
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    A_shifted = A + shift * torch.eye(n, dtype=F64)
    result = minres(matvec_of(A), b, max_iters=k, shift=shift)
    # dense reference: least squares over an orthonormal basis of K_k(A + λI, b)
    columns = [b / b.norm()]
    for _ in range(k - 1):
        w = A_shifted @ columns[-1]
        basis = torch.stack(columns, dim=1)
        w = w - basis @ (basis.T @ w)
        w = w - basis @ (basis.T @ w)
        columns.append(w / w.norm())
    K = torch.stack(columns, dim=1)
    coeffs = torch.linalg.lstsq(A_shifted @ K, b[:, None]).solution[:, 0]
    expected = K @ coeffs
    torch.testing.assert_close(result.solution, expected, rtol=1e-7, atol=1e-9)
    # residual_norm is the true residual of the returned iterate
    true_residual = float((b - A_shifted @ result.solution).norm())
    assert result.residual_norm == pytest.approx(true_residual, rel=1e-7, abs=1e-12)


def test_residual_never_increases_with_k() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 15
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    residuals = [minres(matvec_of(A), b, max_iters=k).residual_norm for k in range(1, n + 1)]
    assert all(b_ <= a + 1e-12 for a, b_ in zip(residuals, residuals[1:], strict=False))


def test_k_equal_one_is_the_closed_form_of_algorithm_2() -> None:
    """Seed 000 Alg. 2 / eq. 23: v = c·g with c = ⟨g, u⟩/⟨u, u⟩, u = (G + λI) g."""
    gen = torch.Generator().manual_seed(6)
    n, lam = 9, 0.7
    G = symmetric_with_spectrum(torch.rand(n, generator=gen, dtype=F64), gen)  # PSD, GGN-like
    g = torch.randn(n, generator=gen, dtype=F64)
    u = G @ g + lam * g
    expected = (g @ u) / (u @ u) * g
    result = minres(matvec_of(G), g, max_iters=1, shift=lam)
    torch.testing.assert_close(result.solution, expected)


def test_shift_equals_adding_to_the_diagonal() -> None:
    gen = torch.Generator().manual_seed(7)
    n, lam = 10, 2.5
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    shifted = minres(matvec_of(A), b, max_iters=4, shift=lam)
    explicit = minres(matvec_of(A + lam * torch.eye(n, dtype=F64)), b, max_iters=4)
    torch.testing.assert_close(shifted.solution, explicit.solution)


def test_inconsistent_singular_system_is_a_breakdown_with_least_squares_iterate() -> None:
    gen = torch.Generator().manual_seed(8)
    eigenvalues = torch.tensor([3.0, -2.0, 1.0, 0.0, 0.0], dtype=F64)
    U = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64)).Q
    A = (U * eigenvalues) @ U.T
    A = 0.5 * (A + A.T)
    b = torch.randn(5, generator=gen, dtype=F64)
    null = U[:, 3:]
    b_null = null @ (null.T @ b)
    result = minres(matvec_of(A), b, max_iters=5)
    assert result.status == "breakdown"
    assert torch.isfinite(result.solution).all()
    # A x is the projection of b on range(A): x is a least-squares solution
    torch.testing.assert_close(A @ result.solution, b - b_null, rtol=1e-8, atol=1e-10)
    assert result.residual_norm == pytest.approx(float(b_null.norm()), rel=1e-8)


def reported_singular_case(seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    """n = 12, eigenvalues 0, 0, 0 and nine N(0, 1) draws, λ = 0, a random (inconsistent) b:
    (A, b, the part of b in range(A))."""
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = torch.cat([torch.zeros(3, dtype=F64), torch.randn(9, generator=gen, dtype=F64)])
    U = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=F64)).Q
    A = (U * eigenvalues) @ U.T
    A = 0.5 * (A + A.T)
    b = torch.randn(12, generator=gen, dtype=F64)
    b_range = U[:, 3:] @ (U[:, 3:].T @ b)
    return A.to(dtype), b.to(dtype), b_range.to(dtype)


@pytest.mark.parametrize("seed", range(5))
def test_numerically_singular_inconsistent_system_is_a_breakdown_with_bounded_iterate(
    seed: int,
) -> None:
    """The computed A has eigenvalues ~1e-16 where the exact ones are 0, and β on the invariant
    Krylov space is ~1e-13 (not ~ε‖T‖): the old round-off guard missed it and ‖x‖ grew to
    1e9–1e14 (seed 0: 1.1e10 at k = 10, status "max_iterations" at k = 12)."""
    A, b, b_range = reported_singular_case(seed)
    for k in (10, 12, 24):
        result = minres(matvec_of(A), b, max_iters=k)
        assert float(result.solution.norm()) < 100.0
        if k >= 12:
            assert result.status == "breakdown"
            # a least-squares solution: A x is the projection of b on range(A)
            torch.testing.assert_close(A @ result.solution, b_range, rtol=1e-7, atol=1e-7)
            assert result.residual_norm == pytest.approx(float((b - b_range).norm()), rel=1e-7)


def test_numerically_singular_inconsistent_system_in_float32() -> None:
    A, b, b_range = reported_singular_case(0, torch.float32)
    result = minres(matvec_of(A), b, max_iters=12)
    assert result.status == "breakdown"
    assert float(result.solution.norm()) < 100.0
    torch.testing.assert_close(A @ result.solution, b_range, rtol=1e-3, atol=1e-3)


def test_least_squares_stop_keeps_the_iterate_of_the_last_regular_step() -> None:
    """After the stop every iteration is a no-op: more iterations change nothing."""
    A, b, _ = reported_singular_case(1)
    first = minres(matvec_of(A), b, max_iters=12)
    later = minres(matvec_of(A), b, max_iters=40)
    assert first.status == later.status == "breakdown"
    torch.testing.assert_close(first.solution, later.solution, rtol=0.0, atol=0.0)
    assert first.residual_norm == later.residual_norm


def test_ill_conditioned_nonsingular_system_is_solved_not_stopped() -> None:
    """κ = 1e6 in float64 is far from 1/√ε: the least-squares test must not fire."""
    gen = torch.Generator().manual_seed(11)
    n = 20
    magnitudes = torch.logspace(0, -6, n, dtype=F64)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    A = symmetric_with_spectrum(magnitudes * signs, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    result = minres(matvec_of(A), b, max_iters=10 * n)  # round-off: more than n iterations
    assert result.status != "breakdown"
    expected = torch.linalg.solve(A, b)
    assert float((result.solution - expected).norm() / expected.norm()) <= 1e-6


def test_consistent_singular_system_converges() -> None:
    gen = torch.Generator().manual_seed(9)
    eigenvalues = torch.tensor([3.0, -2.0, 1.0, 0.0], dtype=F64)
    U = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64)).Q
    A = 0.5 * ((U * eigenvalues) @ U.T + ((U * eigenvalues) @ U.T).T)
    b = A @ torch.randn(4, generator=gen, dtype=F64)  # in the range
    result = minres(matvec_of(A), b, max_iters=10)
    assert result.status in ("converged", "max_iterations")
    torch.testing.assert_close(A @ result.solution, b, rtol=1e-9, atol=1e-10)


def test_invariant_krylov_space_stops_changing_the_iterate() -> None:
    """b in a 2-dim invariant subspace: the exact solution after 2 steps, then no-ops."""
    A = torch.diag(torch.tensor([2.0, -3.0, 5.0, 7.0], dtype=F64))
    b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    for k in (2, 3, 6):
        result = minres(matvec_of(A), b, max_iters=k)
        torch.testing.assert_close(
            result.solution, torch.tensor([0.5, -1 / 3, 0.0, 0.0], dtype=F64)
        )
        assert result.status == "converged" and result.residual_norm <= 1e-15


def test_tolerance_stops_early() -> None:
    gen = torch.Generator().manual_seed(10)
    n = 30
    A = indefinite(n, gen, low=5.0, high=6.0)  # two clusters: fast convergence
    b = torch.randn(n, generator=gen, dtype=F64)
    result = minres(matvec_of(A), b, max_iters=n, tol=1e-6)
    assert result.status == "converged" and result.iterations < n
    assert result.residual_norm <= 1e-6 * float(b.norm())
    assert float((b - A @ result.solution).norm()) <= 1.0001e-6 * float(b.norm())


def test_float32_stays_float32() -> None:
    gen = torch.Generator().manual_seed(11)
    n = 8
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    result = minres(matvec_of(A.float()), b.float(), max_iters=2 * n)
    assert result.solution.dtype == torch.float32
    torch.testing.assert_close(
        result.solution.double(), torch.linalg.solve(A, b), rtol=1e-4, atol=1e-4
    )


def test_non_finite_inputs_give_a_zero_step() -> None:
    A = torch.eye(3, dtype=F64)
    result = minres(matvec_of(A), torch.tensor([1.0, math.inf, 0.0], dtype=F64), max_iters=3)
    assert result.status == "non_finite" and torch.equal(result.solution, torch.zeros(3, dtype=F64))

    b = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    D = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    result = minres(lambda v: D @ v * math.nan, b, max_iters=3)
    assert result.status == "non_finite" and torch.equal(result.solution, torch.zeros(3, dtype=F64))
    assert result.iterations == 3


def test_zero_right_hand_side_and_invalid_arguments() -> None:
    result = minres(matvec_of(torch.eye(3, dtype=F64)), torch.zeros(3, dtype=F64), max_iters=2)
    assert result.status == "converged" and torch.equal(result.solution, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="^max_iters"):
        minres(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), max_iters=0)
    with pytest.raises(ValueError, match="^shift"):
        minres(
            matvec_of(torch.eye(3, dtype=F64)),
            torch.ones(3, dtype=F64),
            max_iters=1,
            shift=math.nan,
        )


@pytest.mark.parametrize("scale", [1e-8, 1e16])
def test_solution_scales_with_the_right_hand_side(scale: float) -> None:
    """Linear in b: the round-off guards are relative to ‖T‖, not to ‖b‖."""
    gen = torch.Generator().manual_seed(12)
    n = 10
    A = indefinite(n, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    for k in (3, n):
        base = minres(matvec_of(A), b, max_iters=k)
        scaled = minres(matvec_of(A), scale * b, max_iters=k)
        assert scaled.status == base.status
        torch.testing.assert_close(scaled.solution, scale * base.solution)
