"""``curvlab reproduce edf``: seed 000, Exponentially Decaying Flows.

Paper ([P0] §6.1–6.3, App. B–D; labels: docs/deviations.md):

* §6.1, full-batch data fitting with a CNN (2 conv layers with ReLU and max-pool, 2 Linear
  layers): Fig 1 left, EDF-G for several Krylov orders k ("k interpolates between gradient
  descent and the flow"); Fig 1 right, EDF-G (k = 1 and a large k) and EDF-H against Momentum
  (step 0.01), NAG (0.001) and Adam (0.001). EDF: step 1.0, no damping, W2 acceleration.
* §6.2, a CNN classifier trained with minibatches (ResNet-56 there): EDF-G with k ∈ {1, 2},
  λ = ‖g‖ (a = b = 1), W1 momentum α = 0.9, batch 250, learning rates by best convergence;
  training loss and test error against Adam and momentum SGD.

Here: Fashion-MNIST (CIFAR-10 with ``--data-root``), the full batch being the first 512
images at quick scale. The EDF methods are the bench optimizers ``edf`` (EDF-G) and
``edf-h`` (`curvlab.optim.edf.EDF` with ``kind="ggn"`` / ``"hessian"``).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from curvlab.bench.records import RunRecord
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.common import Grid, comparisons, data_needs, hp_text
from curvlab.bench.reproduce.framework import (
    Claim,
    Context,
    DataNeed,
    Experiment,
    Method,
    MissingResult,
    RunTask,
    Section,
    Task,
    Verdict,
    estimate_run,
    held_if,
    not_testable,
    slug,
)
from curvlab.bench.reproduce.measures import (
    common_end,
    fmt,
    loss_at,
    mean_std,
    min_train_loss,
    spearman,
)
from curvlab.bench.reproduce.report import Panel, Series, markdown_table, plot_panels, plot_records
from curvlab.bench.runner import Budget

__all__ = ["EXPERIMENT"]

FULL_BATCH_FIRST_ORDER: dict[str, tuple[str, dict[str, Any]]] = {
    "Momentum": ("sgd-m", {"lr": 0.01, "momentum": 0.9}),
    "NAG": ("sgd-m", {"lr": 0.001, "momentum": 0.9, "nesterov": True}),
    "Adam": ("adam", {"lr": 0.001}),
}
#: §6.1: step 1.0, no damping (a = 0), W2.
EDF_FULL_BATCH = {"lr": 1.0, "damping_scale": 0.0, "acceleration": "w2"}
#: §6.2: a = b = 1, W1 with α = 0.9.
EDF_STOCHASTIC = {"damping_scale": 1.0, "damping_power": 1.0, "acceleration": "w1", "alpha": 0.9}
EDF_LR_GRID = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


def _dataset(ctx: Context) -> str:
    return "cifar10" if ctx.options.data_root is not None else "fmnist"


def _orders(ctx: Context) -> list[int]:
    return list(ctx.pick(smoke=(1, 2), quick=(1, 2, 5, 10), full=(1, 2, 5, 10, 20, 30)))


# --------------------------------------------------------------------------- §6.1 full batch
def _full_batch_problem(ctx: Context) -> P.Problem:
    n = int(ctx.pick(smoke=64, quick=512, full=2048))
    loader, source = P.full_batch_subset(ctx.scale, n, _dataset(ctx), ctx.options.data_root)
    return P.cnn_classifier(
        ctx.scale,
        "cnn2fc",
        dataset=_dataset(ctx),
        data_root=ctx.options.data_root,
        batch_size=n,
        name="full-batch-cnn2fc",
        loader=loader,
        source=source,
    )


def _full_batch(ctx: Context) -> dict[str, RunTask]:
    """{label: task}: EDF-G for every k, EDF-H at the largest k, the three first-order methods."""
    problem = _full_batch_problem(ctx)
    budget = ctx.pick(
        smoke=Budget(steps=3), quick=Budget(steps=50, seconds=60.0), full=Budget(steps=500)
    )
    k_max = max(_orders(ctx))

    def task(label: str, optimizer: str, hp: dict[str, Any]) -> RunTask:
        return RunTask(
            key=f"fig1/{slug(problem.name)}/{slug(label)}",
            problem=problem,
            optimizer=optimizer,
            hparams=hp,
            seed=0,
            budget=budget,
            label=label,
            group="fig1",
            estimate_s=estimate_run(budget, per_step_s=0.5),
        )

    out = {
        f"EDF-G k={k}": task(f"EDF-G k={k}", "edf", {**EDF_FULL_BATCH, "order": k})
        for k in _orders(ctx)
    }
    out[f"EDF-H k={k_max}"] = task(f"EDF-H k={k_max}", "edf-h", {**EDF_FULL_BATCH, "order": k_max})
    for label, (opt, hp) in FULL_BATCH_FIRST_ORDER.items():
        out[label] = task(label, opt, hp)
    return out


# --------------------------------------------------------------------------- §6.2 stochastic
def _cnn(ctx: Context) -> P.Problem:
    return P.cnn_classifier(
        ctx.scale, "cnn2fc", dataset=_dataset(ctx), data_root=ctx.options.data_root, batch_size=250
    )


def methods(_: str, scale: str) -> list[Method]:
    quick = scale != "full"
    out = [
        Method(
            f"EDF-G k={k}",
            "edf",
            {**EDF_STOCHASTIC, "order": k, "lr": 0.5},
            "seed 000 §6.2: a = b = 1, W1 α = 0.9, lr from the paper's best values {0.5, 0.75}",
            grid={"lr": EDF_LR_GRID},
            quick_grid={"lr": [0.5, 0.75]} if quick else {},
        )
        for k in (1, 2)
    ]
    out += [
        Method(
            "MSGD",
            "sgd-m",
            {"lr": 0.01, "momentum": 0.9},
            "seed 000 §6.2: LR chosen by best convergence",
            grid={"lr": [round(10 ** (-3 + 2 * i / 9), 6) for i in range(10)]},
            quick_grid={"lr": [0.01, 0.1]},
        ),
        Method(
            "Adam",
            "adam",
            {"lr": 1e-3},
            "seed 000 §6.2: LR chosen by best convergence",
            grid={"lr": [round(10 ** (-4 + 3 * i / 9), 7) for i in range(10)]},
            quick_grid={"lr": [1e-4, 1e-3]},
        ),
    ]
    return out


def _grid(ctx: Context) -> Grid:
    budget = ctx.pick(
        smoke=Budget(steps=3), quick=Budget(epochs=3.0, seconds=60.0), full=Budget(epochs=150.0)
    )
    return comparisons(
        ctx,
        "fig2",
        {"cnn": _cnn(ctx)},
        lambda k: methods(k, ctx.scale),
        seeds=ctx.seeds(1, 1, 1),
        budget=budget,
        search_budget=budget,
        criterion=min_train_loss,
    )


def plan(ctx: Context) -> list[Task]:
    return [*_full_batch(ctx).values(), *_grid(ctx).tasks()]


# --------------------------------------------------------------------------- claims
def _full_records(ctx: Context, labels: list[str]) -> dict[str, RunRecord]:
    tasks = _full_batch(ctx)
    out = {}
    for label in labels:
        rec = ctx.record(tasks[label])
        if rec is None:
            raise MissingResult(f"full-batch run {label} has no record")
        out[label] = rec
    return out


def _common_step(recs: dict[str, RunRecord]) -> int:
    return min(int(r.summary["steps"]) for r in recs.values())


def _k_sweep(ctx: Context) -> Verdict:
    ks = _orders(ctx)
    recs = _full_records(ctx, [f"EDF-G k={k}" for k in ks])
    step = _common_step(recs)
    losses = [loss_at(recs[f"EDF-G k={k}"], "step", step) for k in ks]
    rho = spearman([float(k) for k in ks], losses)
    ok = losses[-1] < losses[0] and rho <= -0.8
    return held_if(
        ok,
        f"training loss after {step} full-batch steps: "
        + ", ".join(f"k={k} {fmt(v)}" for k, v in zip(ks, losses, strict=True))
        + f" (Spearman ρ = {rho:.2f})",
        "held when the largest k ends below k = 1 and the loss falls with k (Spearman ρ ≤ −0.8) "
        "at the step count every run reached",
    )


def _edf_beats_first_order(ctx: Context) -> Verdict:
    k_max = max(_orders(ctx))
    edf = ["EDF-G k=1", f"EDF-G k={k_max}", f"EDF-H k={k_max}"]
    recs = _full_records(ctx, [*edf, *FULL_BATCH_FIRST_ORDER])
    step = _common_step(recs)
    values = {m: loss_at(r, "step", step) for m, r in recs.items()}
    best_first = min(values[m] for m in FULL_BATCH_FIRST_ORDER)
    failures = [m for m in edf if not values[m] < best_first]
    return held_if(
        not failures,
        f"after {step} steps: " + ", ".join(f"{m} {fmt(v)}" for m, v in values.items()),
        "held when EDF-G (k = 1 and the largest k) and EDF-H all end below Momentum, NAG and "
        "Adam at the step count every run reached"
        + ("; not below: " + ", ".join(failures) if failures else ""),
    )


def _g_faster_than_h(ctx: Context) -> Verdict:
    k_max = max(_orders(ctx))
    g, h = f"EDF-G k={k_max}", f"EDF-H k={k_max}"
    recs = _full_records(ctx, [g, h])
    step = _common_step(recs)

    def mean_log(rec: RunRecord) -> float:
        vals = [e.train_loss for e in rec.epochs if e.step <= step and e.train_loss > 0]
        return statistics.fmean(math.log(v) for v in vals) if vals else math.nan

    lg, lh = mean_log(recs[g]), mean_log(recs[h])
    return held_if(
        lg < lh,
        f"mean log training loss over the first {step} steps: {g} {lg:.3f}, {h} {lh:.3f}",
        "held when EDF-G's mean log loss over the common steps (area under the curve) is lower",
    )


def _cnn_claim(ctx: Context) -> Verdict:
    grid = _grid(ctx)
    recs = grid.available_records(ctx, "cnn")
    edf = [m for m in recs if m.startswith("EDF")]
    if not edf or "Adam" not in recs or "MSGD" not in recs:
        raise MissingResult("EDF, Adam or MSGD has no runs")

    # compare at the epochs every run completed (a time cap may stop the slower ones early)
    until = common_end([r for rs in recs.values() for r in rs], "epoch")

    def at(m: str, test: bool = False) -> float:
        return mean_std(
            loss_at(
                r, "epoch", until, (lambda e: e.test_metric) if test else lambda e: e.train_loss
            )
            for r in recs[m]
        )[0]

    def area(m: str) -> float:
        return statistics.fmean(
            statistics.fmean(
                [e.train_loss for e in r.epochs[1:] if e.epoch <= until + 1e-9] or [math.nan]
            )
            for r in recs[m]
        )

    best = min(edf, key=lambda m: at(m))
    ok = all(
        at(best) < at(b) and area(best) < area(b) and at(best, True) <= at(b, True)
        for b in ("Adam", "MSGD")
    )
    ours = f"after {until:.3g} epochs: " + "; ".join(
        f"{m}: train {fmt(at(m))}, test error {fmt(at(m, True), '.2f')} %"
        for m in (best, "Adam", "MSGD")
    )
    return held_if(
        ok,
        ours,
        "held when the better EDF run has a lower training loss, a lower mean training loss "
        "over the epochs and a test error no higher than Adam's and MSGD's, at the epochs "
        "every run completed",
    )


CLAIMS = (
    Claim(
        "fig1-k-sweep",
        "k interpolates between a gradient method (small k, slow) and the flow (large k, fast)",
        "Fig 1 left (curves only)",
        _k_sweep,
        needs=("edf",),
    ),
    Claim(
        "fig1-vs-first-order",
        "In full-batch fitting EDF-G and EDF-H beat Momentum, NAG and Adam; EDF-G even at k = 1",
        "Fig 1 right (curves only)",
        _edf_beats_first_order,
        needs=("edf", "edf-h", "sgd-m", "adam"),
    ),
    Claim(
        "fig1-g-vs-h",
        "EDF-G converges faster overall than EDF-H",
        "Fig 1 right",
        _g_faster_than_h,
        needs=("edf", "edf-h"),
    ),
    Claim(
        "cnn-classifier",
        "With minibatches on a CNN classifier, EDF (k = 1, 2) reaches a lower training loss "
        "faster than Adam and MSGD and an overall better test error",
        "Figs 2–3 (ResNet-56 / CIFAR-10, ResNet-110 / CIFAR-100; curves only)",
        _cnn_claim,
        needs=("edf", "adam", "sgd-m"),
    ),
    Claim(
        "full-batch-generalization",
        "Full-batch second-order training generalizes worse; small k makes EDF compatible with "
        "minibatches",
        "App. B (MNIST)",
        lambda ctx: not_testable(
            "needs the same training set trained full-batch and stochastically to convergence; "
            "the full-batch runs here fit a 512-image subset only"
        ),
    ),
    Claim(
        "augmentation-l2",
        "With augmentation and L2 there is a setting where EDF optimizes better and generalizes "
        "sufficiently",
        "§6.3, Figs 4–5",
        lambda ctx: not_testable("the bench runner has no data augmentation or L2 term"),
    ),
    Claim(
        "cifar100-duplicates",
        "Removing the 9 duplicated CIFAR-100 image pairs improves optimization and generalization",
        "App. C, Fig 8",
        lambda ctx: not_testable(
            "needs a local CIFAR-100 copy and ResNet-110; not part of this run"
        ),
    ),
)


# --------------------------------------------------------------------------- report
def sections(ctx: Context) -> list[Section]:
    out = []
    tasks = _full_batch(ctx)
    recs = {label: ctx.record(t) for label, t in tasks.items()}
    rows = []
    for label, t in tasks.items():
        rec = recs[label]
        if rec is None:
            reason = "not implemented" if not ctx.available(t.optimizer) else "—"
            rows.append([label, t.optimizer, reason, "—", "—"])
        else:
            rows.append(
                [
                    label,
                    t.optimizer,
                    rec.summary["steps"],
                    fmt(rec.summary["final_train_loss"]),
                    fmt(rec.summary["wall_s"], ".1f"),
                ]
            )
    done = [r for r in recs.values() if r is not None]
    plots: tuple[Path, ...] = ()
    if done:
        plots = (
            plot_panels(
                ctx.plots / "fig1-full-batch.png",
                "Fig 1: full-batch training loss",
                [
                    Panel(
                        "step",
                        "training loss",
                        [
                            Series(
                                r.label,
                                [e.step for e in r.epochs],
                                [e.train_loss for e in r.epochs],
                                "-",
                            )
                            for r in done
                        ],
                        clip_blowups=True,
                    ),
                    Panel(
                        "training time (s)",
                        "training loss",
                        [
                            Series(
                                r.label,
                                [e.wall_time for e in r.epochs],
                                [e.train_loss for e in r.epochs],
                                "-",
                            )
                            for r in done
                        ],
                        clip_blowups=True,
                    ),
                ],
            ),
        )
    out.append(
        Section(
            "Fig 1: full-batch data fitting",
            markdown_table(
                ["run", "bench optimizer", "steps", "final training loss", "training s"], rows
            ),
            plots,
        )
    )
    grid = _grid(ctx)
    rows2 = []
    for (_, name), comp in grid.runs.items():
        try:
            rs = grid.records(ctx, "cnn", name)
            rows2.append(
                [
                    name,
                    hp_text(comp, ("lr",)),
                    fmt(rs[0].summary["epochs"], ".2f"),
                    fmt(rs[0].summary["final_train_loss"]),
                    fmt(rs[0].summary["final_test_metric"], ".2f"),
                ]
            )
        except MissingResult as err:
            rows2.append(
                [
                    name,
                    hp_text(comp, ("lr",)),
                    "not implemented" if "not implemented" in str(err) else "—",
                    "—",
                    "—",
                ]
            )
    recs2 = [r for rs in grid.available_records(ctx, "cnn").values() for r in rs]
    plots2: tuple[Path, ...] = ()
    if recs2:
        plots2 = (
            plot_records(
                ctx.plots / "fig2-cnn.png",
                f"EDF on {grid.problems['cnn'].name}",
                recs2,
                test_panel="test error (%)",
            ),
        )
    out.append(
        Section(
            "§6.2 substitute: minibatch CNN classifier",
            markdown_table(
                ["method", "lr", "epochs", "final training loss", "test error %"], rows2
            ),
            plots2,
        )
    )
    return out


def notes(ctx: Context) -> list[str]:
    data_text = "CIFAR-10 (--data-root)" if ctx.options.data_root else "Fashion-MNIST"
    return [
        f"§6.1's CIFAR-10 CNN → the same shape (2 conv + 2 Linear, no BN) on {data_text}; full "
        f"batch = the first {ctx.pick(smoke=64, quick=512, full=2048)} images; cross-entropy "
        "(the paper does not say which loss 'data fitting' used).",
        "ResNet-56 / ResNet-110 → the same small CNN trained with minibatches of 250.",
        "EDF lr grid at quick scale: the paper's best values {0.5, 0.75}; MSGD {0.01, 0.1}, Adam "
        "{1e-4, 1e-3} (the paper: 10 values each); one run per method (the paper reports the "
        "best run).",
        "EDF-G / EDF-H are the bench optimizers 'edf' / 'edf-h' with order = k, damping_scale "
        "= a, acceleration and lr set as above.",
    ]


def data(ctx: Context) -> list[DataNeed]:
    if ctx.scale == "smoke":
        return []
    return data_needs([_full_batch_problem(ctx), _cnn(ctx)])


EXPERIMENT = Experiment(
    name="edf",
    title="Exponentially Decaying Flows (seed 000): k sweep, full-batch fitting, CNN classifier",
    paper="Exponentially Decaying Flows for optimization in deep learning, seed 000",
    plan=plan,
    claims=CLAIMS,
    sections=sections,
    notes=notes,
    data=data,
)
