"""A step learning-rate schedule for any bench optimizer, as the bench optimizer ``multistep``.

Seed 001 (TSO-ALRA, §V-A) divides every method's learning rate by 10 at epochs 81 and 122 of
164; the bench runner has no schedules, but it calls ``end_epoch()`` on optimizers that have
one after every completed epoch. `MultiStepEpochs` wraps the optimizer a registered spec
builds and multiplies the learning rate of its *active* parameter groups by ``gamma`` after the
epochs in ``milestones`` (like `torch.optim.lr_scheduler.MultiStepLR` stepped once per epoch).
For a `curvlab.optim.TwoStage` (TSO-ALRA) the wrapped optimizer switches first, so the
decay applies to the stage that runs the next epoch, as in the paper (the decays fall into the
SGD stage).

Hyperparameters of ``multistep``: ``base`` (a bench optimizer name), ``milestones`` (a list of
epochs), ``gamma`` (default 0.1); every other key goes to ``base`` over its defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from curvlab.bench.specs import OPTIMIZERS, OptimizerSpec

__all__ = ["MULTISTEP", "MultiStepEpochs", "multistep_spec"]

MULTISTEP = "multistep"


class MultiStepEpochs:
    """Delegates to ``inner``; after the epochs in ``milestones`` multiplies its learning rates
    by ``gamma``. Forwards ``end_epoch`` / ``report_validation`` / ``last_step_info``."""

    def __init__(self, inner: torch.optim.Optimizer, milestones: Sequence[int], gamma: float):
        if not gamma > 0.0:
            raise ValueError(f"gamma: must be positive, got {gamma}")
        if any(int(m) < 1 for m in milestones):
            raise ValueError(f"milestones: epochs must be ≥ 1, got {list(milestones)}")
        self.inner = inner
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.epochs = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's (active) parameter groups."""
        return self.inner.param_groups

    @property
    def last_step_info(self) -> Any:
        """The wrapped optimizer's ``last_step_info`` (None if it has none)."""
        return getattr(self.inner, "last_step_info", None)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer."""
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def end_epoch(self) -> None:
        """Forward the epoch end (a staged optimizer may switch), then decay at a milestone."""
        hook = getattr(self.inner, "end_epoch", None)
        if callable(hook):
            hook()
        self.epochs += 1
        if self.epochs in self.milestones:
            for group in self.inner.param_groups:
                group["lr"] *= self.gamma

    def report_validation(self, value: float) -> None:
        """Forward the held-out metric to a staged optimizer (switch rules may watch it)."""
        hook = getattr(self.inner, "report_validation", None)
        if callable(hook):
            hook(value)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and the epoch counter."""
        return {"inner": self.inner.state_dict(), "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""
        self.inner.load_state_dict(state["inner"])
        self.epochs = int(state["epochs"])


def _factory(model: nn.Module, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    hp = dict(hparams)
    try:
        base = OPTIMIZERS[str(hp.pop("base"))]
    except KeyError as err:
        raise ValueError(f"base: a bench optimizer name is required, got {err}") from None
    milestones = hp.pop("milestones", [])
    gamma = float(hp.pop("gamma", 0.1))
    if not isinstance(milestones, list | tuple):
        raise ValueError(f"milestones: expected a list of epochs, got {milestones!r}")
    inner = base.factory(model, {**base.defaults, **hp})
    # The runner only calls step / last_step_info / end_epoch / report_validation.
    return cast(torch.optim.Optimizer, MultiStepEpochs(inner, milestones, gamma))


def multistep_spec() -> OptimizerSpec:
    """The ``multistep`` bench optimizer (see the module docstring)."""
    return OptimizerSpec(
        name=MULTISTEP,
        factory=_factory,
        defaults={"gamma": 0.1},
        paper="seed 001 §V-A schedule (lr ÷ 10 at fixed epochs), for any method",
        algorithm="another bench optimizer ('base') with MultiStepLR-style epoch decays",
        file="curvlab/bench/reproduce/schedule.py",
        description="step learning-rate schedule around a bench optimizer (base=NAME)",
    )
