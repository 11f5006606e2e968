"""Mixed precision: under bf16 autocast on CPU every optimizer keeps its curvature state in
float32 and still decreases the loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim.registry import Config, conformance_configs
from curvlab.testing.models import regression_problem, tiny_mlp

SUITE = conformance_configs()


def _floating_state_dtypes(state: Any) -> set[torch.dtype]:
    found: set[torch.dtype] = set()
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            found.add(state.dtype)
    elif isinstance(state, dict):
        for v in state.values():
            found |= _floating_state_dtypes(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            found |= _floating_state_dtypes(v)
    return found


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.MSELoss()(model(x), y))


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_bf16_autocast_keeps_float32_state_and_decreases_the_loss(config: Config) -> None:
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    x, y = regression_problem(n=64, dtype=torch.float32)
    batches = list(zip(x.split(16), y.split(16), strict=True))
    opt = config.build(model)
    start = _loss(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(10):
            for xb, yb in batches:
                opt.step(Objective(model, nn.MSELoss(), xb, yb))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _floating_state_dtypes(opt.state_dict()) <= {torch.float32}
    assert _loss(model, x, y) < 0.8 * start


class _OutputDtypes:
    """Records the dtype of every Linear output (forward hooks) while active."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[torch.dtype] = []
        self._handles = [
            m.register_forward_hook(lambda mod, args, out: self.seen.append(out.dtype))
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("name", ["kfac", "tnt", "kbfgs", "smw-gn", "hessian-free", "edf"])
def test_forward_passes_run_in_bf16_while_state_is_float32(name: str) -> None:
    """Every forward pass of a step (gradient, sampled-label, statistics, curvature, trial)
    runs in bf16 under autocast, although the optimizer's maths runs with autocast off."""
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    x, y = regression_problem(n=16, dtype=torch.float32)
    opt = SUITE[name].build(model)
    dtypes = _OutputDtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            opt.step(Objective(model, nn.MSELoss(), x, y))
        assert torch.is_autocast_enabled("cpu")  # the user's region is intact after step
    dtypes.remove()
    assert dtypes.seen and set(dtypes.seen) == {torch.bfloat16}
    assert _floating_state_dtypes(opt.state_dict()) <= {torch.float32}  # SMW: none at all
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_plain_closure_runs_under_the_callers_autocast() -> None:
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    x, y = regression_problem(n=16, dtype=torch.float32)
    opt = SUITE["shampoo"].build(model)
    dtypes = _OutputDtypes(model)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.MSELoss()(model(x), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    dtypes.remove()
    assert dtypes.seen == [torch.bfloat16, torch.bfloat16]
    assert _floating_state_dtypes(opt.state_dict()) == {torch.float32}


def test_step_inside_autocast_leaves_no_stale_weight_casts() -> None:
    """Autocast caches the bf16 casts of the weights for its whole block and never notices
    in-place updates; after a step, forwards in the same block must see the new weights."""
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    x, y = regression_problem(n=16, dtype=torch.float32)
    opt = SUITE["kfac"].build(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)  # fills the cache with the casts of the current weights
        opt.step(Objective(model, nn.MSELoss(), x, y))
        inside = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x)
    assert not torch.equal(inside, before)
    assert torch.equal(inside, fresh)


def test_warm_start_under_autocast_forwards_in_bf16_and_keeps_float32_factors() -> None:
    from curvlab.optim.kfac import KFAC

    x, y = regression_problem(n=32, dtype=torch.float32)
    batches = list(zip(x.split(16), y.split(16), strict=True))
    reference = KFAC(tiny_mlp((4, 8, 3), dtype=torch.float32), lr=0.1, damping=0.1)
    reference.warm_start(batches, nn.MSELoss())
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    opt = KFAC(model, lr=0.1, damping=0.1)
    dtypes = _OutputDtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert opt.warm_start(batches, nn.MSELoss()) == 2
    dtypes.remove()
    assert dtypes.seen and set(dtypes.seen) == {torch.bfloat16}
    assert _floating_state_dtypes(opt.state_dict()) == {torch.float32}
    for name in opt.layers:
        for key in ("A", "G"):
            got, want = opt.layer_state(name)[key], reference.layer_state(name)[key]
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["ggn", "hessian", "hessian-fd"])
def test_curvature_products_of_a_bf16_objective_are_float32(kind: str) -> None:
    from curvlab.autodiff import curvature_operator

    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    x, y = regression_problem(n=16, dtype=torch.float32)
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    exact = curvature_operator(Objective(model, nn.MSELoss(), x, y), params, kind).matvec(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective = Objective(model, nn.MSELoss(), x, y)
    op = curvature_operator(objective, params, kind)  # built outside the block: still bf16
    product = op.matvec(v)
    assert product.dtype == torch.float32 and op.gradient().dtype == torch.float32
    if kind == "hessian-fd":  # its passes run in float32: a bf16 shift εv would vanish
        assert torch.equal(product, exact)
        return
    assert not torch.equal(product, exact)  # really computed through the bf16 forward
    torch.testing.assert_close(product, exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))
