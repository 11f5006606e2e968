"""The curvlab benchmark lab: problems × optimizers × budgets → JSON records → reports.

A package and the ``curvlab`` CLI, never part of pytest (only a smoke test runs it there).
Nothing in the library imports this package.

* `problems.PROBLEMS`: models, losses and local/synthetic data sets;
* `specs.OPTIMIZERS`, `specs.PRESETS`: how to build each optimizer, its paper, tuned values;
* `runner.run`: one timed run → `records.RunRecord` (JSON on disk);
* `report.write_report`: Markdown table and PNG plots from a records directory;
* `cost`: what a step or a product costs (``curvlab overhead | products | smw-cost``);
* `reproduce`: reruns of the papers' experiments with a verdict per claim;
* `cli.main`: the ``curvlab`` command (``list``, ``bench``, ``report``, ``compare`` and the
  commands of `cost` and `reproduce`).
"""

from __future__ import annotations

from curvlab.bench.problems import PROBLEMS, Problem, ProblemData, get_problem
from curvlab.bench.records import EpochRecord, RunRecord, load_record, load_records
from curvlab.bench.registry import UnknownNameError
from curvlab.bench.report import write_report
from curvlab.bench.runner import Budget, run
from curvlab.bench.specs import (
    OPTIMIZERS,
    PRESETS,
    OptimizerSpec,
    Preset,
    get_optimizer,
    get_preset,
)

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "PROBLEMS",
    "Budget",
    "EpochRecord",
    "OptimizerSpec",
    "Preset",
    "Problem",
    "ProblemData",
    "RunRecord",
    "UnknownNameError",
    "get_optimizer",
    "get_preset",
    "get_problem",
    "load_record",
    "load_records",
    "run",
    "write_report",
]
