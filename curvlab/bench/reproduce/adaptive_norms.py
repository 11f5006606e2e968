"""``curvlab reproduce adaptive-norms``: seed 002, ellipsoidal trust regions.

Kohler, Adolphs & Lucchi (seed 002; §5, App. I–J; labels: docs/deviations.md): the stochastic
trust region with a
spherical (uniform), Adagrad or RMSProp ellipsoid (Table 1 defaults, S = 512, exact Hessian,
Steihaug-CG), against SGD, Adagrad and RMSprop at batch 32 with grid-searched step sizes (and
Adam, added here). Metrics: full training loss against backpropagations, epochs and wall
time. Backpropagations are counted as the released code does: a TR step costs its CG
iterations (at least 1), a first-order step 1, batch sizes not normalised.

Problems: the Fashion-MNIST MLP 784-128-10 (tanh, the released code's) and the Fashion-MNIST
autoencoder (sigmoid units, linear code, BCE; the full network on 10,000 images at quick scale).
The TR methods are the bench optimizers ``tr-uniform``, ``tr-adagrad`` and ``tr-rmsprop``
(`curvlab.optim.trust_region.EllipsoidalTR` with ``norm=…``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

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
    Section,
    Task,
    Verdict,
    held_if,
    lr_factors,
)
from curvlab.bench.reproduce.measures import (
    Axis,
    backprops_per_step,
    common_end,
    fmt,
    loss_at,
    min_train_loss,
)
from curvlab.bench.reproduce.report import markdown_table, plot_records
from curvlab.bench.runner import Budget

__all__ = ["EXPERIMENT"]

TR_METHODS = {"TR uniform": "tr-uniform", "TR Adagrad": "tr-adagrad", "TR RMSProp": "tr-rmsprop"}
#: First-order step sizes of the released F-MNIST FC configs (batch 128), Adam: torch's default.
FIRST_ORDER = {
    "SGD": ("sgd-m", {"lr": 0.005, "momentum": 0.0}),
    "Adagrad": ("adagrad", {"lr": 0.005}),
    "RMSprop": ("rmsprop", {"lr": 1e-4}),
    "Adam": ("adam", {"lr": 1e-3}),
}
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3]
AXES: tuple[tuple[Axis, str], ...] = (
    ("backprops", "backpropagations"),
    ("epoch", "epochs"),
    ("wall_time", "training time (s)"),
)


def methods(problem: str) -> list[Method]:
    """TR with the three norms (Table 1, S = 512) and the first-order methods (batch 32)."""
    out = [
        Method(name, opt, {"batch_size": 512}, "seed 002 Table 1 defaults (MLP row), S = 512")
        for name, opt in TR_METHODS.items()
    ]
    for name, (opt, hp) in FIRST_ORDER.items():
        quick_grid = {"lr": lr_factors(hp["lr"])} if problem == "mlp" else {}
        out.append(
            Method(
                name,
                opt,
                {**hp, "batch_size": 32},
                "[C-AN] F-MNIST FC configs (batch 128); batch 32 as in the paper",
                grid={"lr": LR_GRID},
                quick_grid=quick_grid,
            )
        )
    return out


def _problems(ctx: Context) -> dict[str, P.Problem]:
    n_train, n_test = ctx.pick(smoke=(None, None), quick=(20000, 5000), full=(None, None))
    mlp = P.mlp_classifier(
        ctx.scale,
        "fmnist-mlp-tanh",
        [784, 128, 10],
        nn.Tanh,
        batch_size=512,
        n_train=n_train,
        n_test=n_test,
    )
    return {"mlp": mlp, "autoencoder": P.seed002_autoencoder(ctx.scale)}


def _grid(ctx: Context) -> Grid:
    grids = []
    for key, problem in _problems(ctx).items():
        cap = ctx.pick(smoke=None, quick=30.0 if key == "mlp" else 90.0, full=None)
        budget = ctx.pick(
            smoke=Budget(steps=3), quick=Budget(epochs=10.0, seconds=cap), full=Budget(epochs=10.0)
        )
        grids.append(
            comparisons(
                ctx,
                "fig-tr",
                {key: problem},
                methods,
                seeds=ctx.seeds(1, 1, 1),
                budget=budget,
                search_budget=budget,
                criterion=min_train_loss,
            )
        )
    return Grid(
        "fig-tr",
        {k: v for g in grids for k, v in g.problems.items()},
        {k: v for g in grids for k, v in g.runs.items()},
    )


def plan(ctx: Context) -> list[Task]:
    return _grid(ctx).tasks()


def _one(grid: Grid, ctx: Context, problem: str, method: str) -> RunRecord:
    return grid.records(ctx, problem, method)[0]


def _at_common(recs: dict[str, RunRecord], axis: Axis) -> tuple[float, dict[str, float]]:
    end = common_end(list(recs.values()), axis)
    return end, {m: loss_at(r, axis, end) for m, r in recs.items()}


def _ellipsoidal(ctx: Context) -> Verdict:
    grid = _grid(ctx)
    parts, failures = [], []
    for problem in grid.problems:
        recs = {m: _one(grid, ctx, problem, m) for m in TR_METHODS}
        finals = {m: r.summary["final_train_loss"] for m, r in recs.items()}
        end, at_bp = _at_common(recs, "backprops")
        for m in ("TR Adagrad", "TR RMSProp"):
            if not finals[m] < finals["TR uniform"]:
                failures.append(f"{problem}: {m} final ≥ uniform")
            if not at_bp[m] < at_bp["TR uniform"]:
                failures.append(f"{problem}: {m} at {end:.0f} backprops ≥ uniform")
        parts.append(f"{problem}: final " + ", ".join(f"{m} {fmt(v)}" for m, v in finals.items()))
    return held_if(
        not failures,
        "; ".join(parts),
        "held when the Adagrad and RMSProp ellipsoids end below the spherical TR (same epochs) "
        "and are below it at the largest backpropagation count all three reached"
        + ("; " + "; ".join(failures) if failures else ""),
    )


def _first_order_records(grid: Grid, ctx: Context, problem: str) -> dict[str, RunRecord]:
    out = {}
    for m in FIRST_ORDER:
        try:
            out[m] = _one(grid, ctx, problem, m)
        except MissingResult:
            continue
    if not out:
        raise MissingResult(f"no first-order runs on {problem}")
    return out


def _vs_first_order(
    ctx: Context, problem: str
) -> tuple[dict[Axis, tuple[float, float, float]], str]:
    """Per axis: (TR-RMSProp's loss, the best first-order loss, where) at the common end."""
    grid = _grid(ctx)
    recs = {
        "TR RMSProp": _one(grid, ctx, problem, "TR RMSProp"),
        **_first_order_records(grid, ctx, problem),
    }
    out, parts = {}, []
    for axis, label in AXES:
        end, values = _at_common(recs, axis)
        best = min(v for m, v in values.items() if m != "TR RMSProp")
        out[axis] = (values["TR RMSProp"], best, end)
        parts.append(
            f"at {end:.3g} {label}: TR RMSProp {fmt(values['TR RMSProp'])}, best first-order "
            f"{fmt(best)}"
        )
    return out, "; ".join(parts)


def _mlp_claim(ctx: Context) -> Verdict:
    values, text = _vs_first_order(ctx, "mlp")
    wins = [axis for axis, (tr, best, _) in values.items() if tr < best]
    return held_if(
        len(wins) == len(AXES),
        text,
        "training loss at the largest backprop count / epoch / time every method reached; held "
        "when TR-RMSProp is below every first-order method on all three axes",
    )


def _ae_claim(ctx: Context) -> Verdict:
    values, text = _vs_first_order(ctx, "autoencoder")
    tr_b, best_b, _ = values["backprops"]
    tr_e, best_e, _ = values["epoch"]
    tr_t, best_t, _ = values["wall_time"]
    ok = tr_b <= best_b and tr_e >= 0.99 * best_e and tr_t > best_t
    return held_if(
        ok,
        text,
        "held when TR-RMSProp is at least as good in backprops, not better by more than 1 % in "
        "epochs, and worse in time than the best first-order method",
    )


TR_NEEDS = tuple(TR_METHODS.values())

CLAIMS = (
    Claim(
        "ellipsoidal-beats-spherical",
        "Ellipsoidal TR (Adagrad, RMSProp) beats spherical TR in backpropagations and final loss "
        "(MLP and autoencoder)",
        "Figs 3–5 (curves only): consistently, on all problems",
        _ellipsoidal,
        needs=TR_NEEDS,
    ),
    Claim(
        "mlp-vs-first-order",
        "On the MLP, TR-RMSProp beats SGD, Adagrad, RMSprop (and Adam) in backpropagations, "
        "epochs and time",
        "Fig 5 (curves only)",
        _mlp_claim,
        needs=("tr-rmsprop",),
    ),
    Claim(
        "ae-vs-first-order",
        "On the autoencoder, TR-RMSProp is slightly better in backpropagations, at best equal in "
        "epochs and worse in time than the first-order methods",
        "Fig 5 (curves only)",
        _ae_claim,
        needs=("tr-rmsprop",),
    ),
)


def sections(ctx: Context) -> list[Section]:
    grid = _grid(ctx)
    out = []
    for problem, prob in grid.problems.items():
        rows, recs_all = [], []
        for (p, name), comp in grid.runs.items():
            if p != problem:
                continue
            try:
                rec = _one(grid, ctx, problem, name)
            except MissingResult as err:
                reason = "not implemented" if "not implemented" in str(err) else "—"
                rows.append([name, comp.method.optimizer, reason, "—", "—", "—", "—", "—"])
                continue
            recs_all.append(rec)
            rows.append(
                [
                    name,
                    comp.method.optimizer,
                    hp_text(comp, ("lr", "batch_size")),
                    fmt(rec.summary["epochs"], ".2f"),
                    f"{sum(backprops_per_step(rec)):.0f}",
                    fmt(rec.summary["wall_s"], ".1f"),
                    fmt(rec.summary["final_train_loss"]),
                    fmt(rec.summary["final_test_metric"]),
                ]
            )
        plots: tuple[Path, ...] = ()
        if recs_all:
            plots = (
                plot_records(
                    ctx.plots / f"seed002-{problem}.png",
                    f"seed 002: {prob.name}",
                    recs_all,
                    axes=AXES,
                ),
            )
        metric = "test error %" if prob.test_metric == "test_error" else "test loss"
        out.append(
            Section(
                f"{prob.name}: training loss against backprops, epochs and time",
                markdown_table(
                    [
                        "method",
                        "bench optimizer",
                        "hyperparameters",
                        "epochs",
                        "backprops (code count)",
                        "training s",
                        "final train loss",
                        metric,
                    ],
                    rows,
                ),
                plots,
            )
        )
    return out


def notes(ctx: Context) -> list[str]:
    sizes = ctx.pick(
        smoke="generated data",
        quick="20,000 / 5,000 (MLP) and 10,000 / 2,000 (autoencoder) images",
        full="all images",
    )
    out = [
        f"CIFAR-10 MLP / ResNet18 / CIFAR autoencoder not run; Fashion-MNIST only ({sizes}).",
        "First-order step sizes: the released F-MNIST FC configs as presets, searched over "
        + (
            "lr × {1/3, 1, 3} on the MLP only (lowest final training loss)"
            if ctx.scale != "full"
            else "a log grid"
        )
        + "; no L2 term (the released code's l2_alpha·Σ‖W‖).",
        "Backprop counts follow the released code (TR step = its CG iterations, ≥ 1; first-order "
        "step = 1; batch size not normalised: TR batch 512, first-order batch 32).",
    ]
    if ctx.scale == "quick":
        out.append(
            "quick: 10 epochs, at most 30 s (MLP) / 90 s (autoencoder) per run, 1 seed; the "
            "paper's 784-1000-500-250-30 autoencoder on 10,000 images."
        )
    return out


def data(ctx: Context) -> list[DataNeed]:
    return [] if ctx.scale == "smoke" else data_needs(list(_problems(ctx).values()))


EXPERIMENT = Experiment(
    name="adaptive-norms",
    title="Adaptive norms (seed 002): ellipsoidal trust regions against spherical and first-order",
    paper="Kohler, Adolphs & Lucchi, Adaptive norms for deep learning with regularized Newton "
    "methods, seed 002",
    plan=plan,
    claims=CLAIMS,
    sections=sections,
    notes=notes,
    data=data,
)
