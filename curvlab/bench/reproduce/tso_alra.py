"""``curvlab reproduce tso-alra``: seed 001, TSO-ALRA against SGD, Adam and AMSGrad.

Ida & Fujiwara (seed 001) §V-A–V-B: AlexNet and VGG on SVHN, Fashion-MNIST,
CIFAR-10 and CIFAR-100; batch 128, 164 epochs, every learning rate ÷ 10 at epochs 81 and 122;
TSO-ALRA lr 1e-2 and a tuned switch epoch (Fashion-MNIST: AlexNet 70, VGG 25; CIFAR-10: 15,
10); SGD lr 0.1 (VGG, AlexNet / Fashion-MNIST), Adam and AMSGrad lr 1e-3 with "momentum"
0.99 (read as β1). The paper plots the test loss (NLL) per epoch; there is no table.

Here: a small CNN without BatchNorm (two 5×5 conv + two Linear) for AlexNet and the small
Conv-BN CNN for VGG, on Fashion-MNIST (CIFAR-10 with ``--data-root``). quick runs 10 epochs
with the schedule scaled to them (switch at round(E·s/164), decays at round(E·81/164) and
round(E·122/164)); TSO-ALRA also runs with the real-time switch of §III-B (validation loss not
improving for 3 epochs; the test set is the validation set, as the bench does).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from curvlab.bench.records import RunRecord
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.common import Grid, data_needs
from curvlab.bench.reproduce.framework import (
    Claim,
    Comparison,
    Context,
    DataNeed,
    Experiment,
    Method,
    MissingResult,
    Section,
    Task,
    Verdict,
    comparison,
    held_if,
)
from curvlab.bench.reproduce.measures import common_end, fmt, min_test_loss
from curvlab.bench.reproduce.report import markdown_table, plot_records
from curvlab.bench.runner import Budget

__all__ = ["EXPERIMENT", "scaled_epoch"]

PAPER_EPOCHS = 164
PAPER_MILESTONES = (81, 122)
#: §V-A chosen switch epochs: (dataset, model) → epoch.
SWITCH = {
    ("fmnist", "alexnet"): 70,
    ("fmnist", "vgg"): 25,
    ("cifar10", "alexnet"): 15,
    ("cifar10", "vgg"): 10,
}
MODELS = {"alexnet": "cnn2fc", "vgg": "small-cnn"}
BASELINES = ("SGD", "Adam", "AMSGrad")
TSO = ("TSO-ALRA", "TSO-ALRA (auto switch)")


def scaled_epoch(epoch: int, total: int) -> int:
    """The paper's ``epoch`` of 164 mapped onto ``total`` epochs (at least 1)."""
    return max(1, round(epoch * total / PAPER_EPOCHS))


def _dataset(ctx: Context) -> str:
    return "cifar10" if ctx.options.data_root is not None else "fmnist"


def _epochs(ctx: Context) -> int:
    return int(ctx.pick(smoke=3, quick=10, full=PAPER_EPOCHS))


def methods(ctx: Context, model: str) -> list[Method]:
    """SGD, Adam, AMSGrad and TSO-ALRA (paper switch, automatic switch) with §V-A's values."""
    total = _epochs(ctx)
    dataset = _dataset(ctx)
    milestones = [scaled_epoch(m, total) for m in PAPER_MILESTONES]
    switch = scaled_epoch(SWITCH[(dataset, model)], total)
    sgd_lr = 0.1 if model == "vgg" or dataset == "fmnist" else 0.01
    sched: dict[str, Any] = {"milestones": milestones, "gamma": 0.1}
    src = "seed 001 §V-A"
    adam_grid: dict[str, list[Any]] = {
        "lr": [0.1, 0.01, 1e-3, 1e-4],
        "betas": [[0.9, 0.999], [0.99, 0.999]],
    }
    return [
        Method(
            "SGD",
            "multistep",
            {"base": "sgd-m", "lr": sgd_lr, "momentum": 0.0, **sched},
            src,
            grid={"lr": [0.1, 0.01, 1e-3, 1e-4]},
        ),
        Method(
            "Adam",
            "multistep",
            {"base": "adam", "lr": 1e-3, "betas": [0.99, 0.999], **sched},
            src + " (momentum 0.99 read as β1)",
            grid=adam_grid,
        ),
        Method(
            "AMSGrad",
            "multistep",
            {"base": "amsgrad", "lr": 1e-3, "betas": [0.99, 0.999], **sched},
            src + " (momentum 0.99 read as β1)",
            grid=adam_grid,
        ),
        Method(
            "TSO-ALRA",
            "multistep",
            {"base": "tso-alra", "lr": 0.01, "switch_at_epoch": switch, "patience": None, **sched},
            src + f": switch after epoch {switch} (paper {SWITCH[(dataset, model)]} of 164); γ = "
            "0.05, T_int = 20, ε = 1e-6 (γ, T_int not reported)",
            grid={"lr": [0.1, 0.01, 1e-3], "switch_at_epoch": list(range(5, 80, 5))},
        ),
        Method(
            "TSO-ALRA (auto switch)",
            "multistep",
            {"base": "tso-alra", "lr": 0.01, "switch_at_epoch": None, "patience": 3, **sched},
            "seed 001 §III-B: switch when the validation loss has not improved for 3 epochs",
        ),
    ]


