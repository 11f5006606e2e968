"""Seed 002's ellipsoidal trust region against dense float64 references on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

from curvlab import Objective
from curvlab.autodiff import curvature_operator
from curvlab.optim.trust_region import EllipsoidalTR, norm_matrix_diagonal, update_second_moment
from curvlab.solvers import steihaug_cg
from curvlab.testing.models import deep_linear, regression_problem, tiny_mlp
from curvlab.testing.modelwise import (
    check_adaptive_norm_passes,
    dense_derivatives,
    flat,
    flat_loss,
)
from curvlab.testing.solvers import dense_tr_solution, quadratic_model
from curvlab.testing.spies import spy_proposals

F64 = torch.float64
NORMS = ["uniform", "adagrad", "rmsprop"]


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_one_step_is_one_gradient_pass_plus_products_and_a_trial(curvature: str) -> None:
    check_adaptive_norm_passes(EllipsoidalTR, {"norm": "adagrad", "curvature": curvature})


def test_table_1_defaults_per_norm() -> None:
    for norm, radius, decrease in [
        ("uniform", 0.05, 1.5),
        ("adagrad", 0.05, 1.5),
        ("rmsprop", 1e-4, 1.75),
    ]:
        group = EllipsoidalTR(tiny_mlp(), norm=norm).param_groups[0]
        assert (group["radius"], group["decrease"]) == (radius, decrease)
        assert (group["max_radius"], group["eta2"], group["increase"]) == (10.0, 0.95, 1.1)
        assert (group["krylov_tol"], group["eta1"], group["stopping"]) == (0.1, 0.01, "paper")
        assert group["curvature"] == "hessian"


@pytest.mark.parametrize("norm", NORMS)
def test_interior_step_on_a_quadratic_is_the_newton_step(norm: str) -> None:
    model = deep_linear((4, 3))  # linear model + MSE: the loss is quadratic in θ
    x, y = regression_problem(n=16)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, H = dense_derivatives(objective)
    newton = -torch.linalg.solve(H, g)
    before = flat(model)
    opt = EllipsoidalTR(
        model, norm=norm, radius=100.0, max_radius=100.0, krylov_tol=0.0, max_krylov_dim=40
    )
    loss = float(opt.step(objective))
    info = opt.last_step_info
    assert not info["hit_boundary"]
    assert info["accepted"] and info["outcome"] == "very_successful"
    torch.testing.assert_close(flat(model) - before, newton, rtol=1e-9, atol=1e-11)
    # The model is exact on a quadratic: ρ = 1 and the predicted reduction is −m(s).
    assert info["model_decrease"] == pytest.approx(-quadratic_model(H, g, newton), rel=1e-9)
    assert info["rho"] == pytest.approx(1.0, abs=1e-6)
    assert info["trial_loss"] == pytest.approx(loss - info["model_decrease"], rel=1e-9)
    assert opt.radius == 100.0  # min(1.1·Δ, Δ_max)


def _expected_norm_matrix(grads: list[Tensor], norm: str, beta: float, eps: float) -> Tensor:
    """diag(A_t) of seed 002 eqs. 2–3 from the full outer-product matrices G_t."""
    t = len(grads)
    if norm == "adagrad":
        G = sum(torch.outer(g, g) for g in grads)  # eq. 2: Σ g_i g_iᵀ
        return torch.sqrt(torch.diagonal(G) + eps)
    G = sum(beta ** (t - 1 - i) * torch.outer(g, g) for i, g in enumerate(grads))  # eq. 3
    return torch.sqrt((1.0 - beta) * torch.diagonal(G) + eps)


@pytest.mark.parametrize("norm", ["adagrad", "rmsprop"])
def test_norm_matrices_are_the_papers_and_bound_the_step(norm: str) -> None:
    model = tiny_mlp((3, 4, 2))
    data = [regression_problem(n=8, d_in=3, d_out=2, seed=s) for s in range(4)]
    beta, eps = 0.7, 1e-3
    opt = EllipsoidalTR(model, norm=norm, radius=0.05, beta=beta, eps=eps)
    proposals = spy_proposals(opt)
    grads: list[Tensor] = []
    boundary = []
    for x, y in data:
        objective = Objective(model, nn.MSELoss(), x, y)
        grads.append(dense_derivatives(objective)[0])  # g_t at θ_t, before the step
        radius = opt.radius
        opt.step(objective)
        M = _expected_norm_matrix(grads, norm, beta, eps)
        state = opt.global_state
        torch.testing.assert_close(torch.sqrt(state["second_moment"] + eps), M)
        s = proposals[-1].step
        norm_s = math.sqrt(float((M * s * s).sum()))  # ‖s‖_A, A = diag(M) (not diag(M²))
        assert norm_s <= radius * (1 + 1e-12)
        boundary.append(opt.last_step_info["hit_boundary"])
        if boundary[-1]:
            assert norm_s == pytest.approx(radius, rel=1e-10)
    assert any(boundary)


def test_code_eps_mode_starts_the_accumulator_at_eps() -> None:
    model = tiny_mlp((3, 4, 2))
    x, y = regression_problem(n=8, d_in=3, d_out=2)
    objective = Objective(model, nn.MSELoss(), x, y)
    g = dense_derivatives(objective)[0]
    opt = EllipsoidalTR(model, norm="rmsprop", beta=0.8, eps=1e-3, eps_mode="code")
    opt.step(objective)
    # [C-AN] RMSPreconditioning: v_0 = ε, v_1 = β ε + (1 − β) g², M = sqrt(v_1).
    torch.testing.assert_close(opt.global_state["second_moment"], 0.8 * 1e-3 + 0.2 * g * g)


def test_boundary_step_ratio_and_lr_scaling_match_the_dense_model() -> None:
    model = tiny_mlp((3, 4, 2))
    x, y = regression_problem(n=8, d_in=3, d_out=2)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, H = dense_derivatives(objective)
    f = flat_loss(objective)
    theta = flat(model)
    opt = EllipsoidalTR(model, norm="uniform", radius=0.01, lr=0.5, krylov_tol=0.0)
    proposals = spy_proposals(opt)
    loss = float(opt.step(objective))
    info = opt.last_step_info
    step = proposals[0].step  # lr · s
    s = step / 0.5
    assert info["hit_boundary"] and float(s.norm()) == pytest.approx(0.01, rel=1e-12)
    # A small region: Steihaug's boundary point is close to the exact TR solution.
    exact = dense_tr_solution(H, g, 0.01)
    assert -quadratic_model(H, g, s) >= 0.99 * -quadratic_model(H, g, exact)
    assert info["model_decrease"] == pytest.approx(-quadratic_model(H, g, s), rel=1e-9)
    assert info["predicted_reduction"] == pytest.approx(-quadratic_model(H, g, step), rel=1e-9)
    trial = float(f(theta + step))
    assert info["trial_loss"] == pytest.approx(trial, rel=1e-12)
    assert info["rho"] == pytest.approx((loss - trial) / info["predicted_reduction"], rel=1e-12)
    if info["accepted"]:
        torch.testing.assert_close(flat(model), theta + step)


def test_ggn_option_solves_with_the_gauss_newton_matrix() -> None:
    model = tiny_mlp((3, 3, 2))  # 20 parameters, 16 samples × 2 outputs: G is nonsingular
    x, y = regression_problem(n=16, d_in=3, d_out=2)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, _ = dense_derivatives(objective)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def outputs(theta: Tensor) -> Tensor:
        parts, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return objective.functional_outputs(parts).reshape(-1)

    J = jacrev(outputs)(flat(model))
    G = J.T @ J * (2.0 / J.shape[0])  # MSE mean over 32 entries: H_L = (2/32) I
    opt = EllipsoidalTR(
        model,
        norm="uniform",
        curvature="ggn",
        radius=1e3,
        max_radius=1e3,
        krylov_tol=0.0,
        max_krylov_dim=60,
    )
    proposals = spy_proposals(opt)
    opt.step(objective)
    assert not opt.last_step_info["hit_boundary"]
    torch.testing.assert_close(proposals[0].step, -torch.linalg.solve(G, g), rtol=1e-7, atol=1e-9)


def test_rejected_steps_leave_parameters_exactly_and_shrink_the_radius() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16, seed=3)
    objective = Objective(model, nn.MSELoss(), x, y)
    opt = EllipsoidalTR(model, norm="adagrad", radius=10.0, decrease=1.5)
    rejected = 0
    for _ in range(12):
        before = [p.detach().clone() for p in model.parameters()]
        radius = opt.radius
        opt.step(objective)
        info = opt.last_step_info
        if not info["accepted"]:
            rejected += 1
            assert info["rho"] < 0.01 and info["outcome"] == "unsuccessful"
            assert opt.radius == info["next_radius"] == radius / 1.5
            for p, q in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, q)
    assert rejected >= 1
    assert opt.global_state["rejected_steps"] == rejected


def test_non_finite_trial_loss_rejects_and_shrinks() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16)
    objective = Objective(model, nn.MSELoss(), x, y)
    objective.loss_at = lambda params: torch.tensor(math.inf, dtype=F64)  # type: ignore[method-assign]
    opt = EllipsoidalTR(model, norm="uniform")
    before = flat(model)
    opt.step(objective)
    info = opt.last_step_info
    assert info["accepted"] is False and info["rho"] == -math.inf
    assert opt.radius == 0.05 / 1.5
    assert torch.equal(flat(model), before)


def test_negative_and_zero_curvature_end_on_the_boundary() -> None:
    model = deep_linear((3, 2))
    x, _ = regression_problem(n=8, d_in=3, d_out=2)
    concave = Objective(model, lambda out, t: -(out**2).mean(), x, torch.zeros(8))
    opt = EllipsoidalTR(model, norm="uniform", radius=0.1)
    proposals = spy_proposals(opt)
    opt.step(concave)  # H ≺ 0: the first CG direction has negative curvature
    info = opt.last_step_info
    assert info["solver_status"] == "negative_curvature" and info["hit_boundary"]
    assert float(proposals[-1].step.norm()) == pytest.approx(0.1, rel=1e-12)
    assert info["accepted"]  # the concave loss decreases more than the model predicts

    # H = 0 (a loss linear in θ): seed 002 Lemma 1, the first-order TR step in the Adagrad
    # ellipsoid is the Adagrad direction −A⁻¹g, scaled to the boundary ‖s‖_A = Δ.
    model = deep_linear((3, 2))
    linear = Objective(model, lambda out, t: (out * t).mean(), x, torch.randn(8, 2, dtype=F64))
    g = dense_derivatives(linear)[0]
    opt = EllipsoidalTR(model, norm="adagrad", radius=0.1, eps=1e-8)
    proposals = spy_proposals(opt)
    opt.step(linear)
    assert opt.last_step_info["solver_status"] == "negative_curvature"
    M = torch.sqrt(g * g + 1e-8)
    direction = -g / M
    tau = 0.1 / math.sqrt(float((M * direction * direction).sum()))
    torch.testing.assert_close(proposals[-1].step, tau * direction, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("stopping", ["paper", "model_decrease"])
@pytest.mark.parametrize("norm", ["uniform", "rmsprop"])
def test_stopping_rules_reach_the_solver_and_the_step_report(stopping: str, norm: str) -> None:
    model = deep_linear((4, 3))
    x, y = regression_problem(n=16)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, H = dense_derivatives(objective)
    opt = EllipsoidalTR(model, norm=norm, radius=100.0, max_radius=100.0, stopping=stopping)
    proposals = spy_proposals(opt)
    opt.step(objective)
    info = opt.last_step_info
    expected_keys = {
        "rho",
        "accepted",
        "radius",
        "next_radius",
        "outcome",
        "solver_status",
        "solver_iterations",
        "hit_boundary",
        "model_decrease",
        "predicted_reduction",
        "residual_norm",
        "curvature_products",
        "loss",
        "trial_loss",
        "step_norm",
        "skipped",
    }
    assert expected_keys <= info.keys()
    # The same solve with the dense Hessian and the paper's first RMSProp matrix (β = 0.8).
    M = None if norm == "uniform" else torch.sqrt(0.2 * g * g + 1e-10)
    reference = steihaug_cg(
        lambda v: H @ v, g, 100.0, norm_matrix_diag=M, tol=0.1, max_iters=50, stopping=stopping
    )
    assert info["solver_status"] == reference.status == "converged"
    assert info["solver_iterations"] == reference.iterations
    torch.testing.assert_close(proposals[0].step, reference.solution, rtol=1e-9, atol=1e-12)
    if stopping == "paper":  # Eq. 52: ‖g + Bs‖ ≤ ‖g‖ · min(κ, ‖g‖^{1/2}), κ = 0.1
        g_norm = float(g.norm())
        assert info["residual_norm"] <= g_norm * min(0.1, math.sqrt(g_norm))
    # Exact products: one Hessian-vector product per CG iteration, counted in the state.
    assert info["curvature_products"] == info["solver_iterations"]
    assert opt.global_state["curvature_products"] == info["solver_iterations"]


def test_non_finite_curvature_rejects_without_touching_the_radius() -> None:
    class NaNCurvature:
        """The real operator's loss and gradient, NaN products."""

        products = 0

        def __init__(self, objective: Objective) -> None:
            self._inner = curvature_operator(objective, list(model.parameters()), "hessian")
            self.loss = self._inner.loss

        def gradient(self) -> Tensor:
            return self._inner.gradient()

        def matvec(self, v: Tensor) -> Tensor:
            self.products += 1
            return torch.full_like(v, math.nan)

    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16)
    opt = EllipsoidalTR(model, norm="uniform")
    opt._build_operator = lambda objective, group, **_: NaNCurvature(objective)  # type: ignore[method-assign]
    before = flat(model)
    opt.step(Objective(model, nn.MSELoss(), x, y))
    info = opt.last_step_info
    assert info["solver_status"] == "non_finite" and info["accepted"] is False
    assert math.isnan(info["rho"]) and opt.radius == 0.05
    assert torch.equal(flat(model), before)


