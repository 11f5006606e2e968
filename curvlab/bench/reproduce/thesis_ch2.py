"""``curvlab reproduce thesis-ch2``: thesis ch.2 (K-BFGS-20, K-BFGS(L)-20) on the autoencoders.

Thesis §2.8 (§2.8.1–2.8.3): K-BFGS and K-BFGS(L) (Alg 4; "-20" in ch.3's naming) against
KFAC (Alg 7), Adam, RMSprop and SGD-m on the MNIST / FACES / CURVES autoencoders, m = 1000,
equal CPU time (500 s MNIST and CURVES), hyperparameters by grid search (selection: lowest
full-training-set loss at an epoch end), 20 seeds. Measured here:

* Fig 2.2: training loss (and test loss) at equal time, per epoch and per second;
* Fig 2.1: the share of iterations with yᵀHy / sᵀy ≤ 2/μ1 per layer for K-BFGS(L) (the
  optimizer reports the ratio of every pair it uses);
* Fig 2.3: the loss after a fixed time over an (α, λ) grid for both methods (a coarse grid at
  quick scale, on CURVES only; at full scale the Fig 2.2 search grid itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from curvlab.bench.records import RunRecord
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.common import Grid, comparisons, data_needs, hp_text
from curvlab.bench.reproduce.framework import (
    WARM_START_S,
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
    lr_factors,
    slug,
)
from curvlab.bench.reproduce.measures import fmt, fmt_mean_std, mean_std, min_train_loss
from curvlab.bench.reproduce.report import (
    Panel,
    Series,
    markdown_table,
    plot_heatmap,
    plot_panels,
    plot_records,
)
from curvlab.bench.runner import Budget

__all__ = ["EXPERIMENT", "dd_fractions"]

PROBLEM_KEYS = ("fmnist", "curves")
PAPER_COLUMN = {"fmnist": "MNIST", "curves": "CURVES"}
FIRST_ORDER = ("Adam", "RMSprop", "SGD-m")
QN = ("K-BFGS", "K-BFGS(L)")

#: Table 2.5 (m = 1000): (lr, damping) for (MNIST, CURVES); damping is ε for Adam / RMSprop.
TABLE_2_5: dict[str, tuple[tuple[float, float | None], tuple[float, float | None]]] = {
    "K-BFGS": ((0.3, 0.3), (0.1, 0.01)),
    "K-BFGS(L)": ((0.3, 0.3), (0.3, 0.3)),
    "KFAC": ((1.0, 3.0), (0.3, 0.3)),
    "Adam": ((1e-4, 1e-4), (1e-3, 1e-3)),
    "RMSprop": ((1e-4, 1e-4), (1e-3, 1e-3)),
    "SGD-m": ((0.03, None), (0.1, None)),
}
OPTIMIZER = {
    "K-BFGS": "kbfgs-20",
    "K-BFGS(L)": "kbfgs-l-20",
    "KFAC": "kfac-alg7",
    "Adam": "adam",
    "RMSprop": "rmsprop",
    "SGD-m": "sgd-m",
}
LR_GRID = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
DAMPING_GRID = [3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
EPS_GRID = [1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1]

#: Fig 2.3 coarse grid (quick and smoke): α × λ.
COARSE_LR = [0.03, 0.1, 0.3, 1.0]
COARSE_DAMPING = [0.01, 0.1, 1.0]
ROBUST_WITHIN = 0.10  # a cell is "good" within 10 % of the best cell's loss
ROBUST_SHARE = 0.5  # … and at least half of the cells must be good, spanning ≥ 10× in α


def methods(problem: str) -> list[Method]:
    """The six methods of Fig 2.2 with their Table 2.5 values on ``problem``."""
    col = PROBLEM_KEYS.index(problem)
    out = []
    for name, values in TABLE_2_5.items():
        lr, damping = values[col]
        source = f"thesis Table 2.5 ({PAPER_COLUMN[problem]})"
        hp: dict[str, Any]
        if name in ("Adam", "RMSprop"):
            hp = {"lr": lr, "eps": damping}
            hp.update({"betas": [0.9, 0.9]} if name == "Adam" else {"alpha": 0.9})
            grid: dict[str, list[Any]] = {"lr": LR_GRID, "eps": EPS_GRID}
        elif name == "SGD-m":
            # ch.2's (1 − β) gradient EMA (thesis A13, docs/deviations.md) is torch's dampening = β.
            hp = {"lr": lr, "momentum": 0.9, "dampening": 0.9}
            grid = {"lr": LR_GRID}
        else:
            hp = {"lr": lr, "damping": damping, "warm_start": True}
            grid = {"lr": LR_GRID, "damping": DAMPING_GRID}
        out.append(
            Method(name, OPTIMIZER[name], hp, source, grid=grid, quick_grid={"lr": lr_factors(lr)})
        )
    return out


def _problems(ctx: Context) -> dict[str, P.Problem]:
    return {k: P.autoencoder(ctx.scale, k) for k in PROBLEM_KEYS}


def _grid(ctx: Context) -> Grid:
    return comparisons(
        ctx,
        "fig2.2",
        _problems(ctx),
        methods,
        seeds=ctx.seeds(1, 2, 20),
        budget=Budget(
            steps=ctx.pick(smoke=3, quick=None, full=None),
            seconds=ctx.pick(smoke=None, quick=20.0, full=500.0),
        ),
        search_budget=ctx.pick(smoke=Budget(steps=2), quick=Budget(seconds=6.0), full=None),
        criterion=min_train_loss,
    )


# --------------------------------------------------------------------------- Fig 2.3
Landscape = dict[tuple[str, str], list[list[RunTask]]]  # (method, problem) → [λ][α] cells


def _landscape(ctx: Context) -> tuple[Landscape, list[float], list[float]]:
    """The (α, λ) cells of Fig 2.3 per (method, problem)."""
    cells: Landscape = {}
    if ctx.scale == "full":  # the Fig 2.2 grid search is the landscape
        grid = _grid(ctx)
        for (key, name), comp in grid.runs.items():
            if name not in QN:
                continue
            by_point = {
                (t.meta["search"]["lr"], t.meta["search"]["damping"]): t for t in comp.search
            }
            cells[(name, key)] = [[by_point[(a, d)] for a in LR_GRID] for d in DAMPING_GRID]
        return cells, LR_GRID, DAMPING_GRID
    budget = ctx.pick(smoke=Budget(steps=2), quick=Budget(seconds=8.0), full=None)
    lrs = COARSE_LR if ctx.scale == "quick" else COARSE_LR[:2]
    dampings = COARSE_DAMPING if ctx.scale == "quick" else COARSE_DAMPING[:2]
    curves = P.autoencoder(ctx.scale, "curves")
    for method in methods("curves"):
        if method.name not in QN:
            continue
        cells[(method.name, "curves")] = [
            [
                RunTask(
                    key=f"fig2.3/{slug(curves.name)}/{slug(method.name)}/lr={a}-damping={d}",
                    problem=curves,
                    optimizer=method.optimizer,
                    hparams={**method.hparams, "lr": a, "damping": d},
                    seed=0,
                    budget=budget,
                    label=method.name,
                    group="fig2.3",
                    estimate_s=estimate_run(budget) + WARM_START_S,
                    meta={"lr": a, "damping": d},
                )
                for a in lrs
            ]
            for d in dampings
        ]
    return cells, lrs, dampings


def plan(ctx: Context) -> list[Task]:
    tasks: list[Task] = list(_grid(ctx).tasks())
    if ctx.scale != "full":
        cells, _, _ = _landscape(ctx)
        tasks += [t for rows in cells.values() for row in rows for t in row]
    return tasks


def _landscape_values(ctx: Context, rows: list[list[RunTask]]) -> list[list[float]]:
    out = []
    for row in rows:
        vals = []
        for task in row:
            rec = ctx.record(task)
            if rec is None:
                raise MissingResult(f"Fig 2.3 cell {task.key} has no record")
            loss = rec.summary.get("final_train_loss")
            vals.append(float(loss) if isinstance(loss, int | float) else math.nan)
        out.append(vals)
    return out


def _robust_verdict(ctx: Context) -> Verdict:
    cells, lrs, _ = _landscape(ctx)
    parts, ok_all = [], True
    for (method, problem), rows in cells.items():
        values = _landscape_values(ctx, rows)
        flat = [v for row in values for v in row if math.isfinite(v)]
        if not flat:
            raise MissingResult(f"no finite Fig 2.3 loss for {method} on {problem}")
        best = min(flat)
        good = [
            (i, j)
            for i, row in enumerate(values)
            for j, v in enumerate(row)
            if math.isfinite(v) and v <= best * (1 + ROBUST_WITHIN)
        ]
        total = sum(len(row) for row in values)
        share = len(good) / total
        good_lrs = [lrs[j] for _, j in good]
        span = max(good_lrs) / min(good_lrs)
        ok = share >= ROBUST_SHARE and span >= 10.0
        ok_all &= ok
        parts.append(
            f"{method} ({problem}): {len(good)}/{total} cells within 10 % of the best "
            f"{best:.4g}, α span {span:.3g}×"
        )
    return held_if(
        ok_all,
        "; ".join(parts),
        f"held when ≥ {ROBUST_SHARE:.0%} of the grid cells end within {ROBUST_WITHIN:.0%} of "
        "the best cell's training loss and those cells span ≥ 10× in α",
    )


# --------------------------------------------------------------------------- Fig 2.1
def dd_fractions(
    rec: RunRecord, mu1: float | None = None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per layer: the share of the recorded (s, y) pairs with yᵀHy / sᵀy ≤ 2/μ1, overall and
    per epoch (thesis Fig 2.1), from the ``yHy_over_sy`` of the record's step info."""
    bound = 2.0 / float(mu1 if mu1 is not None else rec.hyperparameters.get("mu1", 0.2))
    per_epoch: dict[str, dict[int, list[bool]]] = {}
    spe = max(1, int(rec.summary.get("steps_per_epoch") or 1))
    for i, info in enumerate(rec.step_info or []):
        ratios = info.get("yHy_over_sy") if isinstance(info, dict) else None
        if not isinstance(ratios, dict):
            continue
        for layer, ratio in ratios.items():
            if isinstance(ratio, int | float):
                per_epoch.setdefault(layer, {}).setdefault(i // spe, []).append(ratio <= bound)
    overall = {
        layer: sum(sum(v) for v in eps.values()) / sum(len(v) for v in eps.values())
        for layer, eps in per_epoch.items()
    }
    epochs = {
        layer: [sum(v) / len(v) for _, v in sorted(eps.items())] for layer, eps in per_epoch.items()
    }
    return overall, epochs


def _dd_verdict(ctx: Context) -> Verdict:
    grid = _grid(ctx)
    parts, ok = [], True
    for problem in PROBLEM_KEYS:
        recs = grid.records(ctx, problem, "K-BFGS(L)")
        shares: list[float] = []
        worst_epoch = math.inf
        for rec in recs:
            overall, epochs = dd_fractions(rec)
            shares += overall.values()
            worst_epoch = min([worst_epoch, *(min(v) for v in epochs.values() if v)])
        if not shares:
            raise MissingResult(f"K-BFGS(L) on {problem} reported no (s, y) pairs")
        ok &= min(shares) >= 0.9
        parts.append(
            f"{problem}: lowest layer share {min(shares):.1%} (lowest single epoch "
            f"{worst_epoch:.1%})"
        )
    return held_if(ok, "; ".join(parts), "held when every layer's share over the run is ≥ 90 %")


# --------------------------------------------------------------------------- Fig 2.2 claims
def _final(ctx: Context, problem: str, test: bool = False) -> dict[str, tuple[float, float]]:
    key = "final_test_metric" if test else "final_train_loss"
    records = _grid(ctx).available_records(ctx, problem)
    return {m: mean_std(r.summary.get(key) for r in rs) for m, rs in records.items()}


def _need(values: dict[str, tuple[float, float]], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in values]
    if missing:
        raise MissingResult("no runs of " + ", ".join(missing))


def _beats_first_order(ctx: Context) -> Verdict:
    parts, failures = [], []
    for problem in PROBLEM_KEYS:
        values = _final(ctx, problem)
        rivals = FIRST_ORDER if problem == "fmnist" else ("SGD-m",)
        _need(values, [*QN, *rivals])
        for q in QN:
            for r in rivals:
                if not values[q][0] < values[r][0]:
                    failures.append(f"{problem}: {q} {fmt(values[q][0])} ≥ {r} {fmt(values[r][0])}")
        parts.append(
            f"{problem}: "
            + ", ".join(f"{m} {fmt(values[m][0])}" for m in (*QN, *FIRST_ORDER) if m in values)
        )
    return held_if(
        not failures,
        "; ".join(parts),
        "final training loss at equal time (mean over seeds) lower than each first-order "
        "method's (on CURVES only SGD-m, as the thesis exempts Adam / RMSprop)"
        + ("; " + "; ".join(failures) if failures else ""),
    )


def _comparable(values: dict[str, tuple[float, float]], a: str, b: str, rel: float = 0.02) -> bool:
    return abs(values[a][0] - values[b][0]) <= rel * abs(values[b][0])


def _vs_kfac(ctx: Context) -> Verdict:
    parts, failures = [], []
    for problem in PROBLEM_KEYS:
        values = _final(ctx, problem)
        _need(values, [*QN, "KFAC"])
        for q in QN:
            gap = (values[q][0] - values["KFAC"][0]) / abs(values["KFAC"][0])
            parts.append(f"{problem}: {q} {gap:+.1%} vs KFAC")
            if not _comparable(values, q, "KFAC"):
                failures.append(f"{problem}: {q}")
    return held_if(
        not failures,
        "; ".join(parts),
        "comparable = final training loss at equal time within 2 % of KFAC's",
    )


def _test_loss(ctx: Context) -> Verdict:
    parts, failures = [], []
    for problem in PROBLEM_KEYS:
        values = _final(ctx, problem, test=True)
        _need(values, ["K-BFGS(L)", "KFAC", *FIRST_ORDER])
        best_first = min(values[m][0] for m in FIRST_ORDER)
        if not _comparable(values, "K-BFGS(L)", "KFAC"):
            failures.append(f"{problem}: K-BFGS(L) and KFAC differ by more than 2 %")
        for m in ("K-BFGS(L)", "KFAC"):
            if not values[m][0] < best_first:
                failures.append(f"{problem}: {m} does not beat the best first-order method")
        parts.append(
            f"{problem}: K-BFGS(L) {fmt(values['K-BFGS(L)'][0])}, KFAC {fmt(values['KFAC'][0])}, "
            f"best first-order {fmt(best_first)}"
        )
    return held_if(
        not failures,
        "; ".join(parts),
        "test loss (the autoencoders' test error) at the end: K-BFGS(L) within 2 % of KFAC, "
        "both below every first-order method" + ("; " + "; ".join(failures) if failures else ""),
    )


CLAIMS = (
    Claim(
        "fig2.2-vs-first-order",
        "K-BFGS and K-BFGS(L) beat the first-order methods in CPU time, except RMSprop/Adam on "
        "CURVES",
        "Fig 2.2 (curves only)",
        _beats_first_order,
        needs=("kbfgs-20", "kbfgs-l-20", "adam", "rmsprop", "sgd-m"),
    ),
    Claim(
        "fig2.2-vs-kfac",
        "K-BFGS and K-BFGS(L) are comparable to KFAC in time",
        "Fig 2.2 (curves only)",
        _vs_kfac,
        needs=("kbfgs-20", "kbfgs-l-20", "kfac-alg7"),
    ),
    Claim(
        "fig2.2-test",
        "K-BFGS(L) and KFAC have very similar test error and both beat the first-order methods",
        "Fig 2.2 (curves only)",
        _test_loss,
        needs=("kbfgs-l-20", "kfac-alg7", "adam", "rmsprop", "sgd-m"),
    ),
    Claim(
        "fig2.1-dd",
        "≥ 90 % of the iterations satisfy yᵀHy / sᵀy ≤ 2/μ1 for every layer (K-BFGS(L), DD "
        "damping)",
        "Fig 2.1: ≥ 90 % on MNIST, FACES, CURVES",
        _dd_verdict,
        needs=("kbfgs-l-20",),
    ),
    Claim(
        "fig2.3-robust",
        "K-BFGS and K-BFGS(L) are robust within a fairly wide range of (α, λ)",
        "Fig 2.3 (heat maps only)",
        _robust_verdict,
        needs=("kbfgs-20", "kbfgs-l-20"),
    ),
)


# --------------------------------------------------------------------------- report
def sections(ctx: Context) -> list[Section]:
    grid = _grid(ctx)
    rows = []
    for name in TABLE_2_5:
        row = [name]
        for k in PROBLEM_KEYS:
            try:
                recs = grid.records(ctx, k, name)
                train = fmt_mean_std([r.summary["final_train_loss"] for r in recs])
                test = fmt_mean_std([r.summary["final_test_metric"] for r in recs])
            except MissingResult:
                train = test = "—"
            paper = TABLE_2_5[name][PROBLEM_KEYS.index(k)]
            row += [str(paper), hp_text(grid.runs[(k, name)]), train, test]
        rows.append(row)
    headers = ["method"]
    for k in PROBLEM_KEYS:
        headers += [
            f"Table 2.5 {PAPER_COLUMN[k]} (lr, damping)",
            f"ours {k}: used",
            "train loss",
            "test loss",
        ]
    plots = []
    for k, problem in grid.problems.items():
        recs = [r for rs in grid.available_records(ctx, k).values() for r in rs]
        if recs:
            plots.append(
                plot_records(
                    ctx.plots / f"fig2.2-{k}.png",
                    f"Fig 2.2: {problem.name}",
                    recs,
                    test_panel="test loss",
                )
            )
    out = [
        Section(
            "Fig 2.2: training and test loss at equal time",
            "Final losses (mean ± std over seeds) at the end of equal training time. The thesis "
            "gives figures only; its tuned values are listed for reference.\n\n"
            + markdown_table(headers, rows),
            tuple(plots),
        )
    ]
    # Fig 2.1
    dd_rows, dd_plots = [], []
    for k in PROBLEM_KEYS:
        try:
            recs = grid.records(ctx, k, "K-BFGS(L)")
        except MissingResult:
            continue
        series = []
        for rec in recs:
            overall, epochs = dd_fractions(rec)
            for layer, share in overall.items():
                dd_rows.append(
                    [k, f"seed {rec.seed}", layer, f"{share:.1%}", f"{min(epochs[layer]):.1%}"]
                )
                series.append(Series(layer, list(range(1, len(epochs[layer]) + 1)), epochs[layer]))
        if series:
            dd_plots.append(
                plot_panels(
                    ctx.plots / f"fig2.1-{k}.png",
                    f"Fig 2.1: share of pairs with yᵀHy/sᵀy ≤ 2/μ1 ({k})",
                    [Panel("epoch", "share per epoch", series, logy=False)],
                )
            )
    if dd_rows:
        out.append(
            Section(
                "Fig 2.1: the DD statistic of K-BFGS(L)",
                markdown_table(
                    ["problem", "seed", "layer", "share over the run", "lowest epoch"], dd_rows
                ),
                tuple(dd_plots),
            )
        )
    # Fig 2.3
    cells, lrs, dampings = _landscape(ctx)
    maps = []
    for (method, key), task_rows in cells.items():
        try:
            values = _landscape_values(ctx, task_rows)
        except MissingResult:
            continue
        maps.append(
            plot_heatmap(
                ctx.plots / f"fig2.3-{slug(method)}-{key}.png",
                f"Fig 2.3: {method} on {key}",
                values,
                [f"{a:g}" for a in lrs],
                [f"{d:g}" for d in dampings],
                xlabel="learning rate α",
                ylabel="damping λ",
                cbar="training loss after the budget",
            )
        )
    if maps:
        out.append(
            Section(
                "Fig 2.3: loss landscape over (α, λ)",
                "Training loss after a fixed time per cell.\n",
                tuple(maps),
            )
        )
    return out


def notes(ctx: Context) -> list[str]:
    out = [
        "MNIST → Fashion-MNIST; CURVES → generated curves; FACES not run.",
        "No η = 1e-5 L2 term in the loss (the runner has none); ch.3/4 drop it too.",
        "RMSprop is torch's (no first-moment EMA, no warm start of ∇f⊙∇f): "
        "thesis A12 (docs/deviations.md).",
        f"Equal time per run: {ctx.pick(smoke='3 steps', quick='20 s', full='500 s')}; seeds: "
        f"{len(ctx.seeds(1, 2, 20))} (the thesis: 20).",
    ]
    if ctx.scale != "full":
        out.append(
            "Grid search: lr × {1/3, 1, 3} around Table 2.5 (6 s per point, seed 0). Fig 2.3: "
            "coarse grid α ∈ {0.03, 0.1, 0.3, 1} × λ ∈ {0.01, 0.1, 1} on CURVES only, 8 s per "
            "cell (the thesis: the full search grid on all three problems at 500 s)."
        )
    return out


def data(ctx: Context) -> list[DataNeed]:
    return [] if ctx.scale == "smoke" else data_needs(list(_problems(ctx).values()))


EXPERIMENT = Experiment(
    name="thesis-ch2",
    title="Thesis ch.2 (K-BFGS-20, K-BFGS(L)-20): Figs 2.1–2.3 on the autoencoders",
    paper="Yi Ren, Using Second-Order Information in Training Deep Neural Networks (PhD "
    "thesis, Columbia 2022), chapter 2 (seed 004); Goldfarb, Ren & Bahamou, NeurIPS 2020",
    plan=plan,
    claims=CLAIMS,
    sections=sections,
    notes=notes,
    data=data,
)