def _problems(ctx: Context) -> dict[str, P.Problem]:
    return {
        model: P.cnn_classifier(
            ctx.scale,
            kind,
            metric="test_loss",
            dataset=_dataset(ctx),
            data_root=ctx.options.data_root,
        )
        for model, kind in MODELS.items()
    }


def _grid(ctx: Context) -> Grid:
    total = _epochs(ctx)
    budget = ctx.pick(
        smoke=Budget(epochs=total),
        quick=Budget(epochs=total, seconds=100.0),
        full=Budget(epochs=total),
    )
    runs: dict[tuple[str, str], Comparison] = {}
    problems = _problems(ctx)
    for model, problem in problems.items():
        for m in methods(ctx, model):
            runs[(model, m.name)] = comparison(
                ctx,
                "fig-test-loss",
                problem,
                m,
                seeds=ctx.seeds(1, 1, 1),
                budget=budget,
                criterion=min_test_loss,
            )
    return Grid("fig-test-loss", problems, runs)


def plan(ctx: Context) -> list[Task]:
    return _grid(ctx).tasks()


def _curve(rec: RunRecord, until: float = math.inf) -> list[float]:
    """The test losses after epoch 0, up to epoch ``until``."""
    return [
        e.test_metric
        for e in rec.epochs[1:]
        if math.isfinite(e.test_metric) and e.epoch <= until + 1e-9
    ]


def _faster(ctx: Context, variant: str) -> Verdict:
    grid = _grid(ctx)
    parts, failures = [], []
    for model in MODELS:
        recs = {m: grid.records(ctx, model, m) for m in (variant, *BASELINES)}
        until = common_end([r for rs in recs.values() for r in rs], "epoch")
        area = {
            m: statistics.fmean(statistics.fmean(_curve(r, until) or [math.nan]) for r in rs)
            for m, rs in recs.items()
        }
        best = {
            m: statistics.fmean(min(_curve(r, until) or [math.nan]) for r in rs)
            for m, rs in recs.items()
        }
        for b in BASELINES:
            if not (area[variant] < area[b] and best[variant] < best[b]):
                failures.append(f"{model}: not below {b}")
        parts.append(
            f"{model}: mean test loss over {until:.3g} epochs "
            + ", ".join(f"{k} {fmt(v)}" for k, v in area.items())
        )
    return held_if(
        not failures,
        "; ".join(parts),
        "held when, for both networks, TSO-ALRA's test loss averaged over the epochs every run "
        "completed (area under the curve) and its lowest test loss there are both below each "
        "baseline's" + ("; " + "; ".join(failures) if failures else ""),
    )


def _late_increase(ctx: Context) -> Verdict:
    grid = _grid(ctx)
    parts, failures = [], []
    for model in MODELS:
        for name in ("Adam", "AMSGrad", "TSO-ALRA"):
            recs = grid.records(ctx, model, name)
            rise = statistics.fmean(
                r.summary["final_test_metric"] / min_test_loss(r) - 1.0 for r in recs
            )
            parts.append(f"{model} {name} +{rise:.1%}")
            if name == "TSO-ALRA" and rise > 0.02:
                failures.append(f"{model}: TSO-ALRA rises {rise:.1%}")
            elif name != "TSO-ALRA" and rise <= 0.05:
                failures.append(f"{model}: {name} rises only {rise:.1%}")
    return held_if(
        not failures,
        "final test loss above the run's minimum: " + ", ".join(parts),
        "held when Adam's and AMSGrad's final test loss is > 5 % above their minimum and "
        "TSO-ALRA's ≤ 2 % above its minimum, on both networks"
        + ("; " + "; ".join(failures) if failures else ""),
    )


