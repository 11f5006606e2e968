"""The bench runner on two gloo ranks (`curvlab bench --nproc 2`): the same steps as one
process on the whole batches, bytes per step in the record, refusals; the CLI via torchrun
(slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from curvlab.bench.cli import main
from curvlab.bench.runner import Budget, run
from curvlab.distributed import Communicator, spawn

pytestmark = pytest.mark.distributed

STEPS = 4


def _runs(comm: Communicator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, mode in (("kfac-ef", "preconditioned"), ("sgd-m", ""), ("efficient-tr", "")):
        record = run(
            "synthetic-mlp",
            name,
            budget=Budget(steps=STEPS),
            communicator=comm,
            dist_mode=mode or "inverses",
        )
        out[f"{name}/{mode}"] = record.to_dict()
    try:
        run("synthetic-mlp", "smw-gn", budget=Budget(steps=1), communicator=comm)
    except ValueError as err:
        out["refused"] = str(err)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return spawn(_runs, 2, timeout_s=240.0, comm_timeout_s=60.0)


@pytest.mark.parametrize("key", ["kfac-ef/preconditioned", "sgd-m/", "efficient-tr/"])
def test_two_ranks_follow_the_single_process_run(ranks: list[dict[str, Any]], key: str) -> None:
    name = key.split("/")[0]
    single = run("synthetic-mlp", name, budget=Budget(steps=STEPS)).to_dict()
    first, second = (r[key] for r in ranks)
    assert first["step_loss"] == second["step_loss"]  # every rank saw the same mean loss
    assert first["epochs"][-1] == second["epochs"][-1]  # and ends at the same parameters
    # float32 model: the mean of the two shards' losses and updates equals the whole batch's
    assert first["step_loss"] == pytest.approx(single["step_loss"], rel=1e-5)
    assert first["epochs"][-1]["train_loss"] == pytest.approx(
        single["epochs"][-1]["train_loss"], rel=1e-4
    )
    assert first["config"]["distributed"]["world_size"] == 2
    assert first["config"]["distributed"]["shard_size"] == 32


def test_the_record_reports_bytes_per_step(ranks: list[dict[str, Any]]) -> None:
    comm = ranks[0]["kfac-ef/preconditioned"]["summary"]["comm"]
    assert comm["world_size"] == 2 and comm["mode"] == "preconditioned"
    assert len(comm["step_bytes"]) == STEPS
    assert comm["bytes_per_step"] == pytest.approx(sum(comm["step_bytes"]) / STEPS)
    kinds = comm["by_kind"]
    assert kinds["gradients"]["calls_per_step"] == 1.0 and kinds["gradients"]["bytes_per_step"] > 0
    assert kinds["preconditioned"]["calls_per_step"] == 2.0  # one broadcast per owner rank
    assert kinds["statistics"]["calls_per_step"] > 0
    ddp = ranks[0]["sgd-m/"]["summary"]["comm"]["by_kind"]
    assert ddp["gradients"]["calls_per_step"] >= 1.0  # DDP's all-reduce, counted by its hook


def test_model_wide_traffic_is_gradients_products_and_trial_losses(
    ranks: list[dict[str, Any]],
) -> None:
    kinds = ranks[0]["efficient-tr/"]["summary"]["comm"]["by_kind"]
    assert set(kinds) == {"gradients", "products", "loss"}
    assert kinds["gradients"]["calls_per_step"] == 1.0
    assert kinds["loss"]["calls_per_step"] == 1.0
    assert kinds["products"]["calls_per_step"] >= 1.0


def test_smw_is_refused_with_the_reason(ranks: list[dict[str, Any]]) -> None:
    assert "Gram matrix" in ranks[0]["refused"]


@pytest.mark.slow
def test_cli_nproc_runs_under_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--problem",
            "synthetic-mlp",
            "--optimizer",
            "kfac",
            "--steps",
            "3",
            "--nproc",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "synthetic-mlp" / "kfac" / "seed0.json").read_text())
    assert record["config"]["distributed"]["world_size"] == 2
    assert record["summary"]["comm"]["by_kind"]["gradients"]["calls_per_step"] == 1.0
