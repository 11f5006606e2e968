"""No leaked autograd graphs: over 200 steps of each model-wide method, the number of live
tensors and autograd nodes reachable by the garbage collector stays flat."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from torch import nn

import curvlab.optim
from curvlab import Objective
from curvlab.testing.models import regression_problem, tiny_mlp

METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "tr-rmsprop": (curvlab.optim.EllipsoidalTR, dict(radius=0.05)),
    "arc": (curvlab.optim.ARC, {}),
    "efficient-tr": (curvlab.optim.EfficientTR, {}),
    "edf": (curvlab.optim.EDF, {}),
    "edf-h": (curvlab.optim.EDF, dict(kind="hessian")),
    "hessian-free": (curvlab.optim.HessianFree, {}),
    "smw-gn": (curvlab.optim.SMWGN, dict(lr=0.5)),
}


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("method", METHODS)
def test_two_hundred_steps_leave_no_growing_garbage(method: str) -> None:
    cls, kwargs = METHODS[method]
    model = tiny_mlp((4, 6, 3))
    x, y = regression_problem(n=32)
    batches = list(zip(x.split(16), y.split(16), strict=True))
    opt = cls(model, **kwargs)
    counts = []
    for step in range(200):
        xb, yb = batches[step % 2]
        opt.step(Objective(model, nn.MSELoss(), xb, yb))
        if step in (19, 199):
            counts.append(_live_tensors())
    assert counts[1] <= counts[0], f"{method}: live tensors grew {counts[0]} → {counts[1]}"
