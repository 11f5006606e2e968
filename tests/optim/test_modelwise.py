"""The model-wide base: a rejected step leaves parameters exactly; ρ (also at a trial point
other than the step); skips; one group; which models have a stateful training pass; the state
keys of the step control (radius, σ, λ_LM) that saved state_dicts rely on. (The pass-counting
helpers of the model-wide methods' tests: curvlab.testing.spies.)"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import hessian

from curvlab import Objective
from curvlab.optim import (
    ARC,
    EDF,
    SMWGN,
    SMWNG,
    SMWNGBD,
    EfficientTR,
    EllipsoidalTR,
    HessianFree,
)
from curvlab.optim import modelwise as modelwise_module
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal, has_stateful_forward
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp


class DenseLM(ModelwiseOptimizer):
    """Test method: (H + λI) s = −g with the dense Hessian; λ adapted by ρ."""

    def __init__(self, params: Any, damping: float = 1.0) -> None:
        super().__init__(params, {"damping": damping})

    @property
    def uses_trial_loss(self) -> bool:
        return True

    def propose(self, objective: Objective, loss: torch.Tensor, grad: torch.Tensor) -> Proposal:
        names = [n for n, p in objective.model.named_parameters()]
        shapes = [p.shape for p in self.params]

        def f(flat: torch.Tensor) -> torch.Tensor:
            parts, off = {}, 0
            for n, s in zip(names, shapes, strict=True):
                parts[n] = flat[off : off + s.numel()].view(s)
                off += s.numel()
            return objective.functional_loss(parts)

        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        lam = self.global_state.setdefault("lam", self.param_groups[0]["damping"])
        with torch.enable_grad():
            H = hessian(f)(flat)
        s = -torch.linalg.solve(H + lam * torch.eye(len(flat), dtype=flat.dtype), grad)
        predicted = -(grad @ s + 0.5 * s @ H @ s)
        return Proposal(s, float(predicted), {"damping": lam})

    def control(self, rho: float, proposal: Proposal) -> bool:
        accept = rho > 0.25
        self.global_state["lam"] *= 0.5 if accept else 4.0
        return accept


def test_accepted_steps_reduce_the_loss_and_rejections_change_nothing() -> None:
    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    opt = DenseLM(model.parameters(), damping=0.1)
    obj = Objective(model, nn.MSELoss(), x, y)
    losses, rejected = [], 0
    for _ in range(10):
        before = [p.detach().clone() for p in model.parameters()]
        losses.append(float(opt.step(obj)))
        if not opt.last_step_info["accepted"]:
            rejected += 1
            for p, q in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, q)
    assert losses[-1] < losses[0]
    assert opt.global_state["rejected_steps"] == rejected


def test_non_finite_trial_loss_is_rejected() -> None:
    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    opt = DenseLM(model.parameters())
    obj = Objective(model, nn.MSELoss(), x, y)
    before = [p.detach().clone() for p in model.parameters()]
    opt.global_state["lam"] = -1e30  # a wild step whose trial loss overflows
    opt.propose = lambda o, l, g: Proposal(torch.full_like(g, 1e300), 1.0)  # type: ignore[method-assign]
    opt.step(obj)
    assert opt.last_step_info["accepted"] is False and opt.last_step_info["rho"] == float("-inf")
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_plain_closure_and_several_groups_are_rejected() -> None:
    model = tiny_mlp((4, 3, 2))
    opt = DenseLM(model.parameters())
    with pytest.raises(TypeError, match="curvlab.Objective"):
        opt.step(lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="one parameter group"):
        DenseLM([{"params": [model[0].weight]}, {"params": [model[0].bias]}])


class _Skipper(ModelwiseOptimizer):
    """Proposes a step, or raises SkipStep when told to; takes loss and gradient from its own
    evaluation (``.grad`` stays untouched)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})
        self.skip = False
        self.evaluations = 0

    def evaluate(self, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
        self.evaluations += 1
        with torch.enable_grad():
            _, loss = objective.forward()
            grads = torch.autograd.grad(loss, self.params)
        return loss.detach(), torch.cat([g.reshape(-1) for g in grads])

    def propose(self, objective: Objective, loss: torch.Tensor, grad: torch.Tensor) -> Proposal:
        from curvlab.optim.modelwise import SkipStep

        if self.skip:
            raise SkipStep("told to")
        return Proposal(-0.1 * grad)


def test_skip_step_from_a_hook_changes_nothing_and_evaluate_replaces_the_closure() -> None:
    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    opt = _Skipper(model)
    obj = Objective(model, nn.MSELoss(), x, y)
    opt.step(obj)
    assert opt.evaluations == 1 and opt.last_step_info["accepted"] is True
    assert all(p.grad is None for p in model.parameters())  # the closure never ran
    before = [p.detach().clone() for p in model.parameters()]
    opt.skip = True
    opt.step(obj)
    assert opt.last_step_info == {
        "skipped": True,
        "reason": "told to",
        "loss": opt.last_step_info["loss"],
        "skipped_steps": 1,
    }
    assert opt.global_state["skipped_steps"] == 1
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


class _HalfStep(DenseLM):
    """Steps half the LM step but measures ρ at the full one (thesis Alg 23's ratio point)."""

    def propose(self, objective: Objective, loss: torch.Tensor, grad: torch.Tensor) -> Proposal:
        full = super().propose(objective, loss, grad)
        return Proposal(0.5 * full.step, full.predicted_reduction, full.info, trial_step=full.step)


def test_trial_step_moves_the_trial_point_but_not_the_step() -> None:
    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    obj = Objective(model, nn.MSELoss(), x, y)
    opt = _HalfStep(model.parameters(), damping=0.5)
    proposals: list[Proposal] = []
    original = opt.propose

    def spy(objective: Objective, loss: torch.Tensor, g: torch.Tensor) -> Proposal:
        proposals.append(original(objective, loss, g))
        return proposals[-1]

    opt.propose = spy  # type: ignore[method-assign]
    names = [n for n, _ in model.named_parameters()]
    before = [p.detach().clone() for p in model.parameters()]

    def loss_at(step: torch.Tensor) -> float:
        pieces = step.split([p.numel() for p in before])
        moved = {n: p + d.view_as(p) for n, p, d in zip(names, before, pieces, strict=True)}
        return float(obj.functional_loss(moved))

    loss = float(opt.step(obj))
    info, (proposal,) = opt.last_step_info, proposals
    assert proposal.trial_step is not None and proposal.predicted_reduction is not None
    full = proposal.trial_step
    assert info["trial_loss"] == loss_at(full)  # measured at the trial step ...
    assert info["rho"] == (loss - loss_at(full)) / proposal.predicted_reduction
    assert info["accepted"]
    for p, q, d in zip(model.parameters(), before, opt.unflatten(0.5 * full), strict=True):
        assert torch.equal(p, q + d)  # ... while the parameters move by the step


def test_stateful_forward_detects_running_statistics_and_randomness() -> None:
    assert not has_stateful_forward(tiny_mlp())
    assert not has_stateful_forward(tiny_cnn())
    bn = tiny_cnn(batchnorm=True)
    assert has_stateful_forward(bn)
    bn.eval()  # running statistics are read, not moved
    assert not has_stateful_forward(bn)
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    assert has_stateful_forward(dropout)
    assert not has_stateful_forward(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)))
    assert has_stateful_forward(nn.Sequential(nn.Linear(3, 3), nn.RReLU()))
    assert has_stateful_forward(nn.Sequential(nn.Linear(3, 3), nn.Dropout2d(0.1)))
    dropout.eval()
    assert not has_stateful_forward(dropout)


