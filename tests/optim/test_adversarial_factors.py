"""Decomposition failures: every method that inverts or roots curvature
statistics survives adversarial statistics — exact zeros, rank one, a huge dynamic range,
denormals, a slightly indefinite matrix, NaN — with finite parameters: the decomposition is
retried in float64 with more damping, and if that fails too the previous inverse is kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab.optim
from curvlab import Objective
from curvlab.testing.models import regression_problem, tiny_mlp


def _zeros(d: int, dtype: torch.dtype) -> Tensor:
    return torch.zeros(d, d, dtype=dtype)


def _rank_one(d: int, dtype: torch.dtype) -> Tensor:
    v = torch.arange(1, d + 1, dtype=dtype)
    return torch.outer(v, v)


def _dynamic_range(d: int, dtype: torch.dtype) -> Tensor:
    big = 1e30 if dtype == torch.float32 else 1e150
    return torch.diag(torch.logspace(-30, 0, d, dtype=torch.float64) * big).to(dtype)


def _denormal(d: int, dtype: torch.dtype) -> Tensor:
    tiny = torch.finfo(dtype).tiny / 16  # below the smallest normal number
    return torch.eye(d, dtype=dtype) * tiny


def _indefinite(d: int, dtype: torch.dtype) -> Tensor:
    return _rank_one(d, dtype) - 1e-3 * torch.eye(d, dtype=dtype)


def _nan(d: int, dtype: torch.dtype) -> Tensor:
    return torch.full((d, d), float("nan"), dtype=dtype)


ADVERSARIAL: dict[str, Callable[[int, torch.dtype], Tensor]] = {
    "zeros": _zeros,
    "rank-one": _rank_one,
    "dynamic-range": _dynamic_range,
    "denormal": _denormal,
    "indefinite": _indefinite,
    "nan": _nan,
}

METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "kfac": (curvlab.optim.KFAC, dict(lr=0.1, damping=1e-3, inverse_every=1)),
    "tso-alra": (curvlab.optim.TSOALRAFirstStage, dict(lr=0.1, eps=1e-6, inverse_every=1)),
    "tnt": (curvlab.optim.TNT, dict(lr=0.01, damping=1e-3, inverse_every=1)),
    "shampoo": (curvlab.optim.Shampoo, dict(lr=0.01, damping=1e-3, inverse_every=1)),
    "shampoo-newton": (
        curvlab.optim.Shampoo,
        dict(lr=0.01, damping=1e-3, inverse_every=1, root_method="coupled_newton"),
    ),
}


def _poison(state: dict[str, Any], make: Callable[[int, torch.dtype], Tensor]) -> int:
    """Replace every square statistic of one block's state; returns how many."""
    count = 0
    for key in ("A", "G"):
        if key in state:
            state[key] = make(state[key].shape[0], state[key].dtype)
            count += 1
    stats = state.get("statistics")
    if isinstance(stats, list):
        for i, s in enumerate(stats):
            stats[i] = make(s.shape[0], s.dtype)
            count += 1
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("method", METHODS)
def test_adversarial_statistics_never_give_a_non_finite_parameter(
    method: str, kind: str, dtype: torch.dtype
) -> None:
    cls, kwargs = METHODS[method]
    model = tiny_mlp((4, 8, 3), dtype=dtype)
    x, y = regression_problem(n=16, dtype=dtype)
    opt = cls(model, **{**kwargs, "ema_decay": 0.99})
    opt.step(Objective(model, nn.MSELoss(), x, y))
    poisoned = sum(_poison(opt.state[p], ADVERSARIAL[kind]) for p in model.parameters())
    assert poisoned > 0
    for _ in range(3):  # each step refreshes (inverse_every=1) from the poisoned statistics
        opt.step(Objective(model, nn.MSELoss(), x, y))
        for p in model.parameters():
            assert bool(torch.isfinite(p).all()), f"{method}/{kind}: non-finite parameter"
