"""ARC with seed 002's adaptive norms against dense float64 cubic solutions on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim.arc import ARC
from curvlab.optim.control import arc_sigma_update
from curvlab.testing.models import regression_problem, tiny_mlp
from curvlab.testing.modelwise import (
    check_adaptive_norm_passes,
    dense_derivatives,
    flat,
    flat_loss,
)
from curvlab.testing.solvers import cubic_model, dense_cubic_solution
from curvlab.testing.spies import spy_proposals

F64 = torch.float64


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_one_step_is_one_gradient_pass_plus_products_and_a_trial(curvature: str) -> None:
    check_adaptive_norm_passes(ARC, {"norm": "rmsprop", "curvature": curvature})


def test_scr_defaults() -> None:
    group = ARC(tiny_mlp()).param_groups[0]
    assert (group["sigma"], group["eta1"], group["eta2"]) == (1.0, 0.1, 0.9)
    assert (group["increase"], group["decrease"], group["min_sigma"]) == (2.0, 2.0, 1e-16)
    assert (group["krylov_tol"], group["curvature"], group["lr"]) == (0.1, "hessian", 1.0)


@pytest.mark.parametrize("norm", ["uniform", "adagrad", "rmsprop"])
def test_step_is_the_dense_cubic_minimiser_and_sigma_follows_rho(norm: str) -> None:
    model = tiny_mlp((2, 3, 1))  # 13 parameters, tanh: an indefinite Hessian is allowed
    data = [regression_problem(n=8, d_in=2, d_out=1, seed=s) for s in range(6)]
    eps, beta = 1e-6, 0.8
    opt = ARC(model, norm=norm, sigma=2.0, krylov_tol=0.0, max_krylov_dim=13, eps=eps, beta=beta)
    proposals = spy_proposals(opt)
    moment = torch.zeros(13, dtype=F64)
    outcomes = set()
    for x, y in data:
        objective = Objective(model, nn.MSELoss(), x, y)
        g, H = dense_derivatives(objective)
        theta = flat(model)
        sigma = opt.sigma
        # The norm matrix of this step: seed 002 eqs. 2–3 (diagonal), including g_t.
        moment = moment + g * g if norm == "adagrad" else beta * moment + (1 - beta) * g * g
        M = None if norm == "uniform" else torch.sqrt(moment + eps)
        expected, lam = dense_cubic_solution(H, g, sigma, M)
        loss = float(opt.step(objective))
        info = opt.last_step_info
        step = proposals[-1].step
        torch.testing.assert_close(step, expected, rtol=1e-7, atol=1e-10)
        assert info["multiplier"] == pytest.approx(lam, rel=1e-6)
        # ρ divides by the cubic model's decrease (cubic term included, [C-SCR]).
        decrease = -cubic_model(H, g, sigma, step, M)
        assert info["model_decrease"] == pytest.approx(decrease, rel=1e-9)
        trial = float(flat_loss(objective)(theta + step))
        assert info["rho"] == pytest.approx((loss - trial) / decrease, rel=1e-9, abs=1e-12)
        # σ rule: very successful halves σ, unsuccessful doubles it and rejects exactly.
        rule = arc_sigma_update(sigma, info["rho"])
        assert opt.sigma == info["next_sigma"] == rule.value
        assert info["accepted"] is rule.accepted
        outcomes.add(rule.outcome)
        if info["accepted"]:
            torch.testing.assert_close(flat(model), theta + step)
        else:
            assert torch.equal(flat(model), theta)
    assert outcomes == {"very_successful", "successful", "unsuccessful"}


def test_rejections_double_sigma_and_leave_parameters() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16, seed=3)
    objective = Objective(model, nn.MSELoss(), x, y)
    opt = ARC(model, norm="uniform", sigma=1e-4)  # a weak regulariser: long, bad steps
    rejected = 0
    for _ in range(10):
        before = [p.detach().clone() for p in model.parameters()]
        sigma = opt.sigma
        opt.step(objective)
        if not opt.last_step_info["accepted"]:
            rejected += 1
            assert opt.sigma == 2.0 * sigma
            for p, q in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, q)
    assert rejected >= 1


def test_non_finite_trial_loss_rejects_and_raises_sigma() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16)
    objective = Objective(model, nn.MSELoss(), x, y)
    objective.loss_at = lambda params: torch.tensor(math.nan, dtype=F64)  # type: ignore[method-assign]
    opt = ARC(model)
    before = flat(model)
    opt.step(objective)
    info = opt.last_step_info
    assert info["accepted"] is False and info["rho"] == -math.inf
    assert opt.sigma == 2.0
    assert torch.equal(flat(model), before)
    expected_keys = {
        "rho",
        "accepted",
        "sigma",
        "next_sigma",
        "outcome",
        "solver_status",
        "solver_iterations",
        "model_decrease",
        "predicted_reduction",
        "residual_norm",
        "multiplier",
        "curvature_products",
    }
    assert expected_keys <= info.keys()


def test_lr_scales_the_step_and_the_predicted_reduction() -> None:
    model = tiny_mlp((2, 3, 1))
    x, y = regression_problem(n=8, d_in=2, d_out=1)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, H = dense_derivatives(objective)
    opt = ARC(model, norm="uniform", lr=0.25, krylov_tol=0.0, max_krylov_dim=13)
    proposals = spy_proposals(opt)
    opt.step(objective)
    s, _ = dense_cubic_solution(H, g, 1.0)
    torch.testing.assert_close(proposals[0].step, 0.25 * s, rtol=1e-7, atol=1e-10)
    # m(0) − m(lr·s) of the same cubic model (σ = 1).
    expected = -cubic_model(H, g, 1.0, 0.25 * s)
    assert opt.last_step_info["predicted_reduction"] == pytest.approx(expected, rel=1e-8)
