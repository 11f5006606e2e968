"""``curvlab reproduce efficient-tr``: seed 003, the efficient trust region, Hybrid and tracks.

Liu, Lee & Hsieh (seed 003; §4 and App. B): VGG16 (BatchNorm, SReLU, average pooling,
N(0, 0.02) init) on CIFAR-10 without augmentation; plain SGD at lr 0.1; the trust region of
Alg 1–2; Hybrid = TR until the accuracy stops increasing, then SGD. Measured here:

* Fig 3: the best test accuracy of SGD, TR and Hybrid for batch sizes 64 … 2048 (the paper:
  mean over 5 runs of each run's maximum);
* Table 1: the tracks SGD(n) → TR(2n) → SGD(n) and TR(2n) → SGD(n) → TR(n) (n = 50 epochs,
  B = 2048), each stage warm-started from the previous weights, accuracy at each stage end;
* Fig 2 / §4: TR's cost per epoch against SGD's (~3×, "2–3×").

Substitute network: a 4-conv VGG-style CNN with BatchNorm, SReLU and average pooling on
Fashion-MNIST (CIFAR-10 with ``--data-root``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from curvlab.bench.records import RunRecord
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.common import data_needs
from curvlab.bench.reproduce.framework import (
    Claim,
    Comparison,
    Context,
    DataNeed,
    Experiment,
    Method,
    MissingResult,
    Section,
    Stage,
    StagedTask,
    Task,
    Verdict,
    comparison,
    estimate_run,
    held_if,
)
from curvlab.bench.reproduce.measures import (
    accuracy,
    best_accuracy,
    fmt,
    mean_std,
    neg_best_accuracy,
)
from curvlab.bench.reproduce.report import Panel, Series, markdown_table, plot_panels
from curvlab.bench.runner import Budget

__all__ = ["EXPERIMENT"]

BATCH_SIZES = (64, 128, 256, 512, 1024, 2048)
#: Fig 3 numbers quoted in the text (%): B → (TR, Hybrid, SGD).
FIG3 = {128: (86.8, 88.1, 86.7), 2048: (85.5, 87.0, 80.3)}
#: Table 1 (VGG16 / CIFAR-10, B = 2048): stage accuracies (%).
TABLE_1 = {"track 1": (80.1, 86.2, 87.8), "track 2": (85.6, 87.5, 86.5)}

SGD = Method("SGD", "sgd-m", {"lr": 0.1, "momentum": 0.0}, "seed 003 §4.2: plain SGD, lr 0.1")
#: §4.2: the experiments' Hessian-vector products are finite differences (one extra gradient
#: each, where an exact product through the SReLU / BatchNorm CNN costs several).
TR_HP = {"hvp": "hessian-fd"}
TR = Method(
    "TR",
    "efficient-tr",
    TR_HP,
    "seed 003 Alg 1–2 (bench defaults: radius 1, step 0.1) with §4.2's finite-difference "
    "Hessian-vector products",
)
HYBRID = Method(
    "Hybrid",
    "hybrid-tr-sgd",
    {"sgd_lr": 0.1, "patience": 1, "mode": "min", **TR_HP},
    "seed 003 §4: TR (as above) until the held-out metric stops improving (patience 1), then "
    "SGD lr 0.1; mode 'min' because the bench reports the test error",
)
METHODS = (SGD, TR, HYBRID)


def _problem(ctx: Context) -> P.Problem:
    dataset = "cifar10" if ctx.options.data_root is not None else "fmnist"
    return P.cnn_classifier(
        ctx.scale, "vgg-srelu", dataset=dataset, data_root=ctx.options.data_root
    )


def _batch_sizes(ctx: Context) -> tuple[int, ...]:
    return ctx.pick(smoke=(64, 128), quick=BATCH_SIZES, full=BATCH_SIZES)


def _sweep(ctx: Context) -> dict[tuple[int, str], Comparison]:
    problem = _problem(ctx)
    budget = ctx.pick(
        smoke=Budget(steps=3), quick=Budget(epochs=3.0, seconds=45.0), full=Budget(epochs=200.0)
    )
    out = {}
    for b in _batch_sizes(ctx):
        for m in METHODS:
            out[(b, m.name)] = comparison(
                ctx,
                f"fig3/B{b}",
                problem,
                m,
                seeds=ctx.seeds(1, 1, 5),
                budget=budget,
                criterion=neg_best_accuracy,
                extra={"batch_size": b},
            )
    return out


def _tracks(ctx: Context) -> dict[str, StagedTask]:
    problem = _problem(ctx)
    n = ctx.pick(smoke=1, quick=1, full=50)
    batch = ctx.pick(smoke=64, quick=512, full=2048)
    cap = ctx.pick(smoke=None, quick=15.0, full=None)

    def stage(method: Method, epochs: int) -> Stage:
        budget = (
            Budget(steps=2 * epochs)
            if ctx.scale == "smoke"
            else Budget(epochs=float(epochs), seconds=None if cap is None else cap * epochs)
        )
        return Stage(method.optimizer, {**method.hparams, "batch_size": batch}, budget, method.name)

    defs = {
        "track 1": (stage(SGD, n), stage(TR, 2 * n), stage(SGD, n)),
        "track 2": (stage(TR, 2 * n), stage(SGD, n), stage(TR, n)),
    }
    return {
        name: StagedTask(
            key=f"table1/{name.replace(' ', '')}",
            problem=problem,
            stages=stages,
            seed=0,
            label=name,
            group="table1",
            estimate_s=sum(estimate_run(s.budget) for s in stages),
            meta={"n": n, "batch_size": batch},
        )
        for name, stages in defs.items()
    }


def plan(ctx: Context) -> list[Task]:
    tasks: list[Task] = [t for comp in _sweep(ctx).values() for t in comp.tasks]
    return [*tasks, *_tracks(ctx).values()]


# --------------------------------------------------------------------------- claims
def _acc(ctx: Context, value: str = "accuracy") -> dict[tuple[int, str], float]:
    """{(B, method): mean best test accuracy} (``value="epochs"``: mean epochs run)."""
    out = {}
    for key, comp in _sweep(ctx).items():
        if not ctx.available(comp.method.optimizer):
            continue
        try:
            recs = ctx.records_of(comp.finals)
        except MissingResult:
            continue
        if value == "epochs":
            out[key] = mean_std(r.summary.get("epochs") for r in recs)[0]
        else:
            out[key] = mean_std(best_accuracy(r) for r in recs)[0]
    return out


def _need(acc: dict[tuple[int, str], float], keys: list[tuple[int, str]]) -> None:
    missing = [f"{m} at B={b}" for b, m in keys if (b, m) not in acc]
    if missing:
        raise MissingResult("no runs of " + ", ".join(missing))


def _large_batch(ctx: Context) -> Verdict:
    acc = _acc(ctx)
    bs = [b for b in _batch_sizes(ctx) if b >= 256] or list(_batch_sizes(ctx))[-1:]
    _need(acc, [(b, m) for b in bs for m in ("SGD", "TR", "Hybrid")])
    failures = [
        f"{m} ≤ SGD at B={b}"
        for b in bs
        for m in ("TR", "Hybrid")
        if not acc[(b, m)] > acc[(b, "SGD")]
    ]
    ours = "; ".join(
        f"B={b}: TR {acc[(b, 'TR')]:.2f}, Hybrid {acc[(b, 'Hybrid')]:.2f}, "
        f"SGD {acc[(b, 'SGD')]:.2f}"
        for b in bs
    )
    return held_if(
        not failures,
        ours,
        "best test accuracy (%); held when TR and Hybrid beat SGD at every batch size ≥ 256"
        + ("; " + "; ".join(failures) if failures else ""),
    )


def _gap_grows(ctx: Context) -> Verdict:
    acc = _acc(ctx)
    bs = list(_batch_sizes(ctx))
    lo, hi = (128, 2048) if 2048 in bs else (bs[0], bs[-1])
    first, last = (64, 1024) if 1024 in bs else (bs[0], bs[-1])
    _need(acc, [(b, m) for b in {lo, hi, first, last} for m in ("SGD", "Hybrid")])
    gap_lo = acc[(lo, "Hybrid")] - acc[(lo, "SGD")]
    gap_hi = acc[(hi, "Hybrid")] - acc[(hi, "SGD")]
    drop_sgd = acc[(first, "SGD")] - acc[(last, "SGD")]
    drop_hybrid = acc[(first, "Hybrid")] - acc[(last, "Hybrid")]
    return held_if(
        gap_hi > gap_lo and drop_sgd > drop_hybrid,
        f"Hybrid − SGD: {gap_lo:+.2f} at B={lo}, {gap_hi:+.2f} at B={hi}; drop from B={first} "
        f"to B={last}: SGD {drop_sgd:.2f}, Hybrid {drop_hybrid:.2f}",
        f"held when Hybrid's lead over SGD is larger at B={hi} than at B={lo} and SGD loses "
        f"more accuracy than Hybrid from B={first} to B={last}",
    )


def _small_batch(ctx: Context) -> Verdict:
    acc = _acc(ctx)
    b = min(_batch_sizes(ctx))
    _need(acc, [(b, "TR"), (b, "SGD")])
    return held_if(
        acc[(b, "TR")] < acc[(b, "SGD")],
        f"B={b}: TR {acc[(b, 'TR')]:.2f}, SGD {acc[(b, 'SGD')]:.2f}",
        "held when TR's best test accuracy is below SGD's at the smallest batch size",
    )


def _stage_acc(rec: RunRecord) -> float:
    return accuracy(rec.epochs[-1])


def _track(ctx: Context, name: str) -> Verdict:
    recs = ctx.stage_records(_tracks(ctx)[name])
    a = [_stage_acc(r) for r in recs]
    ok = a[0] < a[1] < a[2] if name == "track 1" else a[0] < a[1] and a[2] < a[1]
    stages = " → ".join(
        f"{r.extra.get('stage_label')} {v:.2f}" for r, v in zip(recs, a, strict=True)
    )
    rule = "I < II < III" if name == "track 1" else "I < II and III < II"
    return held_if(ok, stages, f"test accuracy (%) at each stage end; held when {rule}")


def _cost(ctx: Context) -> Verdict:
    sweep = _sweep(ctx)
    b = 512 if 512 in _batch_sizes(ctx) else max(_batch_sizes(ctx))
    ms = {}
    for m in ("TR", "SGD"):
        recs = ctx.records_of(sweep[(b, m)].finals)
        ms[m] = statistics.fmean(float(r.summary.get("median_step_ms") or math.nan) for r in recs)
    ratio = ms["TR"] / ms["SGD"]
    return held_if(
        2.0 <= ratio <= 3.0,
        f"B={b}: TR {ms['TR']:.1f} ms/step, SGD {ms['SGD']:.1f} ms/step (×{ratio:.2f})",
        "median step time ratio (equal steps per epoch); held when it lies in the paper's 2–3×",
    )


def _track_claim(name: str) -> Claim:
    paper = " → ".join(f"{v}" for v in TABLE_1[name])
    stages = "SGD(50) → TR(100) → SGD(50)" if name == "track 1" else "TR(100) → SGD(50) → TR(50)"
    pattern = (
        "accuracy rises at each stage"
        if name == "track 1"
        else "SGD after TR improves, TR after SGD falls back"
    )
    return Claim(
        f"table1-{name.replace(' ', '')}",
        f"{stages}: {pattern}",
        f"Table 1 (VGG16/CIFAR-10, B=2048): {paper} %",
        lambda ctx: _track(ctx, name),
        needs=("sgd-m", "efficient-tr"),
    )


CLAIMS = (
    Claim(
        "fig3-large-batch",
        "TR and Hybrid generalize better than SGD at large batch sizes (TR wins for B > 128)",
        "Fig 3: B=2048: TR 85.5, Hybrid 87.0, SGD 80.3 %",
        _large_batch,
        needs=("sgd-m", "efficient-tr", "hybrid-tr-sgd"),
    ),
    Claim(
        "fig3-gap-grows",
        "The gap to SGD grows with the batch size: from B=64 to 1024 Hybrid drops 0.35 %, "
        "SGD 6.97 %",
        "Fig 3: B=128: TR 86.8, Hybrid 88.1, SGD 86.7 %; drops 0.35 vs 6.97",
        _gap_grows,
        needs=("sgd-m", "hybrid-tr-sgd"),
    ),
    Claim(
        "fig3-small-batch",
        "TR is worse than SGD for small batches (below 128)",
        "Fig 3",
        _small_batch,
        needs=("sgd-m", "efficient-tr"),
    ),
    _track_claim("track 1"),
    _track_claim("track 2"),
    Claim(
        "tr-cost",
        "TR costs about 3× (2–3×) SGD's time per epoch",
        "Fig 2 (VGG16, B=512)",
        _cost,
        needs=("sgd-m", "efficient-tr"),
    ),
)


# --------------------------------------------------------------------------- report
def sections(ctx: Context) -> list[Section]:
    out = []
    acc, epochs = _acc(ctx), _acc(ctx, "epochs")
    bs = list(_batch_sizes(ctx))
    rows = []
    for b in bs:
        paper = FIG3.get(b)
        rows.append(
            [
                b,
                *(
                    f"{fmt(acc.get((b, m)), '.2f')} ({fmt(epochs.get((b, m)), '.2g')} ep.)"
                    for m in ("SGD", "TR", "Hybrid")
                ),
                "—" if paper is None else f"TR {paper[0]}, Hybrid {paper[1]}, SGD {paper[2]}",
            ]
        )
    series = [
        Series(m, [b for b in bs if (b, m) in acc], [acc[(b, m)] for b in bs if (b, m) in acc])
        for m in ("SGD", "TR", "Hybrid")
    ]
    plots: tuple[Any, ...] = ()
    if any(s.x for s in series):
        plots = (
            plot_panels(
                ctx.plots / "fig3-batch-size.png",
                "Fig 3: best test accuracy against batch size",
                [Panel("batch size", "best test accuracy (%)", series, logy=False, logx=True)],
            ),
        )
    out.append(
        Section(
            "Fig 3: test accuracy against batch size",
            "Best test accuracy (%) over the run's evaluations (mean over seeds), with the epochs "
            "each run completed (a time cap can stop the slower runs early).\n\n"
            + markdown_table(["B", "SGD", "TR", "Hybrid", "paper (VGG16 / CIFAR-10)"], rows),
            plots,
        )
    )
    track_rows, panels = [], []
    for name, task in _tracks(ctx).items():
        try:
            recs = ctx.stage_records(task)
        except MissingResult:
            continue
        xs: list[float] = []
        ys: list[float] = []
        bounds: list[float] = []
        offset = 0.0
        for r in recs:
            xs += [offset + e.epoch for e in r.epochs]
            ys += [e.test_metric for e in r.epochs]
            offset += r.epochs[-1].epoch
            bounds.append(offset)
        track_rows.append(
            [
                name,
                *(f"{r.extra.get('stage_label')} {_stage_acc(r):.2f}" for r in recs),
                " → ".join(map(str, TABLE_1[name])),
            ]
        )
        panels.append(
            Panel(
                "epoch",
                "test error (%)",
                [Series(name, xs, ys)],
                logy=False,
                vlines=bounds[:-1],
                title=name,
            )
        )
    if track_rows:
        plot = plot_panels(ctx.plots / "table1-tracks.png", "Table 1 tracks", panels)
        out.append(
            Section(
                "Table 1: SGD / TR tracks",
                "Test accuracy (%) at the end of each stage.\n\n"
                + markdown_table(
                    ["track", "stage I", "stage II", "stage III", "paper"], track_rows
                ),
                (plot,),
            )
        )
    return out


def notes(ctx: Context) -> list[str]:
    data_text = "CIFAR-10 (--data-root)" if ctx.options.data_root else "Fashion-MNIST"
    out = [
        "VGG16 → a 4-conv VGG-style CNN (BN, SReLU, average pooling, N(0, 0.02) init) on "
        f"{data_text}.",
        "Accuracy = the best test accuracy over the evaluations (epoch ends), as in the paper's "
        "Fig 3.",
    ]
    if ctx.scale == "quick":
        out += [
            "quick: 3 epochs per (method, batch size), at most 45 s each, 1 seed (paper: 5 runs).",
            "Tracks at quick scale: n = 1 epoch (stages 1–2–1 epochs), B = 512 instead of 2048 "
            "(a 10,000-image subset has 5 steps per epoch at 2048), ≤ 15 s per epoch.",
        ]
    return out


def data(ctx: Context) -> list[DataNeed]:
    return [] if ctx.scale == "smoke" else data_needs([_problem(ctx)])


EXPERIMENT = Experiment(
    name="efficient-tr",
    title="Efficient trust region (seed 003): batch-size sweep and SGD/TR tracks",
    paper="Liu, Lee & Hsieh, an efficient trust-region method for large-batch training, seed 003",
    plan=plan,
    claims=CLAIMS,
    sections=sections,
    notes=notes,
    data=data,
)
