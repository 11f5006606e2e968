"""Optimizer cases and the per-rank worker of the two-process gloo tests
(tests/distributed).

Every case is run (a) in one process on three global batches and (b) on two gloo ranks that
each step on their half of every batch, in mode "inverses", in mode "preconditioned" and with
a DDP-wrapped model. Labels are not sampled in the cases compared with the single-process
run (empirical Fisher / true-label statistics), so the two must agree to round-off; the
sampled-label cases are compared across ranks and modes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from curvlab.distributed import Communicator
from curvlab.objective import Objective
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.tnt import TNT
from curvlab.optim.tso_alra import TSOALRA, TSOALRAFirstStage
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp

Factory = Callable[[nn.Module], Any]

#: name → (optimizer factory, model kind). ``inverse_every=2`` so that three steps contain
#: the first inverses, a refresh and a step between refreshes.
CASES: dict[str, tuple[Factory, str]] = {
    "kfac": (
        lambda m: KFAC(m, lr=0.1, damping=0.3, fisher="empirical", inverse_every=2),
        "mlp",
    ),
    "kfac-before-step": (
        lambda m: KFAC(
            m, lr=0.1, damping=0.3, fisher="empirical", statistics="before_step", inverse_every=2
        ),
        "mlp",
    ),
    "kfac-cnn": (
        lambda m: KFAC(m, lr=0.1, damping=0.3, fisher="empirical", inverse_every=2),
        "cnn",
    ),
    "kbfgs": (lambda m: KBFGS(m, lr=0.1, damping=0.3), "mlp"),
    "kbfgs-l": (lambda m: KBFGS(m, lr=0.1, damping=0.3, memory=2), "mlp"),
    "kbfgs-20": (lambda m: KBFGS(m, lr=0.1, damping=0.3, variant="ch2"), "mlp"),
    "kbfgs-cnn": (lambda m: KBFGS(m, lr=0.1, damping=0.3), "cnn"),
    "tnt-ef": (
        lambda m: TNT(m, lr=0.01, damping=0.1, fisher="empirical", inverse_every=2),
        "mlp",
    ),
    "shampoo": (lambda m: Shampoo(m, lr=0.01, damping=0.01, inverse_every=2), "mlp"),
    "shampoo-cnn": (
        lambda m: Shampoo(m, lr=0.01, damping=0.01, inverse_every=2, root_method="eigh"),
        "cnn",
    ),
    "tso-alra": (
        lambda m: TSOALRA(m, lr=0.05, inverse_every=2, init="first_batch", switch_at_step=2),
        "mlp",
    ),
    "tso-alra-identity": (lambda m: TSOALRAFirstStage(m, lr=0.05, inverse_every=2), "mlp"),
}

#: Cases with labels sampled from the model: compared across ranks and modes only.
SAMPLED: dict[str, tuple[Factory, str]] = {
    "kfac-true-fisher": (lambda m: KFAC(m, lr=0.1, damping=0.3, inverse_every=2), "mlp"),
    "tnt": (lambda m: TNT(m, lr=0.01, damping=0.1, inverse_every=2), "mlp"),
}

STEPS = 3
BATCH = 16
RUNS = ("inverses", "preconditioned", "ddp")


def model_of(kind: str) -> nn.Module:
    return tiny_mlp((4, 8, 3)) if kind == "mlp" else tiny_cnn()


def batches(kind: str) -> list[tuple[Tensor, Tensor, nn.Module]]:
    """Three global batches of 16 (inputs, targets, loss)."""
    if kind == "mlp":
        x, y = regression_problem(n=STEPS * BATCH, d_in=4, d_out=3, seed=1)
        return [
            (xb, yb, nn.MSELoss()) for xb, yb in zip(x.split(BATCH), y.split(BATCH), strict=True)
        ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS * BATCH,), generator=g)
    return [
        (xb, yb, nn.CrossEntropyLoss())
        for xb, yb in zip(x.split(BATCH), y.split(BATCH), strict=True)
    ]


def _inner(opt: Any) -> Any:
    """The layer-wise optimizer inside a two-stage wrapper (TSO-ALRA), else ``opt``."""
    return getattr(opt, "first", opt)


def _named(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n.removeprefix("module."), p) for n, p in model.named_parameters()]


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in _named(model)}


def summary(opt: Any, model: nn.Module) -> dict[str, Any]:
    """Parameters, tensor state (by parameter name and key) and per-block refresh counters."""
    inner = _inner(opt)
    names = _names(model)
    state: dict[str, Tensor] = {}
    refreshes: dict[str, int] = {}
    for p, entries in inner.state.items():
        for key, value in entries.items():
            if isinstance(value, Tensor) and key != "sampler_state":
                state[f"{names[id(p)]}/{key}"] = value.detach().clone()
            elif isinstance(value, list) and value and isinstance(value[0], Tensor):
                for i, v in enumerate(value):
                    state[f"{names[id(p)]}/{key}/{i}"] = v.detach().clone()
            if key == "refreshes":
                refreshes[names[id(p)]] = int(value)
    return {
        "params": {name: p.detach().clone() for name, p in _named(model)},
        "state": state,
        "refreshes": refreshes,
    }


def _block_name(inner: Any, key: str, names: dict[int, str]) -> str:
    """A block key as the name of the block's first parameter (a layer's weight, or the
    tensor)."""
    return names[id(inner.blocks[key].params[0])]


def run_single(name: str) -> dict[str, Any]:
    """The single-process run on the full batches."""
    factory, kind = {**CASES, **SAMPLED}[name]
    model = model_of(kind)
    torch.manual_seed(0)
    opt = factory(model)
    losses = [float(opt.step(Objective(model, loss_fn, x, y))) for x, y, loss_fn in batches(kind)]
    return {**summary(opt, model), "losses": losses}


def run_rank(comm: Communicator, name: str, run: str) -> dict[str, Any]:
    """Rank ``comm.rank``'s run on its half of every batch."""
    factory, kind = {**CASES, **SAMPLED}[name]
    model = model_of(kind)
    net: nn.Module = DistributedDataParallel(model) if run == "ddp" else model
    torch.manual_seed(0)
    opt = factory(net)
    opt.distribute(comm, mode="preconditioned" if run == "preconditioned" else "inverses")
    inner = _inner(opt)
    names = _names(net)
    before = comm.stats.copy()
    losses = []
    for x, y, loss_fn in batches(kind):
        n, r = comm.world_size, comm.rank
        xs, ys = x.tensor_split(n)[r], y.tensor_split(n)[r]
        losses.append(float(opt.step(Objective(net, loss_fn, xs, ys))))
    out = summary(opt, net)
    out["losses"] = losses
    out["owners"] = {
        _block_name(inner, key, names): rank for key, rank in inner.parallel.owners.items()
    }
    out["ready"] = sorted(_block_name(inner, key, names) for key in inner.parallel.ready)
    out["stats"] = comm.stats.since(before).to_dict()
    return out


def worker(comm: Communicator, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every case in every run, and `traffic` (the function `spawn` runs on each rank)."""
    out = {f"{name}/{run}": run_rank(comm, name, run) for name in names for run in RUNS}
    out["traffic"] = traffic(comm)
    return out


def traffic(comm: Communicator) -> dict[str, Any]:
    """40 K-FAC steps (statistics every step, inverses every 20) of a 32-64-64-8 MLP on this
    rank's shards: the communication counters."""
    model = tiny_mlp((32, 64, 64, 8))
    opt = KFAC(model, lr=0.01, damping=0.3, inverse_every=20).distribute(comm)
    g = torch.Generator().manual_seed(0)
    before = comm.stats.copy()
    for _ in range(40):
        x = torch.randn(16, 32, generator=g, dtype=torch.float64)
        y = torch.randn(16, 8, generator=g, dtype=torch.float64)
        shard = slice(8 * comm.rank, 8 * comm.rank + 8)
        opt.step(Objective(model, nn.MSELoss(), x[shard], y[shard]))
    return comm.stats.since(before).to_dict()
