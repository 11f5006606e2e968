"""The torch.optim contract beyond the conformance suite: copies and pickles that work,
parameter groups added later, parameters unfrozen later."""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim import KFAC, TNT, HessianFree, Shampoo
from curvlab.optim.registry import Config, conformance_configs
from curvlab.testing.conformance import batches
from curvlab.testing.models import tiny_mlp

SUITE = conformance_configs()


def _steps(opt: Any, model: nn.Module, data: list[Any]) -> None:
    for x, y in data:
        opt.step(Objective(model, nn.MSELoss(), x, y))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_a_copy_is_a_working_optimizer_that_continues_alike(config: Config, how: str) -> None:
    data = batches(6)
    model = tiny_mlp((4, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = config.build(model)
    _steps(opt, model, data[:3])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _steps(opt, model, data[3:])
    _steps(opt2, model2, data[3:])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_copy_of_the_model_is_not_recorded_by_the_optimizer() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, fisher="empirical", statistics="before_step")
    ema = copy.deepcopy(model)  # e.g. an exponential-moving-average copy
    x, _ = batches(1)[0]
    ema(x).sum().backward()
    assert not opt._recorder.calls
    assert pickle.loads(pickle.dumps(model))(x).shape == (16, 3)  # the hooks pickle as no-ops


@pytest.mark.parametrize("cls", [KFAC, TNT, Shampoo])
def test_an_added_group_gets_blocks_and_trains(cls: type) -> None:
    model = tiny_mlp((4, 8, 3))
    opt = cls(model, params=list(model[0].parameters()), lr=0.01)
    last = [p.detach().clone() for p in model[2].parameters()]
    _steps(opt, model, batches(2))
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), last, strict=True))
    before = {id(p) for b in opt.blocks.values() for p in b.params}
    opt.add_param_group({"params": list(model[2].parameters())})
    assert {id(p) for p in model[2].parameters()} <= {
        id(p) for b in opt.blocks.values() for p in b.params
    } - before
    _steps(opt, model, batches(2))
    assert not any(torch.equal(p, q) for p, q in zip(model[2].parameters(), last, strict=True))


def test_a_group_of_foreign_parameters_is_refused_naming_it() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, params=list(model[0].parameters()))
    with pytest.raises(ValueError, match="^params: every parameter must belong to the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


def test_model_wide_methods_refuse_a_second_group_and_say_why() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = HessianFree(model)
    with pytest.raises(ValueError, match="^params: HessianFree solves one subproblem"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_parameters_unfrozen_later_are_named_until_they_are_added() -> None:
    model = tiny_mlp((4, 8, 3))
    for p in model[2].parameters():
        p.requires_grad_(False)
    opt = KFAC(model, lr=0.1)
    for p in model[2].parameters():
        p.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) of the model have gradients .*2\.wei"):
        _steps(opt, model, batches(1))
    opt.add_param_group({"params": list(model[2].parameters())})
    last = [p.detach().clone() for p in model[2].parameters()]
    _steps(opt, model, batches(2))
    assert not any(torch.equal(p, q) for p, q in zip(model[2].parameters(), last, strict=True))
