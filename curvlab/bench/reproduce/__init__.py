"""``curvlab reproduce NAME``: rerun a paper's experiments at a scale the machine can finish,
and write a report that puts our numbers next to the paper's with a verdict per claim.

NAMEs (`EXPERIMENTS`): ``edf`` (seed 000), ``tso-alra`` (001), ``adaptive-norms`` (002),
``efficient-tr`` (003), ``thesis-ch2`` … ``thesis-ch5`` (004). See
`curvlab.bench.reproduce.framework` for how experiments, scales, resume and verdicts work.
The CLI entry points are `add_reproduce_parser` and `run_reproduce_command`.
"""

from __future__ import annotations

from curvlab.bench.reproduce.cli import (
    EXPERIMENTS,
    add_reproduce_parser,
    get_experiment,
    run_reproduce_command,
)
from curvlab.bench.reproduce.execution import execute
from curvlab.bench.reproduce.framework import (
    SCALES,
    Claim,
    Context,
    Experiment,
    Options,
    Verdict,
)
from curvlab.bench.reproduce.problems import register

__all__ = [
    "EXPERIMENTS",
    "SCALES",
    "Claim",
    "Context",
    "Experiment",
    "Options",
    "Verdict",
    "add_reproduce_parser",
    "execute",
    "get_experiment",
    "register",
    "run_reproduce_command",
]
