"""Property-based fuzzing of every optimizer.

Random tiny architectures (MLPs with or without bias / BatchNorm, small CNNs with random
stride, padding and dilation), losses (MSE, cross-entropy, BCE-with-logits), batch sizes,
dtypes and hyperparameters drawn from each method's documented ranges (the ``fuzz`` of its
`curvlab.optim.registry.Method`, inside the ranges its constructor validates). Three steps
each. The property: no parameter ever becomes NaN or Inf, and nothing raises except the
documented construction errors (a model the method cannot handle: ``ValueError("model: …")``).

Profiles: the default run draws a small derandomised sample of cases (fast); the ``slow`` test
draws ``CURVLAB_FUZZ_EXAMPLES`` cases (default 240) — CI runs it with a small derandomised
profile (``CURVLAB_TEST_PROFILE=ci``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlab.optim
from curvlab import Objective
from curvlab.optim.registry import (
    METHODS,
    Domain,
    Every,
    IntRange,
    LogUniform,
    Method,
    OneOf,
    Sample,
)

Draw = Callable[[st.SearchStrategy[Any]], Any]


def _log(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Log-uniform floats in [lo, hi]."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def _strategy(sample: Sample, domain: Domain) -> st.SearchStrategy[Any]:
    """The hypothesis strategy of a registry `Sample` of a hyperparameter's domain."""
    if isinstance(sample, LogUniform):
        return _log(sample.low, sample.high)
    if isinstance(sample, IntRange):
        return st.integers(sample.low, sample.high)
    if isinstance(sample, OneOf):
        return st.sampled_from(sample.values)
    assert isinstance(sample, Every)
    options = getattr(domain, "options", (False, True))
    return st.sampled_from(options)


def _strategies(method: Method) -> dict[str, st.SearchStrategy[Any]]:
    domains = method.domains()
    return {name: _strategy(sample, domains[name]) for name, sample in method.fuzz.items()}


#: Every method of curvlab.optim.registry, drawn within its registered fuzzing ranges.
FUZZED: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    name: _strategies(method) for name, method in METHODS.items()
}


def _hyperparameters(name: str, draw: Draw) -> dict[str, Any]:
    return {key: draw(strategy) for key, strategy in FUZZED[name].items()}


_WRAPPERS_AND_BASES = {
    "BlockOptimizer",
    "ModelwiseOptimizer",
    "TensorwiseOptimizer",
    "TwoStage",
}


# ------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: nn.Module
    has_other_params: bool  # BatchNorm: parameters outside Linear/Conv2d


@st.composite
def problems(draw: Draw) -> Problem:
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batchnorm = draw(st.booleans())
    batch = draw(st.integers(2 if batchnorm else 1, 9))
    loss_name = draw(st.sampled_from(["mse", "ce", "bce"]))
    out = draw(st.integers(1, 4)) if loss_name != "ce" else draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):  # MLP
        widths = [draw(st.integers(1, 6)) for _ in range(draw(st.integers(1, 3)))]
        bias = draw(st.booleans())
        layers: list[nn.Module] = []
        d_in = widths[0]
        for width in widths[1:]:
            layers.append(nn.Linear(d_in, width, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(draw(st.sampled_from([nn.Tanh, nn.ReLU, nn.Sigmoid]))())
            d_in = width
        layers.append(nn.Linear(d_in, out, bias=bias))
        model = nn.Sequential(*layers)
        shape: tuple[int, ...] = (widths[0],)
    else:  # CNN
        channels = draw(st.integers(1, 3))
        kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        side = draw(st.integers(dilation * (kernel - 1) + 1, 7))
        conv = nn.Conv2d(
            channels,
            draw(st.integers(1, 3)),
            kernel_size=kernel,
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, 1)),
            dilation=dilation,
            bias=draw(st.booleans()),
        )
        mods: list[nn.Module] = [conv]
        if batchnorm:
            mods.append(nn.BatchNorm2d(conv.out_channels))
        mods += [nn.ReLU(), nn.Flatten()]
        probe = nn.Sequential(*mods).eval()(torch.zeros(2, channels, side, side))
        model = nn.Sequential(*mods, nn.Linear(probe.shape[1], out))
        shape = (channels, side, side)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        x = torch.randn(batch, *shape, generator=g, dtype=dtype)
        if loss_name == "mse":
            y = torch.randn(batch, out, generator=g, dtype=dtype)
        elif loss_name == "ce":
            y = torch.randint(0, out, (batch,), generator=g)
        else:
            y = torch.randint(0, 2, (batch, out), generator=g).to(dtype)
        batches.append((x, y))
    loss_fn = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[
        loss_name
    ](reduction=draw(st.sampled_from(["mean", "sum"])))
    return Problem(model, batches, loss_fn, has_other_params=batchnorm)


def _check(name: str, problem: Problem, hparams: dict[str, Any]) -> None:
    method = METHODS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback-update warnings are expected here
        try:
            opt = method.build(problem.model, **hparams)
        except ValueError as err:
            # Documented: a model the method cannot precondition (e.g. SMW with BatchNorm).
            assert str(err).startswith("model:"), err
            assert method.needs_layers and problem.has_other_params, err
            return
        for x, y in problem.batches:
            opt.step(Objective(problem.model, problem.loss_fn, x, y))
            for p in problem.model.parameters():
                assert bool(torch.isfinite(p).all()), f"{name} made a parameter non-finite"


_CI = os.environ.get("CURVLAB_TEST_PROFILE") == "ci"
_SLOW_EXAMPLES = 40 if _CI else int(os.environ.get("CURVLAB_FUZZ_EXAMPLES", "240"))
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("name", FUZZED)
@settings(max_examples=4, derandomize=True, **_SETTINGS)  # type: ignore[arg-type]
@given(problem=problems(), data=st.data())
def test_fuzz_small_profile(name: str, problem: Problem, data: st.DataObject) -> None:
    _check(name, problem, _hyperparameters(name, data.draw))


@pytest.mark.slow
@settings(max_examples=_SLOW_EXAMPLES, derandomize=_CI, **_SETTINGS)  # type: ignore[arg-type]
@given(name=st.sampled_from(sorted(FUZZED)), problem=problems(), data=st.data())
def test_fuzz_every_optimizer(name: str, problem: Problem, data: st.DataObject) -> None:
    _check(name, problem, _hyperparameters(name, data.draw))


def test_every_exported_optimizer_is_fuzzed() -> None:
    exported = {
        n
        for n in curvlab.optim.__all__
        if isinstance(getattr(curvlab.optim, n), type)
        and issubclass(getattr(curvlab.optim, n), torch.optim.Optimizer)
    }
    missing = exported - set(FUZZED) - _WRAPPERS_AND_BASES
    assert not missing, f"not fuzzed: {missing}"
    assert all(FUZZED.values()), [name for name, drawn in FUZZED.items() if not drawn]
