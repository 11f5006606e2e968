"""What every curvlab step does around its maths: mixed precision, a snapshot for a skipped
step, and the skip itself. Each base calls it explicitly in its ``step``::

    with step_guard(self, closure) as guard:
        loss = guard.closure()                    # the user's forward passes
        if not torch.isfinite(loss):
            return guard.skip(loss, "non-finite loss")
        ...                                       # the method's maths

Mixed precision: inside ``torch.autocast``, the body runs with autocast off for cpu and cuda,
so statistics, inverses, roots, solves and updates stay in the parameters' dtype. The forward
passes keep the caller's precision: a `curvlab.Objective` re-enters the autocast state it was
built under (`curvlab.Objective.autocast`), and a plain closure is wrapped to run under the
state at the call of ``step`` (``guard.closure``). On exit the weight-cast cache is cleared
(the step changed the parameters in place). `full_precision` does the same for
``warm_start``.

Skipped steps: at the start of the step the label sampler's random state (``optimizer.
_generator``, if the method has one) and the model's running statistics (BatchNorm /
InstanceNorm buffers that a training pass moves) are copied; `StepGuard.skip` puts them back,
so a skipped step (a NaN batch) leaves the sampler exactly as it was even if labels were
already sampled, and no NaN running statistics behind. The copies are never in
``state_dict``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.objective import (
    AutocastState,
    Objective,
    autocast_off,
    autocast_state,
    run_with_autocast,
)

__all__ = [
    "SampledLabels",
    "StepGuard",
    "full_precision",
    "require_objective",
    "running_statistics",
    "step_guard",
    "watch",
]


def require_objective(closure: Any, method: str) -> Objective:
    """The closure as an `Objective`, or a `TypeError` that says what to pass and why."""
    if isinstance(closure, Objective):
        return closure
    got = "nothing (after your own backward pass)" if closure is None else repr(type(closure))
    raise TypeError(
        f"{method}.step needs a curvlab.Objective(model, loss_fn, inputs, targets): it solves "
        "a model of the loss built from curvature-vector products (and measures the loss at "
        "trial parameters) on the step's own mini-batch, which neither a plain closure nor "
        f"your own loss.backward() can give; got {got}"
    )


def running_statistics(model: Any) -> tuple[tuple[Tensor, Tensor], ...]:
    """``(buffer, copy)`` of every running statistic a training forward pass of ``model``
    moves (BatchNorm / InstanceNorm with ``track_running_stats`` in training mode)."""
    if not isinstance(model, nn.Module):
        return ()
    return tuple(
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and module.training
        and module.track_running_stats
        for buffer in module.buffers(recurse=False)
    )


def _autocast_on(state: AutocastState) -> bool:
    return any(enabled for _, enabled, _ in state)


def _closure_with_autocast(closure: Callable[[], Any], state: AutocastState) -> Callable[[], Any]:
    """A plain closure that runs under the autocast ``state`` of the caller of ``step``."""

    @functools.wraps(closure)
    def run() -> Any:
        with run_with_autocast(state):
            return closure()

    return run


class StepGuard:
    """One step's guard (made by `step_guard`): the closure to call, the caller's autocast
    state, and the snapshot that `skip` puts back."""

    def __init__(self, optimizer: Any, closure: Any, model: Any) -> None:
        self.optimizer = optimizer
        self.caller_autocast = autocast_state()
        plain = closure is not None and not isinstance(closure, Objective)
        if plain and _autocast_on(self.caller_autocast):
            closure = _closure_with_autocast(closure, self.caller_autocast)
        self.closure = closure
        generator = getattr(optimizer, "_generator", None)
        self._sampler = None if generator is None else generator.get_state()
        self._running = running_statistics(model)

    def restore_sampler(self) -> None:
        """Put the label sampler back to its state at the start of this step."""
        generator = getattr(self.optimizer, "_generator", None)
        if generator is not None and self._sampler is not None:
            generator.set_state(self._sampler)

    def skip(self, loss: Tensor | None, reason: str) -> Tensor | None:
        """Record a skipped step and return ``loss``: parameters and curvature state stay
        untouched, the label sampler and the running statistics are put back."""
        self.restore_sampler()
        with torch.no_grad():
            for buffer, saved in self._running:
                buffer.copy_(saved)
        state: dict[str, Any] = self.optimizer.global_state
        state["skipped_steps"] += 1
        self.optimizer.last_step_info = {
            "skipped": True,
            "reason": reason,
            "loss": None if loss is None else float(loss),
            "skipped_steps": state["skipped_steps"],
        }
        watch(self.optimizer, loss, skipped=reason)
        return loss


#: Consecutive skipped steps after which a run is reported as dead.
DEAD_AFTER = 5
#: A loss above ``BLOWN_UP × (|first loss| + 1)`` is reported as a run that blew up.
BLOWN_UP = 1e3


def watch(optimizer: Any, loss: Tensor | float | None, skipped: str | None = None) -> None:
    """Warn once when a run is dead — ``DEAD_AFTER`` steps skipped in a row — or blowing up —
    the loss ``BLOWN_UP`` times above its first value — naming the likely cause and the knob,
    instead of stepping on silently (the optimizer keeps being called and the loss curve is
    the only other sign). Called by every base's step (``skipped``: the reason of a skip)."""
    seen: dict[str, Any] = optimizer.__dict__.setdefault("_watch", {"in_row": 0, "first": None})
    name = type(optimizer).__name__
    knobs = "lower the learning rate (lr) or raise the damping (or, for a method that has none, "
    knobs += "resume from a checkpoint before the trouble)"
    if skipped is not None:
        seen["in_row"] += 1
        if seen["in_row"] == DEAD_AFTER and not seen.get("warned_dead"):
            seen["warned_dead"] = True
            warnings.warn(
                f"{name}: the last {DEAD_AFTER} steps were skipped ({skipped}); the run has "
                f"probably diverged and nothing is trained any more: {knobs}",
                RuntimeWarning,
                stacklevel=4,
            )
        return
    seen["in_row"] = 0
    if loss is None:
        return
    value = float(loss)
    if seen["first"] is None:
        seen["first"] = value
        return
    if value > BLOWN_UP * (abs(seen["first"]) + 1.0) and not seen.get("warned_blown_up"):
        seen["warned_blown_up"] = True
        warnings.warn(
            f"{name}: the loss rose from {seen['first']:.4g} to {value:.4g}: the run is "
            f"diverging; {knobs}",
            RuntimeWarning,
            stacklevel=4,
        )


