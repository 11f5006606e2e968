"""The conformance suite's checks: the behaviour every curvlab optimizer shares.

tests/optim/test_conformance.py runs each check over the configurations of
`curvlab.optim.registry` (``make`` is a `Config`'s ``build``); a method's own test file calls
them for a case of its own. Every check runs on the suite's tiny float64 regression problem
(`batches`) with `curvlab.testing.models.tiny_mlp` ``(4, 8, 3)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlab.objective import Objective
from curvlab.optim.switching import TwoStage
from curvlab.testing.models import regression_problem, tiny_mlp

__all__ = [
    "ENTRIES",
    "FAULTS",
    "Fault",
    "Make",
    "NaNBackward",
    "assert_same",
    "batches",
    "check_entry_points_agree",
    "check_invalid_hyperparameter",
    "check_invalid_hyperparameter_set_later",
    "check_loss_decreases",
    "check_lr_scheduler",
    "check_non_finite_step_is_skipped",
    "check_skip_leaves_running_statistics",
    "check_state_dict_round_trip",
    "for_entry",
    "full_loss",
    "run",
    "step",
    "was_skipped",
    "without",
]

#: ``make(model, **hyperparameters)`` builds the optimizer under test (e.g. ``Config.build``).
Make = Callable[..., Any]
Batches = list[tuple[Tensor, Tensor]]

#: TwoStage's schedule: a step-count switch counts every call, skipped or not
#: (curvlab.optim.switching).
_SCHEDULE = frozenset({"steps", "stage_steps", "stage", "switch", "second"})


# ------------------------------------------------------------------------------ helpers
def batches(n: int, dtype: torch.dtype = torch.float64) -> Batches:
    """``n`` mini-batches of 16 from the suite's regression problem (4 inputs, 3 outputs)."""
    x, y = regression_problem(n=16 * n, seed=1, dtype=dtype)
    return list(zip(x.split(16), y.split(16), strict=True))


#: How a step gets its mini-batch (`curvlab.optim.base.BlockOptimizer.entry_points`).
ENTRIES = ("objective", "closure", "backward")


def step(opt: Any, model: nn.Module, x: Tensor, y: Tensor, entry: str = "objective") -> Tensor:
    """One step on ``(x, y)`` (MSE) through ``entry``: a `curvlab.Objective`, a plain closure,
    or the user's own ``loss.backward()`` then ``opt.step()``; the step's loss."""
    loss_fn = nn.MSELoss()
    if entry == "objective":
        loss: Tensor = opt.step(Objective(model, loss_fn, x, y))
        return loss

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss_fn(model(x), y)
        value.backward()
        return value.detach()

    if entry == "closure":
        loss = opt.step(closure)
        return loss
    loss = closure()
    opt.step()
    return loss


def run(opt: Any, model: nn.Module, data: Batches, entry: str = "objective") -> list[float]:
    """One step per batch (MSE) through ``entry``; the losses of the steps."""
    return [float(step(opt, model, x, y, entry)) for x, y in data]


def for_entry(make: Make, entry: str) -> Make:
    """``make`` for steps through ``entry``: told the loss (``loss_fn``) where the optimizer
    takes one, since without an `Objective` a method cannot know it."""
    if entry == "objective":
        return make

    def build(model: nn.Module, **extra: Any) -> Any:
        try:
            return make(model, loss_fn=nn.MSELoss(), **extra)
        except TypeError:  # no loss_fn argument (e.g. TwoStage subclasses pass it on)
            return make(model, **extra)

    return build


def full_loss(model: nn.Module, data: Batches) -> float:
    """The mean MSE over ``data``."""
    with torch.no_grad():
        return sum(float(nn.MSELoss()(model(x), y)) for x, y in data) / len(data)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality of state_dict-like structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, where


def without(sd: Any, keys: frozenset[str] | set[str]) -> Any:
    """``sd`` with every dict entry named in ``keys`` removed, at any depth."""
    if isinstance(sd, dict):
        return {k: without(v, keys) for k, v in sd.items() if k not in keys}
    if isinstance(sd, list):
        return [without(v, keys) for v in sd]
    return sd


def was_skipped(opt: Any) -> bool:
    """The last step was skipped (layer-wise) or rejected (model-wide)."""
    info = opt.last_step_info
    return info.get("skipped") is True or info.get("accepted") is False


class NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: a gradient fault with a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, float("nan"))


