"""Tests for curvlab.solvers.tr_gd_subproblem: seed 003's Algorithm 2 on its Fig. 1 problems."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from curvlab.solvers import tr_gd_subproblem
from curvlab.testing.solvers import dense_tr_solution, matvec_of, quadratic_model

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def figure_1_problem(n: int, lam: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 003 §4.1: H = BBᵀ − λI with B ∈ R^{n×(n−1)}, B_ij ~ N(0,1), so λ_min(H) = −λ."""
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n - 1, generator=gen, dtype=F64)
    H = B @ B.T - lam * torch.eye(n, dtype=F64)
    g = torch.randn(n, generator=gen, dtype=F64)
    return 0.5 * (H + H.T), g


def operator_norm(H: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(H).abs().max())


@pytest.mark.parametrize(("lam", "seed"), [(10.0, 0), (30.0, 1), (50.0, 2), (110.0, 3)])
def test_reaches_the_global_minimiser_of_figure_1_problems(lam: float, seed: int) -> None:
    n = 30
    H, g = figure_1_problem(n, lam, seed)
    eta = 0.5 / operator_norm(H)  # Assumption 1: η < 1/β
    result = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=2000, n2=20000, step_size=eta)
    expected = dense_tr_solution(H, g, 1.0)
    # Armijo on function values resolves ‖grad‖ down to ~sqrt(ε|f|/α), then cannot decrease f
    assert result.status == "line_search_failed" and result.hit_boundary
    assert result.residual_norm <= 1e-6 * float(g.norm())
    assert result.info["phase2_iterations"] > 0
    torch.testing.assert_close(result.solution, expected, rtol=0, atol=1e-6)
    assert float(result.solution.norm()) == pytest.approx(1.0, rel=1e-12)
    best = quadratic_model(H, g, expected)
    assert quadratic_model(H, g, result.solution) == pytest.approx(best, rel=1e-10)
    assert result.model_decrease == pytest.approx(-best, rel=1e-10)
    # matvecs: one per phase-I step, at least one per phase-II step, one to enter phase II
    info = result.info
    assert info["matvecs"] >= info["phase1_iterations"] + info["phase2_iterations"] + 1


@pytest.mark.parametrize("radius", [0.3, 1.0, 4.0])
def test_other_radii_are_the_unit_ball_algorithm_in_scaled_variables(radius: float) -> None:
    """z = r·u: Alg. 2 on (H, g, r, η) equals r × Alg. 2 on (r²H, r g, 1, η/r²)."""
    H, g = figure_1_problem(12, 10.0, 4)
    eta = 0.5 / operator_norm(H)
    scaled = tr_gd_subproblem(matvec_of(H), g, radius, n1=50, n2=80, step_size=eta)
    unit = tr_gd_subproblem(
        matvec_of(radius**2 * H), radius * g, 1.0, n1=50, n2=80, step_size=eta / radius**2
    )
    torch.testing.assert_close(scaled.solution, radius * unit.solution)
    assert scaled.iterations == unit.iterations
    assert scaled.model_decrease == pytest.approx(unit.model_decrease)


def test_global_minimiser_for_a_larger_radius() -> None:
    H, g = figure_1_problem(20, 30.0, 5)
    eta = 0.5 / operator_norm(H)
    result = tr_gd_subproblem(matvec_of(H), g, 3.0, n1=2000, n2=20000, step_size=eta, tol=1e-6)
    assert result.status == "converged" and result.residual_norm <= 1e-6 * float(g.norm())
    expected = dense_tr_solution(H, g, 3.0)
    torch.testing.assert_close(result.solution, expected, rtol=0, atol=1e-5)
    best = quadratic_model(H, g, expected)
    assert quadratic_model(H, g, result.solution) == pytest.approx(best, rel=1e-10)


def test_phase_one_norms_increase_and_signs_are_invariant() -> None:
    """Thm 5: ‖z_t‖ increases in phase I. Thm 3: z_t⁽ⁱ⁾ g⁽ⁱ⁾ ≤ 0 in the eigenbasis of H."""
    H, g = figure_1_problem(25, 50.0, 6)
    eta = 0.9 / operator_norm(H)
    _, V = torch.linalg.eigh(H)
    g_eig = V.T @ g
    phase1_steps = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=10**6, n2=0, step_size=eta)
    hitting_time = phase1_steps.info["phase1_iterations"]
    assert 1 < hitting_time < 10**6  # Lemma 6: phase I is finite when λ_1 < 0
    norms = phase1_steps.info["phase1_norms"]
    assert len(norms) == hitting_time + 1
    assert all(b >= a for a, b in zip(norms, norms[1:], strict=False))
    for n1 in range(0, hitting_time):  # every phase-I iterate z_{n1+1}
        z = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=n1, n2=0, step_size=eta).solution
        assert float(((V.T @ z) * g_eig).max()) <= 1e-12