def test_norm_matrix_stays_positive_when_the_accumulator_underflows() -> None:
    # "code" mode: v_t = β^t ε for a coordinate whose gradient stays 0 (flushed to 0 on
    # devices without denormals); "paper" mode: an ε below the dtype's range.
    zeros = torch.zeros(3, dtype=torch.float32)
    M = norm_matrix_diagonal(zeros, "rmsprop", eps=1e-10, eps_mode="code")
    assert M is not None and bool((M > 0).all())
    M = norm_matrix_diagonal(zeros, "adagrad", eps=1e-60, eps_mode="paper")
    assert M is not None and bool((M > 0).all())
    assert norm_matrix_diagonal(None, "uniform", eps=1e-10, eps_mode="paper") is None
    moment = update_second_moment(
        None, zeros + 2.0, "rmsprop", beta=0.8, eps=1e-10, eps_mode="code"
    )
    assert moment is not None
    torch.testing.assert_close(moment, torch.full((3,), 0.8e-10 + 0.2 * 4.0))


def test_a_negative_scaled_model_decrease_is_passed_on_not_hidden() -> None:
    """lr > 1 can turn the solver's m(0) − m(s) > 0 into m(0) − m(lr·s) < 0; it reaches the
    base's ρ (−∞, docs/deviations.md "A model that predicts no decrease") instead of being
    passed as 'no prediction' (ρ = 1 when the loss went down). Round-off values pass too (the
    base's guard handles them); only a non-finite value is None."""
    # gᵀs = −1, ½ sᵀBs = 0.5: m(0) − m(s) = 0.5, m(0) − m(3s) = 3 − 4.5
    assert EllipsoidalTR._predicted(3.0, 0.5, -1.0) == pytest.approx(-1.5)
    assert EllipsoidalTR._predicted(1.0, -1e-16, -1.0) == -1e-16
    assert EllipsoidalTR._predicted(1.0, math.inf, -1.0) is None
