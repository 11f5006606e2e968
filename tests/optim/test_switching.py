"""TwoStage: each criterion switches at the right moment and not before; the active stage's
groups are exposed; a resumed run continues bit-identically across the switch."""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlab import KFAC, Objective
from curvlab.optim.switching import TwoStage
from curvlab.testing.conformance import batches as _batches
from curvlab.testing.models import regression_problem, tiny_mlp


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Any:
    def closure() -> Tensor:
        model.zero_grad()
        loss = nn.MSELoss()(model(x), y)
        loss.backward()
        return loss.detach()

    return closure


def _sgd_pair(model: nn.Module, **kwargs: Any) -> TwoStage:
    """SGD lr 0.1 then a factory SGD lr 0.01 (not carried), to tell the stages apart."""
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = functools.partial(torch.optim.SGD, lr=0.01)
    return TwoStage(first, second, carry=(), **kwargs)


def _step_lr(opt: TwoStage, model: nn.Module) -> float:
    """Run one step and return the learning rate it used (Δθ = −lr ∇)."""
    x, y = regression_problem()
    p = model[0].weight
    before = p.detach().clone()
    opt.step(_closure(model, x, y))
    ratio = (before - p.detach()) / p.grad
    return float(ratio.mean())


# ---------------------------------------------------------------- criteria
def test_switch_at_step_takes_effect_after_exactly_k_steps() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model, switch_at_step=3)
    lrs, stages, switched = [], [], []
    for _ in range(5):
        stages.append(opt.stage)
        lrs.append(_step_lr(opt, model))
        switched.append(opt.last_step_info["switched"])
    assert stages == [1, 1, 1, 2, 2]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    assert switched == [False, False, True, False, False]
    assert opt.schedule["switch"] == {"reason": "step", "step": 3, "epoch": 0, "evaluation": 0}
    assert opt.last_step_info["stage_steps"] == 2 and opt.last_step_info["steps"] == 5


def test_switch_at_epoch_happens_at_the_e_th_end_of_epoch() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model, switch_at_epoch=2)
    assert opt.second is None
    for epoch in range(1, 4):
        for _ in range(2):
            assert _step_lr(opt, model) == pytest.approx(0.1 if epoch <= 2 else 0.01, rel=1e-12)
        switched = opt.end_epoch()
        assert switched == (epoch == 2)
        assert opt.stage == (1 if epoch < 2 else 2)
    assert opt.schedule["switch"]["reason"] == "epoch" and opt.schedule["switch"]["step"] == 4
    assert opt.last_step_info["switch"]["epoch"] == 2


@pytest.mark.parametrize(
    ("mode", "values", "switch_at"),
    [
        ("min", [1.0, 0.8, 0.85, 0.7, 0.75, 0.7, 0.9], 6),  # 0.7 again is no new minimum
        ("min", [math.nan, 1.0, math.inf, 1.1, 0.5], 4),  # non-finite values never improve
        ("max", [0.5, 0.6, 0.6, 0.7, 0.65, 0.69], 6),  # accuracy ([P3]'s hybrid)
    ],
)
def test_patience_switches_at_the_n_th_evaluation_without_improvement(
    mode: str, values: list[float], switch_at: int
) -> None:
    opt = _sgd_pair(tiny_mlp(), patience=2, mode=mode)
    results = [opt.report_validation(v) for v in values]
    assert results.index(True) + 1 == switch_at and results.count(True) == 1
    assert opt.schedule["switch"]["evaluation"] == switch_at


def test_min_delta_requires_a_large_enough_improvement() -> None:
    opt = _sgd_pair(tiny_mlp(), patience=2, min_delta=0.05)
    assert not opt.report_validation(1.0)
    assert not opt.report_validation(0.97)  # better, but by less than min_delta
    assert opt.report_validation(0.96)
    assert opt.schedule["best"] == 1.0


def test_without_criteria_only_an_explicit_switch_changes_stage() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model)
    for _ in range(3):
        _step_lr(opt, model)
        opt.end_epoch()
        opt.report_validation(1.0)
    assert opt.stage == 1
    assert opt.switch() and not opt.switch()
    assert opt.last_step_info["switched"] and opt.schedule["switch"]["reason"] == "manual"
    assert _step_lr(opt, model) == pytest.approx(0.01, rel=1e-12)


# ------------------------------------------------------ groups and schedulers
def test_param_groups_are_the_active_stage_and_carry_the_learning_rate() -> None:
    model = tiny_mlp()
    first = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.2}],
        lr=0.1,
        momentum=0.9,
    )
    opt = TwoStage(first, torch.optim.Adam, switch_at_step=2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    assert opt.param_groups is first.param_groups and opt.defaults is first.defaults
    for _ in range(2):
        _step_lr(opt, model)
        sched.step()
    assert opt.stage == 2 and isinstance(opt.second, torch.optim.Adam)
    assert opt.param_groups is opt.second.param_groups and opt.state is opt.second.state
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.05]  # carried, then scheduled
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert "momentum" not in opt.param_groups[0]  # only the carry keys cross over
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    _step_lr(opt, model)
    sched.step()
    assert [g["lr"] for g in opt.second.param_groups] == [0.0125, 0.025]


def test_a_pre_built_second_stage_is_used_as_given() -> None:
    model = tiny_mlp()
    second = torch.optim.SGD(model.parameters(), lr=0.03)
    opt = TwoStage(torch.optim.SGD(model.parameters(), lr=0.1), second, switch_at_step=1)
    _step_lr(opt, model)
    assert opt.second is second and opt.param_groups[0]["lr"] == 0.03
    assert _step_lr(opt, model) == pytest.approx(0.03, rel=1e-12)


