"""A dead or blowing-up run says so once (a warning naming the cause and the knobs), instead
of being skipped silently for ever while the optimizer keeps being called."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim import KFAC, HessianFree
from curvlab.optim.guard import DEAD_AFTER
from curvlab.testing.conformance import batches
from curvlab.testing.models import tiny_mlp


@pytest.mark.parametrize("cls", [KFAC, HessianFree])
def test_steps_skipped_in_a_row_warn_once(cls: type) -> None:
    model = tiny_mlp((4, 8, 3))
    opt = cls(model)
    x, y = batches(1)[0]
    bad = torch.full_like(y, float("nan"))
    opt.step(Objective(model, nn.MSELoss(), x, y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2 * DEAD_AFTER):
            opt.step(Objective(model, nn.MSELoss(), x, bad))
    dead = [w for w in caught if "were skipped" in str(w.message)]
    assert len(dead) == 1
    message = str(dead[0].message)
    assert f"last {DEAD_AFTER} steps were skipped (non-finite loss" in message
    assert "lower the learning rate (lr) or raise the damping" in message


def test_a_run_whose_loss_blows_up_warns_once() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, lr=30.0, damping=1e-3, momentum=0.0)
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match=r"KFAC: the loss rose from .* the run is diverging"):
        for _ in range(30):
            opt.step(Objective(model, nn.MSELoss(), x, y))


def test_a_skip_between_good_steps_does_not_warn() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, lr=0.01)
    x, y = batches(1)[0]
    bad = torch.full_like(y, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3 * DEAD_AFTER):
            opt.step(Objective(model, nn.MSELoss(), x, bad if i % 2 else y))
