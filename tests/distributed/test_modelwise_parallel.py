"""Two gloo processes on the loopback interface (float64): the model-wide methods (Hessian-
free, EDF, the ellipsoidal trust region, ARC, the efficient trust region and its SGD hybrid)
equal the single-process run on the whole batches and keep every rank identical; SMW, the
output-space EDF and a DDP model are refused with a message.

One `spawn` runs every case (see `curvlab.testing.distributed.modelwise`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from curvlab.distributed import spawn
from curvlab.testing.distributed.modelwise import CASES, STEPS, run_single, worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return spawn(worker, 2, (list(CASES),), timeout_s=240.0, comm_timeout_s=60.0)


@pytest.mark.parametrize("name", CASES)
def test_two_shards_equal_one_process_on_the_concatenated_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    ref = run_single(name)
    for rank, out in enumerate(ranks):
        result = out[name]
        assert result["losses"] == pytest.approx(ref["losses"], rel=1e-12)
        for key, value in ref["params"].items():
            torch.testing.assert_close(
                result["params"][key], value, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {key}"
            )
        assert result["accepted"] == ref["accepted"]
        assert result["stage"] == ref["stage"]
        if ref["rho"] is not None and ref["rho"] == ref["rho"]:  # ρ is NaN without a model
            assert result["rho"] == pytest.approx(ref["rho"], rel=1e-8)


@pytest.mark.parametrize("name", CASES)
def test_ranks_stay_bit_identical(ranks: list[dict[str, Any]], name: str) -> None:
    first, second = (out[name] for out in ranks)
    assert first["losses"] == second["losses"]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key


def test_traffic_is_one_gradient_all_reduce_and_one_per_product(
    ranks: list[dict[str, Any]],
) -> None:
    stats = ranks[0]["efficient-tr"]["stats"]
    params = sum(p.numel() for p in ranks[0]["efficient-tr"]["params"].values())
    assert stats["gradients"]["calls"] == STEPS  # loss and gradient packed together
    assert stats["gradients"]["bytes"] == STEPS * (params + 1) * 8
    assert stats["loss"]["calls"] == STEPS  # the trial loss of ρ
    products = stats["products"]["calls"]
    assert products >= STEPS  # at least one Hessian product per step
    assert stats["products"]["bytes"] == products * params * 8
    assert set(stats) == {"gradients", "loss", "products"}
    hybrid = ranks[0]["hybrid"]["stats"]
    assert hybrid["gradients"]["calls"] == STEPS  # the SGD stage averages its gradient too


def test_methods_without_a_data_parallel_form_are_refused(ranks: list[dict[str, Any]]) -> None:
    refused = ranks[0]["refusals"]
    assert "Gram matrix" in refused["smw"]
    assert refused["edf-output-space"].startswith("space:")
    assert "DistributedDataParallel" in refused["ddp"]