class _Uphill(ModelwiseOptimizer):
    """Proposes a small gradient step (the loss goes down) with a model that predicts an
    increase; accepts when ρ ≥ 0.1."""

    def __init__(self, params: Any, predicted: float) -> None:
        super().__init__(params, {})
        self.predicted = predicted

    @property
    def uses_trial_loss(self) -> bool:
        return True

    def propose(self, objective: Objective, loss: torch.Tensor, grad: torch.Tensor) -> Proposal:
        return Proposal(-1e-3 * grad, self.predicted)

    def control(self, rho: float, proposal: Proposal) -> bool:
        return rho >= 0.1


def test_a_model_that_predicts_no_decrease_rejects_the_step() -> None:
    """Deviation (docs/deviations.md): ρ = −∞ for m(0) − m(s) ≤ −1e-15. Before, such a step was
    passed as 'no prediction': ρ = 1 because the loss went down, accepted."""
    model = tiny_mlp((4, 3, 2))
    x, y = regression_problem(n=12, d_out=2)
    obj = Objective(model, nn.MSELoss(), x, y)
    before = [p.detach().clone() for p in model.parameters()]
    opt = _Uphill(model, predicted=-1e-3)
    loss = float(opt.step(obj))
    info = opt.last_step_info
    assert info["trial_loss"] < loss  # the loss went down: the literal ratio is negative ...
    assert info["rho"] == -math.inf and not info["accepted"]  # ... and the step is rejected
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    # Round-off (|m(0) − m(s)| < 1e-15, [C-AN]): ρ = 1 when the loss went down.
    opt = _Uphill(model, predicted=-1e-16)
    opt.step(obj)
    assert opt.last_step_info["rho"] == 1.0 and opt.last_step_info["accepted"]


