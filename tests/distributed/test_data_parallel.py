"""Two gloo processes on the loopback interface (float64): data-parallel K-FAC, K-BFGS,
K-BFGS(L), TNT, Shampoo and TSO-ALRA equal the single-process run on the whole batches, keep
every rank identical, split the inverse work, and both modes agree.

One `spawn` runs every case in every run (see `curvlab.testing.distributed.layerwise`); the
tests read its results.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from curvlab.distributed import spawn
from curvlab.testing.distributed.layerwise import (
    CASES,
    RUNS,
    SAMPLED,
    STEPS,
    run_single,
    worker,
)

pytestmark = pytest.mark.distributed

ALL = [*CASES, *SAMPLED]
#: EMAs that each rank keeps for its own shard (K-FAC, TSO-ALRA, K-BFGS-20): their mean over
#: ranks is the single-process EMA.
PER_RANK = ("/A", "/G")


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, dict[str, Any]]]:
    return spawn(worker, 2, (ALL,), timeout_s=240.0, comm_timeout_s=60.0)


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return {name: run_single(name) for name in CASES}


def _blocks_with_inverses(result: dict[str, Any]) -> set[str]:
    """Parameter names whose state holds an inverse / root."""
    keys = ("/A_inv", "/preconditioners/")
    return {k.split("/")[0] for k in result["state"] if any(m in k for m in keys)}


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=msg)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", CASES)
def test_two_shards_equal_one_process_on_the_concatenated_batch(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str, run: str
) -> None:
    ref = single[name]
    results = [out[f"{name}/{run}"] for out in ranks]
    for rank, result in enumerate(results):
        for key, value in ref["params"].items():
            _close(result["params"][key], value, f"rank {rank} {key}")
        # The mean loss over ranks is the loss of the whole batch (equal shards, mean loss).
        assert result["losses"] == pytest.approx(ref["losses"], rel=1e-12)
        if run != "preconditioned":  # every rank holds every block's state
            assert set(result["state"]) == set(ref["state"])
    # Curvature state: factors, inverses / roots, K-BFGS's H_A, H_G and (s, y) pairs.
    for key, expected in ref["state"].items():
        held = [r["state"][key] for r in results if key in r["state"]]
        assert held, key
        if key.endswith(PER_RANK):
            _close(sum(held) / len(held), expected, f"mean over ranks of {key}")
        else:
            for value in held:
                _close(value, expected, key)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", ALL)
def test_every_rank_ends_bit_identical(ranks: list[dict[str, Any]], name: str, run: str) -> None:
    first, second = (out[f"{name}/{run}"] for out in ranks)
    assert first["losses"] == second["losses"]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key
    # The replicated curvature state too: K-BFGS's H_A, H_G, (s_G, y_G) and L-BFGS pairs,
    # momentum, the inverses both ranks hold.
    shared = [k for k in first["state"] if k in second["state"] and not k.endswith(PER_RANK)]
    assert shared or run == "preconditioned"  # (TSO-ALRA there: per-rank A, B and roots only)
    for key in shared:
        assert torch.equal(first["state"][key], second["state"][key]), key


@pytest.mark.parametrize("name", ALL)
def test_both_modes_and_ddp_give_the_same_parameters(
    ranks: list[dict[str, Any]], name: str
) -> None:
    out = ranks[0]
    base = out[f"{name}/inverses"]["params"]
    for run in ("preconditioned", "ddp"):
        for key, value in out[f"{name}/{run}"]["params"].items():
            torch.testing.assert_close(value, base[key], rtol=1e-12, atol=1e-15, msg=run)


@pytest.mark.parametrize("run", ["inverses", "preconditioned"])
@pytest.mark.parametrize(
    "name", [n for n in ALL if not n.startswith("kbfgs")]
)  # K-BFGS has no inverses to refresh
def test_each_rank_refreshes_only_the_blocks_it_owns(
    ranks: list[dict[str, Any]], name: str, run: str
) -> None:
    results = [out[f"{name}/{run}"] for out in ranks]
    owners = results[0]["owners"]
    assert owners == results[1]["owners"]
    assert set(owners.values()) == {0, 1}  # the work is split
    for rank, result in enumerate(results):
        mine = {block for block, owner in owners.items() if owner == rank}
        assert set(result["refreshes"]) == mine
        assert all(count >= 1 for count in result["refreshes"].values())


def test_preconditioned_mode_keeps_each_inverse_on_its_owner_only(
    ranks: list[dict[str, Any]],
) -> None:
    for name in ("kfac", "kfac-cnn", "shampoo", "tnt-ef", "tso-alra-identity"):
        for rank, out in enumerate(ranks):
            result = out[f"{name}/preconditioned"]
            owned = {b for b, r in result["owners"].items() if r == rank}
            assert _blocks_with_inverses(result) == owned
            assert _blocks_with_inverses(out[f"{name}/inverses"]) == set(result["owners"])
            # ... and every rank knows that every block's owner has one (its decisions
            # about refreshing must not depend on what it holds itself).
            assert set(result["ready"]) == set(result["owners"])


def test_statistics_and_gradients_are_one_bucketed_all_reduce_per_update(
    ranks: list[dict[str, Any]],
) -> None:
    stats = {run: ranks[0][f"kfac/{run}"]["stats"] for run in RUNS}
    # K-FAC, inverse_every=2 over 3 steps: refreshes at step 1 (first inverses) and step 2.
    # Each refresh: every layer's EMA'd A and G in one all-reduce, then one broadcast per
    # owner rank. One gradient (+ loss) all-reduce per step; one tiny agreement on the
    # first mini-batch's statistics being finite.
    refreshes = 2
    assert stats["inverses"]["statistics"]["calls"] == refreshes
    assert stats["inverses"]["gradients"]["calls"] == STEPS
    assert stats["inverses"]["inverses"]["calls"] == refreshes * 2
    assert stats["inverses"]["control"]["calls"] == 1
    assert "preconditioned" not in stats["inverses"]
    assert stats["preconditioned"]["preconditioned"]["calls"] == 2 * STEPS
    assert "inverses" not in stats["preconditioned"]
    assert "gradients" not in stats["ddp"]  # DDP averaged them; the optimizer adds the loss
    assert stats["ddp"]["loss"]["calls"] == STEPS
    # Shampoo's statistics are contractions of the averaged gradient: no extra traffic.
    assert "statistics" not in ranks[0]["shampoo/inverses"]["stats"]
    # K-BFGS: step 1 = initial A, (ā, D̄h), y_A, second pass; later steps the last three.
    assert ranks[0]["kbfgs/inverses"]["stats"]["statistics"]["calls"] == 4 + 3 * (STEPS - 1)


def test_gradient_all_reduce_dominates_with_inverses_every_t_steps(
    ranks: list[dict[str, Any]],
) -> None:
    """K-FAC, 40 steps, inverses every 20: the factors travel only with the refreshes (3
    times, the first inverses included), so the curvature traffic is a fraction of the
    gradient all-reduce's, though each refresh moves about 2 (d_a² + d_out²) per layer."""
    out = ranks[0]["traffic"]
    assert out["gradients"]["calls"] == 40
    assert out["statistics"]["calls"] == 3
    gradients = out["gradients"]["bytes"]
    curvature = out["statistics"]["bytes"] + out["inverses"]["bytes"]
    assert curvature < 0.5 * gradients
