"""Pieces shared by the experiment modules: method comparisons on several problems, their
tables and plots, and ordering checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from curvlab.bench.problems import Problem
from curvlab.bench.records import RunRecord
from curvlab.bench.reproduce.framework import (
    Comparison,
    Context,
    Criterion,
    DataNeed,
    Method,
    MissingResult,
    Task,
    comparison,
)
from curvlab.bench.reproduce.measures import approx, fmt, mean_std
from curvlab.bench.runner import Budget

__all__ = ["Grid", "Relation", "check_chain", "comparisons", "data_needs", "hp_text", "means"]


@dataclass(frozen=True)
class Grid:
    """The comparisons of one table: every method on every problem."""

    group: str
    problems: Mapping[str, Problem]
    runs: Mapping[tuple[str, str], Comparison]  # (problem key, method name) → comparison

    def tasks(self) -> list[Task]:
        return [t for comp in self.runs.values() for t in comp.tasks]

    def records(self, ctx: Context, problem: str, method: str) -> list[RunRecord]:
        """The final records (all seeds) of ``method`` on ``problem``."""
        comp = self.runs.get((problem, method))
        if comp is None:
            raise MissingResult(f"{method} on {problem} is not part of {self.group}")
        if not ctx.available(comp.method.optimizer):
            raise MissingResult(
                f"{method}: method not implemented (no bench optimizer {comp.method.optimizer!r})"
            )
        return ctx.records_of(comp.finals)

    def available_records(self, ctx: Context, problem: str) -> dict[str, list[RunRecord]]:
        """{method: final records} of the methods whose runs all exist."""
        out = {}
        for (p, m), _ in self.runs.items():
            if p != problem:
                continue
            try:
                out[m] = self.records(ctx, p, m)
            except MissingResult:
                continue
        return out


def comparisons(
    ctx: Context,
    group: str,
    problems: Mapping[str, Problem],
    methods: Callable[[str], Sequence[Method]],
    *,
    seeds: Sequence[int],
    budget: Budget,
    criterion: Criterion,
    search_budget: Budget | None = None,
) -> Grid:
    """`comparison` of ``methods(problem key)`` on every problem."""
    runs: dict[tuple[str, str], Comparison] = {}
    for key, problem in problems.items():
        for method in methods(key):
            runs[(key, method.name)] = comparison(
                ctx,
                group,
                problem,
                method,
                seeds=seeds,
                budget=budget,
                criterion=criterion,
                search_budget=search_budget,
            )
    return Grid(group, problems, runs)


def data_needs(problems: Sequence[Problem]) -> list[DataNeed]:
    """A `DataNeed` per distinct data source of ``problems``."""
    seen: dict[str, DataNeed] = {}
    for p in problems:
        seen.setdefault(p.data_source, DataNeed(p.data_source, p.load_dataset))
    return list(seen.values())


def means(
    records: Mapping[str, Sequence[RunRecord]], value: Callable[[RunRecord], float]
) -> dict[str, tuple[float, float]]:
    """{method: (mean, std)} of ``value`` over each method's seeds."""
    return {m: mean_std(value(r) for r in rs) for m, rs in records.items()}


def hp_text(comp: Comparison, keys: Sequence[str] = ("lr", "damping", "eps")) -> str:
    """The hyperparameters the final runs used (the selected grid point marked)."""
    if not comp.finals:
        return "—"
    hp = comp.finals[0].hparams
    parts = [
        f"{k}={hp[k]:g}" if isinstance(hp[k], float) else f"{k}={hp[k]}" for k in keys if k in hp
    ]
    text = ", ".join(parts)
    if comp.search:
        text += " (grid)" if comp.selected is not None else " (grid running)"
    return text or "defaults"


Relation = tuple[str, str, str]  # (left method, "≈" | "≤" | "<", right method)


def check_chain(
    values: Mapping[str, tuple[float, float]], chain: Sequence[Relation], rel: float = 0.01
) -> tuple[bool, list[str]]:
    """Whether every relation of ``chain`` holds on (mean, std) values; and the failures.

    ``a ≈ b``: `approx` (within ``rel`` or the sum of the seed deviations); ``a ≤ b``:
    ``a ≤ b`` or ``a ≈ b``; ``a < b``: strictly smaller mean.
    """
    failures = []
    for a, op, b in chain:
        if a not in values or b not in values:
            raise MissingResult(f"{a if a not in values else b} has no runs")
        (ma, sa), (mb, sb) = values[a], values[b]
        close = approx(ma, mb, sa, sb, rel)
        ok = close if op == "≈" else (ma <= mb or close) if op == "≤" else ma < mb
        if not ok:
            failures.append(f"{a} {fmt(ma)} {op} {b} {fmt(mb)} fails")
    return not failures, failures
