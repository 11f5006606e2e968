"""A finite gradient whose preconditioned direction overflows moves no parameter: the
layer-wise and tensor-wise bases form every direction before applying any, and withhold the
whole update (reported in ``last_step_info["update_applied"]``) when one is not finite."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlab import Objective
from curvlab.optim import KBFGS, KFAC, TNT, Shampoo, TSOALRAFirstStage, kbfgs
from curvlab.testing.models import regression_problem, tiny_mlp


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_tnt_overflowing_direction_is_withheld() -> None:
    # Entries ~1e37 of a finite float32 gradient under TNT's first preconditioners
    # (1/ε = 100 per factor) overflow; found by a probe of every optimizer.
    model = nn.Sequential(nn.Linear(1000, 1))
    nn.init.constant_(model[0].weight, 1e-3)
    nn.init.zeros_(model[0].bias)
    x, y = torch.full((4, 1000), 3e18), torch.zeros(4, 1)
    opt = TNT(model)
    before = _params(model)
    loss = opt.step(Objective(model, nn.MSELoss(), x, y))
    assert torch.isfinite(loss)
    assert opt.last_step_info["update_applied"] is False
    assert opt.global_state["withheld_updates"] == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: KFAC(m, lr=0.1, damping=0.3, fisher="empirical"),
        lambda m: TSOALRAFirstStage(m, lr=0.05),
        lambda m: Shampoo(m, lr=0.01, root_method="eigh"),
    ],
    ids=["kfac", "tso-alra", "shampoo"],
)
def test_one_non_finite_block_withholds_every_layer(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16, d_in=4, d_out=3, seed=1)
    opt = make(model)
    opt.step(Objective(model, nn.MSELoss(), x, y))  # statistics and inverses exist
    assert opt.last_step_info["update_applied"] is True
    before = _params(model)
    first = next(iter(opt.blocks.values()))
    original = type(first).precondition

    def broken(self: Any, state: Any, V: Tensor, damping: float) -> Tensor:
        out = original(self, state, V, damping)
        return out.fill_(float("inf")) if self is first else out

    monkeypatch.setattr(type(first), "precondition", broken)
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert opt.last_step_info["update_applied"] is False
    assert opt.global_state["withheld_updates"] == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # all or nothing: the finite blocks did not move either
    monkeypatch.setattr(type(first), "precondition", original)
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert opt.last_step_info["update_applied"] is True


@pytest.mark.parametrize("memory", [None, 3], ids=["kbfgs", "kbfgs-l"])
def test_kbfgs_overflowing_direction_is_withheld(memory: int | None) -> None:
    # K-BFGS's one-process update accumulates into the parameters only when a norm bound shows
    # it stays finite; otherwise (and always for K-BFGS(L)) every direction is formed and
    # checked first. Finite H_A (and H_G) scaled to ~1e38 make the direction overflow.
    model = tiny_mlp((4, 8, 3)).float()
    x, y = regression_problem(n=16, d_in=4, d_out=3, seed=1)
    x, y = x.float(), y.float()
    opt = KBFGS(model, lr=0.1, damping=0.3, memory=memory)
    opt.step(Objective(model, nn.MSELoss(), x, y))  # H_A, H_G exist
    assert opt.last_step_info["update_applied"] is True
    name = next(iter(opt.layers))
    state = opt.layer_state(name)
    for key in ("H_a", "H_g") if memory is None else ("H_a",):
        state[key].mul_(1e38)
    before = _params(model)
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert opt.last_step_info["update_applied"] is False
    assert opt.global_state["withheld_updates"] == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # all or nothing
    assert all(
        torch.isfinite(t).all()
        for t in opt.state_dict()["state"][0].values()
        if isinstance(t, Tensor)
    )


def test_kbfgs_fused_and_checked_updates_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused update (straight into the parameters) and the checked one (directions formed
    # first) are the same step: float64, several steps, equal to round-off.
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kbfgs, "fused_update_is_finite", lambda *args: False)
        model = tiny_mlp((4, 8, 3))
        x, y = regression_problem(n=16, d_in=4, d_out=3, seed=1)
        opt = KBFGS(model, lr=0.1, damping=0.3, weight_decay=1e-2)
        for _ in range(4):
            opt.step(Objective(model, nn.MSELoss(), x, y))
            assert opt.last_step_info["update_applied"] is True
        results.append(_params(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