class Fault(nn.Module):
    """Appended to the model; when ``active``, every backward pass through it yields NaN (in
    autograd and in functional `torch.func` paths alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = NaNBackward.apply(x) if self.active else x
        return out


# ------------------------------------------------------------------------------- checks
def check_loss_decreases(
    make: Make, dtype: torch.dtype = torch.float64, entry: str = "objective"
) -> None:
    """Ten epochs of four batches take the mean loss below 0.7 of its start."""
    model = tiny_mlp((4, 8, 3), dtype=dtype)
    data = batches(4, dtype)
    opt = for_entry(make, entry)(model)
    start = full_loss(model, data)
    for _ in range(10):
        run(opt, model, data, entry)
    assert full_loss(model, data) < 0.7 * start


def check_state_dict_round_trip(
    make: Make, save_at: int = 5, total: int = 12, entry: str = "objective"
) -> None:
    """Saved after ``save_at`` steps and loaded into a fresh optimizer (and a model with other
    weights), the run continues bit-identically (parameters and ``state_dict``)."""
    make = for_entry(make, entry)
    data = batches(total)
    model = tiny_mlp((4, 8, 3))
    opt = make(model)
    run(opt, model, data[:save_at], entry)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(opt, model, data[save_at:], entry)
    resumed = tiny_mlp((4, 8, 3), seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    run(opt2, resumed, data[save_at:], entry)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(opt2.state_dict(), opt.state_dict())


def check_lr_scheduler(make: Make, entry: str = "objective") -> None:
    """An LR scheduler that sets ``lr = 0`` after the first step freezes the parameters for
    the next five steps, weight decay included. A two-stage optimizer that carries ``lr`` into
    its second stage stays frozen across the switch; one that does not (`HybridTRSGD`: seed
    003's fixed SGD step) is checked up to its switch."""
    model = tiny_mlp((4, 8, 3))
    data = batches(6)
    opt = for_entry(make, entry)(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    run(opt, model, data[:1], entry)
    sched.step()
    frozen = [p.detach().clone() for p in model.parameters()]
    for batch in data[1:]:
        if isinstance(opt, TwoStage) and opt.stage == 2 and "lr" not in opt.carry:
            break
        run(opt, model, [batch], entry)
    for p, q in zip(model.parameters(), frozen, strict=True):
        assert torch.equal(p, q)


def check_invalid_hyperparameter(make: Make, key: str, value: Any) -> None:
    """``make`` with ``key=value`` raises a ValueError whose message starts with ``key``."""
    with pytest.raises(ValueError, match=f"^{key}"):
        make(tiny_mlp(), **{key: value})


def check_invalid_hyperparameter_set_later(make: Make, key: str, value: Any) -> None:
    """``param_groups[0][key] = value`` after construction is refused by the next step."""
    model = tiny_mlp((4, 8, 3))
    opt = make(model)
    opt.param_groups[0][key] = value
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=f"^{key}"):
        opt.step(Objective(model, nn.MSELoss(), x, y))


#: The faults of `check_non_finite_step_is_skipped`.
FAULTS = ("nan-loss", "nan-gradient", "nan-first-layer-gradient")


def check_non_finite_step_is_skipped(make: Make, fault: str, entry: str = "objective") -> None:
    """A NaN loss (``fault="nan-loss"``), or a NaN gradient with a finite loss (every
    parameter's: ``"nan-gradient"``; the first layer's only, the rest finite:
    ``"nan-first-layer-gradient"``) skips the step: the step returns the loss, reports the skip
    and its cause; parameters and every piece of optimizer state stay exactly as they were, the
    label sampler's random state and the step counters included, except ``skipped_steps``,
    which counts one more (and a two-stage optimizer's schedule, which counts every call).
    After the user's own backward pass the step sees no loss: a NaN loss is its gradient's."""
    fault_module = Fault()
    mlp = tiny_mlp((4, 8, 3))
    if fault == "nan-first-layer-gradient":
        model = nn.Sequential(mlp[0], fault_module, *list(mlp)[1:])
    else:
        model = nn.Sequential(mlp, fault_module)
    data = batches(3)
    opt = for_entry(make, entry)(model)
    run(opt, model, data[:2], entry)
    params = [p.detach().clone() for p in model.parameters()]
    saved = copy.deepcopy(opt.state_dict())
    x, y = data[2]
    if fault == "nan-loss":
        y = torch.full_like(y, float("nan"))
    fault_module.active = fault != "nan-loss"
    loss = step(opt, model, x, y, entry)
    info = opt.last_step_info
    assert info["skipped"] is True and info["skipped_steps"] == 1, info
    assert info["reason"].startswith("non-finite"), info
    cause = "gradient" if entry == "backward" else fault.split("-")[-1]
    assert cause in info["reason"], info  # "loss", "gradient"
    assert bool(torch.isfinite(torch.as_tensor(loss))) == (fault != "nan-loss")
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    ignored = _SCHEDULE if isinstance(opt, TwoStage) else frozenset()
    assert_same(without(opt.state_dict(), ignored), without(_counted(saved), ignored))


def _counted(sd: Any) -> Any:
    """``sd`` with every ``skipped_steps`` one higher."""
    if isinstance(sd, dict):
        return {k: v + 1 if k == "skipped_steps" else _counted(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_counted(v) for v in sd]
    return sd


def check_entry_points_agree(make: Make, entries: Iterable[str], steps: int = 4) -> None:
    """The same run through a plain closure or the user's own backward pass as through the
    `curvlab.Objective` (float64, equal to round-off): where a method takes several entry
    points it runs the same algorithm through each."""
    data = batches(steps)
    results = []
    for entry in ("objective", *entries):
        model = tiny_mlp((4, 8, 3))
        torch.manual_seed(0)
        opt = for_entry(make, entry)(model)
        run(opt, model, data, entry)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for p, q in zip(other, results[0], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def check_skip_leaves_running_statistics(make: Make) -> None:
    """A NaN batch through a BatchNorm model is skipped and leaves the model's running
    statistics as they were (NaN running statistics would break evaluation later). A method
    that refuses BatchNorm parameters must say so (``ValueError`` naming BatchNorm)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    try:
        opt = make(model)
    except ValueError as error:  # SMW-GN/NG: no BatchNorm parameters (documented)
        assert "BatchNorm" in str(error)
        pytest.skip("refuses BatchNorm parameters")
    data = batches(3)
    run(opt, model, data[:2])
    before = copy.deepcopy(model.state_dict())
    x, y = data[2]
    x = x.clone()
    x[0, 0] = float("nan")
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert was_skipped(opt), opt.last_step_info
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