@contextmanager
def step_guard(optimizer: Any, closure: Any, model: Any = None) -> Iterator[StepGuard]:
    """The guard of one ``step`` of ``optimizer`` (module docstring). ``model``: whose running
    statistics a skip puts back (default: the closure's model, e.g. an `Objective`'s)."""
    guard = StepGuard(optimizer, closure, model if model is not None else _model_of(closure))
    if not _autocast_on(guard.caller_autocast):
        yield guard
        return
    try:
        with run_with_autocast(autocast_off(), clear_cache=False):
            yield guard
    finally:
        torch.clear_autocast_cache()


@contextmanager
def full_precision() -> Iterator[AutocastState]:
    """Autocast off around an optimizer's own maths outside ``step`` (``warm_start``); yields
    the caller's autocast state, for the forward passes the optimizer builds itself."""
    state = autocast_state()
    if not _autocast_on(state):
        yield state
        return
    try:
        with run_with_autocast(autocast_off(), clear_cache=False):
            yield state
    finally:
        torch.clear_autocast_cache()


def _model_of(closure: Any) -> Any:
    return getattr(closure, "model", None)


class SampledLabels:
    """Mixin of the optimizers that sample labels or subsets: the random generator
    (``self._generator``, seeded from the global RNG, so ``torch.manual_seed`` makes a run
    reproducible) and its state in ``state_dict`` (``global_state["sampler_state"]``)."""

    _generator: torch.Generator

    def new_sampler(self, device: torch.device) -> torch.Generator:
        """Make ``self._generator`` on ``device`` and return it."""
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._generator = generator
        return generator

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim` state plus the sampler's random state (methods that have one)."""
        generator = getattr(self, "_generator", None)
        if generator is not None:
            self.global_state["sampler_state"] = generator.get_state()  # type: ignore[attr-defined]
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything saved by `state_dict`, the sampler included."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        sampler = self.global_state.get("sampler_state")  # type: ignore[attr-defined]
        generator = getattr(self, "_generator", None)
        if generator is not None and sampler is not None:
            # torch.optim casts state tensors to the parameter dtype; bytes survive exactly.
            generator.set_state(sampler.to(device="cpu", dtype=torch.uint8))
