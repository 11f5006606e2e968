"""`curvlab reproduce`: bad input, resume, grid search, verdict arithmetic (all in seconds)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from curvlab.bench.problems import get_problem
from curvlab.bench.records import EpochRecord, RunRecord
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.cli import EXPERIMENTS, main
from curvlab.bench.reproduce.common import check_chain
from curvlab.bench.reproduce.execution import TimeLimitReached, execute
from curvlab.bench.reproduce.framework import (
    Claim,
    Context,
    Experiment,
    FunctionTask,
    Method,
    Options,
    RunTask,
    Section,
    Task,
    comparison,
    held_if,
)
from curvlab.bench.reproduce.measures import (
    backprops_per_step,
    common_end,
    loss_at,
    min_train_loss,
    spearman,
)
from curvlab.bench.reproduce.schedule import MultiStepEpochs
from curvlab.bench.reproduce.smoke import restored_registries
from curvlab.bench.reproduce.thesis_ch2 import dd_fractions
from curvlab.bench.reproduce.tso_alra import scaled_epoch
from curvlab.bench.runner import Budget


@pytest.fixture(autouse=True)
def _restore_registries() -> Iterator[None]:
    """`execute` registers the reproductions' problems and ``multistep``: undo it."""
    with restored_registries():
        yield