NEEDS = ("multistep", "tso-alra", "sgd-m", "adam", "amsgrad")

CLAIMS = (
    Claim(
        "faster-paper-switch",
        "TSO-ALRA (paper's switch point) reduces the test loss faster than SGD, Adam and AMSGrad",
        "Figs 1–4 (curves only), all datasets and models",
        lambda ctx: _faster(ctx, "TSO-ALRA"),
        needs=NEEDS,
    ),
    Claim(
        "faster-auto-switch",
        "TSO-ALRA with the automatic (validation-plateau) switch reduces the test loss faster "
        "than SGD, Adam and AMSGrad",
        "§III-B rule; not evaluated in the paper",
        lambda ctx: _faster(ctx, "TSO-ALRA (auto switch)"),
        needs=NEEDS,
    ),
    Claim(
        "late-increase",
        "Adam's and AMSGrad's test loss increases late in training; TSO-ALRA's does not",
        "Figs 1(b), 2(b), 3, 4",
        _late_increase,
        needs=NEEDS,
    ),
)


def sections(ctx: Context) -> list[Section]:
    grid = _grid(ctx)
    out = []
    for model, problem in grid.problems.items():
        rows, recs_all = [], []
        for mdl, name in grid.runs:
            if mdl != model:
                continue
            try:
                recs = grid.records(ctx, model, name)
            except MissingResult:
                rows.append([name, "—", "—", "—", "—", "—"])
                continue
            recs_all += recs
            r = recs[0]
            switch = next(
                (
                    i.get("switch")
                    for i in reversed(r.step_info or [])
                    if isinstance(i, dict) and i.get("switch")
                ),
                None,
            )
            rows.append(
                [
                    name,
                    fmt(r.summary["epochs"], ".1f"),
                    fmt(min_test_loss(r)),
                    fmt(r.summary["final_test_metric"]),
                    fmt(statistics.fmean(_curve(r) or [math.nan])),
                    "—" if not switch else f"epoch {switch.get('epoch')} ({switch.get('reason')})",
                ]
            )
        plots: tuple[Path, ...] = ()
        if recs_all:
            plots = (
                plot_records(
                    ctx.plots / f"test-loss-{model}.png",
                    f"seed 001: {problem.name}",
                    recs_all,
                    test_panel="test loss (NLL)",
                ),
            )
        out.append(
            Section(
                f"Test loss, {model} substitute ({problem.name})",
                markdown_table(
                    [
                        "method",
                        "epochs",
                        "lowest test loss",
                        "final test loss",
                        "mean over epochs",
                        "switch",
                    ],
                    rows,
                ),
                plots,
            )
        )
    return out


def notes(ctx: Context) -> list[str]:
    total = _epochs(ctx)
    data_text = "CIFAR-10 (--data-root)" if ctx.options.data_root else "Fashion-MNIST"
    out = [
        f"AlexNet → a small CNN without BatchNorm; VGG → a small Conv-BN CNN; data {data_text}; "
        "no validation split (the test set serves as validation).",
        f"{total} epochs (paper 164); lr ÷ 10 after epochs "
        f"{[scaled_epoch(m, total) for m in PAPER_MILESTONES]} (paper 81, 122); switch epochs "
        "scaled the same way.",
        "One run per method, as the paper shows single curves.",
    ]
    if ctx.scale != "full":
        out.append(
            "No grid search at this scale (the paper's chosen values are used); full scale "
            "searches the paper's grids (lowest test loss)."
        )
    if ctx.scale == "quick":
        out.append("Each run stops after 100 s of training at most (see 'epochs' in the tables).")
    return out


def data(ctx: Context) -> list[DataNeed]:
    return [] if ctx.scale == "smoke" else data_needs(list(_problems(ctx).values()))


EXPERIMENT = Experiment(
    name="tso-alra",
    title="TSO-ALRA (seed 001): test loss against SGD, Adam and AMSGrad",
    paper="Ida & Fujiwara, two-stage optimization with adaptive learning-rate adjustment "
    "(TSO-ALRA), seed 001",
    plan=plan,
    claims=CLAIMS,
    sections=sections,
    notes=notes,
    data=data,
)