def test_positive_definite_interior_case_is_plain_gradient_descent_to_newton() -> None:
    gen = torch.Generator().manual_seed(7)
    n = 10
    A = torch.randn(n, n, generator=gen, dtype=F64)
    H = A @ A.T / n + torch.eye(n, dtype=F64)
    g = 0.1 * torch.randn(n, generator=gen, dtype=F64)
    newton = -torch.linalg.solve(H, g)
    radius = 2.0 * float(newton.norm())
    eta = 0.9 / operator_norm(H)
    result = tr_gd_subproblem(matvec_of(H), g, radius, n1=5000, n2=5000, step_size=eta, tol=1e-12)
    assert result.status == "converged" and not result.hit_boundary
    assert result.info["phase2_iterations"] == 0
    torch.testing.assert_close(result.solution, newton, rtol=1e-10, atol=1e-12)


def test_paper_settings_take_one_or_two_inner_steps() -> None:
    """§4: N1 = N2 = 1, radius 1, step 0.1: "1–2 inner iterations" and a feasible step."""
    H, g = figure_1_problem(15, 10.0, 8)
    H = H / operator_norm(H)  # so that η = 0.1 satisfies Assumption 1
    result = tr_gd_subproblem(matvec_of(H), 10.0 * g, 1.0, n1=1, n2=1, step_size=0.1)
    assert 1 <= result.iterations <= 2
    assert float(result.solution.norm()) <= 1.0 + 1e-12
    assert result.model_decrease == pytest.approx(-quadratic_model(H, 10.0 * g, result.solution))
    interior = tr_gd_subproblem(matvec_of(H), 1e-3 * g, 1.0, n1=1, n2=1, step_size=0.1)
    assert interior.iterations == 2 and not interior.hit_boundary  # two GD steps, z_2 returned
    z0 = -0.5 * g / g.norm()  # Assumption 2 with α = 0.5
    z1 = z0 - 0.1 * (H @ z0 + 1e-3 * g)
    z2 = z1 - 0.1 * (H @ z1 + 1e-3 * g)
    torch.testing.assert_close(interior.solution, z2)


def test_code_variant_is_the_released_loop() -> None:
    """[C-TR] iter_TR: z = −η g, then z ← z − (η/2)(Hz + g), z ← r z/(‖z‖ + 1e-9)."""
    H, g = figure_1_problem(10, 10.0, 9)
    eta, radius = 0.01, 2.0
    sgd = tr_gd_subproblem(matvec_of(H), g, radius, n1=0, n2=0, step_size=eta, variant="code")
    torch.testing.assert_close(sgd.solution, -eta * g)
    assert not sgd.hit_boundary
    z = -eta * g
    for _ in range(2):
        z = z - 0.5 * eta * (H @ z + g)
        z = radius * z / (z.norm() + 1e-9)
    two = tr_gd_subproblem(matvec_of(H), g, radius, n1=2, n2=0, step_size=eta, variant="code")
    torch.testing.assert_close(two.solution, z)
    assert two.hit_boundary and two.info["matvecs"] == 3
    assert two.model_decrease == pytest.approx(-quadratic_model(H, g, z))
    no_model = tr_gd_subproblem(
        matvec_of(H),
        g,
        radius,
        n1=2,
        n2=0,
        step_size=eta,
        variant="code",
        compute_model_decrease=False,
    )
    assert no_model.model_decrease is None and no_model.info["matvecs"] == 2


def test_line_search_failure_is_a_status() -> None:
    """At round-off level the Armijo test cannot be met: status, current point kept."""
    H, g = figure_1_problem(12, 10.0, 10)
    eta = 0.5 / operator_norm(H)
    result = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=1000, n2=10**5, step_size=eta)
    assert result.status == "line_search_failed"
    torch.testing.assert_close(result.solution, dense_tr_solution(H, g, 1.0), rtol=0, atol=1e-6)


