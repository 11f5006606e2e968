"""Running an experiment: what is missing of it, within its time limit, then its report.

`execute` is what ``curvlab reproduce NAME`` does for one experiment. It sits above
`curvlab.bench.reproduce.framework` (the experiments, their tasks and claims) and
`curvlab.bench.reproduce.report` (which renders them): the report imports the framework, and
the framework imports neither.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from curvlab.bench.reproduce.framework import (
    Context,
    DatasetMissing,
    Experiment,
    Options,
    pending_tasks,
    plan_summary,
)
from curvlab.bench.reproduce.problems import register
from curvlab.bench.reproduce.report import write_report

__all__ = ["BudgetTooSmall", "TimeLimitReached", "execute"]


class BudgetTooSmall(RuntimeError):
    """The estimated time of the remaining runs exceeds the time limit."""


class TimeLimitReached(RuntimeError):
    """The time limit ran out before every run finished (finished runs are kept)."""


def _check_data(ctx: Context) -> None:
    for need in ctx.experiment.data(ctx):
        try:
            need.load()
        except FileNotFoundError as err:
            raise DatasetMissing(
                f"{ctx.experiment.name}: data set {need.name} is needed at scale "
                f"{ctx.scale!r} but is not available: {err}"
            ) from None


def _format_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def execute(
    experiment: Experiment, options: Options, log: Callable[[str], None] | None = None
) -> Context:
    """Run what is missing of ``experiment`` at ``options.scale`` and write its report.

    Raises:
        DatasetMissing: a needed data set is not installed (before anything runs).
        BudgetTooSmall: the estimate of the remaining runs exceeds the time limit (before
            anything runs).
        TimeLimitReached: the limit ran out mid-way; finished runs are kept, the report is
            written from them, and a rerun resumes.
    """
    say = log or (lambda text: print(text, file=sys.stderr))
    register()
    ctx = Context(experiment, options)
    if options.report_only:
        write_report(ctx)
        return ctx
    _check_data(ctx)
    if options.threads is not None:
        torch.set_num_threads(options.threads)  # measurements too, not only bench runs
    _, estimate = plan_summary(ctx)
    limit = options.limit_s
    if options.dry_run:
        return ctx
    if limit is not None and estimate > limit:
        raise BudgetTooSmall(
            f"{experiment.name}: the {ctx.scale} runs still to do need about "
            f"{_format_s(estimate)}, more than the time limit of {_format_s(limit)}. Raise "
            "--time-limit, use fewer --seeds, or a smaller --scale."
        )
    start = time.monotonic()
    done_keys: set[str] = set()
    while True:
        pending, _ = pending_tasks(ctx, experiment.plan(ctx))
        runnable = [t for t in pending if not t.provisional and t.key not in done_keys]
        if not runnable:
            break
        for task in runnable:
            elapsed = time.monotonic() - start
            if limit is not None and elapsed > limit:
                write_report(ctx)
                raise TimeLimitReached(
                    f"{experiment.name}: time limit of {_format_s(limit)} reached after "
                    f"{_format_s(elapsed)}; finished runs are kept under {ctx.records}. Rerun "
                    "the same command to resume."
                )
            say(f"[{experiment.name}] {task.key}")
            try:
                task.execute(ctx)
            except (ValueError, RuntimeError) as err:
                ctx.failed[task.key] = f"{type(err).__name__}: {err}"
                say(f"[{experiment.name}] {task.key} failed: {err}")
            done_keys.add(task.key)
    write_report(ctx)
    return ctx
