"""Checks shared by the model-wide methods' tests (trust region, ARC, Hessian-free): dense
derivatives of a flat parameter vector, and the forward passes one step costs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, hessian

from curvlab.objective import Objective
from curvlab.testing.models import regression_problem, tiny_mlp
from curvlab.testing.spies import count_forwards, spy_operators, spy_proposals

__all__ = [
    "check_adaptive_norm_passes",
    "check_stateful_training_pass",
    "dense_derivatives",
    "flat",
    "flat_loss",
]


def flat(model: nn.Module) -> Tensor:
    """The model's parameters as one flat vector (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_loss(objective: Objective) -> Callable[[Tensor], Tensor]:
    """θ ↦ L(θ) on the objective's batch, θ the flat parameter vector."""
    names = [n for n, _ in objective.model.named_parameters()]
    shapes = [p.shape for p in objective.model.parameters()]

    def f(theta: Tensor) -> Tensor:
        parts, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return objective.functional_loss(parts)

    return f


def dense_derivatives(objective: Objective) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of the batch loss at the model's parameters (torch.func, dense)."""
    f = flat_loss(objective)
    theta = flat(objective.model)
    g: Tensor = grad(f)(theta)
    H: Tensor = hessian(f)(theta)
    return g, H


def check_adaptive_norm_passes(cls: type, kwargs: dict[str, Any]) -> None:
    """Seed 002's methods (``norm`` adagrad or rmsprop): one step = the operator's build (the
    gradient pass) + k products + one trial forward; ``.grad`` untouched; the operator (and its
    graphs) gone after ``step``; the norm's accumulator saw the dense gradient. Then
    `check_stateful_training_pass`."""
    model = tiny_mlp((3, 4, 2))
    x, y = regression_problem(n=8, d_in=3, d_out=2)
    objective = Objective(model, nn.MSELoss(), x, y)
    g, _ = dense_derivatives(objective)
    loss0 = float(flat_loss(objective)(flat(model)))
    opt = cls(model, **kwargs)
    proposals = spy_proposals(opt)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        loss = opt.step(objective)
    info = opt.last_step_info
    assert forwards[0] == 2  # build + trial; Hessian / GGN products reuse the kept graphs
    assert all(p.grad is None for p in model.parameters())
    assert float(loss) == pytest.approx(loss0, rel=1e-14)
    assert info["curvature_products"] >= 1
    assert opt.global_state["curvature_products"] == info["curvature_products"]
    # g_t from the operator's build is the dense gradient: the norm's accumulator saw it.
    weight = {"adagrad": 1.0, "rmsprop": 1.0 - opt.param_groups[0]["beta"]}[kwargs["norm"]]
    torch.testing.assert_close(opt.global_state["second_moment"], weight * g * g)
    assert len(proposals) == 1 and len(refs) == 1
    assert refs[0]() is None and opt._operator is None  # no autograd graph outlives the step

    check_stateful_training_pass(cls, kwargs, x, y)


def check_stateful_training_pass(cls: type, kwargs: dict[str, Any], x: Tensor, y: Tensor) -> None:
    """BatchNorm: build + trial, the running statistics moved once, bit-identical to a training
    forward pass at the same parameters. Dropout: the closure's pass is kept (3 forwards)."""
    d_in, d_out = x.shape[1], y.shape[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, d_out))
    model = model.to(torch.float64)
    reference = copy.deepcopy(model)
    reference(x)  # one training pass at the step's parameters
    opt = cls(model, **kwargs)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        opt.step(Objective(model, nn.MSELoss(), x, y))
    assert forwards[0] == 2  # the build (the training pass) and the trial
    assert all(p.grad is None for p in model.parameters())
    bn, reference_bn = model[1], reference[1]
    assert isinstance(bn, nn.BatchNorm1d) and isinstance(reference_bn, nn.BatchNorm1d)
    assert bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 1
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(bn, name), getattr(reference_bn, name))
    assert refs[0]() is None
    model = nn.Sequential(nn.Linear(d_in, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, d_out))
    model = model.to(torch.float64)
    opt = cls(model, **kwargs)
    with count_forwards(model) as forwards:
        opt.step(Objective(model, nn.MSELoss(), x, y))
    assert forwards[0] == 3  # closure, build, trial
    assert all(p.grad is not None for p in model.parameters())