# ------------------------------------------------------------- dropout: one network per step
def dropout_mlp(p: float) -> nn.Sequential:
    """6–16–3 tanh MLP, with ``Dropout(p)`` after the hidden layer when p > 0 (same weights)."""
    torch.manual_seed(0)
    dropout: list[nn.Module] = [nn.Dropout(p)] if p else []
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), *dropout, nn.Linear(16, 3)).double()


def classification_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (32,), generator=gen)


#: Every model-wide method with a trial loss, set up for a tiny step (radius 1e-4, σ or the LM
#: damping large), where the model of the loss is accurate and ρ ≈ 1 (ARC: 3/2, the cubic
#: term's share of m(0) − m(s) when σ dominates).
TINY_STEP = {
    "EllipsoidalTR": lambda m: EllipsoidalTR(m, radius=1e-4),
    "EllipsoidalTR-ggn": lambda m: EllipsoidalTR(m, norm="uniform", curvature="ggn", radius=1e-4),
    "ARC": lambda m: ARC(m, norm="uniform", sigma=1e6),
    "EfficientTR": lambda m: EfficientTR(m, radius=1e-4, radius_rule="deterministic"),
    "EfficientTR-fd": lambda m: EfficientTR(
        m, radius=1e-4, radius_rule="deterministic", hvp="hessian-fd"
    ),
    "HessianFree": lambda m: HessianFree(m, damping=1e4),
    "SMWGN": lambda m: SMWGN(m, damping=1e4),
    "SMWNG": lambda m: SMWNG(m, damping=1e4),
    "SMWNGBD": lambda m: SMWNGBD(m, damping=1e4),
}


@pytest.mark.parametrize("name", list(TINY_STEP))
def test_tiny_step_ratio_with_dropout_is_the_ratio_without(name: str) -> None:
    """L(θ) and L(θ + s) of ρ with the same masks. Measured before, when the trial loss drew
    fresh masks (ellipsoidal TR, Δ = 1e-4, Dropout(0.5)): ρ = 184, −72, 691, 111 where the
    model without dropout gives 1, 1, 1, 1."""
    x, y = classification_batch()
    ratios = {}
    for p in (0.0, 0.5):
        model = dropout_mlp(p)
        opt = TINY_STEP[name](model)
        torch.manual_seed(1)
        ratios[p] = []
        for _ in range(4):
            opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
            ratios[p].append(opt.last_step_info["rho"])
    assert ratios[0.5] == pytest.approx(ratios[0.0], abs=1e-2)
    assert ratios[0.0] == pytest.approx([1.5 if name == "ARC" else 1.0] * 4, abs=1e-2)


