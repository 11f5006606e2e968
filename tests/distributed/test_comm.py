"""curvlab.distributed in one process: bucket planning, owner assignment, no-op collectives,
`distribute()` without a process group changes nothing, and only `curvlab/distributed`
imports torch.distributed."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab
from curvlab.distributed import (
    BlockParallel,
    CommStats,
    Communicator,
    assign_owners,
    is_ddp,
    kronecker_cost,
    loads,
    plan_buckets,
    torchrun_command,
)
from curvlab.objective import Objective
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.tnt import TNT
from curvlab.optim.tso_alra import TSOALRA
from curvlab.testing.models import regression_problem, tiny_mlp


def test_buckets_group_by_dtype_and_respect_the_size_cap() -> None:
    f64 = [torch.zeros(4, dtype=torch.float64) for _ in range(5)]  # 32 bytes each
    f32 = torch.zeros(3, dtype=torch.float32)
    big = torch.zeros(100, dtype=torch.float64)
    tensors = [f64[0], f32, f64[1], big, f64[2], f64[3], f64[4]]
    buckets = plan_buckets(tensors, bucket_bytes=64)
    assert sorted(i for b in buckets for i in b) == list(range(len(tensors)))
    for bucket in buckets:
        assert len({tensors[i].dtype for i in bucket}) == 1
        size = sum(tensors[i].numel() * tensors[i].element_size() for i in bucket)
        assert size <= 64 or len(bucket) == 1  # an oversized tensor travels alone
    assert [3] in buckets
    assert len(plan_buckets(tensors, bucket_bytes=2**20)) == 2  # one per dtype
    with pytest.raises(ValueError, match="^bucket_bytes"):
        plan_buckets(tensors, 0)


def _best_makespan(costs: list[float], world: int) -> float:
    return min(
        max(loads(costs, list(owners), world))
        for owners in itertools.product(range(world), repeat=len(costs))
    )


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_owner_assignment_is_balanced_deterministic_and_complete(world: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dims = torch.randint(1, 40, (7, 2), generator=g).tolist()
    costs = [kronecker_cost(d) for d in dims]
    owners = assign_owners(costs, world)
    assert owners == assign_owners(costs, world)  # every rank computes the same plan
    assert all(0 <= r < world for r in owners)
    makespan = max(loads(costs, owners, world))
    assert makespan <= (4 / 3 - 1 / (3 * world)) * _best_makespan(costs, world) + 1e-9
    if len(costs) >= world:
        assert set(owners) == set(range(world))


def test_owner_assignment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="^world_size"):
        assign_owners([1.0], 0)
    with pytest.raises(ValueError, match="^costs"):
        assign_owners([1.0, float("nan")], 2)


def test_local_communicator_is_a_no_op() -> None:
    comm = Communicator.local()
    assert (comm.rank, comm.world_size, comm.is_distributed) == (0, 1, False)
    a = torch.randn(3)
    before = a.clone()
    comm.all_reduce_mean([a], kind="statistics")
    comm.all_reduce_sum([a], kind="statistics")
    comm.broadcast_from_owners([[a]], kind="inverses")
    comm.barrier()
    assert torch.equal(a, before)
    assert comm.stats.total_calls == 0
    assert Communicator().world_size == 1  # no process group: one process


def test_comm_stats_difference() -> None:
    stats = CommStats()
    stats.record("gradients", 100)
    snap = stats.copy()
    stats.record("gradients", 40)
    stats.record("inverses", 8)
    diff = stats.since(snap)
    assert diff.to_dict() == {
        "gradients": {"calls": 1, "bytes": 40},
        "inverses": {"calls": 1, "bytes": 8},
    }
    assert (diff.total_calls, diff.total_bytes) == (2, 48)


def test_local_plan_runs_everything_here() -> None:
    plan = BlockParallel.local()
    assert plan.owns("any") and plan.keeps_inverse("any")
    loss = torch.tensor(1.5)
    assert plan.synchronize_gradients(loss, [torch.ones(2)]) is loss
    with pytest.raises(ValueError, match="^mode"):
        BlockParallel(Communicator.local(), {}, mode="nope")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda m: KFAC(m, lr=0.1, inverse_every=2),
        lambda m: KBFGS(m, lr=0.1),
        lambda m: TNT(m, lr=0.01, inverse_every=2),
        lambda m: Shampoo(m, lr=0.01, inverse_every=2),
        lambda m: TSOALRA(m, lr=0.05, inverse_every=2, switch_at_step=2),
    ],
    ids=["kfac", "kbfgs", "tnt", "shampoo", "tso-alra"],
)
@pytest.mark.parametrize("mode", ["inverses", "preconditioned"])
def test_distribute_in_one_process_changes_nothing(make, mode: str) -> None:
    x, y = regression_problem(n=48, seed=1)
    runs = []
    for distributed in (False, True):
        model = tiny_mlp((4, 8, 3))
        torch.manual_seed(0)
        opt = make(model)
        if distributed:
            assert opt.distribute(mode=mode) is opt
        losses = [
            opt.step(Objective(model, nn.MSELoss(), xb, yb))
            for xb, yb in zip(x.split(16), y.split(16), strict=True)
        ]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = runs
    assert [float(v) for v in loss_a] == [float(v) for v in loss_b]
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=True))


def test_distribute_validates_mode_and_detects_ddp() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="^mode"):
        KFAC(model).distribute(mode="everything")  # type: ignore[arg-type]
    assert not is_ddp(model)
    assert KFAC(model).distribute().parallel.average_gradients


def test_torchrun_command() -> None:
    cmd = torchrun_command(2, "curvlab.bench.cli", ["bench", "--steps", "3"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-5:] == ["-m", "curvlab.bench.cli", "bench", "--steps", "3"]


def test_only_curvlab_distributed_imports_torch_distributed() -> None:
    root = Path(curvlab.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "distributed":  # curvlab.distributed; curvlab.testing.distributed
            continue  # (the gloo tests' cases: DDP-wrapped models)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            bad = [n for n in names if n.startswith(("torch.distributed", "torch.nn.parallel"))]
            assert not bad, f"{path.relative_to(root)} imports {bad}"
