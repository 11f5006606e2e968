"""Unusual inputs for every optimizer: a plain closure, frozen parameters,
parameters that get no gradient, a layer used twice (tied weights), several parameter groups.
Each gets a clear error or its documented behaviour."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim.modelwise import ModelwiseOptimizer
from curvlab.optim.registry import Config, conformance_configs
from curvlab.testing.models import regression_problem, tiny_mlp

SUITE = conformance_configs()


def _build(config: Config, model: nn.Module, **extra: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config.build(model, **extra)


def _steps(opt: Any, model: nn.Module, n: int = 3) -> None:
    x, y = regression_problem(n=16)
    for _ in range(n):
        opt.step(Objective(model, nn.MSELoss(), x, y))


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_plain_closure_works_or_says_what_to_pass(config: Config) -> None:
    """Told the loss (``loss_fn``), the block methods step with a plain closure; the model-wide
    methods say that they need an `Objective`."""
    model = tiny_mlp((4, 8, 3))
    told = "loss_fn" in inspect.signature(config.cls).parameters
    opt = _build(config, model, **({"loss_fn": nn.MSELoss()} if told else {}))
    x, y = regression_problem(n=16)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.MSELoss()(model(x), y)
        loss.backward()
        return loss

    if told:
        opt.step(closure)
        assert opt.last_step_info["skipped"] is False
    else:
        with pytest.raises(TypeError, match="needs a curvlab.Objective"):
            opt.step(closure)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_frozen_parameters_stay_frozen_and_the_rest_trains(config: Config) -> None:
    model = tiny_mlp((4, 8, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    trained = [p.detach().clone() for p in model[2].parameters()]
    opt = _build(config, model)
    _steps(opt, model)
    for p, q in zip(model[0].parameters(), frozen, strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(model[2].parameters(), trained, strict=True))


class _WithUnused(nn.Module):
    """A head that forward never calls: its parameters never get a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp((4, 8, 3))
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_parameters_without_gradient_are_left_alone(config: Config) -> None:
    model = _WithUnused()
    before = [p.detach().clone() for p in model.unused.parameters()]
    opt = _build(config, model)
    _steps(opt, model)
    for p, q in zip(model.unused.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Tied(nn.Module):
    """One Linear applied twice (a shared layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6).double()
        self.shared = nn.Linear(6, 6).double()
        self.out = nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_a_layer_used_twice_keeps_parameters_finite_and_the_loss_from_rising(
    config: Config,
) -> None:
    model = _Tied()
    x, y = regression_problem(n=16)
    with torch.no_grad():
        start = float(nn.MSELoss()(model(x), y))
    opt = _build(config, model)
    _steps(opt, model, n=5)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with torch.no_grad():  # methods with step control may reject all of their first steps
        assert float(nn.MSELoss()(model(x), y)) <= start


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_several_parameter_groups_are_honoured_or_refused_clearly(config: Config) -> None:
    model = tiny_mlp((4, 8, 3))
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": 0.0},
    ]
    if issubclass(config.cls, ModelwiseOptimizer):
        # Documented: one subproblem over all parameters, so exactly one group (methods that
        # need the model's layers take the model itself and say so).
        with pytest.raises((ValueError, TypeError), match="^(params|model)"):
            config.cls(groups, **config.test_kwargs)
        return
    if "params" not in inspect.signature(config.cls).parameters:
        pytest.skip(f"{config.cls.__name__} takes no parameter groups")
    frozen = [p.detach().clone() for p in model[2].parameters()]
    opt = _build(config, model, params=groups)
    _steps(opt, model)
    # The second group has lr = 0: its parameters must not move.
    for p, q in zip(model[2].parameters(), frozen, strict=True):
        assert torch.equal(p, q)
