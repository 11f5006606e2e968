"""The machinery of ``curvlab reproduce``: experiments as lists of runs, claims and verdicts.

An `Experiment` reruns one paper's experiments. It is declarative:

* ``plan(ctx)`` lists `Task`s: `RunTask` (one bench run through `curvlab.bench.runner.run`,
  saved as a `RunRecord`), `StagedTask` (runs chained by their weights, e.g. seed 003's
  SGD → TR → SGD tracks) and `FunctionTask` (a measurement that is not a training run, e.g.
  the cosine similarities of thesis Fig 4.1). ``plan`` is called again after every pass, so a
  task may depend on the results of others (hyperparameters picked by a grid search: until the
  search is finished such a task is *provisional*, counted in the time estimate but not run).
* ``claims``: `Claim`s, each with the paper's statement and numbers and a ``check(ctx)`` that
  computes a `Verdict` (held / not held / not testable here) from the measured records only.
* ``sections(ctx)``: the report's tables (our numbers next to the paper's) and plots.

Scales (`SCALES`): ``smoke`` (generated data, a few steps: seconds, for tests), ``quick``
(the default: Fashion-MNIST subsets and generated CURVES, at most 30 minutes per experiment
on a 2-core CPU) and ``full`` (the papers' sizes, for a bigger machine). Every experiment
module picks its sizes per scale with `pick`.

Resume: every finished task writes one JSON file under ``OUT/NAME/records/SCALE/`` with a
fingerprint of what it ran (problem and data sizes, optimizer, hyperparameters, seed, budget).
A rerun skips tasks whose file exists, parses and carries the same fingerprint, so an
interrupted reproduction continues where it stopped. Writes are atomic (temporary file, then
rename), so an interruption never leaves a half-written record that looks complete. The unit
of resumption is one run (or one stage of a `StagedTask`): a run interrupted midway starts again
from its beginning.

Methods that are not registered in `curvlab.bench.specs.OPTIMIZERS` (yet) are skipped: their
tasks are listed as not run and the claims that need them read "not testable here: method …
not implemented".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from curvlab.bench.problems import Problem
from curvlab.bench.records import RunRecord, to_jsonable
from curvlab.bench.runner import Budget, run
from curvlab.bench.specs import OPTIMIZERS

__all__ = [
    "DEFAULT_TIME_LIMIT_S",
    "SCALES",
    "Claim",
    "Comparison",
    "Context",
    "Criterion",
    "DataNeed",
    "DatasetMissing",
    "Experiment",
    "FunctionTask",
    "Method",
    "MissingResult",
    "Options",
    "RunTask",
    "ScaleName",
    "Section",
    "Stage",
    "StagedTask",
    "Task",
    "Verdict",
    "comparison",
    "estimate_run",
    "evaluate_claims",
    "held_if",
    "lr_factors",
    "not_testable",
    "pending_tasks",
    "pick",
    "plan_summary",
    "slug",
]

ScaleName = Literal["smoke", "quick", "full"]
SCALES: tuple[ScaleName, ...] = ("smoke", "quick", "full")

#: Default wall-clock limit per experiment (seconds): quick is the 30 minutes a reproduction may
#: take on a 2-core CPU; smoke is for tests; full has no limit.
DEFAULT_TIME_LIMIT_S: dict[str, float | None] = {"smoke": 300.0, "quick": 1800.0, "full": None}

Status = Literal["held", "not held", "not testable"]


def pick(scale: str, *, smoke: Any, quick: Any, full: Any) -> Any:
    """The value for ``scale``."""
    values = {"smoke": smoke, "quick": quick, "full": full}
    return values[scale]


def slug(text: str) -> str:
    """``text`` made safe as one path component (letters, digits, ``.-_=+`` kept)."""
    out = re.sub(r"[^A-Za-z0-9.=+_-]+", "-", text).strip("-")
    return out or "x"


def _fingerprint(payload: Mapping[str, Any]) -> str:
    text = json.dumps(to_jsonable(dict(payload)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(dict(data)), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- errors
class MissingResult(LookupError):
    """A claim or section needs a result that does not exist (not run, interrupted, skipped)."""


class DatasetMissing(FileNotFoundError):
    """A data set the experiment needs is not installed (nothing is downloaded)."""


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    """What the command line chose.

    Attributes:
        scale: ``smoke``, ``quick`` or ``full``.
        out: results root; an experiment writes ``out/NAME/``.
        seeds: number of seeds (overrides each experiment's default for the scale).
        threads: ``torch.set_num_threads`` for every run.
        device: ``cpu``, ``cuda`` or ``auto``.
        data_root: a directory with local copies of optional data sets (CIFAR-10/100, SVHN).
        time_limit_s: wall-clock limit per experiment; None: the scale's default
            (`DEFAULT_TIME_LIMIT_S`); ``math.inf``: none.
        progress: progress bars on stderr.
        dry_run: list the plan and its time estimate, run nothing.
        report_only: rewrite the report from the existing records, run nothing.
    """

    scale: ScaleName = "quick"
    out: Path = Path("docs/results")
    seeds: int | None = None
    threads: int | None = None
    device: str = "cpu"
    data_root: Path | None = None
    time_limit_s: float | None = None
    progress: bool = False
    dry_run: bool = False
    report_only: bool = False

    @property
    def limit_s(self) -> float | None:
        """The effective time limit (None: unlimited)."""
        limit = DEFAULT_TIME_LIMIT_S[self.scale] if self.time_limit_s is None else self.time_limit_s
        return None if limit is None or math.isinf(limit) else limit


# --------------------------------------------------------------------------- context
class Context:
    """One experiment at one scale: options, where its files go, and access to its results."""

    def __init__(self, experiment: Experiment, options: Options) -> None:
        self.experiment = experiment
        self.options = options
        self.scale: ScaleName = options.scale
        self.root = Path(options.out) / experiment.name
        self.records = self.root / "records" / options.scale
        self.plots = self.root / "plots"
        self.skipped: dict[str, str] = {}  # task key → why it was not run
        self.failed: dict[str, str] = {}  # task key → error
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}

    # ------------------------------------------------------------------ choices
    def seeds(self, smoke: int, quick: int, full: int) -> list[int]:
        """Seeds 0…n−1: ``--seeds`` if given, else the experiment's default for the scale."""
        n = self.options.seeds or pick(self.scale, smoke=smoke, quick=quick, full=full)
        return list(range(int(n)))

    def pick(self, *, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for this context's scale."""
        return pick(self.scale, smoke=smoke, quick=quick, full=full)

    @staticmethod
    def available(optimizer: str) -> bool:
        """Whether the bench registry has the optimizer ``optimizer``."""
        return optimizer in OPTIMIZERS

    # ------------------------------------------------------------------ results
    def path(self, key: str) -> Path:
        """The result file of task ``key``."""
        return self.records / f"{key}.json"

    def stored(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored result of task ``key`` if it is complete and has ``fingerprint``."""
        data = self._load(key)
        if data is None or data.get("fingerprint") != fingerprint or not data.get("complete"):
            return None
        return data

    def _load(self, key: str) -> dict[str, Any] | None:
        """The parsed file of ``key``, cached while its modification time and size hold."""
        path = self.path(key)
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        data = _read_json(path)
        if data is not None:
            self._cache[key] = (stamp, data)
        return data

    def record(self, task: RunTask) -> RunRecord | None:
        """The finished record of ``task``, or None."""
        data = self.stored(task.key, task.fingerprint())
        return None if data is None else RunRecord.from_dict(data["record"])

    def records_of(self, tasks: Sequence[RunTask]) -> list[RunRecord]:
        """The finished records among ``tasks``; `MissingResult` if any is missing."""
        out: list[RunRecord] = []
        for task in tasks:
            rec = self.record(task)
            if rec is None:
                raise MissingResult(f"run {task.key} has no record ({self._why(task.key)})")
            out.append(rec)
        return out

    def result(self, task: FunctionTask) -> dict[str, Any]:
        """The stored result of a `FunctionTask`; `MissingResult` if it has none."""
        data = self.stored(task.key, task.fingerprint())
        if data is None:
            raise MissingResult(f"measurement {task.key} has no result ({self._why(task.key)})")
        result: dict[str, Any] = data["result"]
        return result

    def stage_records(self, task: StagedTask) -> list[RunRecord]:
        """The records of a `StagedTask`'s stages; `MissingResult` if any is missing."""
        out = []
        for i in range(len(task.stages)):
            data = self.stored(task.stage_key(i), task.stage_fingerprint(i))
            if data is None:
                raise MissingResult(f"stage {i + 1} of {task.key} has no record")
            out.append(RunRecord.from_dict(data["record"]))
        return out

    def _why(self, key: str) -> str:
        if key in self.skipped:
            return self.skipped[key]
        if key in self.failed:
            return "failed: " + self.failed[key]
        return "not run yet"


# --------------------------------------------------------------------------- tasks
class Task(Protocol):
    """Something an experiment runs once per fingerprint and stores as JSON."""

    @property
    def key(self) -> str: ...

    @property
    def estimate_s(self) -> float: ...

    @property
    def provisional(self) -> bool: ...

    def fingerprint(self) -> str: ...

    def needs(self) -> tuple[str, ...]: ...

    def done(self, ctx: Context) -> bool: ...

    def execute(self, ctx: Context) -> None: ...


def estimate_run(
    budget: Budget,
    *,
    per_step_s: float = 0.05,
    per_epoch_s: float = 2.0,
    overhead_s: float = 2.0,
) -> float:
    """A conservative wall-clock estimate of one run: its time cap plus evaluations, warm
    start and set-up (+25 % and ``overhead_s``); without a cap, steps × ``per_step_s`` or
    epochs × ``per_epoch_s`` (rough: only capped budgets give reliable estimates)."""
    if budget.seconds is not None:
        return 1.25 * budget.seconds + overhead_s
    guesses = []
    if budget.steps is not None:
        guesses.append(budget.steps * per_step_s)
    if budget.epochs is not None:
        guesses.append(budget.epochs * per_epoch_s)
    return min(guesses) + overhead_s


WARM_START_S = 3.0
"""Estimated extra seconds of a run with ``warm_start`` (one statistics pass over the data)."""


def _with_warm_start(estimate: float, hparams: Mapping[str, Any]) -> float:
    return estimate + (WARM_START_S if hparams.get("warm_start") else 0.0)


def _needs(optimizer: str, hparams: Mapping[str, Any]) -> tuple[str, ...]:
    """The bench optimizers a run needs (a ``multistep`` wrapper needs its ``base`` too)."""
    base = hparams.get("base")
    return (optimizer, str(base)) if isinstance(base, str) else (optimizer,)


def _problem_fingerprint(problem: Problem) -> dict[str, Any]:
    return {
        "name": problem.name,
        "data": problem.data_source,
        "batch_size": problem.batch_size,
        "metric": problem.test_metric,
    }


@dataclass(frozen=True)
class RunTask:
    """One bench run: ``problem`` × ``optimizer`` × ``hparams`` × ``seed`` within ``budget``.

    Attributes:
        key: unique name inside the experiment; the record is ``records/SCALE/<key>.json``.
        label: the method's name in tables and plots (the record's ``label``).
        group: which table / figure it belongs to.
        meta: free annotations (e.g. the grid point of a tuning run).
        provisional: hyperparameters not final yet (a grid search is still running): counted
            in time estimates, never run.
    """

    key: str
    problem: Problem
    optimizer: str
    hparams: Mapping[str, Any]
    seed: int
    budget: Budget
    label: str
    group: str = ""
    estimate_s: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    provisional: bool = False

    def fingerprint(self) -> str:
        return _fingerprint(
            {
                "problem": _problem_fingerprint(self.problem),
                "optimizer": self.optimizer,
                "hparams": dict(self.hparams),
                "seed": self.seed,
                "budget": self.budget.to_dict(),
            }
        )

    def needs(self) -> tuple[str, ...]:
        return _needs(self.optimizer, self.hparams)

    def done(self, ctx: Context) -> bool:
        return ctx.stored(self.key, self.fingerprint()) is not None

    def execute(self, ctx: Context) -> None:
        record = _run(ctx, self.problem, self.optimizer, self.hparams, self.seed, self.budget)
        record = dataclasses.replace(record, label=self.label, extra={"task": self.key})
        _write_json_atomic(
            ctx.path(self.key),
            {
                "fingerprint": self.fingerprint(),
                "complete": True,
                "kind": "run",
                "record": record.to_dict(),
            },
        )


def _run(
    ctx: Context,
    problem: Problem,
    optimizer: str,
    hparams: Mapping[str, Any],
    seed: int,
    budget: Budget,
) -> RunRecord:
    return run(
        problem,
        optimizer,
        dict(hparams),
        seed=seed,
        budget=budget,
        device=ctx.options.device,
        progress=ctx.options.progress,
        threads=ctx.options.threads,
    )


@dataclass(frozen=True)
class Stage:
    """One stage of a `StagedTask`: a method run for ``budget`` from the previous weights."""

    optimizer: str
    hparams: Mapping[str, Any]
    budget: Budget
    label: str


@dataclass(frozen=True)
class StagedTask:
    """Runs chained by their weights: stage i+1 starts from stage i's final parameters with a
    fresh optimizer (seed 003 §4.5: "each stage is warm-started from the last iterate").

    Each stage is stored as its own record (and its final weights as ``<key>/stage<i>.pt``),
    so an interrupted track resumes at the first unfinished stage.
    """

    key: str
    problem: Problem
    stages: tuple[Stage, ...]
    seed: int
    label: str
    group: str = ""
    estimate_s: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    provisional: bool = False

    def stage_key(self, i: int) -> str:
        return f"{self.key}/stage{i + 1}"

    def stage_fingerprint(self, i: int) -> str:
        return _fingerprint(
            {
                "problem": _problem_fingerprint(self.problem),
                "seed": self.seed,
                "stages": [
                    {
                        "optimizer": s.optimizer,
                        "hparams": dict(s.hparams),
                        "budget": s.budget.to_dict(),
                    }
                    for s in self.stages[: i + 1]
                ],
            }
        )

    def fingerprint(self) -> str:
        return self.stage_fingerprint(len(self.stages) - 1)

    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for s in self.stages for n in _needs(s.optimizer, s.hparams)))

    def _weights(self, ctx: Context, i: int) -> Path:
        return ctx.records / self.key / f"stage{i + 1}.pt"

    def done(self, ctx: Context) -> bool:
        return all(
            ctx.stored(self.stage_key(i), self.stage_fingerprint(i)) is not None
            for i in range(len(self.stages))
        )

    def execute(self, ctx: Context) -> None:
        init: dict[str, Any] | None = None
        for i, stage in enumerate(self.stages):
            weights = self._weights(ctx, i)
            stored = ctx.stored(self.stage_key(i), self.stage_fingerprint(i))
            if stored is not None and weights.is_file():
                init = torch.load(weights, map_location="cpu", weights_only=True)
                continue
            holder: list[nn.Module] = []
            problem = _problem_from(self.problem, init, holder)
            record = _run(ctx, problem, stage.optimizer, stage.hparams, self.seed, stage.budget)
            record = dataclasses.replace(
                record,
                problem=self.problem.name,
                label=f"{self.label} · stage {i + 1} {stage.label}",
                extra={"task": self.key, "stage": i + 1, "stage_label": stage.label},
            )
            init = {k: v.detach().cpu().clone() for k, v in holder[-1].state_dict().items()}
            weights.parent.mkdir(parents=True, exist_ok=True)
            tmp = weights.with_name(weights.name + ".tmp")
            torch.save(init, tmp)
            os.replace(tmp, weights)
            _write_json_atomic(
                ctx.path(self.stage_key(i)),
                {
                    "fingerprint": self.stage_fingerprint(i),
                    "complete": True,
                    "kind": "stage",
                    "record": record.to_dict(),
                },
            )


def _problem_from(
    base: Problem, init: Mapping[str, Any] | None, holder: list[nn.Module]
) -> Problem:
    """``base`` whose network starts from ``init`` (if given) and is kept in ``holder``, so
    the trained weights can be read after the runner returns."""

    def build() -> nn.Module:
        model = base.build()
        if init is not None:
            model.load_state_dict(init)
        holder.append(model)
        return model

    return dataclasses.replace(base, build=build)


@dataclass(frozen=True)
class FunctionTask:
    """A measurement that is not a bench run: ``fn(ctx)`` returns a JSON-able dict.

    ``params`` is everything ``fn`` depends on (it goes into the fingerprint); ``requires``
    lists the bench optimizers it uses.
    """

    key: str
    fn: Callable[[Context], dict[str, Any]]
    params: Mapping[str, Any]
    estimate_s: float
    requires: tuple[str, ...] = ()
    group: str = ""
    provisional: bool = False

    def fingerprint(self) -> str:
        return _fingerprint({"fn": self.key, "params": dict(self.params)})

    def needs(self) -> tuple[str, ...]:
        return self.requires

    def done(self, ctx: Context) -> bool:
        return ctx.stored(self.key, self.fingerprint()) is not None

    def execute(self, ctx: Context) -> None:
        result = self.fn(ctx)
        _write_json_atomic(
            ctx.path(self.key),
            {
                "fingerprint": self.fingerprint(),
                "complete": True,
                "kind": "measurement",
                "result": result,
            },
        )


# --------------------------------------------------------------------------- methods, grids
@dataclass(frozen=True)
class Method:
    """A compared method: a bench optimizer with the paper's hyperparameters.

    Attributes:
        name: the paper's name for it (table rows, plot legends).
        optimizer: the bench registry name.
        hparams: the paper's (tuned) values, the runner's keys included (``batch_size``,
            ``warm_start``).
        source: where ``hparams`` come from (table and deviations).
        grid: the paper's search grid (``full`` scale), e.g. ``{"lr": [...], "damping": [...]}``.
        quick_grid: the small grid searched at ``quick`` scale (``smoke`` searches none).
    """

    name: str
    optimizer: str
    hparams: Mapping[str, Any]
    source: str
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    quick_grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def grid_for(self, scale: str) -> dict[str, list[Any]]:
        """The search grid at ``scale`` ({} when the method is not tuned there)."""
        if scale == "full":
            return {k: list(v) for k, v in self.grid.items()}
        if scale == "quick":
            return {k: list(v) for k, v in self.quick_grid.items()}
        return {}


def lr_factors(lr: float, factors: Sequence[float] = (1 / 3, 1.0, 3.0)) -> list[float]:
    """``lr`` times ``factors``, rounded to 3 significant digits (a ×3 grid around a value)."""
    return [float(f"{lr * f:.3g}") for f in factors]


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def _hp_slug(point: Mapping[str, Any]) -> str:
    return slug(",".join(f"{k}={v}" for k, v in point.items()))


Criterion = Callable[[RunRecord], float]
"""A grid-search criterion: smaller is better (negate accuracies)."""


@dataclass(frozen=True)
class Comparison:
    """The tasks of one method in one comparison: grid search (if any), then seeds.

    ``finals`` always lists one task per seed; they are provisional until the search ends.
    ``selected`` is the chosen grid point ({} without a search), ``search`` the grid runs.
    """

    method: Method
    search: tuple[RunTask, ...]
    finals: tuple[RunTask, ...]
    selected: Mapping[str, Any] | None

    @property
    def tasks(self) -> list[RunTask]:
        unique = {t.key: t for t in [*self.search, *self.finals]}
        return list(unique.values())


def comparison(
    ctx: Context,
    group: str,
    problem: Problem,
    method: Method,
    *,
    seeds: Sequence[int],
    budget: Budget,
    criterion: Criterion,
    search_budget: Budget | None = None,
    estimate: Callable[[Budget], float] = estimate_run,
    extra: Mapping[str, Any] | None = None,
) -> Comparison:
    """Grid search at seed 0 with ``search_budget`` (the paper's selection rule is
    ``criterion``), then ``method`` with the selected values for every seed within ``budget``.

    Grid runs whose record is missing leave the final runs provisional. ``extra`` is merged
    into every run's hyperparameters (e.g. a batch size of a sweep).
    """
    grid = method.grid_for(ctx.scale)
    base = {**method.hparams, **(extra or {})}
    prefix = f"{group}/{slug(problem.name)}/{slug(method.name)}"
    search: list[RunTask] = []
    selected: dict[str, Any] | None = {}
    if grid:
        sb = search_budget or budget
        scored: list[tuple[float, dict[str, Any]]] = []
        complete = True
        for point in _grid_points(grid):
            task = RunTask(
                key=f"{prefix}/search/{_hp_slug(point)}",
                problem=problem,
                optimizer=method.optimizer,
                hparams={**base, **point},
                seed=0,
                budget=sb,
                label=method.name,
                group=group,
                estimate_s=_with_warm_start(estimate(sb), base),
                meta={"search": dict(point)},
            )
            search.append(task)
            rec = ctx.record(task) if ctx.available(method.optimizer) else None
            if rec is None:
                complete = False
                continue
            score = criterion(rec)
            scored.append((math.inf if math.isnan(score) else score, point))
        selected = min(scored, key=lambda s: s[0])[1] if complete and scored else None
    hparams = {**base, **(selected or {})}
    finals: list[RunTask] = []
    for seed in seeds:
        reuse = bool(grid) and seed == 0 and (search_budget or budget) == budget
        task = RunTask(
            key=f"{prefix}/seed{seed}",
            problem=problem,
            optimizer=method.optimizer,
            hparams=hparams,
            seed=seed,
            budget=budget,
            label=method.name,
            group=group,
            estimate_s=0.0 if reuse else _with_warm_start(estimate(budget), hparams),
            meta={"selected": dict(selected or {})},
            provisional=selected is None,
        )
        # The selected grid point already ran seed 0 with this budget: reuse its record.
        same = [t for t in search if t.fingerprint() == task.fingerprint()]
        finals.append(same[0] if same else task)
    return Comparison(method, tuple(search), tuple(finals), selected)


# --------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Verdict:
    """A claim's outcome, computed from measured numbers.

    Attributes:
        status: ``"held"``, ``"not held"`` or ``"not testable"`` (here, at this scale).
        ours: our measured numbers, as text.
        detail: how the verdict was decided (the operational test), or why not testable.
    """

    status: Status
    ours: str
    detail: str = ""


def held_if(condition: bool, ours: str, detail: str = "") -> Verdict:
    """``held`` when ``condition``, else ``not held``."""
    return Verdict("held" if condition else "not held", ours, detail)


def not_testable(reason: str, ours: str = "—") -> Verdict:
    """A ``not testable`` verdict with its reason."""
    return Verdict("not testable", ours, reason)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper and how we test it.

    Attributes:
        id: short identifier (e.g. ``"table-3.3-order"``).
        statement: the claim, in the paper's terms.
        paper: the paper's numbers / figure reference.
        check: computes the `Verdict` from the context's stored results.
        needs: bench optimizers without which the claim is not testable.
    """

    id: str
    statement: str
    paper: str
    check: Callable[[Context], Verdict]
    needs: tuple[str, ...] = ()


def evaluate_claims(ctx: Context) -> list[tuple[Claim, Verdict]]:
    """Every claim's verdict; missing methods or results give "not testable" with the reason."""
    out = []
    for claim in ctx.experiment.claims:
        missing = [name for name in claim.needs if not ctx.available(name)]
        if missing:
            verdict = not_testable(
                "method not implemented: no bench optimizer named "
                + ", ".join(repr(m) for m in missing)
            )
        else:
            try:
                verdict = claim.check(ctx)
            except MissingResult as err:
                verdict = not_testable(f"results missing: {err}")
            except (ArithmeticError, LookupError, ValueError, TypeError) as err:
                # e.g. a run that diverged at once left nothing to compare; the report says so
                # instead of losing every other verdict.
                verdict = not_testable(f"could not be computed: {type(err).__name__}: {err}")
        out.append((claim, verdict))
    return out


# --------------------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Section:
    """A part of the report: a title, Markdown text (tables) and plots (paths under
    ``ctx.plots``)."""

    title: str
    body: str
    plots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DataNeed:
    """A data set the experiment needs at this scale; ``load`` raises FileNotFoundError."""

    name: str
    load: Callable[[], Any]


@dataclass(frozen=True)
class Experiment:
    """One ``curvlab reproduce NAME``.

    Attributes:
        name: the NAME on the command line.
        title: the report's title.
        paper: the paper (authors, title, seed number).
        plan: the tasks at the context's scale (see the module docstring).
        claims: the claims tested.
        sections: the report's tables and plots.
        notes: substitutions and deviations at the context's scale, one per line.
        data: the data sets needed at the context's scale.
    """

    name: str
    title: str
    paper: str
    plan: Callable[[Context], list[Task]]
    claims: tuple[Claim, ...]
    sections: Callable[[Context], list[Section]]
    notes: Callable[[Context], list[str]]
    data: Callable[[Context], list[DataNeed]]


def pending_tasks(ctx: Context, tasks: Sequence[Task]) -> tuple[list[Task], list[Task]]:
    """(tasks to run or estimate, tasks skipped because a method is missing)."""
    pending: list[Task] = []
    skipped: list[Task] = []
    for task in tasks:
        missing = [n for n in task.needs() if not ctx.available(n)]
        if missing:
            ctx.skipped[task.key] = "method not implemented: " + ", ".join(missing)
            skipped.append(task)
        elif not task.done(ctx):
            pending.append(task)
    return pending, skipped


def plan_summary(ctx: Context) -> tuple[list[Task], float]:
    """(every planned task, estimated seconds of those still to run)."""
    tasks = ctx.experiment.plan(ctx)
    pending, _ = pending_tasks(ctx, tasks)
    return tasks, sum(t.estimate_s for t in pending)
