"""The runner, records, registries and problems, on the synthetic problem (fast)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlab.bench import specs
from curvlab.bench.problems import PROBLEMS, get_problem
from curvlab.bench.records import RunRecord, load_record
from curvlab.bench.registry import UnknownNameError
from curvlab.bench.report import summarize
from curvlab.bench.runner import BLOW_UP_FACTOR, Budget, _diverged, run
from curvlab.bench.specs import OptimizerSpec


class _FakeCurvature(torch.optim.SGD):
    """SGD with the extras the runner looks for: ``warm_start`` and ``last_step_info``."""

    def __init__(
        self, model: nn.Module, lr: float, blow_up_at: int = 0, blow_up_to: float = math.nan
    ) -> None:
        super().__init__(model.parameters(), lr=lr)
        self.warm_batches = 0
        self.blow_up_at, self.blow_up_to = blow_up_at, blow_up_to
        self.count = 0
        self.last_step_info: dict[str, Any] = {}

    def warm_start(
        self, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: Any, *, batch_average: bool
    ) -> None:
        self.warm_batches = sum(1 for _ in batches)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        self.count += 1
        self.last_step_info = {"skipped": self.count % 2 == 0, "rho": torch.tensor(0.5)}
        if self.count == self.blow_up_at:
            return torch.tensor(self.blow_up_to)
        return loss


@pytest.fixture
def fake_spec(monkeypatch: pytest.MonkeyPatch) -> OptimizerSpec:
    spec = OptimizerSpec(
        name="fake",
        factory=lambda model, hp: _FakeCurvature(model, **hp),
        defaults={"lr": 0.1},
        paper="none",
        algorithm="none",
        file="tests",
        description="test double",
        curvature=True,
        supports_warm_start=True,
    )
    monkeypatch.setitem(specs.OPTIMIZERS, "fake", spec)
    return spec


def test_same_seed_same_trajectory_other_seed_differs() -> None:
    a = run("synthetic-mlp", "adam", seed=3, budget=Budget(steps=10))
    b = run("synthetic-mlp", "adam", seed=3, budget=Budget(steps=10))
    c = run("synthetic-mlp", "adam", seed=4, budget=Budget(steps=10))
    assert a.step_loss == b.step_loss
    assert a.epochs[-1].train_loss == b.epochs[-1].train_loss
    assert a.step_loss != c.step_loss


def test_epoch_budget_evaluates_every_epoch_and_loss_decreases() -> None:
    r = run("synthetic-mlp", "sgd-m", {"lr": 0.05}, budget=Budget(epochs=3))
    assert [e.epoch for e in r.epochs] == [0.0, 1.0, 2.0, 3.0]
    assert r.summary["steps"] == 3 * r.summary["steps_per_epoch"] == 24
    assert r.epochs[-1].train_loss < r.epochs[0].train_loss
    assert r.summary["best_train_loss"] == min(e.train_loss for e in r.epochs)
    assert r.summary["median_step_ms"] > 0 and r.summary["peak_memory_mb"] > 0


def test_time_budget_and_subset_and_batch_size() -> None:
    r = run("synthetic-mlp", "adam", {"batch_size": 50}, budget=Budget(seconds=0.2), subset=100)
    assert r.config["num_train"] == 100 and r.config["batch_size"] == 50
    assert r.summary["steps_per_epoch"] == 2
    assert r.summary["wall_s"] >= 0.2 or r.summary["status"] != "completed"
    assert r.summary["wall_s"] == pytest.approx(sum(r.step_time))


def test_step_info_skips_and_warm_start_are_recorded(fake_spec: OptimizerSpec) -> None:
    r = run("synthetic-mlp", "fake", {"warm_start": True}, budget=Budget(steps=4))
    assert r.config["warm_start"] is True
    assert r.summary["skipped_steps"] == 2
    assert r.step_info is not None and r.step_info[0] == {"skipped": False, "rho": 0.5}
    assert r.hyperparameters == {"lr": 0.1}


def test_divergence_stops_the_run(fake_spec: OptimizerSpec, tmp_path: Path) -> None:
    r = run("synthetic-mlp", "fake", {"blow_up_at": 2}, budget=Budget(steps=10))
    assert r.summary["status"] == "diverged" and r.summary["steps"] == 2
    assert math.isnan(r.step_loss[-1])
    back = load_record(r.save(tmp_path))
    assert math.isnan(back.step_loss[-1]) and back.summary == r.summary
    assert summarize([back])[0].diverged == 1


@pytest.mark.parametrize(
    ("to", "status"), [(1e30, "diverged"), (-1e30, "diverged"), (1e3, "completed")]
)
def test_a_finite_loss_explosion_is_divergence(
    fake_spec: OptimizerSpec, to: float, status: str
) -> None:
    """A loss a million times the first step's (plus one) ends the run as diverged even while
    it stays finite; a thousandfold rise does not."""
    r = run("synthetic-mlp", "fake", {"blow_up_at": 2, "blow_up_to": to}, budget=Budget(steps=4))
    assert r.summary["status"] == status
    assert r.summary["steps"] == (2 if status == "diverged" else 4)
    assert r.step_loss[1] == pytest.approx(to)


def test_divergence_rule() -> None:
    assert _diverged(math.inf, 1.0) and _diverged(math.nan, 1.0)
    assert _diverged(BLOW_UP_FACTOR * 544.0 * 1.01, 543.0)
    assert not _diverged(BLOW_UP_FACTOR * 544.0 * 0.99, 543.0)
    assert not _diverged(1e5, -0.5) and _diverged(1e7, -0.5)  # negative losses: magnitude
    assert not _diverged(1e300, math.nan)  # no finite reference: only non-finite values count


def test_warm_start_needs_support() -> None:
    with pytest.raises(ValueError, match="warm_start"):
        run("synthetic-mlp", "adam", {"warm_start": True}, budget=Budget(steps=1))


def test_record_round_trip_and_label(tmp_path: Path) -> None:
    r = run("synthetic-mlp", "adam", budget=Budget(steps=2), label="adam-x", seed=2)
    path = r.save(tmp_path)
    assert path == tmp_path / "synthetic-mlp" / "adam-x" / "seed2.json"
    assert load_record(path) == RunRecord.from_dict(r.to_dict())


def test_presets_merge_over_defaults() -> None:
    r = run("synthetic-mlp", "adam", budget=Budget(steps=1))
    assert r.hyperparameters["lr"] == specs.OPTIMIZERS["adam"].defaults["lr"]
    preset = specs.get_preset("adam", "curves-autoencoder", "thesis")
    assert preset.hparams == {"lr": 1e-3, "eps": 1e-3}
    with pytest.raises(UnknownNameError, match="thesis"):
        specs.get_preset("adam", "curves-autoencoder", "nope")


def test_every_preset_builds_its_optimizer() -> None:
    """Each preset's values are accepted by its optimizer on its problem's model (a typo or an
    out-of-range value would otherwise surface only when someone runs that preset)."""
    models: dict[str, nn.Module] = {}
    for (name, problem, _), preset in sorted(specs.PRESETS.items()):
        spec = specs.get_optimizer(name)
        hparams = {**spec.defaults, **preset.hparams}
        if hparams.pop("warm_start", False):
            assert spec.supports_warm_start, (name, problem)
        hparams.pop("batch_size", None)
        model = models.setdefault(problem, get_problem(problem).make_model(0))
        assert isinstance(spec.factory(model, hparams), torch.optim.Optimizer), (name, problem)


def test_tuned_fmnist_presets_name_their_grid() -> None:
    tuned = {
        o: p for (o, q, n), p in specs.PRESETS.items() if q == "fmnist-autoencoder" and n == "tuned"
    }
    assert {"kfac", "kbfgs", "kbfgs-l", "tnt", "sgd-m", "adam"} <= set(tuned)
    for preset in tuned.values():
        assert "scripts/tune_fmnist_presets.sh" in preset.source
        assert preset.hparams.get("warm_start", True) is True


@pytest.mark.parametrize("kwargs", [{}, {"steps": 0}, {"seconds": -1.0}])
def test_budget_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Budget"):
        Budget(**kwargs)


def test_registries_reject_unknown_names() -> None:
    with pytest.raises(UnknownNameError, match="synthetic-mlp"):
        get_problem("mnist")
    with pytest.raises(UnknownNameError, match="sgd-m"):
        specs.get_optimizer("sgd")


AUTOENCODER_WIDTHS = {
    "fmnist-autoencoder": [784, 1000, 500, 250, 30, 250, 500, 1000, 784],
    "curves-autoencoder": [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784],
}


@pytest.mark.parametrize("name", sorted(AUTOENCODER_WIDTHS))
def test_autoencoders_follow_the_thesis(name: str) -> None:
    problem = get_problem(name)
    model = problem.make_model(0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widths = AUTOENCODER_WIDTHS[name]
    assert [m.in_features for m in linears] + [linears[-1].out_features] == widths
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert relus == len(linears) - 2  # no activation after the code layer and the output
    code = widths.index(min(widths))
    layers = list(model)
    after_code = layers[layers.index(linears[code - 1]) + 1]
    assert isinstance(after_code, nn.Linear)
    loss = problem.make_loss()
    assert isinstance(loss, nn.BCEWithLogitsLoss) and loss.reduction == "sum"
    assert problem.batch_average and problem.batch_size == 1000 and problem.autoencoder


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_every_problem_builds_deterministically(name: str) -> None:
    problem = PROBLEMS[name]
    a, b = problem.make_model(7), problem.make_model(7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    first = next(m for m in a.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Linear):
        shape: tuple[int, ...] = (2, first.in_features)
    else:
        shape = (2, first.in_channels, 32, 32) if first.in_channels == 3 else (2, 1, 28, 28)
    assert a(torch.rand(shape)).shape[0] == 2
    assert problem.description and problem.data_source


@pytest.mark.parametrize("optimizer", ["kfac", "tso-alra", "sgd-m"])
def test_resumed_run_continues_exactly_like_the_uninterrupted_one(
    optimizer: str, tmp_path: Path
) -> None:
    """A run stopped mid-epoch resumes from its last epoch-end checkpoint and
    then takes exactly the uninterrupted run's steps (batches, sampled labels, switch)."""
    hp = {"lr": 0.05, "patience": 1} if optimizer == "tso-alra" else {"lr": 0.05}
    whole = run("synthetic-mlp", optimizer, hp, budget=Budget(epochs=3))
    ckpt = tmp_path / "run.ckpt.pt"
    cut = run("synthetic-mlp", optimizer, hp, budget=Budget(steps=12), checkpoint=ckpt)
    assert cut.summary["steps"] == 12 and ckpt.is_file()  # stopped in epoch 2 (8 steps each)
    resumed = run(
        "synthetic-mlp", optimizer, hp, budget=Budget(epochs=3), checkpoint=ckpt, resume=True
    )
    assert resumed.step_loss == whole.step_loss
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]
    assert resumed.summary["steps"] == whole.summary["steps"] == 24


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^resume: no checkpoint"):
        run(
            "synthetic-mlp",
            "sgd-m",
            budget=Budget(steps=1),
            checkpoint=tmp_path / "missing.pt",
            resume=True,
        )
