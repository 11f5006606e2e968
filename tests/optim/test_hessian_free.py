"""Hessian-free (thesis ch.5 baseline): the converged CG direction is the dense LM solve, the
S2 scaling, ρ, the LM rule, CG warm start, acceptance, skips, passes per step (one gradient
from the operator's build when N2 = N1), no graph after a step. (Validation and the other
conformance checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

import curvlab.optim.hessian_free as hf_module
from curvlab import Objective
from curvlab.optim.control import levenberg_marquardt_update
from curvlab.optim.hessian_free import HessianFree
from curvlab.solvers import SolverResult
from curvlab.testing.models import regression_problem, tiny_mlp
from curvlab.testing.modelwise import check_stateful_training_pass
from curvlab.testing.spies import count_forwards, spy_operators

F64 = torch.float64


def _unflat(model: nn.Module, v: Tensor) -> dict[str, Tensor]:
    out, o = {}, 0
    for n, p in model.named_parameters():
        out[n] = v[o : o + p.numel()].view_as(p)
        o += p.numel()
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_grad(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    theta = _flat(model)

    def f(t: Tensor) -> Tensor:
        return loss_fn(functional_call(model, _unflat(model, t), (x,)), y)

    return float(f(theta)), grad(f)(theta)


def _ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    theta = _flat(model)

    def outputs(t: Tensor) -> Tensor:
        return functional_call(model, _unflat(model, t), (x,))

    out = outputs(theta).detach()
    J = jacrev(outputs)(theta).reshape(out.numel(), -1)
    HL = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ HL @ J


def _problem(loss: str = "mse", n: int = 6) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    model = tiny_mlp((3, 4, 2))  # 26 parameters
    x, y = regression_problem(n=n, d_in=3, d_out=2, seed=5)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.tensor([0, 1, 1, 0, 1, 0][:n])
    if loss == "mse-sum":
        return model, nn.MSELoss(reduction="sum"), x, y
    return model, nn.MSELoss(), x, y


EXACT = {"lr": 1.0, "cg_tol": 1e-13, "warm_start_decay": 0.0}


# --------------------------------------------------------------------------- direction
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_converged_cg_direction_is_the_dense_lm_solve(loss: str) -> None:
    model, loss_fn, x, y = _problem(loss)
    theta = _flat(model)
    f0, g = _loss_grad(model, loss_fn, x, y)
    G = _ggn(model, loss_fn, x, y)
    opt = HessianFree(model, damping=0.5, tau=1e-3, **EXACT)
    opt.step(Objective(model, loss_fn, x, y))
    lam = 0.5 + 1e-3
    p = -torch.linalg.solve(G + lam * torch.eye(len(g), dtype=F64), g)
    torch.testing.assert_close(_flat(model) - theta, p, rtol=1e-8, atol=1e-10)
    info = opt.last_step_info
    assert info["damping"] == pytest.approx(lam)
    assert info["cg_status"] == "converged" and info["warm_started"] is False
    assert info["matvecs"] == info["cg_iterations"] + 1  # + pᵀBp for ρ
    # ρ (5.5) with the undamped GN model on the same batch
    f1, _ = _loss_grad(model, loss_fn, x, y)
    predicted = float(-(g @ p) - 0.5 * p @ G @ p)
    assert info["predicted_reduction"] == pytest.approx(predicted, rel=1e-8)
    assert info["trial_loss"] == pytest.approx(f1, rel=1e-12)
    assert info["rho"] == pytest.approx((f0 - f1) / predicted, rel=1e-8)


@pytest.mark.parametrize("loss", ["mse", "mse-sum"])
def test_curvature_subset_is_the_scaled_ggn_of_its_rows(loss: str) -> None:
    model, loss_fn, x, y = _problem(loss)
    theta = _flat(model)
    _, g = _loss_grad(model, loss_fn, x, y)
    n1, n2 = 6, 4
    # (1/N2) Σ_{S2} J_iᵀH_iJ_i in the scale of the S1 loss: a mean loss on S2 as is, a sum
    # loss on S2 times N1/N2.
    G_sub = _ggn(model, loss_fn, x[:n2], y[:n2]) * (n1 / n2 if loss == "mse-sum" else 1.0)
    opt = HessianFree(
        model, damping=0.2, curvature_batch_size=n2, curvature_subset="first", **EXACT
    )
    opt.step(Objective(model, loss_fn, x, y))
    lam = 0.2 + 1e-3
    p = -torch.linalg.solve(G_sub + lam * torch.eye(len(g), dtype=F64), g)
    torch.testing.assert_close(_flat(model) - theta, p, rtol=1e-8, atol=1e-10)
    assert opt.last_step_info["curvature_batch_size"] == n2


def test_lr_scales_the_step_and_ratio_point() -> None:
    model, loss_fn, x, y = _problem("mse")
    theta = _flat(model)
    G = _ggn(model, loss_fn, x, y)
    _, g = _loss_grad(model, loss_fn, x, y)
    p = -torch.linalg.solve(G + 1.001 * torch.eye(len(g), dtype=F64), g)
    for point, c in (("direction", 1.0), ("step", 0.3)):
        m = copy.deepcopy(model)
        opt = HessianFree(m, **{**EXACT, "lr": 0.3}, ratio_point=point)  # type: ignore[arg-type]
        opt.step(Objective(m, loss_fn, x, y))
        torch.testing.assert_close(_flat(m) - theta, 0.3 * p, rtol=1e-8, atol=1e-10)
        predicted = float(-c * (g @ p) - 0.5 * c * c * (p @ G @ p))
        assert opt.last_step_info["predicted_reduction"] == pytest.approx(predicted, rel=1e-8)


# --------------------------------------------------------------------------- passes per step
def test_full_batch_curvature_takes_loss_and_gradient_from_the_operator() -> None:
    model, loss_fn, x, y = _problem("mse")
    f0, _ = _loss_grad(model, loss_fn, x, y)
    opt = HessianFree(model, lr=1.0, cg_max_iters=3)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        loss = opt.step(Objective(model, loss_fn, x, y))
    info = opt.last_step_info
    assert float(loss) == pytest.approx(f0, rel=1e-14)
    # One forward (the GGN operator's build, which is the gradient pass) + the trial forward;
    # the GGN products reuse the kept graphs.
    assert forwards[0] == 2
    assert all(p.grad is None for p in model.parameters())  # no closure ran
    assert info["matvecs"] == info["cg_iterations"] + 1
    assert len(refs) == 1 and refs[0]() is None  # no autograd graph outlives the step
    assert opt._operator is None


def test_batchnorm_build_is_the_training_pass_and_dropout_keeps_the_closure() -> None:
    _, _, x, y = _problem("mse")
    check_stateful_training_pass(HessianFree, {"lr": 1.0, "cg_max_iters": 3}, x, y)


def test_curvature_subset_keeps_the_closure_for_the_s1_gradient() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, lr=1.0, cg_max_iters=3, curvature_batch_size=4)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        opt.step(Objective(model, loss_fn, x, y))
    # closure on S1 + the operator's build on S2 + the trial forward on S1
    assert forwards[0] == 3
    assert all(p.grad is not None for p in model.parameters())
    assert refs[0]() is None


# --------------------------------------------------------------------------- LM rule
def test_optimizer_moves_lambda_by_the_lm_rule() -> None:
    model, loss_fn, x, y = _problem("ce")
    opt = HessianFree(model, lr=1.0, damping=1.0, boost=1.5, drop=0.5, tau=1e-3)
    lam_lm = 1.0
    seen = set()
    for scale in (1.0, 1.0, 30.0, 30.0, 1.0):
        opt.step(Objective(model, loss_fn, scale * x, y))
        info = opt.last_step_info
        assert info["damping"] == pytest.approx(lam_lm + 1e-3)
        rho = info["rho"]
        # thesis §5.2.3, the rule of curvlab.optim.control (shared with SMW)
        assert levenberg_marquardt_update(lam_lm, rho, epsilon=0.25, boost=1.5, drop=0.5) == (
            1.5 * lam_lm if rho < 0.25 else (0.5 * lam_lm if rho > 0.75 else lam_lm)
        )
        lam_lm = 1.5 * lam_lm if rho < 0.25 else (0.5 * lam_lm if rho > 0.75 else lam_lm)
        seen.add("boost" if rho < 0.25 else ("drop" if rho > 0.75 else "keep"))
        assert opt.global_state["lambda_lm"] == pytest.approx(lam_lm)
        assert info["next_damping"] == pytest.approx(lam_lm + 1e-3)
    assert "drop" in seen


class _WorseTrial(Objective):
    def loss_at(self, params: Any) -> Tensor:
        return super().loss_at(params) + 1.0


def test_accept_threshold_rejects_and_boosts() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, lr=1.0, damping=0.5, accept_threshold=0.2)
    before = _flat(model)
    # the trial loss is worse than the current one: ρ < 0 < η
    opt.step(_WorseTrial(model, loss_fn, x, y))
    info = opt.last_step_info
    assert info["rho"] < 0.0
    assert info["accepted"] is False
    assert torch.equal(_flat(model), before)
    assert opt.global_state["lambda_lm"] == pytest.approx(0.5 * 1.01)  # boosted
    assert opt.global_state["rejected_steps"] == 1
    # accepted when ρ ≥ η
    opt = HessianFree(model, lr=1.0, damping=1.0, accept_threshold=0.2)
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["rho"] >= 0.2 and opt.last_step_info["accepted"] is True
    assert not torch.equal(_flat(model), before)


# --------------------------------------------------------------------------- warm start
def test_cg_warm_starts_from_the_decayed_previous_direction() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, lr=1.0, damping=0.3, cg_tol=1e-13, warm_start_decay=0.9)
    obj1 = Objective(model, loss_fn, x, y)
    theta0 = _flat(model)
    opt.step(obj1)
    p1 = _flat(model) - theta0
    torch.testing.assert_close(opt.global_state["previous_direction"], p1)
    p1 = opt.global_state["previous_direction"]
    lam = opt.damping
    # second step, one CG iteration from x0 = ζ p1 on a different batch
    opt.param_groups[0]["cg_max_iters"] = 1
    x2, y2 = x.flip(0)[:5], y.flip(0)[:5] * 0.5
    A = _ggn(model, loss_fn, x2, y2) + lam * torch.eye(len(p1), dtype=F64)
    _, g = _loss_grad(model, loss_fn, x2, y2)
    x0 = 0.9 * p1
    r0 = -g - A @ x0
    expected = x0 + float(r0 @ r0 / (r0 @ A @ r0)) * r0  # CG's first iterate (p0 = r0)
    theta1 = _flat(model)
    opt.step(Objective(model, loss_fn, x2, y2))
    info = opt.last_step_info
    assert info["warm_started"] is True and info["cg_iterations"] == 1
    assert info["matvecs"] == 3  # A x0, one iteration, pᵀBp
    torch.testing.assert_close(_flat(model) - theta1, expected, rtol=1e-9, atol=1e-11)
    # ζ = 0: cold start
    opt.param_groups[0]["warm_start_decay"] = 0.0
    opt.step(Objective(model, loss_fn, x2, y2))
    assert opt.last_step_info["warm_started"] is False


# --------------------------------------------------------------------------- robustness
def test_non_finite_cg_skips_the_step(monkeypatch: Any) -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, lr=1.0)
    opt.step(Objective(model, loss_fn, x, y))
    before = _flat(model)
    lam, previous = opt.global_state["lambda_lm"], opt.global_state["previous_direction"].clone()

    def broken(matvec: Any, b: Tensor, **kw: Any) -> SolverResult:
        return SolverResult(torch.zeros_like(b), 0, float("inf"), "non_finite")

    monkeypatch.setattr(hf_module, "cg", broken)
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["skipped"] is True
    assert torch.equal(_flat(model), before)
    assert opt.global_state["lambda_lm"] == lam
    assert torch.equal(opt.global_state["previous_direction"], previous)


class _InfiniteTrial(Objective):
    def loss_at(self, params: Any) -> Tensor:
        return torch.tensor(math.inf, dtype=F64)


def test_non_finite_trial_loss_rejects_and_boosts() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, lr=1.0, damping=2.0)
    before = _flat(model)
    opt.step(_InfiniteTrial(model, loss_fn, x, y))
    info = opt.last_step_info
    assert info["rho"] == -math.inf and info["accepted"] is False
    assert torch.equal(_flat(model), before)
    assert opt.global_state["lambda_lm"] == pytest.approx(2.0 * 1.01)


def test_subset_larger_than_batch_and_plain_closure() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = HessianFree(model, curvature_batch_size=7)
    with pytest.raises(ValueError, match="^curvature_batch_size"):
        opt.step(Objective(model, loss_fn, x, y))
    with pytest.raises(TypeError):
        HessianFree(model).step(lambda: loss_fn(model(x), y))


def test_a_direction_without_model_decrease_is_not_taken() -> None:
    """Deviation (docs/deviations.md, "A model that predicts no decrease"): ρ_t = −∞, the step
    is not taken even by the always-step Alg 23 and λ_LM is boosted. (A truncated CG from a
    bad warm start can end there; simulated by negating the model reduction.) Before, ρ_t = 1
    because the loss went down, and the step was taken with λ_LM dropped."""
    from curvlab.optim.modelwise import Proposal

    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    opt = HessianFree(model, lr=1.0, damping=1.0, boost=2.0)
    original = opt.propose

    def uphill(objective: Objective, loss: Tensor, g: Tensor) -> Proposal:
        p = original(objective, loss, g)
        assert p.predicted_reduction is not None and p.predicted_reduction > 0
        return Proposal(p.step, -p.predicted_reduction, p.info, trial_step=p.trial_step)

    opt.propose = uphill  # type: ignore[method-assign]
    before = [p.detach().clone() for p in model.parameters()]
    loss = float(opt.step(Objective(model, nn.MSELoss(), x, y)))
    info = opt.last_step_info
    assert info["trial_loss"] < loss and info["rho"] == -math.inf and not info["accepted"]
    assert opt.global_state["lambda_lm"] == 2.0
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", ["HessianFree", "SMWGN", "SMWNG", "SMWNGBD"])
def test_zero_initial_damping_is_rejected_naming_it(cls: str) -> None:
    """λ_LM(0) = 0 would stay 0: the LM rule of thesis §5.2.3 only multiplies it (before, it was
    accepted and λ_t = τ at every step, whatever ρ_t)."""
    import curvlab.optim

    model = tiny_mlp((4, 3, 2))
    make = getattr(curvlab.optim, cls)
    with pytest.raises(ValueError, match=r"^damping: .*stays 0"):
        make(model, damping=0.0)
    opt = make(model, damping=1.0)
    opt.param_groups[0]["damping"] = 0.0  # set later: rejected at the step
    x, y = regression_problem(n=12, d_out=2)
    with pytest.raises(ValueError, match=r"^damping: "):
        opt.step(Objective(model, nn.MSELoss(), x, y))
