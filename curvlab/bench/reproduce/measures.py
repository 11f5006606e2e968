"""Numbers read off `RunRecord`s for tables and verdicts (pure functions, no plotting)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from curvlab.bench.records import EpochRecord, RunRecord

__all__ = [
    "Axis",
    "accuracy",
    "approx",
    "backprops_per_step",
    "best_accuracy",
    "common_end",
    "curve",
    "final_train_loss",
    "finite",
    "fmt",
    "fmt_mean_std",
    "loss_at",
    "mean_std",
    "min_test_loss",
    "min_train_loss",
    "neg_best_accuracy",
    "spearman",
]

Axis = Literal["epoch", "wall_time", "step", "backprops"]


def finite(values: Iterable[float | None]) -> list[float]:
    """The finite values."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; std 0 for one value, NaN mean
    for none."""
    vals = finite(values)
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(value: float | None, spec: str = ".4g") -> str:
    """``value`` formatted, "—" for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def fmt_mean_std(values: Sequence[float | None], spec: str = ".4g") -> str:
    """ "m ± s (n)" over seeds, or one value."""
    m, s = mean_std(values)
    n = len(finite(values))
    if n <= 1:
        return fmt(m, spec)
    return f"{fmt(m, spec)} ± {fmt(s, '.2g')} (n={n})"


def final_train_loss(rec: RunRecord) -> float:
    """Full-training-set loss at the end of the run."""
    return float(rec.summary.get("final_train_loss", math.nan) or math.nan)


def min_train_loss(rec: RunRecord) -> float:
    """The lowest full-training-set loss among the evaluations (thesis ch.2's selection)."""
    vals = finite(e.train_loss for e in rec.epochs)
    return min(vals) if vals else math.nan


def min_test_loss(rec: RunRecord) -> float:
    """The lowest test loss among the evaluations (problems whose metric is the test loss)."""
    vals = finite(e.test_metric for e in rec.epochs)
    return min(vals) if vals else math.nan


def accuracy(e: EpochRecord) -> float:
    """Test accuracy in % of an evaluation of a ``test_error`` problem."""
    return 100.0 - e.test_metric


def best_accuracy(rec: RunRecord) -> float:
    """The highest test accuracy (%) over the evaluations (seed 003: each run's max)."""
    vals = finite(accuracy(e) for e in rec.epochs[1:] or rec.epochs)
    return max(vals) if vals else math.nan


def neg_best_accuracy(rec: RunRecord) -> float:
    """``-best_accuracy``: a grid-search criterion (smaller is better)."""
    return -best_accuracy(rec)


def backprops_per_step(rec: RunRecord, mode: Literal["code", "raw"] = "code") -> list[float]:
    """Backpropagations of every step (seed 002 §5's "number of backpropagations", counted as
    its released code does).

    ``code``: a step of a method with a Krylov solver counts its solver iterations (at least 1),
    any other step 1 (the released code's counter; batch size not normalised). ``raw``: 1
    gradient plus the reported curvature products (``curvature_products`` / ``hvp_products`` /
    ``matvecs``).
    """
    n = len(rec.step_loss)
    info = rec.step_info or []
    if not info:
        return [1.0] * n
    out = []
    for i in range(n):
        step: dict[str, Any] = info[i] if i < len(info) else {}
        if mode == "code":
            iters = step.get("solver_iterations")
            out.append(float(max(1, int(iters))) if isinstance(iters, int | float) else 1.0)
        else:
            products = 0.0
            for key in ("curvature_products", "hvp_products", "matvecs"):
                value = step.get(key)
                if isinstance(value, int | float):
                    products = float(value)
                    break
            out.append(1.0 + products)
    return out


def curve(
    rec: RunRecord,
    x: Axis,
    y: Callable[[EpochRecord], float] = lambda e: e.train_loss,
    mode: Literal["code", "raw"] = "code",
) -> tuple[list[float], list[float]]:
    """(x values, y values) at the record's evaluations; ``x="backprops"`` counts
    `backprops_per_step` up to each evaluation."""
    ys = [y(e) for e in rec.epochs]
    if x == "backprops":
        per_step = backprops_per_step(rec, mode)
        cumulative = [0.0]
        for b in per_step:
            cumulative.append(cumulative[-1] + b)
        xs = [cumulative[min(e.step, len(per_step))] for e in rec.epochs]
    else:
        xs = [float(getattr(e, x)) for e in rec.epochs]
    return xs, ys


def loss_at(
    rec: RunRecord,
    x: Axis,
    at: float,
    y: Callable[[EpochRecord], float] = lambda e: e.train_loss,
) -> float:
    """The last evaluated value with ``x ≤ at`` (a step function of the evaluations)."""
    xs, ys = curve(rec, x, y)
    value = math.nan
    for xv, yv in zip(xs, ys, strict=True):
        if xv <= at + 1e-12:
            value = yv
    return value


def common_end(records: Sequence[RunRecord], x: Axis) -> float:
    """The largest ``x`` that every record reached (equal-budget comparisons)."""
    return min(curve(r, x)[0][-1] for r in records)


def approx(a: float, b: float, sa: float = 0.0, sb: float = 0.0, rel: float = 0.005) -> bool:
    """``a ≈ b``: within ``rel`` of ``|b|`` or within the sum of the seed deviations."""
    return abs(a - b) <= max(rel * abs(b), sa + sb)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN for fewer than 2 points or a constant input)."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx > 0 and vy > 0 else math.nan