# --------------------------------------------------------------------------- bad input
def test_unknown_name_exits_2_and_lists_the_valid_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err
    for name in EXPERIMENTS:
        assert name in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["edf", "--all"],
        ["edf", "--seeds", "0"],
        ["edf", "--time-limit", "-1"],
        ["edf", "--threads", "0"],
        ["edf", "--scale", "huge"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_missing_optional_dataset_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["thesis-ch4", "--scale", "quick", "--data-root", str(empty), "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "CIFAR-10" in err and "not available" in err and "nothing is downloaded" in err
    assert main(["edf", "--data-root", str(tmp_path / "absent")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_missing_fashion_mnist_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def absent() -> Any:
        raise FileNotFoundError("Fashion-MNIST not found (nothing is downloaded)")

    monkeypatch.setattr(P, "load_fashion_mnist", absent)
    P.fashion_mnist.cache_clear()
    P._standardised_fmnist.cache_clear()
    try:
        assert main(["thesis-ch5", "--scale", "quick", "--out", str(tmp_path)]) == 1
    finally:
        P.fashion_mnist.cache_clear()
        P._standardised_fmnist.cache_clear()
    err = capsys.readouterr().err
    assert "thesis-ch5: data set" in err and "Fashion-MNIST not found" in err


def test_budget_too_small_exits_1_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["thesis-ch3", "--scale", "smoke", "--time-limit", "0.001", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "more than the time limit" in err and "--time-limit" in err
    assert not (tmp_path / "thesis-ch3" / "records").exists()


def test_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["thesis-ch5", "--scale", "smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fig5/fmnist-mlp-logistic-std/SMW-GN/seed0: to run" in out
    assert "estimated time still to run" in out
    assert not (tmp_path / "thesis-ch5").exists()


# --------------------------------------------------------------------------- a tiny experiment
def _tiny(counter: list[str], lrs: tuple[float, ...] = (0.05, 0.2)) -> Experiment:
    problem = get_problem("synthetic-mlp")
    method = Method(
        "SGD", "sgd-m", {"lr": 0.1}, "test", grid={"lr": list(lrs)}, quick_grid={"lr": list(lrs)}
    )

    def measure(ctx: Context) -> dict[str, Any]:
        counter.append("measure")
        return {"value": 1.5}

    def plan(ctx: Context) -> list[Task]:
        comp = comparison(
            ctx,
            "g",
            problem,
            method,
            seeds=[0, 1],
            budget=Budget(steps=3),
            search_budget=Budget(steps=2),
            criterion=min_train_loss,
        )
        plain = RunTask(
            "g/adam", problem, "adam", {"lr": 1e-3}, 0, Budget(steps=2), "Adam", estimate_s=1.0
        )
        missing = RunTask("g/nope", problem, "nope", {}, 0, Budget(steps=2), "Nope")
        fn = FunctionTask("m/value", measure, {"v": 1}, estimate_s=0.5)
        return [*comp.tasks, plain, missing, fn]

    def check(ctx: Context) -> Any:
        value = ctx.result(plan(ctx)[-1])["value"]  # type: ignore[arg-type]
        return held_if(value > 1.0, f"value {value}")

    return Experiment(
        name="tiny",
        title="tiny",
        paper="none",
        plan=plan,
        claims=(
            Claim("value", "value > 1", "1", check),
            Claim("needs-nope", "needs a missing method", "—", check, needs=("nope",)),
        ),
        sections=lambda ctx: [Section("s", "body\n")],
        notes=lambda ctx: ["a note"],
        data=lambda ctx: [],
    )


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    ran: list[str] = []
    original = RunTask.execute

    def counting(self: RunTask, ctx: Context) -> None:
        ran.append(self.key)
        original(self, ctx)

    monkeypatch.setattr(RunTask, "execute", counting)
    return ran


def test_grid_search_then_finals_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[str] = []
    exp = _tiny(measured)
    ran = _count_runs(monkeypatch)
    options = Options(scale="quick", out=tmp_path, time_limit_s=600.0)
    ctx = execute(exp, options, log=lambda _: None)
    search = [k for k in ran if "/search/" in k]
    assert search == ["g/synthetic-mlp/SGD/search/lr=0.05", "g/synthetic-mlp/SGD/search/lr=0.2"]
    assert ran.index("g/synthetic-mlp/SGD/seed0") > ran.index(search[-1])  # finals after search
    assert "g/nope" in ctx.skipped and "g/nope" not in ran
    final = ctx.record(
        next(t for t in exp.plan(ctx) if t.key == "g/synthetic-mlp/SGD/seed1")  # type: ignore[arg-type]
    )
    assert final is not None and final.hyperparameters["lr"] in (0.05, 0.2)
    text = (tmp_path / "tiny" / "report.md").read_text()
    assert "✅ held" in text and "method not implemented: no bench optimizer named 'nope'" in text
    assert "tiny" in (tmp_path / "summary.md").read_text()
    # a rerun finds every record and runs nothing
    ran.clear()
    execute(exp, options, log=lambda _: None)
    assert ran == [] and measured == ["measure"]
    # a changed hyperparameter (new fingerprint) reruns only what it affects
    execute(_tiny(measured, lrs=(0.05, 0.3)), options, log=lambda _: None)
    assert "g/synthetic-mlp/SGD/search/lr=0.3" in ran
    assert "g/synthetic-mlp/SGD/search/lr=0.05" not in ran and "g/adam" not in ran


def test_an_interrupted_run_resumes_from_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = _tiny([])
    options = Options(scale="smoke", out=tmp_path)
    original = RunTask.execute
    calls: list[str] = []

    def interrupted(self: RunTask, ctx: Context) -> None:
        calls.append(self.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, ctx)

    monkeypatch.setattr(RunTask, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(exp, options, log=lambda _: None)
    done = calls[:2]
    monkeypatch.setattr(RunTask, "execute", original)
    ran = _count_runs(monkeypatch)
    execute(exp, options, log=lambda _: None)
    assert ran and not set(ran) & set(done)
    assert calls[2] in ran


def test_time_limit_stops_between_runs_and_keeps_records(tmp_path: Path) -> None:
    def slow(ctx: Context) -> dict[str, Any]:
        time.sleep(0.2)
        return {"ok": True}

    tasks: list[Task] = [FunctionTask(f"f/{i}", slow, {"i": i}, estimate_s=0.0) for i in range(3)]
    exp = Experiment(
        "slow",
        "slow",
        "none",
        lambda ctx: tasks,
        (),
        lambda ctx: [],
        lambda ctx: [],
        lambda ctx: [],
    )
    options = Options(scale="smoke", out=tmp_path, time_limit_s=0.3)
    with pytest.raises(TimeLimitReached, match="Rerun the same command to resume"):
        execute(exp, options, log=lambda _: None)
    assert len(list((tmp_path / "slow" / "records" / "smoke" / "f").glob("*.json"))) == 2
    execute(exp, Options(scale="smoke", out=tmp_path, time_limit_s=60.0), log=lambda _: None)
    assert len(list((tmp_path / "slow" / "records" / "smoke" / "f").glob("*.json"))) == 3


# --------------------------------------------------------------------------- verdict arithmetic
def _record(
    losses: list[float], *, steps: list[int] | None = None, info: list[dict[str, Any]] | None = None
) -> RunRecord:
    steps = steps or list(range(len(losses)))
    epochs = [
        EpochRecord(float(i), s, 0.5 * s, loss, 10.0)
        for i, (s, loss) in enumerate(zip(steps, losses, strict=True))
    ]
    n = steps[-1]
    return RunRecord(
        problem="p",
        optimizer="o",
        label="o",
        seed=0,
        config={},
        hyperparameters={"mu1": 0.2},
        environment={},
        epochs=epochs,
        step_loss=[1.0] * n,
        step_time=[0.5] * n,
        step_info=info,
        summary={"steps_per_epoch": 2, "final_train_loss": losses[-1]},
    )


def test_chain_relations() -> None:
    values = {"a": (1.0, 0.0), "b": (1.005, 0.0), "c": (2.0, 0.0), "d": (3.0, 0.0)}
    ok, failures = check_chain(values, [("a", "≈", "b"), ("b", "≤", "c"), ("c", "<", "d")])
    assert ok and not failures
    ok, failures = check_chain(values, [("d", "<", "c"), ("a", "≈", "c")])
    assert not ok and len(failures) == 2
    # seed deviations widen "≈"
    assert check_chain({"a": (1.0, 0.3), "b": (1.5, 0.3)}, [("a", "≈", "b")])[0]


def test_dd_fractions_count_pairs_per_layer_and_epoch() -> None:
    info = [
        {"yHy_over_sy": {"0": 1.0, "2": 50.0}},
        {"yHy_over_sy": {"0": 9.9, "2": 2.0}},
        {"yHy_over_sy": {"0": 10.5, "2": None}},  # a skipped pair does not count
        {"yHy_over_sy": {"0": 3.0, "2": 1.0}},
    ]
    overall, epochs = dd_fractions(_record([3.0, 2.0, 1.0], steps=[0, 2, 4], info=info))
    assert overall == {"0": 0.75, "2": 2 / 3}
    assert epochs == {"0": [1.0, 0.5], "2": [0.5, 1.0]}


def test_backprops_steps_and_equal_budget_losses() -> None:
    info = [{"solver_iterations": 4, "curvature_products": 4}, {"solver_iterations": 0}, {}]
    rec = _record([3.0, 2.0, 1.0, 0.5], info=info)
    assert backprops_per_step(rec, "code") == [4.0, 1.0, 1.0]
    assert backprops_per_step(rec, "raw") == [5.0, 1.0, 1.0]
    assert loss_at(rec, "backprops", 4.0) == 2.0 and loss_at(rec, "backprops", 5.0) == 1.0
    other = _record([3.0, 1.0])
    assert common_end([rec, other], "step") == 1.0 and loss_at(rec, "step", 1.0) == 2.0


def test_spearman() -> None:
    assert spearman([1, 2, 5, 10], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 2], [1.0, 1.0]))


def test_multistep_schedule_decays_the_active_groups() -> None:
    model = torch.nn.Linear(2, 1)
    opt = MultiStepEpochs(torch.optim.SGD(model.parameters(), lr=1.0), [1, 3], 0.1)
    lrs = []
    for _ in range(4):
        opt.end_epoch()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert [scaled_epoch(e, 10) for e in (81, 122, 25, 70, 5)] == [5, 7, 2, 4, 1]