class _ZeroStep(ModelwiseOptimizer):
    """Proposes s = 0 with a model reduction of 1: ρ = L(θ) − L(θ + 0)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    @property
    def uses_trial_loss(self) -> bool:
        return True

    def propose(self, objective: Objective, loss: torch.Tensor, grad: torch.Tensor) -> Proposal:
        return Proposal(torch.zeros_like(grad), 1.0)


def test_trial_loss_at_the_same_point_is_the_loss_with_dropout() -> None:
    model = dropout_mlp(0.5)
    x, y = classification_batch()
    opt = _ZeroStep(model)
    for _ in range(3):
        loss = opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
        assert opt.last_step_info["trial_loss"] == float(loss)  # the same masks, bit for bit
        assert opt.last_step_info["rho"] == 0.0


#: Methods whose curvature comes from a curvature operator (built after the closure's pass on a
#: dropout model); the operator's gradient must be the closure's: the same masks.
OPERATOR_METHODS = {
    "EllipsoidalTR": lambda m: EllipsoidalTR(m, radius=1e-2),
    "ARC": lambda m: ARC(m),
    "EfficientTR": lambda m: EfficientTR(m, radius=1e-2, radius_rule="deterministic"),
    "EfficientTR-fd": lambda m: EfficientTR(
        m, radius=1e-2, radius_rule="deterministic", hvp="hessian-fd"
    ),
    "HessianFree": lambda m: HessianFree(m),
    "EDF": lambda m: EDF(m),
    "EDF-output": lambda m: EDF(m, space="output"),
}


@pytest.mark.parametrize("name", list(OPERATOR_METHODS))
def test_curvature_operator_sees_the_masks_of_the_gradient_pass(name: str) -> None:
    model = dropout_mlp(0.5)
    x, y = classification_batch()
    opt = OPERATOR_METHODS[name](model)
    gradients: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = opt.propose

    def propose(objective: Objective, loss: torch.Tensor, g: torch.Tensor) -> Proposal:
        proposal = original(objective, loss, g)
        gradients.append((opt._operator.gradient(), opt.flat_grad()))
        return proposal

    opt.propose = propose
    for _ in range(2):
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    for from_operator, from_closure in gradients:
        torch.testing.assert_close(from_operator, from_closure, rtol=1e-12, atol=1e-14)


def test_smw_gauss_newton_rows_see_the_masks_of_the_gradient_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from curvlab.optim import smw

    model = dropout_mlp(0.5)
    x, y = classification_batch()
    opt = SMWGN(model)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = smw.output_jacobian_rows

    def rows(layers: Any, net: nn.Module, inputs: torch.Tensor) -> Any:
        out = original(layers, net, inputs)
        pairs.append((out[1], objective.outputs))
        return out

    monkeypatch.setattr(smw, "output_jacobian_rows", rows)
    for _ in range(2):
        objective = Objective(model, nn.CrossEntropyLoss(), x, y)
        opt.step(objective)
    assert len(pairs) == 2
    for outputs, closure_outputs in pairs:
        assert torch.equal(outputs, closure_outputs)


@pytest.mark.parametrize("name", [*TINY_STEP, "EDF", "EDF-output"])
def test_a_step_draws_one_set_of_masks(name: str) -> None:
    """The replays leave the global RNG where the gradient pass left it."""
    make = TINY_STEP.get(name) or OPERATOR_METHODS[name]
    model = dropout_mlp(0.5)
    x, y = classification_batch()
    opt = make(model)
    objective = Objective(model, nn.CrossEntropyLoss(), x, y)
    for _ in range(2):
        start = torch.get_rng_state()
        objective()  # one training pass
        after_one_pass = torch.get_rng_state()
        torch.set_rng_state(start)
        opt.step(objective)
        assert torch.equal(torch.get_rng_state(), after_one_pass)


def test_a_model_without_random_modules_never_reads_the_rng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(device: torch.device) -> Any:
        raise AssertionError("the RNG state was read")

    monkeypatch.setattr(modelwise_module, "capture_rng", fail)
    x, y = classification_batch()
    for make in TINY_STEP.values():
        model = dropout_mlp(0.0)
        make(model).step(Objective(model, nn.CrossEntropyLoss(), x, y))
    model = dropout_mlp(0.5)
    with pytest.raises(AssertionError, match="RNG state was read"):
        EllipsoidalTR(model).step(Objective(model, nn.CrossEntropyLoss(), x, y))


# A saved state_dict holds these keys (per method, after a step); the step control must keep
# reading them under these names, or a state_dict saved by an earlier curvlab stops resuming.
_COUNTERS = {"global_step", "skipped_steps", "rejected_steps"}
_TR_STATE = {"second_moment", "curvature_products", "solver_iterations"}
STATE_LAYOUTS = {
    # method: (the adapted quantity's key, the last_step_info entry that reports its use,
    #          τ added to it there, the other keys)
    EllipsoidalTR: ("radius", "radius", 0.0, _TR_STATE),
    ARC: ("sigma", "sigma", 0.0, _TR_STATE),
    HessianFree: ("lambda_lm", "damping", 1e-3, {"previous_direction", "sampler_state"}),
    SMWGN: ("lambda_lm", "damping", 1e-3, {"sampler_state"}),
}


@pytest.mark.parametrize("cls", list(STATE_LAYOUTS), ids=lambda c: c.__name__)
def test_step_control_state_keeps_its_key_names(cls: type) -> None:
    key, reported, tau, others = STATE_LAYOUTS[cls]
    model = tiny_mlp((3, 4, 2))
    x, y = regression_problem(n=6, d_in=3, d_out=2)
    obj = Objective(model, nn.MSELoss(), x, y)
    opt = cls(model)
    opt.step(obj)
    saved = opt.state_dict()
    assert set(saved["state"][0]) == _COUNTERS | {key} | others
    # A state_dict in this layout, the adapted value written by hand, is what the next step uses.
    saved["state"][0][key] = 0.125
    resumed = cls(model)
    resumed.load_state_dict(saved)
    resumed.step(obj)
    assert resumed.last_step_info[reported] == 0.125 + tau
