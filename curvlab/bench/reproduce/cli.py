"""``curvlab reproduce``: the command line of the reproductions.

Wiring into ``curvlab/bench/cli.py``: call ``add_reproduce_parser(sub)`` in ``_parser()`` and
map ``"reproduce"`` to ``run_reproduce_command`` in ``_COMMANDS``. The command returns its own
exit code and prints its own messages:

* 0: every requested experiment finished and its report is written (``--dry-run``: the plan);
* 1: a needed data set is missing, the time limit is too small for the runs still to do, or it
  ran out mid-way (finished runs are kept; the same command resumes), or a run failed;
* 2: a usage error (unknown NAME, no NAME and no ``--all``, a bad option value).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvlab.bench.registry import UnknownNameError, lookup
from curvlab.bench.reproduce import (
    adaptive_norms,
    edf,
    efficient_tr,
    thesis_ch2,
    thesis_ch3,
    thesis_ch4,
    thesis_ch5,
    tso_alra,
)
from curvlab.bench.reproduce.execution import BudgetTooSmall, TimeLimitReached, execute
from curvlab.bench.reproduce.framework import (
    SCALES,
    Context,
    DatasetMissing,
    Experiment,
    Options,
    plan_summary,
)
from curvlab.bench.reproduce.problems import register

__all__ = ["EXPERIMENTS", "add_reproduce_parser", "get_experiment", "main", "run_reproduce_command"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        edf.EXPERIMENT,
        tso_alra.EXPERIMENT,
        adaptive_norms.EXPERIMENT,
        efficient_tr.EXPERIMENT,
        thesis_ch2.EXPERIMENT,
        thesis_ch3.EXPERIMENT,
        thesis_ch4.EXPERIMENT,
        thesis_ch5.EXPERIMENT,
    )
}


def get_experiment(name: str) -> Experiment:
    """The experiment ``name``; `UnknownNameError` lists the valid names."""
    return lookup(EXPERIMENTS, name, "experiment")


def add_reproduce_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``reproduce`` sub-command to ``sub`` (an argparse sub-parsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "reproduce",
        help="rerun a paper's experiments and write a report with verdicts",
        description="Rerun a paper's experiments at a scale this machine finishes and write "
        "OUT/NAME/report.md (our numbers next to the paper's, a verdict per claim, PNG plots). "
        "An interrupted run resumes from its records. NAMEs: " + ", ".join(EXPERIMENTS),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run")
    p.add_argument("--all", action="store_true", help="every experiment, one after the other")
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="quick",
        help="smoke (seconds, generated data), quick (default: ≤ 30 min per NAME on 2 cores), "
        "full (the papers' sizes)",
    )
    p.add_argument("--out", default="docs/results", help="results root (default docs/results)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: per experiment)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(T) for every run")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument(
        "--data-root",
        help="directory with local copies of optional data sets (CIFAR-10: "
        "cifar-10-batches-py/); used instead of Fashion-MNIST by the CNN experiments",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="wall-clock limit per NAME (default: 30 for quick, 5 for smoke, none for full; "
        "'inf' for none)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from existing records"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


class _Usage(Exception):
    pass


def _options(args: argparse.Namespace) -> Options:
    if args.seeds is not None and args.seeds < 1:
        raise _Usage(f"--seeds: must be at least 1, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        raise _Usage(f"--threads: must be at least 1, got {args.threads}")
    limit: float | None = None
    if args.time_limit is not None:
        if math.isnan(args.time_limit) or args.time_limit <= 0:
            raise _Usage(
                f"--time-limit: must be a positive number of minutes, got {args.time_limit}"
            )
        limit = args.time_limit * 60.0
    data_root = None
    if args.data_root:
        data_root = Path(args.data_root).expanduser()
        if not data_root.is_dir():
            raise DatasetMissing(f"--data-root: {data_root} is not a directory")
    return Options(
        scale=args.scale,
        out=Path(args.out),
        seeds=args.seeds,
        threads=args.threads,
        device=args.device,
        data_root=data_root,
        time_limit_s=limit,
        progress=not args.no_progress,
        dry_run=args.dry_run,
        report_only=args.report_only,
    )


def _selected(args: argparse.Namespace) -> list[Experiment]:
    if args.all and args.names:
        raise _Usage("give NAMEs or --all, not both")
    if args.all:
        return list(EXPERIMENTS.values())
    if not args.names:
        raise _Usage("give a NAME or --all; valid names: " + ", ".join(EXPERIMENTS))
    return [get_experiment(n) for n in dict.fromkeys(args.names)]


def _print_plan(exp: Experiment, options: Options) -> None:
    register()
    ctx = Context(exp, options)
    tasks, remaining = plan_summary(ctx)
    print(f"{exp.name} ({options.scale}): {len(tasks)} tasks")
    for t in tasks:
        state = (
            "skipped: " + ctx.skipped[t.key]
            if t.key in ctx.skipped
            else "done"
            if t.done(ctx)
            else "after the grid search"
            if t.provisional
            else f"to run, ~{t.estimate_s:.0f} s"
        )
        print(f"  {t.key}: {state}")
    limit = options.limit_s
    print(
        f"  estimated time still to run: {remaining / 60:.1f} min"
        + (f" (limit {limit / 60:.0f} min)" if limit is not None else "")
    )
    if any(not t.done(ctx) and t.key not in ctx.skipped and t.estimate_s > 0 for t in tasks) and (
        options.scale == "full"
    ):
        print(
            "  (full-scale runs have no time caps: they are estimated at 2 s per epoch or "
            "0.05 s per step, a rough lower bound)"
        )


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Run the parsed ``reproduce`` command; returns the exit code (see the module doc)."""
    try:
        experiments = _selected(args)
        options = _options(args)
    except (UnknownNameError, _Usage) as err:
        print(f"curvlab reproduce: {err}", file=sys.stderr)
        return 2
    except DatasetMissing as err:
        print(f"curvlab reproduce: {err}", file=sys.stderr)
        return 1
    code = 0
    for exp in experiments:
        try:
            if options.dry_run:
                _print_plan(exp, options)
                continue
            ctx = execute(exp, options)
        except (DatasetMissing, BudgetTooSmall, TimeLimitReached) as err:
            print(f"curvlab reproduce: {err}", file=sys.stderr)
            code = 1
            continue
        report = ctx.root / "report.md"
        if ctx.failed:
            print(
                f"curvlab reproduce: {exp.name}: {len(ctx.failed)} run(s) failed; see {report}",
                file=sys.stderr,
            )
            code = 1
        print(report)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curvlab.bench.reproduce.cli``: the ``reproduce`` command alone."""
    parser = argparse.ArgumentParser(prog="curvlab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(sub)
    try:
        args = parser.parse_args(["reproduce", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    return run_reproduce_command(args)


if __name__ == "__main__":
    sys.exit(main())
