"""Tests for curvlab.solvers.cg: preconditioned CG against dense float64 solves."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.solvers import cg
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


def spd(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    return symmetric_with_spectrum(torch.logspace(0.0, -math.log10(cond), n, dtype=F64), gen)


@SETTINGS
@given(n=st.integers(1, 16), log_cond=st.floats(0.0, 4.0), seed=st.integers(0, 2**31 - 1))
def test_cg_matches_dense_solve(n: int, log_cond: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    A = spd(n, 10.0**log_cond, gen)
    b = torch.randn(n, generator=gen, dtype=F64)
    result = cg(matvec_of(A), b, tol=1e-12, max_iters=10 * n)
    assert result.status == "converged"
    expected = torch.linalg.solve(A, b)
    cond = float(torch.linalg.cond(A))
    err = float((result.solution - expected).norm() / expected.norm())
    assert err <= 1e-10 * cond
    # residual_norm is the recursive residual, which tracks the true one
    true_residual = float((b - A @ result.solution).norm())
    assert result.residual_norm <= 1e-12 * float(b.norm())
    assert true_residual <= 1e-10 * float(b.norm()) * cond


def test_preconditioned_cg_matches_solve_in_fewer_iterations() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 40
    scales = torch.logspace(-2, 2, n, dtype=F64)
    core = spd(n, 10.0, gen)  # well conditioned core, badly scaled rows / columns
    A = scales.sqrt()[:, None] * core * scales.sqrt()[None, :]
    b = torch.randn(n, generator=gen, dtype=F64)
    diag = torch.diagonal(A).clone()
    plain = cg(matvec_of(A), b, tol=1e-10, max_iters=20 * n)
    jacobi = cg(matvec_of(A), b, preconditioner=lambda v: v / diag, tol=1e-10, max_iters=20 * n)
    expected = torch.linalg.solve(A, b)
    assert jacobi.status == "converged"
    torch.testing.assert_close(jacobi.solution, expected, rtol=1e-7, atol=0.0)
    assert jacobi.iterations < plain.iterations
    assert jacobi.iterations <= n < plain.iterations  # cond(A) ~ 1e5 slows plain CG down


def test_exact_preconditioner_converges_in_one_iteration() -> None:
    gen = torch.Generator().manual_seed(0)
    A = spd(12, 1e3, gen)
    b = torch.randn(12, generator=gen, dtype=F64)
    A_inv = torch.linalg.inv(A)
    result = cg(matvec_of(A), b, preconditioner=matvec_of(A_inv), tol=1e-10)
    assert result.status == "converged" and result.iterations == 1
    torch.testing.assert_close(result.solution, A_inv @ b)


def test_warm_start_at_the_solution_needs_no_iteration() -> None:
    gen = torch.Generator().manual_seed(1)
    A = spd(8, 10.0, gen)
    b = torch.randn(8, generator=gen, dtype=F64)
    x_star = torch.linalg.solve(A, b)
    result = cg(matvec_of(A), b, x0=x_star, tol=1e-8)
    assert result.status == "converged" and result.iterations == 0
    assert result.info["matvecs"] == 1
    torch.testing.assert_close(result.solution, x_star)


def test_indefinite_matrix_gives_a_status_not_an_exception() -> None:
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    result = cg(matvec_of(A), b, tol=1e-12)
    assert result.status == "negative_curvature"
    assert torch.isfinite(result.solution).all()
    assert math.isfinite(result.residual_norm)


def test_max_iterations_status_and_count() -> None:
    gen = torch.Generator().manual_seed(2)
    A = spd(30, 1e4, gen)
    b = torch.randn(30, generator=gen, dtype=F64)
    result = cg(matvec_of(A), b, tol=1e-14, max_iters=3)
    assert result.status == "max_iterations" and result.iterations == 3
    assert result.info["matvecs"] == 3


def test_zero_right_hand_side() -> None:
    result = cg(matvec_of(torch.eye(4, dtype=F64)), torch.zeros(4, dtype=F64))
    assert result.status == "converged" and result.iterations == 0
    assert torch.equal(result.solution, torch.zeros(4, dtype=F64))


def test_non_finite_inputs_give_a_zero_step() -> None:
    A = torch.eye(3, dtype=F64)
    b = torch.tensor([1.0, math.nan, 0.0], dtype=F64)
    result = cg(matvec_of(A), b)
    assert result.status == "non_finite" and torch.equal(result.solution, torch.zeros(3, dtype=F64))

    def nan_matvec(v: torch.Tensor) -> torch.Tensor:
        return v * math.nan

    result = cg(nan_matvec, torch.ones(3, dtype=F64))
    assert result.status == "non_finite" and torch.equal(result.solution, torch.zeros(3, dtype=F64))


def test_float32_stays_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    A = spd(10, 10.0, gen)
    b = torch.randn(10, generator=gen, dtype=F64)
    result = cg(matvec_of(A.float()), b.float(), tol=1e-5)
    assert result.solution.dtype == torch.float32
    torch.testing.assert_close(
        result.solution.double(), torch.linalg.solve(A, b), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1.0}, "^tol"),
        ({"max_iters": 0}, "^max_iters"),
        ({"x0": torch.zeros(2, dtype=F64)}, "^x0"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cg(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), **kwargs)  # type: ignore[arg-type]


def test_rejects_matrices_as_right_hand_side() -> None:
    with pytest.raises(ValueError, match="^b"):
        cg(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, 1, dtype=F64))
