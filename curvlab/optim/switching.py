"""`TwoStage`: run one optimizer, then switch to another (TSO-ALRA; Liu et al.'s Hybrid TR → SGD).

Source labels ([P1], [P3]) are defined in docs/deviations.md.

TSO-ALRA (Ida & Fujiwara, [P1] Alg 1) runs a preconditioned first stage "while stopping
criterion not met" (lines 1–9) and plain SGD afterwards (lines 10–13). [P1] §III-B/§III-C name
the criteria: a switch-over point tuned as a hyperparameter (the experiments use an epoch,
§V-A), or, in real time, "when the minimum validation loss is not altered over several epochs".
Liu et al.'s hybrid method ([P3] §4) runs a trust-region method "until the accuracy
no longer increases" and then SGD from the last weights. Both are this wrapper::

    opt = TwoStage(first, second, switch_at_epoch=10)   # or switch_at_step=, patience=
    for epoch in range(epochs):
        for batch in loader:
            opt.step(closure)              # delegates to the active stage's optimizer
        opt.report_validation(val_loss)    # only needed for patience=
        opt.end_epoch()                    # only needed for switch_at_epoch=

Criteria (any that is given triggers the switch; none: only an explicit `switch()` call):

* ``switch_at_step=k``: steps 1…k run the first stage, step k+1 onwards the second. Every
  call of `step` counts, also one that the inner optimizer skipped (non-finite loss).
* ``switch_at_epoch=E``: switches at the E-th call of `end_epoch`, so epochs 1…E are the first
  stage ([P1]'s "switchover point 70" = 70 epochs of TSO-ALRA).
* ``patience=N``: `report_validation` tracks the best value (minimum, or maximum with
  ``mode="max"``, e.g. the training accuracy of [P3]); a value improves on it when it beats it
  by more than ``min_delta``. The switch happens at the N-th consecutive evaluation without
  improvement ([P1]: "the minimum validation loss is not altered over several epochs"; [P1]
  and [P3] give no N). A non-finite value never improves.

The second stage is built at the switch by a factory ``second(param_groups)`` (or given
pre-built). The factory receives one dict per first-stage group with its ``params`` and the
keys listed in ``carry`` (default ``lr`` and ``initial_lr``) copied from the first stage, so
``torch.optim.SGD`` or ``functools.partial(torch.optim.SGD, momentum=0.9)`` is a factory.
Carrying ``lr`` is what [P1] Alg 1 needs (one η for both stages, under the same ÷10 schedule);
[P3]'s hybrid sets its SGD lr itself (``carry=()`` and ``partial(SGD, lr=0.1)``). A pre-built
second optimizer is used as it is (``carry`` does not apply).

LR schedulers: ``param_groups`` is the *active* optimizer's list, so a scheduler created on the
wrapper writes its learning rates into the first stage before the switch and into the second
after it. A scheduler keeps the ``base_lrs`` it read when it was created (from the first stage):
closed-form schedulers such as `LambdaLR` therefore set the second stage's lr from the first
stage's base lr on their next step; chainable ones (`StepLR`, `MultiStepLR`,
`ExponentialLR`) multiply the current, carried lr. Both stages must have the same number of
groups for this (the factory's groups always do). A scheduler whose base lr must differ in
the second stage is created after the switch.

``state_dict()`` holds the stage, the counters, the best monitored value, the switch event and
both optimizers' state dicts; `load_state_dict` rebuilds the second stage with the factory when
the saved run had switched, so a resumed run continues bit-identically across the switch.
``last_step_info`` is the inner optimizer's info plus ``stage`` (which stage ran the step),
``steps``, ``stage_steps``, ``switched`` (the switch happened right after this step: in the
step, or by `end_epoch` / `report_validation` / `switch` before the next one) and ``switch``
(the event: reason, step, epoch, evaluation; ``None`` before the switch).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.optim.validation import check_choice, check_int, check_range

__all__ = ["DataParallelSGD", "SecondStage", "TwoStage"]

#: A pre-built optimizer, or a factory called with the first stage's groups at the switch.
SecondStage = Optimizer | Callable[[list[dict[str, Any]]], Optimizer]
Mode = Literal["min", "max"]

_COUNTERS = ("stage", "steps", "stage_steps", "epochs", "evaluations", "best", "bad_evaluations")


class TwoStage(Optimizer):
    """Delegate to ``first`` until a switch criterion holds, then to ``second``.

    Args:
        first: the first-stage optimizer (any `torch.optim.Optimizer`).
        second: the second-stage optimizer, or a factory ``second(param_groups)`` called at the
            switch with the first stage's groups (``params`` plus the ``carry`` keys).
        switch_at_step: switch after this many calls of `step`.
        switch_at_epoch: switch at this call of `end_epoch`.
        patience: switch at this many consecutive `report_validation` values without
            improvement.
        min_delta: how much a value must beat the best one to count as an improvement (≥ 0).
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy) for `report_validation`.
        carry: group keys copied from the first stage into the factory's groups.

    Raises:
        ValueError: an invalid criterion (the message starts with its name).
        TypeError: ``first`` is not an optimizer or ``second`` neither one nor a callable.
    """

    def __init__(
        self,
        first: Optimizer,
        second: SecondStage,
        *,
        switch_at_step: int | None = None,
        switch_at_epoch: int | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        mode: Mode = "min",
        carry: Sequence[str] = ("lr", "initial_lr"),
    ) -> None:
        if not isinstance(first, Optimizer):
            raise TypeError(f"first: expected a torch.optim.Optimizer, got {type(first)!r}")
        if not (isinstance(second, Optimizer) or callable(second)):
            raise TypeError(
                f"second: expected a torch.optim.Optimizer or a factory, got {type(second)!r}"
            )
        if second is first:
            raise ValueError("second: must be a different optimizer from first")
        self.switch_at_step = (
            None if switch_at_step is None else check_int("switch_at_step", switch_at_step, 1)
        )
        self.switch_at_epoch = (
            None if switch_at_epoch is None else check_int("switch_at_epoch", switch_at_epoch, 1)
        )
        self.patience = None if patience is None else check_int("patience", patience, 1)
        self.min_delta = check_range("min_delta", min_delta, 0.0)
        self.mode = check_choice("mode", mode, ("min", "max"))
        if isinstance(carry, str) or not all(isinstance(k, str) for k in carry):
            raise ValueError(f"carry: expected a sequence of group keys, got {carry!r}")
        if "params" in carry:
            raise ValueError("carry: 'params' are always passed to the factory")
        self.carry = tuple(carry)
        self.first = first
        self._factory = None if isinstance(second, Optimizer) else second
        self.second: Optimizer | None = second if isinstance(second, Optimizer) else None
        self.schedule: dict[str, Any] = {
            "stage": 1,
            "steps": 0,
            "stage_steps": 0,
            "epochs": 0,
            "evaluations": 0,
            "best": None,
            "bad_evaluations": 0,
            "switch": None,
        }
        self.last_step_info: dict[str, Any] = {}
        # What torch.optim.Optimizer.__init__ sets up besides the groups (hooks, profiling);
        # the groups, state and defaults are the active optimizer's (properties below).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # ------------------------------------------------------------ delegation
    @property
    def stage(self) -> int:
        """1 before the switch, 2 after it."""
        return int(self.schedule["stage"])

    @property
    def active(self) -> Optimizer:
        """The optimizer that the next `step` runs."""
        if self.stage == 1:
            return self.first
        assert self.second is not None
        return self.second

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The active optimizer's groups (LR schedulers and users edit these)."""
        return self.active.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.active.param_groups = groups

    @property
    def state(self) -> Any:
        """The active optimizer's per-parameter state."""
        return self.active.state

    @state.setter
    def state(self, state: Any) -> None:
        self.active.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        """The active optimizer's defaults."""
        return self.active.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.active.defaults = defaults

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def entry_points(self) -> frozenset[str]:
        """The first stage's (a plain torch optimizer: every entry point)."""
        entries = getattr(self.first, "entry_points", None)
        return entries() if entries is not None else frozenset({"objective", "closure", "backward"})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            "TwoStage: add parameter groups to the stage optimizers before wrapping them"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.active.zero_grad(set_to_none)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the active optimizer; then the step criterion is checked."""
        for group in self.active.param_groups:  # an lr set later (e.g. NaN) is rejected
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and not isinstance(lr, bool):
                check_range("lr", lr, 0.0)
        stage = self.stage
        loss = self.active.step() if closure is None else self.active.step(closure)
        self.schedule["steps"] += 1
        self.schedule["stage_steps"] += 1
        info = dict(getattr(self.active, "last_step_info", None) or {})
        self.last_step_info = {
            **info,
            "stage": stage,
            "steps": self.schedule["steps"],
            "stage_steps": self.schedule["stage_steps"],
            "switched": False,
            "switch": self.schedule["switch"],
        }
        if self.switch_at_step is not None and self.schedule["steps"] >= self.switch_at_step:
            self.switch("step")
        return loss

    # ------------------------------------------------------------- criteria
    def end_epoch(self) -> bool:
        """Count one finished epoch; returns whether this switched to the second stage."""
        self.schedule["epochs"] += 1
        if self.switch_at_epoch is not None and self.schedule["epochs"] >= self.switch_at_epoch:
            return self.switch("epoch")
        return False

    def report_validation(self, value: float | Tensor) -> bool:
        """Record a monitored value (validation loss; see ``mode``); returns whether this
        switched to the second stage (``patience`` evaluations without improvement)."""
        v = float(value)
        s = self.schedule
        s["evaluations"] += 1
        best = s["best"]
        if math.isfinite(v) and (
            best is None
            or (v < best - self.min_delta if self.mode == "min" else v > best + self.min_delta)
        ):
            s["best"], s["bad_evaluations"] = v, 0
        else:
            s["bad_evaluations"] += 1
        if self.patience is not None and s["bad_evaluations"] >= self.patience:
            return self.switch("patience")
        return False

    def switch(self, reason: str = "manual") -> bool:
        """Switch to the second stage now; returns False when already switched."""
        if self.stage == 2:
            return False
        if self.second is None:
            self.second = self._build_second()
        self._stop_first()
        s = self.schedule
        s["stage"], s["stage_steps"] = 2, 0
        s["switch"] = {
            "reason": reason,
            "step": s["steps"],
            "epoch": s["epochs"],
            "evaluation": s["evaluations"],
        }
        self.last_step_info = {**self.last_step_info, "switched": True, "switch": s["switch"]}
        return True

    def _stop_first(self) -> None:
        """A first stage that records the user's passes (a curvlab block method) stops."""
        stop = getattr(self.first, "stop_recording", None)
        if stop is not None:
            stop()

    def _build_second(self) -> Optimizer:
        assert self._factory is not None
        groups = [
            {"params": list(g["params"]), **{k: g[k] for k in self.carry if k in g}}
            for g in self.first.param_groups
        ]
        second = self._factory(groups)
        if not isinstance(second, Optimizer):
            raise TypeError(f"second: the factory returned {type(second)!r}, not an Optimizer")
        return second

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Stage, counters, best value, switch event, and both optimizers' state dicts."""
        return {
            **{k: self.schedule[k] for k in _COUNTERS},
            "switch": None if self.schedule["switch"] is None else dict(self.schedule["switch"]),
            "first": self.first.state_dict(),
            "second": None if self.second is None else self.second.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict`, rebuilding the second stage if the saved run had switched."""
        missing = [k for k in (*_COUNTERS, "switch", "first", "second") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: not a TwoStage state dict (missing {missing})")
        stage = int(state_dict["stage"])
        if stage not in (1, 2):
            raise ValueError(f"state_dict: stage must be 1 or 2, got {stage}")
        self.first.load_state_dict(state_dict["first"])
        if self._factory is not None:  # the second stage exists exactly when switched
            self.second = self._build_second() if stage == 2 else None
        if stage == 2:
            self._stop_first()
        if state_dict["second"] is not None:
            if self.second is None:
                raise ValueError("state_dict: has a second-stage state but no second stage")
            self.second.load_state_dict(state_dict["second"])
        elif stage == 2 and self._factory is None:
            raise ValueError("state_dict: switched run without a second-stage state")
        for k in _COUNTERS:
            self.schedule[k] = state_dict[k]
        switch = state_dict["switch"]
        self.schedule["switch"] = None if switch is None else dict(switch)


class DataParallelSGD(torch.optim.SGD):
    """Plain SGD (no momentum) as the second stage of a data-parallel `TwoStage`: the
    closure, then the loss and gradients averaged over ranks by ``synchronize`` (the first
    stage's ``synchronize_gradients``; it averages only the loss with a DDP model), then SGD.

    Args:
        groups: the parameter groups handed to a second-stage factory.
        synchronize: ``loss ↦ mean loss`` that also averages the ``.grad`` of every rank.
        lr: the step size (default: the first group's ``lr``).
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        synchronize: Callable[[Tensor | None], Tensor | None],
        lr: float | None = None,
    ) -> None:
        super().__init__(groups, lr=groups[0]["lr"] if lr is None else lr, momentum=0.0)
        self._synchronize = synchronize

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss = self._synchronize(None if loss is None else torch.as_tensor(loss))
        super().step()
        return loss