def test_zero_and_non_finite_inputs() -> None:
    zero = torch.zeros(3, dtype=F64)
    H = -torch.eye(3, dtype=F64)
    result = tr_gd_subproblem(matvec_of(H), zero, 1.0, n1=1, n2=1)
    assert result.status == "converged" and torch.equal(result.solution, zero)
    for result in (
        tr_gd_subproblem(
            matvec_of(H), torch.tensor([1.0, math.inf, 0.0], dtype=F64), 1.0, n1=1, n2=1
        ),
        tr_gd_subproblem(lambda v: v * math.nan, torch.ones(3, dtype=F64), 1.0, n1=3, n2=3),
        tr_gd_subproblem(
            lambda v: v * math.nan, torch.ones(3, dtype=F64), 1.0, n1=3, n2=3, variant="code"
        ),
    ):
        assert result.status == "non_finite" and torch.equal(result.solution, zero)
        assert result.model_decrease is None


def test_float32_stays_float32() -> None:
    H, g = figure_1_problem(10, 10.0, 11)
    eta = 0.5 / operator_norm(H)
    result = tr_gd_subproblem(
        matvec_of(H.float()), g.float(), 1.0, n1=500, n2=3000, step_size=eta, tol=1e-5
    )
    assert result.solution.dtype == torch.float32
    torch.testing.assert_close(
        result.solution.double(), dense_tr_solution(H, g, 1.0), rtol=0, atol=1e-3
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius": -1.0}, "^radius"),
        ({"n1": -1}, "^n1"),
        ({"n2": 1.5}, "^n2"),
        ({"step_size": 0.0}, "^step_size"),
        ({"init_scale": 1.0}, "^init_scale"),
        ({"armijo_sigma": 0.0}, "^armijo_sigma"),
        ({"armijo_shrink": 1.0}, "^armijo_shrink"),
        ({"armijo_max_backtracks": -1}, "^armijo_max_backtracks"),
        ({"armijo_initial_step": -0.1}, "^armijo_initial_step"),
        ({"tol": -1.0}, "^tol"),
        ({"variant": "released"}, "^variant"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"radius": 1.0, "n1": 1, "n2": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        tr_gd_subproblem(matvec_of(torch.eye(3, dtype=F64)), torch.ones(3, dtype=F64), **arguments)  # type: ignore[arg-type]


def test_a_step_size_above_one_over_the_hessian_norm_is_reported() -> None:
    """Assumption 1 (η < 1/‖H‖) checked from the products: here η‖H‖ = 3. Before, the status
    was "max_iterations" and nothing said that Thm 3 did not apply."""
    H = torch.diag(torch.tensor([30.0, 2.0, -1.0, 0.5], dtype=F64))
    g = torch.ones(4, dtype=F64)
    result = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=1, n2=1, step_size=0.1)
    assert result.status == "step_size_too_large"
    bound = result.info["hessian_norm_bound"]
    assert 10.0 <= bound <= 30.0 + 1e-12  # a lower bound on ‖H‖ that proves η‖H‖ ≥ 1
    assert float(result.solution.norm()) <= 1.0 + 1e-12  # still feasible


def test_interior_divergence_with_a_too_large_step_is_reported_not_silent() -> None:
    """η‖H‖ = 3: the top component of the phase-I iterate grows by |1 − ηλ| = 2 per step, held
    in a large ball only by the projection; the result is far worse than z₀ (f(z) > 0 = f(0)).
    Before, this ended with status "max_iterations"."""
    H = torch.diag(torch.tensor([30.0, 1.0], dtype=F64))
    g = torch.tensor([1.0, 1.0], dtype=F64)
    result = tr_gd_subproblem(matvec_of(H), g, 1e3, n1=12, n2=0, step_size=0.1)
    z0 = -0.5 * 1e3 * g / g.norm()
    assert quadratic_model(H, g, result.solution) > max(0.0, quadratic_model(H, g, z0))
    assert result.status == "step_size_too_large"
    assert 25.0 <= result.info["hessian_norm_bound"] <= 30.0 + 1e-12  # growth → the top λ


def test_a_step_size_within_assumption_1_keeps_the_usual_status() -> None:
    H = torch.diag(torch.tensor([5.0, 1.0, -1.0], dtype=F64))  # η‖H‖ = 0.5
    g = torch.ones(3, dtype=F64)
    result = tr_gd_subproblem(matvec_of(H), g, 1.0, n1=3, n2=3, step_size=0.1)
    assert result.status == "max_iterations"
    assert 0.0 < result.info["hessian_norm_bound"] <= 5.0 + 1e-12
