"""State dicts saved by an earlier curvlab (before the block-base redesign, commit c3f3a18)
load into today's optimizers and continue exactly: the parameters after five more steps are
bit-identical to the ones the earlier version reached (`data/make_saved_state_dicts.py`)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab.optim
from curvlab import Objective
from curvlab.testing.models import tiny_mlp

DATA = Path(__file__).parent / "data"


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location("maker", DATA / "make_saved_state_dicts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
SAVED = torch.load(DATA / "saved_state_dicts.pt", weights_only=True)


def test_every_configuration_was_saved() -> None:
    assert set(SAVED) == set(MAKER.CONFIGURATIONS)


@pytest.mark.parametrize("name", sorted(MAKER.CONFIGURATIONS))
def test_old_state_dict_loads_and_continues_bit_identically(name: str) -> None:
    cls, kwargs = MAKER.CONFIGURATIONS[name]
    saved = SAVED[name]
    model = tiny_mlp((4, 8, 3), seed=7)
    model.load_state_dict(saved["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = getattr(curvlab.optim, cls)(model, **kwargs)
    opt.load_state_dict(saved["optimizer"])
    for x, y in MAKER.batches()[5:]:
        opt.step(Objective(model, nn.MSELoss(), x, y))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["final"][key]), key
