"""SMW-GN / SMW-NG / SMW-NG-BD (thesis ch.5): directions equal the dense LM solve, the LM
rule, ρ, Theorem 6's acceptance, skips and bad input, passes per step (NG's per-sample rows
from the gradient pass). (The conformance checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab.optim.smw as smw
from curvlab import Objective
from curvlab.linalg import DecompositionError
from curvlab.optim.modelwise import Proposal
from curvlab.optim.smw import SMWGN, SMWNG, SMWNGBD
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp
from curvlab.testing.spies import count_forwards

F64 = torch.float64
CLASSES = [SMWGN, SMWNG, SMWNGBD]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model: nn.Module, v: Tensor) -> dict[str, Tensor]:
    out, o = {}, 0
    for n, p in model.named_parameters():
        out[n] = v[o : o + p.numel()].view_as(p)
        o += p.numel()
    return out


def _dense_curvature(cls: type, objective: Objective, subset: Tensor) -> Tensor:
    """B on S2 from torch.func: (1/N2) Σ J_iᵀH_iJ_i (GN) or (1/N2) Σ ∇f_i∇f_iᵀ (NG, BD)."""
    model, x, y = objective.model, objective.inputs, objective.targets
    n1 = x.shape[0]
    theta = _flat(model)
    outputs = model(x).detach()
    J = jacrev(lambda t: functional_call(model, _unflat(model, t), (x,)))(theta)
    J = J.reshape(n1, -1, theta.numel())[subset]  # (N2, q, n)
    # L = (1/N1) Σ f_i, so H_i = N1 ∂²L/∂ŷ_i² and ∇f_i = N1 (∂L/∂ŷ_i) J_i.
    if cls is SMWGN:
        H = hessian(lambda o: objective.loss_from_outputs(o, y))(outputs)
        q = J.shape[1]
        H = n1 * H.reshape(n1, q, n1, q)[subset, :, subset, :]
        return torch.einsum("iqn,iqr,irm->nm", J, H, J) / len(subset)
    r = torch.func.grad(lambda o: objective.loss_from_outputs(o, y))(outputs)
    G = n1 * torch.einsum("iq,iqn->in", r.reshape(n1, -1)[subset], J)
    B = G.T @ G / len(subset)
    if cls is SMWNGBD:  # keep the layer blocks (weight and bias of one module)
        owner = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() for _ in range(p.numel())]
        same = torch.tensor([[a == b for b in owner] for a in owner])
        B = B * same
    return B


def _dense_direction(cls: type, objective: Objective, lam: float, subset: Tensor) -> Tensor:
    theta = _flat(objective.model)
    g = torch.func.grad(lambda t: objective.functional_loss(_unflat(objective.model, t)))(theta)
    B = _dense_curvature(cls, objective, subset)
    return -torch.linalg.solve(B + lam * torch.eye(theta.numel(), dtype=F64), g)


def _problem(loss: str, n: int = 6, d_out: int = 3) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    model = tiny_mlp((4, 5, d_out))
    x, y = regression_problem(n=n, d_out=d_out)
    g = torch.Generator().manual_seed(3)
    if loss == "mse":
        return model, nn.MSELoss(), x, y
    if loss == "mse-sum":
        return model, nn.MSELoss(reduction="sum"), x, y
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, d_out, (n,), generator=g)
    return model, nn.BCEWithLogitsLoss(), x, (torch.rand(n, d_out, generator=g) < 0.5).to(F64)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loss", ["mse", "mse-sum", "ce", "bce"])
@pytest.mark.parametrize("n2", [None, 4])
def test_direction_equals_dense_damped_solve(cls: type, loss: str, n2: int | None) -> None:
    model, loss_fn, x, y = _problem(loss)
    obj = Objective(model, loss_fn, x, y)
    opt = cls(model, lr=1.0, curvature_batch_size=n2, curvature_subset="first")
    subset = torch.arange(6 if n2 is None else n2)
    expected = _dense_direction(cls, obj, opt.damping, subset)
    before = _flat(model)
    opt.step(obj)
    assert opt.last_step_info["accepted"]
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-9, atol=1e-12)
    if cls is SMWGN:  # (5.7) exactly where H is singular (softmax + CE)
        assert opt.last_step_info["woodbury_form"] == ("5.7" if loss == "ce" else "5.6")


@pytest.mark.parametrize("cls", [SMWGN, SMWNG], ids=lambda c: c.__name__)
def test_conv_layers_and_the_general_form(cls: type) -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    obj = Objective(model, nn.CrossEntropyLoss(), x, y)
    opt = cls(model, lr=1.0, damping=0.1)
    expected = _dense_direction(cls, obj, opt.damping, torch.arange(4))
    before = _flat(model)
    opt.step(obj)
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-9, atol=1e-12)
    # (5.7) also holds for an invertible H: MSE solved with form="general".
    model, loss_fn, x, y = _problem("mse")
    obj = Objective(model, loss_fn, x, y)
    opt = cls(model, lr=1.0, form="general")
    expected = _dense_direction(cls, obj, opt.damping, torch.arange(6))
    before = _flat(model)
    opt.step(obj)
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-9, atol=1e-12)


def test_random_curvature_subset_is_drawn_from_the_saved_generator() -> None:
    model, loss_fn, x, y = _problem("ce", n=8)
    obj = Objective(model, loss_fn, x, y)
    opt = SMWGN(model, lr=1.0, curvature_batch_size=3)
    gen = torch.Generator()
    gen.set_state(opt._generator.get_state())
    subset = torch.randperm(8, generator=gen)[:3]
    expected = _dense_direction(SMWGN, obj, opt.damping, subset)
    before = _flat(model)
    opt.step(obj)
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ratio_point", ["direction", "step"])
def test_rho_is_the_thesis_ratio_and_the_step_is_alpha_p(ratio_point: str) -> None:
    model, loss_fn, x, y = _problem("ce")
    obj = Objective(model, loss_fn, x, y)
    alpha = 0.3
    opt = SMWNG(model, lr=alpha, ratio_point=ratio_point)
    lam = opt.damping
    theta = _flat(model)
    p = _dense_direction(SMWNG, obj, lam, torch.arange(6))
    g = torch.func.grad(lambda t: obj.functional_loss(_unflat(model, t)))(theta)
    B = _dense_curvature(SMWNG, obj, torch.arange(6))
    c = 1.0 if ratio_point == "direction" else alpha
    loss = float(obj.functional_loss(_unflat(model, theta)))
    trial = float(obj.functional_loss(_unflat(model, theta + c * p)))
    predicted = float(-c * g @ p - 0.5 * c * c * p @ B @ p)  # m(0) − m(c p), eq. (5.5)
    opt.step(obj)
    info = opt.last_step_info
    assert info["trial_loss"] == pytest.approx(trial, rel=1e-12)
    assert info["predicted_reduction"] == pytest.approx(predicted, rel=1e-10)
    assert info["rho"] == pytest.approx((loss - trial) / predicted, rel=1e-10)
    torch.testing.assert_close(_flat(model), theta + alpha * p, rtol=1e-10, atol=1e-12)


def test_lm_rule_moves_lambda_as_specified() -> None:
    opt = SMWNG(tiny_mlp(), damping=2.0, tau=0.01, boost=1.5, drop=0.5, epsilon=0.25)
    cases = [(0.1, 3.0), (-math.inf, 4.5), (0.5, 4.5), (0.75, 4.5), (0.9, 2.25), (0.25, 2.25)]
    for rho, lam_lm in cases:
        proposal = Proposal(torch.zeros(1), 1.0, {})
        accepted = opt.control(rho, proposal)
        assert accepted is math.isfinite(rho)  # practical Alg 23 accepts every finite step
        assert opt.global_state["lambda_lm"] == lam_lm
        assert opt.damping == lam_lm + 0.01  # λ = λ_LM + τ
        assert proposal.info["next_damping"] == opt.damping


@pytest.mark.parametrize(("cls", "forwards"), [(SMWNG, 2), (SMWNGBD, 2), (SMWGN, 3)])
def test_passes_per_step(cls: type, forwards: int) -> None:
    # NG / NG-BD: the closure's gradient pass also records the per-sample rows (§5.3.3), then
    # only the trial forward; GN adds one forward on S2 (and backward passes to the outputs).
    model, loss_fn, x, y = _problem("ce")
    opt = cls(model, lr=1.0, curvature_batch_size=4)
    with count_forwards(model) as count:
        opt.step(Objective(model, loss_fn, x, y))
    assert count[0] == forwards
    assert all(p.grad is not None for p in model.parameters())  # the closure's gradient
    assert opt._gradient_capture is None  # nothing of the step's pass is kept ...
    for layer in opt.layers.values():  # ... and no hook is left on the layers
        assert not layer.module._forward_hooks and not layer.module._forward_pre_hooks
    info = opt.last_step_info
    assert info["next_damping"] == opt.damping and info["accepted"]


def test_step_reports_lambda_and_applies_the_rule() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = SMWGN(model, lr=1.0)
    for _ in range(3):
        lam_before = opt.global_state.get("lambda_lm", 1.0)
        opt.step(Objective(model, loss_fn, x, y))
        info = opt.last_step_info
        rho = info["rho"]
        factor = 1.01 if rho < 0.25 else 0.99 if rho > 0.75 else 1.0
        assert info["damping"] == lam_before + 1e-3
        assert opt.global_state["lambda_lm"] == lam_before * factor
        assert info["next_damping"] == lam_before * factor + 1e-3


def test_theorem6_semi_stochastic_steps_never_increase_the_loss() -> None:
    model, loss_fn, x, y = _problem("ce", n=12)
    full = Objective(model, loss_fn, x, y)  # N1 = N: the full gradient
    # A tiny initial λ makes the first GN steps overshoot; boost = 10 recovers quickly.
    opt = SMWGN(
        model,
        lr=1.0,
        damping=1e-3,
        tau=1e-6,
        boost=10.0,
        drop=0.5,
        curvature_batch_size=3,
        accept_threshold=0.1,
    )
    losses, rejected = [], 0
    for _ in range(15):
        before = _flat(model)
        losses.append(float(opt.step(full)))
        if not opt.last_step_info["accepted"]:
            rejected += 1
            assert opt.last_step_info["rho"] < 0.1
            assert torch.equal(_flat(model), before)
    assert rejected > 0 and opt.global_state["rejected_steps"] == rejected
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


def test_non_finite_trial_loss_is_rejected() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = SMWNG(model, lr=1.0, damping=1e-300, tau=1e-300)
    with torch.no_grad():
        model[0].weight.mul_(1e150)  # finite loss and gradient; p overflows the trial loss
    before = _flat(model)
    opt.step(Objective(model, loss_fn, x, y))
    info = opt.last_step_info
    if not info["skipped"]:
        assert info["rho"] == -math.inf and not info["accepted"]
    assert torch.equal(_flat(model), before)


def test_non_finite_gram_and_failed_solves_skip_the_step(monkeypatch: Any) -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = SMWGN(model, lr=1.0)
    before = _flat(model)
    monkeypatch.setattr(smw, "layer_gram", lambda rows: torch.full((18, 18), math.nan, dtype=F64))
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["skipped"] and "Gram" in opt.last_step_info["reason"]
    monkeypatch.undo()

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise DecompositionError("damped_solve: failed after 4 attempts")

    monkeypatch.setattr(smw, "woodbury_coefficients", fail)
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["skipped"] and "Woodbury" in opt.last_step_info["reason"]
    assert opt.global_state["skipped_steps"] == 2 and opt.global_state["global_step"] == 0
    assert "lambda_lm" not in opt.global_state or opt.global_state["lambda_lm"] == 1.0
    assert torch.equal(_flat(model), before)


def test_bad_input_raises_clear_errors() -> None:
    model, loss_fn, x, y = _problem("mse")
    before = _flat(model)
    with pytest.raises(ValueError, match="^curvature_batch_size.*exceeds"):
        SMWGN(model, curvature_batch_size=7).step(Objective(model, loss_fn, x, y))
    assert torch.equal(_flat(model), before)
    with pytest.raises(ValueError, match="^model.*BatchNorm1d"):
        SMWNG(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    with pytest.raises(TypeError, match="^model"):
        SMWNG(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="curvlab.Objective"):
        SMWNG(model).step(lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="^loss_fn"):
        SMWNG(model).step(Objective(model, nn.L1Loss(), x, y))
    with pytest.raises(ValueError, match="^objective"):
        SMWNG(tiny_mlp()).step(Objective(model, loss_fn, x, y))
    m2, ce, x2, y2 = _problem("ce")
    with pytest.raises(ValueError, match="^form"):
        SMWGN(m2, form="symmetric").step(Objective(m2, ce, x2, y2))