def test_zero_grad_and_last_step_info_come_from_the_active_stage() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem()
    opt = TwoStage(KFAC(model, lr=0.1, damping=0.1), torch.optim.SGD, switch_at_step=1)
    opt.step(Objective(model, nn.MSELoss(), x, y))
    info = opt.last_step_info
    assert info["stage"] == 1 and info["switched"] and "inverses_refreshed" in info
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert opt.last_step_info["stage"] == 2 and "inverses_refreshed" not in opt.last_step_info


# --------------------------------------------------------------- resuming
def _kfac_then_sgd(model: nn.Module, **kwargs: Any) -> TwoStage:
    first = KFAC(model, lr=0.1, damping=0.1, fisher="true")
    return TwoStage(first, functools.partial(torch.optim.SGD, momentum=0.9), **kwargs)


def _epochs(opt: TwoStage, model: nn.Module, batches: list, epochs: range) -> list[bool]:
    """Two batches per epoch, then a "validation loss" that plateaus from epoch 2 on."""
    switched = []
    for e in epochs:
        for x, y in batches[2 * e : 2 * e + 2]:
            opt.step(Objective(model, nn.MSELoss(), x, y))
        switched.append(opt.report_validation(max(1.0 - 0.1 * e, 0.8)))
        switched.append(opt.end_epoch())
    return switched


@pytest.mark.parametrize(
    ("kwargs", "saved_at"),
    [
        (dict(switch_at_step=3), 1),  # saved before the switch, which happens after resuming
        (dict(switch_at_step=3), 3),  # saved after it (SGD momentum buffers in the state)
        (dict(switch_at_epoch=3), 2),
        (dict(patience=2), 3),  # saved with one bad evaluation counted
    ],
)
def test_state_dict_continues_bit_identically_across_the_switch(
    kwargs: dict[str, Any], saved_at: int
) -> None:
    batches = _batches(12)
    model = tiny_mlp((4, 8, 3))
    opt = _kfac_then_sgd(model, **kwargs)
    _epochs(opt, model, batches, range(saved_at))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rest = _epochs(opt, model, batches, range(saved_at, 6))
    assert opt.stage == 2
    resumed = tiny_mlp((4, 8, 3), seed=7)
    resumed.load_state_dict(saved_model)
    opt2 = _kfac_then_sgd(resumed, **kwargs)
    opt2.load_state_dict(saved)
    assert opt2.stage == saved["stage"] and (opt2.second is None) == (saved["stage"] == 1)
    assert _epochs(opt2, resumed, batches, range(saved_at, 6)) == rest
    assert opt2.schedule == opt.schedule
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loading_a_first_stage_checkpoint_drops_a_built_second_stage() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model, switch_at_step=2)
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        _step_lr(opt, model)
    assert opt.stage == 2
    opt.load_state_dict(saved)
    assert opt.stage == 1 and opt.second is None
    assert _step_lr(opt, model) == pytest.approx(0.1, rel=1e-12)


def test_deepcopy_keeps_both_stages() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model, switch_at_step=1)
    _step_lr(opt, model)
    clone = copy.deepcopy(opt)
    assert clone.stage == 2 and clone.second is not None and clone.first is not None


# ------------------------------------------------------------ validation
INVALID = {
    "switch_at_step": 0,
    "switch_at_epoch": 1.5,
    "patience": 0,
    "min_delta": -1.0,
    "mode": "avg",
    "carry": "lr",
}


@pytest.mark.parametrize(("key", "value"), INVALID.items(), ids=INVALID.keys())
def test_invalid_criteria_raise_naming_them(key: str, value: Any) -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match=f"^{key}"):
        TwoStage(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD, **{key: value})


def test_invalid_stages_are_rejected() -> None:
    model = tiny_mlp()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="^first"):
        TwoStage(model, torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^second"):
        TwoStage(first, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^second"):
        TwoStage(first, first)
    with pytest.raises(ValueError, match="^carry"):
        TwoStage(first, torch.optim.SGD, carry=("params",))
    opt = TwoStage(first, lambda groups: "not an optimizer", switch_at_step=1)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="^second"):
        _step_lr(opt, model)
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": []})
    with pytest.raises(ValueError, match="^state_dict"):
        opt.load_state_dict({"stage": 1})


def test_learning_rate_set_later_is_checked_in_either_stage() -> None:
    model = tiny_mlp()
    opt = _sgd_pair(model, switch_at_step=1)
    _step_lr(opt, model)
    opt.param_groups[0]["lr"] = math.nan
    with pytest.raises(ValueError, match="^lr"):
        _step_lr(opt, model)


# ---------------------------------------------- conformance of the wrapper
def _wrapped(model: nn.Module, switch_at_step: int) -> TwoStage:
    return TwoStage(
        KFAC(model, lr=0.1, damping=0.1),
        functools.partial(torch.optim.SGD, momentum=0.9),
        switch_at_step=switch_at_step,
    )


@pytest.mark.parametrize("switch_at_step", [3, 20])
def test_conformance_loss_decreases_and_lr_zero_freezes(switch_at_step: int) -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(4)
    opt = _wrapped(model, switch_at_step)
    with torch.no_grad():
        start = sum(float(nn.MSELoss()(model(x), y)) for x, y in batches)
    for _ in range(10):
        for x, y in batches:
            opt.step(Objective(model, nn.MSELoss(), x, y))
    with torch.no_grad():
        end = sum(float(nn.MSELoss()(model(x), y)) for x, y in batches)
    assert end < 0.7 * start
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    frozen = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        opt.step(Objective(model, nn.MSELoss(), x, y))
    sched.step()
    for p, q in zip(model.parameters(), frozen, strict=True):
        assert torch.equal(p, q)
