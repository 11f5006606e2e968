"""Model-wide optimizer cases and the per-rank worker of the two-process gloo tests
(tests/distributed).

Every case runs (a) in one process on three global batches of a float64 MLP and (b) on two
gloo ranks that each step on their half of every batch (`ModelwiseOptimizer.distribute`).
Nothing is sampled (full curvature batch, no sampled labels), so the two must agree to
round-off: the averaged loss, gradient, products and trial loss are the global batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from curvlab.distributed import Communicator
from curvlab.objective import Objective
from curvlab.optim import (
    ARC,
    EDF,
    SMWGN,
    EfficientTR,
    EllipsoidalTR,
    HessianFree,
    HybridTRSGD,
)
from curvlab.testing.models import regression_problem, tiny_mlp

Factory = Callable[[nn.Module], Any]

#: name → optimizer factory. ``hybrid`` switches to SGD after its second step, so the three
#: steps cover both stages.
CASES: dict[str, Factory] = {
    "hessian-free": lambda m: HessianFree(m),
    "edf": lambda m: EDF(m),
    "edf-k1": lambda m: EDF(m, order=1),
    "edf-h": lambda m: EDF(m, kind="hessian"),
    "ellipsoidal-tr-adagrad": lambda m: EllipsoidalTR(m, norm="adagrad"),
    "ellipsoidal-tr-ggn": lambda m: EllipsoidalTR(m, norm="uniform", curvature="ggn"),
    "arc": lambda m: ARC(m),
    "efficient-tr": lambda m: EfficientTR(m),
    "efficient-tr-fd": lambda m: EfficientTR(m, hvp="hessian-fd"),
    "hybrid": lambda m: HybridTRSGD(m, switch_at_step=2),
}

STEPS = 3
BATCH = 16


def batches() -> list[tuple[Tensor, Tensor]]:
    x, y = regression_problem(n=STEPS * BATCH, d_in=4, d_out=3, seed=1)
    return list(zip(x.split(BATCH), y.split(BATCH), strict=True))


def _result(opt: Any, model: nn.Module, losses: list[float]) -> dict[str, Any]:
    inner = getattr(opt, "first", opt)
    info = getattr(inner, "last_step_info", {})
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "losses": losses,
        "rho": info.get("rho"),
        "accepted": info.get("accepted"),
        "stage": getattr(opt, "stage", 1),
    }


def run_single(name: str) -> dict[str, Any]:
    """The single-process run on the full batches."""
    model = tiny_mlp((4, 8, 3))
    torch.manual_seed(0)
    opt = CASES[name](model)
    losses = [float(opt.step(Objective(model, nn.MSELoss(), x, y))) for x, y in batches()]
    return _result(opt, model, losses)


def run_rank(comm: Communicator, name: str) -> dict[str, Any]:
    """Rank ``comm.rank``'s run on its half of every batch, with the traffic by kind."""
    model = tiny_mlp((4, 8, 3))
    torch.manual_seed(0)
    opt = CASES[name](model).distribute(comm)
    before = comm.stats.copy()
    losses = []
    for x, y in batches():
        n, r = comm.world_size, comm.rank
        objective = Objective(model, nn.MSELoss(), x.tensor_split(n)[r], y.tensor_split(n)[r])
        losses.append(float(opt.step(objective)))
    out = _result(opt, model, losses)
    out["stats"] = comm.stats.since(before).to_dict()
    return out


def refusals(comm: Communicator) -> dict[str, str]:
    """The messages of the configurations that have no data-parallel form."""
    out: dict[str, str] = {}
    model = tiny_mlp((4, 8, 3))
    for key, make in (
        ("smw", lambda: SMWGN(model)),
        ("edf-output-space", lambda: EDF(model, space="output")),
    ):
        try:
            make().distribute(comm)
        except ValueError as err:
            out[key] = str(err)
    opt = EDF(model).distribute(comm)
    x, y = batches()[0]
    try:
        opt.step(Objective(DistributedDataParallel(model), nn.MSELoss(), x, y))
    except ValueError as err:
        out["ddp"] = str(err)
    return out


def worker(comm: Communicator, names: list[str]) -> dict[str, Any]:
    """Every case, then the refusals (the function `spawn` runs on each rank)."""
    out: dict[str, Any] = {name: run_rank(comm, name) for name in names}
    out["refusals"] = refusals(comm)
    return out
