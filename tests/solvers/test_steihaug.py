"""Tests for curvlab.solvers.steihaug_cg: the (ellipsoidal) trust-region subproblem by CG."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.solvers import steihaug_cg
from curvlab.testing.solvers import matvec_of, quadratic_model, symmetric_with_spectrum

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def m_norm(s: torch.Tensor, M: torch.Tensor | None) -> float:
    weights = torch.ones_like(s) if M is None else M
    return math.sqrt(float((weights * s * s).sum()))


def cauchy_decrease(
    H: torch.Tensor, g: torch.Tensor, radius: float, M: torch.Tensor | None
) -> float:
    """m(0) − m(s_C), s_C the model minimiser along −M⁻¹g inside ‖s‖_M ≤ Δ."""
    d = -g if M is None else -g / M
    t_max = radius / m_norm(d, M)
    slope, curvature = float(g @ d), float(d @ H @ d)
    t = t_max if curvature <= 0 else min(t_max, -slope / curvature)
    return -(t * slope + 0.5 * t * t * curvature)


@SETTINGS
@given(
    n=st.integers(2, 14),
    negative=st.integers(0, 14),
    log_radius=st.floats(-2.0, 1.5),
    ellipsoidal=st.booleans(),
    stopping=st.sampled_from(["paper", "model_decrease"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_step_is_feasible_and_beats_the_cauchy_point(
    n: int, negative: int, log_radius: float, ellipsoidal: bool, stopping: str, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = 0.1 + 5.0 * torch.rand(n, generator=gen, dtype=F64)
    eigenvalues[: min(negative, n)] *= -1.0
    H = symmetric_with_spectrum(eigenvalues, gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    M = 0.1 + torch.rand(n, generator=gen, dtype=F64) * 10.0 if ellipsoidal else None
    radius = 10.0**log_radius
    result = steihaug_cg(
        matvec_of(H),
        g,
        radius,
        norm_matrix_diag=M,
        stopping=stopping,  # type: ignore[arg-type]
    )
    s = result.solution
    assert result.status in ("converged", "boundary", "negative_curvature", "max_iterations")
    assert m_norm(s, M) <= radius * (1.0 + 1e-10)
    assert result.info["step_norm"] == pytest.approx(m_norm(s, M), rel=1e-8)
    decrease = -quadratic_model(H, g, s)
    assert result.model_decrease == pytest.approx(decrease, rel=1e-9, abs=1e-12)
    assert decrease >= cauchy_decrease(H, g, radius, M) * (1.0 - 1e-10)
    assert result.hit_boundary == (result.status in ("boundary", "negative_curvature"))
    if result.hit_boundary:
        assert m_norm(s, M) == pytest.approx(radius, rel=1e-9)
    assert result.residual_norm == pytest.approx(float((g + H @ s).norm()), rel=1e-8, abs=1e-12)


@SETTINGS
@given(n=st.integers(1, 14), ellipsoidal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_interior_newton_step_is_returned(n: int, ellipsoidal: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    H = symmetric_with_spectrum(1.0 + 9.0 * torch.rand(n, generator=gen, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    M = 0.5 + torch.rand(n, generator=gen, dtype=F64) if ellipsoidal else None
    newton = -torch.linalg.solve(H, g)
    radius = 2.0 * m_norm(newton, M)
    result = steihaug_cg(matvec_of(H), g, radius, norm_matrix_diag=M, tol=1e-12, max_iters=5 * n)
    assert result.status == "converged" and not result.hit_boundary
    torch.testing.assert_close(result.solution, newton, rtol=1e-9, atol=1e-11)
    assert result.model_decrease == pytest.approx(-0.5 * float(g @ newton), rel=1e-9)


def test_negative_curvature_goes_to_the_boundary() -> None:
    gen = torch.Generator().manual_seed(0)
    H = symmetric_with_spectrum(-torch.linspace(1.0, 3.0, 6, dtype=F64), gen)  # negative definite
    g = torch.randn(6, generator=gen, dtype=F64)
    M = torch.linspace(0.5, 2.0, 6, dtype=F64)
    result = steihaug_cg(matvec_of(H), g, 0.7, norm_matrix_diag=M)
    assert result.status == "negative_curvature" and result.hit_boundary
    assert result.iterations == 1
    direction = -g / M  # the first CG direction −M⁻¹g
    torch.testing.assert_close(result.solution, direction * (0.7 / m_norm(direction, M)))
    assert result.model_decrease is not None and result.model_decrease > 0


def test_negative_curvature_after_positive_steps() -> None:
    """A later CG direction with κ ≤ 0 continues from the interior iterate to the boundary."""
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    g = torch.tensor([1.0, 1e-3], dtype=F64)
    result = steihaug_cg(matvec_of(H), g, 5.0, tol=1e-14)
    assert result.status == "negative_curvature" and result.iterations == 2
    assert float(result.solution.norm()) == pytest.approx(5.0, rel=1e-12)
    assert result.model_decrease == pytest.approx(-quadratic_model(H, g, result.solution))


def test_positive_curvature_boundary_step() -> None:
    gen = torch.Generator().manual_seed(1)
    H = symmetric_with_spectrum(torch.linspace(1.0, 2.0, 5, dtype=F64), gen)
    g = torch.randn(5, generator=gen, dtype=F64)
    radius = 0.1 * float(torch.linalg.solve(H, g).norm())
    result = steihaug_cg(matvec_of(H), g, radius)
    assert result.status == "boundary" and result.hit_boundary
    assert float(result.solution.norm()) == pytest.approx(radius, rel=1e-12)


def test_diagonal_norm_equals_preconditioner_callable() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 10
    H = symmetric_with_spectrum(torch.randn(n, generator=gen, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    M = 0.2 + torch.rand(n, generator=gen, dtype=F64)
    a = steihaug_cg(matvec_of(H), g, 1.5, norm_matrix_diag=M)
    b = steihaug_cg(matvec_of(H), g, 1.5, preconditioner=lambda v: v / M)
    torch.testing.assert_close(a.solution, b.solution)
    assert a.status == b.status and a.iterations == b.iterations
    assert a.model_decrease == pytest.approx(b.model_decrease)


def test_ellipsoidal_solve_is_the_spherical_solve_in_scaled_variables() -> None:
    """u = D s with D = diag(√M): the iterates of PCG are those of CG on D⁻¹HD⁻¹, D⁻¹g."""
    gen = torch.Generator().manual_seed(3)
    n = 8
    H = symmetric_with_spectrum(torch.randn(n, generator=gen, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    M = 0.2 + 3.0 * torch.rand(n, generator=gen, dtype=F64)
    d = M.sqrt()
    ellipsoidal = steihaug_cg(matvec_of(H), g, 0.8, norm_matrix_diag=M)
    H_hat = H / d[:, None] / d[None, :]
    spherical = steihaug_cg(matvec_of(H_hat), g / d, 0.8)
    torch.testing.assert_close(ellipsoidal.solution, spherical.solution / d)
    assert ellipsoidal.status == spherical.status


def test_paper_stopping_rule_eq_52() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 40
    H = symmetric_with_spectrum(torch.logspace(0.0, 2.0, n, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    g_norm = float(g.norm())
    result = steihaug_cg(matvec_of(H), g, 100.0, tol=0.1, stopping="paper")
    assert result.status == "converged" and 1 < result.iterations < n
    assert result.residual_norm <= g_norm * min(0.1, math.sqrt(g_norm))
    shorter = steihaug_cg(matvec_of(H), g, 100.0, tol=0.1, max_iters=result.iterations - 1)
    assert shorter.status == "max_iterations"
    assert shorter.residual_norm > g_norm * min(0.1, math.sqrt(g_norm))


def test_model_decrease_stopping_rule_of_the_released_code() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 40
    H = symmetric_with_spectrum(torch.logspace(0.0, 2.0, n, dtype=F64), gen)
    g = torch.randn(n, generator=gen, dtype=F64)
    bound = min(0.1, math.sqrt(float(g.norm())))
    run = steihaug_cg(matvec_of(H), g, 100.0, tol=0.1, stopping="model_decrease")
    k = run.iterations
    assert run.status == "converged" and 2 < k < n

    def mdec(iters: int) -> float:
        value = steihaug_cg(matvec_of(H), g, 100.0, max_iters=iters).model_decrease
        assert value is not None
        return value

    assert mdec(k) == pytest.approx(run.model_decrease)
    assert (mdec(k) - mdec(k - 1)) / mdec(k - 1) <= bound  # the rule fired at k
    assert (mdec(k - 1) - mdec(k - 2)) / mdec(k - 2) > bound  # and not before


def test_zero_gradient_gives_zero_step() -> None:
    result = steihaug_cg(matvec_of(-torch.eye(3, dtype=F64)), torch.zeros(3, dtype=F64), 1.0)
    assert result.status == "converged" and result.model_decrease == 0.0
    assert torch.equal(result.solution, torch.zeros(3, dtype=F64))


def test_non_finite_inputs_give_a_zero_step() -> None:
    H = torch.eye(3, dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    bad = torch.tensor([1.0, math.nan, 0.0], dtype=F64)
    for result in (
        steihaug_cg(matvec_of(H), bad, 1.0),
        steihaug_cg(lambda v: v * math.inf, torch.ones(3, dtype=F64), 1.0),
        steihaug_cg(
            matvec_of(H),
            torch.ones(3, dtype=F64),
            1.0,
            norm_matrix_diag=torch.tensor([1.0, math.inf, 1.0], dtype=F64),
        ),
    ):
        assert result.status == "non_finite" and torch.equal(result.solution, zero)
        assert result.model_decrease is None


def test_float32_stays_float32() -> None:
    gen = torch.Generator().manual_seed(6)
    H = symmetric_with_spectrum(1.0 + torch.rand(8, generator=gen, dtype=F64), gen)
    g = torch.randn(8, generator=gen, dtype=F64)
    M = 0.5 + torch.rand(8, generator=gen, dtype=F64)
    result = steihaug_cg(
        matvec_of(H.float()), g.float(), 100.0, norm_matrix_diag=M.float(), tol=1e-6
    )
    assert result.solution.dtype == torch.float32
    torch.testing.assert_close(
        result.solution.double(), -torch.linalg.solve(H, g), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius": 0.0}, "^radius"),
        ({"radius": math.inf}, "^radius"),
        ({"tol": -0.1}, "^tol"),
        ({"stopping": "eq52"}, "^stopping"),
        ({"max_iters": 0}, "^max_iters"),
        ({"norm_matrix_diag": -torch.ones(3, dtype=F64)}, "^norm_matrix_diag"),
        ({"norm_matrix_diag": torch.ones(3), "preconditioner": lambda v: v}, "^preconditioner"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"radius": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        steihaug_cg(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), **arguments)  # type: ignore[arg-type]
