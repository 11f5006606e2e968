"""A torch.compile'd model: the block methods capture what they need (their passes run the
model eagerly), the model-wide curvature products get their double backward, and where the
user's own compiled pass hides the layers the step says so instead of stepping without
statistics."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab import Objective
from curvlab.optim import KBFGS, KFAC, HessianFree, TSOALRAFirstStage
from curvlab.testing.models import tiny_mlp

F64 = torch.float64


def _data(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(steps, 16, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (steps, 16), generator=g)
    return list(zip(x, y, strict=True))


def _compiled(model: nn.Module, backend: str = "eager") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.compile(model, backend=backend)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"statistics": "before_step"}, {"fisher": "empirical", "statistics": "before_step"}],
    ids=["after-step", "before-step", "ef-before-step"],
)
def test_kfac_on_a_compiled_model_steps_as_on_the_model(kwargs: dict) -> None:
    results = []
    for compile_it in (False, True):
        model = tiny_mlp((4, 8, 3))
        net = _compiled(model) if compile_it else model
        opt = KFAC(net, lr=0.1, damping=0.1, **kwargs)
        opt._generator.manual_seed(0)
        for x, y in _data():
            opt.step(Objective(net, nn.CrossEntropyLoss(), x, y))
            assert opt.last_step_info["statistics_updated"]
        assert all("A" in opt.block_state(n) for n in opt.blocks)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_plain_loop_on_a_compiled_model_takes_its_own_pass() -> None:
    model = tiny_mlp((4, 8, 3))
    net = _compiled(model)
    opt = KFAC(net, lr=0.1, loss_fn=nn.CrossEntropyLoss())  # true Fisher: its own pass
    for x, y in _data():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert all("A" in opt.block_state(n) for n in opt.blocks)


@pytest.mark.parametrize("cls", [KFAC, TSOALRAFirstStage])
def test_statistics_of_a_compiled_own_pass_raise_instead_of_a_silent_sgd_step(cls: type) -> None:
    model = tiny_mlp((4, 8, 3))
    net = _compiled(model)
    kwargs = {"statistics": "before_step"} if cls is KFAC else {}
    opt = cls(net, fisher="empirical", loss_fn=nn.CrossEntropyLoss(), **kwargs)
    x, y = _data(1)[0]
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(ValueError, match="torch.compile"):
        opt.step()


def test_a_plain_closure_on_a_compiled_model_is_recorded() -> None:
    model = tiny_mlp((4, 8, 3))
    net = _compiled(model)
    opt = KBFGS(net, lr=0.1)
    for x, y in _data():

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        assert opt.last_step_info["curvature_updated"]
    assert all("H_a" in opt.block_state(n) for n in opt.blocks)


def test_hessian_free_gets_its_double_backward_on_a_compiled_model() -> None:
    model = tiny_mlp((4, 8, 3))
    net = _compiled(model, backend="aot_eager")
    opt = HessianFree(net)
    x, y = _data(1)[0]
    loss = opt.step(Objective(net, nn.CrossEntropyLoss(), x, y))
    assert torch.isfinite(loss) and opt.last_step_info["skipped"] is False
