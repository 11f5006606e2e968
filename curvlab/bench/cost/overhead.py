"""Per-step time of the curvature methods against SGD with momentum, next to their floors.

``curvlab overhead`` answers two questions: how many times an SGD-m step does a step of
K-FAC, K-BFGS, K-BFGS(L), TNT or Shampoo cost on a problem (by default the Fashion-MNIST
autoencoder, batch 1000, float32, 2 threads, curvature statistics every step and inverses /
roots every 20 steps), and how far is that from what the method's extra arithmetic alone must
cost on this machine? It also reports each method's memory beyond SGD-m next to the thesis's
storage formula (Tables 3.1, 4.1), and each method's ratio next to the project's performance
target for it (`STEP_TARGETS`).

Measurement (`measure_overhead`):

* one model per method, all initialised from the same seed, and one fixed list of mini-batches
  drawn once (seeded shuffle) from the real training data, visited in the same order by all;
* each method is warmed up (at least ``warmup`` steps, and as many as its steady state needs:
  K-BFGS(L) until its p pairs are stored, a schedule's warm-up refreshes), then the methods
  take turns, ``A B C … A B C …``, ``steps`` timed steps per turn and ``repeats`` turns each, so
  that machine drift hits every method alike;
* a step is ``optimizer.step(Objective(model, loss_fn, x, y, batch_average=…))`` timed with
  ``time.perf_counter`` as `curvlab.bench.runner` times it (the objective is built outside);
* a turn's mean step time includes the amortised refreshes and statistics steps (exactly so
  when ``steps`` is a multiple of every T1 and T2); a method's time is the minimum over its
  turns of the turn mean, and the median over all its timed steps is reported next to it;
* ratios are to sgd-m's time from the same run.

Floor (`curvlab.bench.cost.floor_model`; each method's operations as its optimizer lists them,
`curvlab.optim.base.BlockOptimizer.step_cost`): the time each method must spend beyond an SGD-m
step — extra passes, statistics, preconditioning products, and its amortised decompositions —
every operation timed at the shape where it occurs, decompositions timed on the method's own
factors after the turns. The floor ratio is ``(t_sgd + extra floor) / t_sgd`` with the measured
t_sgd. As a cross-check, the FLOPs each method executes per step (over one full statistics /
inverse period) are counted with ``FlopCounterMode`` after the timing and compared with the
floor's matrix-product FLOPs: the difference is work the method does beyond its floor.

The timing learning rates are a tenth of the thesis presets (`TIMING_LR`; K-FAC:
`KFAC_TIMING_LR`): a diverged method skips its steps, which would time the wrong thing, and
the learning rate does not change the cost of a step. Skipped steps are flagged in the table.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.bench.cost.floor_model import FLOOR_TERMS, floor_flops, measure_floor_model
from curvlab.bench.cost.floors import floor_items, real_factors
from curvlab.bench.cost.geometry import layer_geometry
from curvlab.bench.cost.memory import state_bytes, storage_formula
from curvlab.bench.cost.operations import counted_flops
from curvlab.bench.problems import Problem, get_problem
from curvlab.bench.records import environment, to_jsonable, write_json
from curvlab.bench.runner import RUNNER_KEYS
from curvlab.bench.specs import get_optimizer, presets_for
from curvlab.curvature.cost import (
    CostItem,
    LayerShape,
    cost_items,
    forward_product,
    output_gradient_product,
    weight_gradient_ops,
)
from curvlab.data import batches
from curvlab.linalg.cost import Decomposition, Gemm, Op
from curvlab.losses import BatchMean
from curvlab.objective import Objective
from curvlab.optim.base import BlockOptimizer

__all__ = [
    "DEFAULT_METHODS",
    "KFAC_TIMING_LR",
    "METHODS",
    "STEP_TARGETS",
    "TARGET_PROBLEM",
    "TIMING_LR",
    "Variant",
    "add_overhead_parser",
    "default_variants",
    "format_overhead",
    "measure_overhead",
    "run_overhead_command",
]

BASELINE = "sgd-m"


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One timed method: a registered optimizer, hyperparameter overrides, its target.

    Attributes:
        name: the table label.
        optimizer: a key of `curvlab.bench.specs.OPTIMIZERS`.
        hparams: overrides over the spec's defaults and its ``thesis`` preset for the problem.
        target: the bound on its ratio to sgd-m (`STEP_TARGETS`), if it has one.
        entry: how each step gets its mini-batch: ``"objective"`` (a `curvlab.Objective`),
            ``"closure"`` (a plain closure) or ``"backward"`` (the loop's own forward and
            ``loss.backward()``, then ``step()``; a curvlab method is told the loss).
    """

    name: str
    optimizer: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    target: float | None = None
    entry: str = "objective"


#: K-FAC's learning rate in the timing runs. The thesis preset (0.03 with momentum 0.9, tuned on
#: MNIST with a warm start) diverges within ~20 steps on the Fashion-MNIST autoencoder, and a
#: diverged K-FAC skips its steps, which would time the wrong thing; at 0.003 every variant stays
#: finite for hundreds of steps there. The learning rate does not change the cost of a step.
KFAC_TIMING_LR = 0.003

#: K-BFGS', K-BFGS(L)'s, TNT's and Shampoo's learning rates in the timing runs: a tenth of the
#: thesis presets for the autoencoders (Tables 3.5, 4.3, 4.5), as for K-FAC, so that no run
#: diverges into skipped steps.
TIMING_LR: dict[str, float] = {
    "kbfgs": 0.003,
    "kbfgs-l": 0.003,
    "tnt": 1e-5,
    "tnt-ef": 3e-7,
    "shampoo": 3e-5,
}

#: The project's performance targets: the per-step time over SGD-m that each variant of
#: `default_variants` is to stay within on `TARGET_PROBLEM` (K-FAC with the true Fisher and
#: factors every step at either statistics point ≤ 2.8×, K-FAC-EF ≤ 2.3×, factors every 10
#: steps ≤ 1.9×; K-BFGS ≤ 2.8×, K-BFGS(L) with p = 100 ≤ 2.9×, TNT ≤ 3.0×, Shampoo with eigh
#: roots ≤ 2.3×; Adam and TNT-EF have none).
STEP_TARGETS: dict[str, float] = {
    "kfac": 2.8,
    "kfac/before": 2.8,
    "kfac-ef/before": 2.3,
    "kfac/T1=10": 1.9,
    "kfac/T1=10/before": 1.9,
    "kbfgs": 2.8,
    "kbfgs-l": 2.9,
    "tnt": 3.0,
    "shampoo": 2.3,
}

#: The problem the targets were set for (batch 1000, float32, 2 threads).
TARGET_PROBLEM = "fmnist-autoencoder"

#: Method groups of ``--methods``: sgd-m is always timed (the baseline).
METHODS = ("adam", "kfac", "kbfgs", "kbfgs-l", "tnt", "tnt-ef", "shampoo")
DEFAULT_METHODS = ("adam", "kfac", "kbfgs", "kbfgs-l", "tnt", "shampoo")


def default_variants(
    inverse_every: int = 20,
    kfac_lr: float = KFAC_TIMING_LR,
    *,
    targets: bool = True,
    methods: Sequence[str] = DEFAULT_METHODS,
    lrs: Mapping[str, float] | None = None,
) -> list[Variant]:
    """sgd-m and the chosen method groups (`METHODS`), with their targets (`STEP_TARGETS`).

    Groups: ``adam``; ``kfac``, five K-FAC variants (true Fisher with factors every step at
    both statistics points, empirical Fisher, true Fisher with factors every 10 steps at both
    statistics points); ``kbfgs``, ``kbfgs-l`` (p = 100), ``tnt``, ``tnt-ef`` and ``shampoo``
    (eigh roots), with statistics every step and inverses / roots every ``inverse_every``
    steps on the printed schedule (``inverse_warmup=False``; the refresh warm-up only changes
    the first T2 steps).

    Args:
        inverse_every: T2 of K-FAC, TNT and Shampoo.
        kfac_lr: K-FAC's learning rate.
        targets: attach the bounds of `STEP_TARGETS` (they hold for `TARGET_PROBLEM` only).
        methods: method groups, in table order.
        lrs: learning rates by method group or variant name, over `TIMING_LR` / ``kfac_lr``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    lrs = dict(lrs or {})

    def bound(name: str) -> float | None:
        return STEP_TARGETS.get(name) if targets else None

    def lr(name: str, default: float) -> float:
        return float(lrs.get(name, default))

    out = [Variant(BASELINE, "sgd-m")]
    for method in dict.fromkeys(methods):
        if method == "adam":
            out.append(Variant("adam", "adam", {"lr": lrs["adam"]} if "adam" in lrs else {}))
        elif method == "kfac":
            base = {"inverse_every": inverse_every, "lr": lr("kfac", kfac_lr)}
            before = {"statistics": "before_step"}
            ef = {**base, **before, "fisher": "empirical"}
            every10 = {**base, "curvature_every": 10}
            out += [
                Variant(name, "kfac", hp, bound(name))
                for name, hp in (
                    ("kfac", {**base}),
                    ("kfac/before", {**base, **before}),
                    ("kfac-ef/before", ef),
                    ("kfac/T1=10", every10),
                    ("kfac/T1=10/before", {**every10, **before}),
                )
            ]
        elif method in ("kbfgs", "kbfgs-l"):
            hp = {"lr": lr(method, TIMING_LR[method]), "curvature_every": 1}
            out.append(Variant(method, method, hp, bound(method)))
        else:  # tnt, tnt-ef, shampoo
            hp = {
                "lr": lr(method, TIMING_LR[method]),
                "curvature_every": 1,
                "inverse_every": inverse_every,
                "inverse_warmup": False,
            }
            out.append(Variant(method, method, hp, bound(method)))
    for key in lrs:
        if key not in METHODS and all(v.name != key for v in out):
            raise ValueError(f"lr: no timed method is called {key!r}")
    return out


def _hyperparameters(variant: Variant, problem: Problem) -> dict[str, Any]:
    """Spec defaults, then the problem's ``thesis`` preset (no runner keys), then overrides."""
    spec = get_optimizer(variant.optimizer)
    merged: dict[str, Any] = dict(spec.defaults)
    preset = presets_for(spec.name, problem.name).get("thesis")
    if preset is not None:
        merged.update({k: v for k, v in preset.hparams.items() if k not in RUNNER_KEYS})
    merged.update(variant.hparams)
    return merged


def _steady_after(optimizer: torch.optim.Optimizer) -> int:
    """Steps before the optimizer's per-step cost is that of its steady state (a curvlab
    block method says: `curvlab.optim.base.BlockOptimizer.cost_warmup_steps`; 0 for others)."""
    return optimizer.cost_warmup_steps() if isinstance(optimizer, BlockOptimizer) else 0


def _period(optimizer: torch.optim.Optimizer) -> int:
    """Steps of one full statistics / decomposition cycle (for counting FLOPs per step;
    `curvlab.optim.base.BlockOptimizer.cost_period`; 1 for others)."""
    return optimizer.cost_period() if isinstance(optimizer, BlockOptimizer) else 1


# --------------------------------------------------------------------------- measurement
@dataclass
class _Contender:
    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    hparams: dict[str, Any]
    warmup: int = 0
    position: int = 0
    turns: list[list[float]] = field(default_factory=list)
    skipped: int = 0


def _fixed_batches(
    problem: Problem, batch_size: int, count: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``count`` distinct mini-batches (fewer if the training set is smaller), drawn once."""
    data = problem.data()
    if data.num_train < batch_size:
        raise ValueError(f"batch: {batch_size} exceeds the {data.num_train} training examples")
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[Tensor, Tensor]] = []
    for x, y in batches(
        data.train_inputs,
        data.train_targets,
        batch_size,
        shuffle=True,
        generator=gen,
        drop_last=True,
    ):
        out.append((x.contiguous(), y.contiguous()))
        if len(out) == count:
            break
    return out


def _step(
    c: _Contender,
    data: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_average: bool,
) -> float:
    """One timed optimizer step on the contender's next batch; returns seconds."""
    x, y = data[c.position % len(data)]
    c.position += 1
    entry = c.variant.entry
    if entry == "objective":
        objective = Objective(c.model, loss_fn, x, y, batch_average=batch_average)
        t0 = time.perf_counter()
        c.optimizer.step(objective)  # type: ignore[arg-type]  # an Objective is a closure
        return _done(c, time.perf_counter() - t0)

    def closure() -> Tensor:
        c.optimizer.zero_grad()
        loss = loss_fn(c.model(x), y)
        loss = loss / x.shape[0] if batch_average else loss
        loss.backward()
        return loss.detach()

    t0 = time.perf_counter()
    if entry == "closure":
        c.optimizer.step(closure)  # type: ignore[arg-type]  # a closure returning the loss
    else:
        closure()
        c.optimizer.step()
    return _done(c, time.perf_counter() - t0)


def _done(c: _Contender, elapsed: float) -> float:
    """Count a skipped step; return the step's seconds."""
    info = getattr(c.optimizer, "last_step_info", None)
    if isinstance(info, Mapping) and info.get("skipped") is True:
        c.skipped += 1
    return elapsed


def _validate(steps: int, repeats: int, warmup: int, threads: int | None) -> None:
    if steps < 1:
        raise ValueError(f"steps: need at least 1, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats: need at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: must be ≥ 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads: need at least 1, got {threads}")


def measure_overhead(
    problem: Problem | str = "fmnist-autoencoder",
    *,
    batch_size: int | None = None,
    threads: int | None = 2,
    steps: int = 60,
    repeats: int = 3,
    warmup: int = 5,
    seed: int = 0,
    variants: Sequence[Variant] | None = None,
    progress: bool = False,
    floor_repeats: int = 7,
) -> dict[str, Any]:
    """Time the variants in turns, model their floors, and return everything as a JSON-ready
    dict.

    Args:
        problem: a `Problem` or its registry name.
        batch_size: m (default: the problem's).
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards);
            None keeps the current setting.
        steps: timed steps per turn (a multiple of every T1 and T2 amortises exactly).
        repeats: turns per method; the minimum turn mean is reported.
        warmup: untimed steps per method before the first turn (at least; see
            `_steady_after`).
        seed: model initialisation, batch selection and the global RNG.
        variants: the methods (default `default_variants`); must include ``sgd-m``.
        progress: report progress on stderr.
        floor_repeats: timing groups per floor operation
            (`curvlab.bench.cost.operations.best_time`).

    Returns:
        ``{"config", "environment", "methods", "floor", "layers", "gemms", "ops",
        "inversions_ms"}``; see `format_overhead` for the tables made from it.
    """
    _validate(steps, repeats, warmup, threads)
    if floor_repeats < 1:
        raise ValueError(f"floor_repeats: need at least 1, got {floor_repeats}")
    prob = get_problem(problem) if isinstance(problem, str) else problem
    chosen = list(variants) if variants is not None else default_variants()
    names = [v.name for v in chosen]
    if BASELINE not in names:
        raise ValueError(f"variants: the baseline {BASELINE!r} must be one of them")
    if len(set(names)) != len(names):
        raise ValueError(f"variants: duplicate names in {names}")
    for v in chosen:
        get_optimizer(v.optimizer)
    m = int(batch_size if batch_size is not None else prob.batch_size)
    if m < 1:
        raise ValueError(f"batch: must be positive, got {m}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(prob, chosen, m, steps, repeats, warmup, seed, progress, floor_repeats)
    finally:
        torch.set_num_threads(previous_threads)


def _diagnostics(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """State that decides a step's cost (`curvlab.optim.base.BlockOptimizer.cost_diagnostics`:
    decompositions that were retried or failed, K-BFGS's skipped pairs, K-BFGS(L)'s stored
    pairs); for other optimizers the retries and failures their ``last_step_info`` reports."""
    if isinstance(optimizer, BlockOptimizer):
        return optimizer.cost_diagnostics()
    info = getattr(optimizer, "last_step_info", None) or {}
    return {key: info[key] for key in ("retried_decompositions", "failed_refreshes") if key in info}


def _sgd_items(geometry: Sequence[LayerShape]) -> list[CostItem]:
    """SGD-m's own products (forward, backward, weight gradients), for the report."""
    out: list[CostItem] = []
    for g in geometry:
        ops: list[Op] = [forward_product(g)]
        if g.input_grad:
            ops.append(output_gradient_product(g))
        ops += weight_gradient_ops(g)
        out += cost_items("sgd", ops, 1.0, g.name, "forward / backward")
    return out


def _measure(
    prob: Problem,
    variants: list[Variant],
    m: int,
    steps: int,
    repeats: int,
    warmup: int,
    seed: int,
    progress: bool,
    floor_repeats: int,
) -> dict[str, Any]:
    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    torch.manual_seed(seed)
    contenders: list[_Contender] = []
    for v in variants:
        model = prob.make_model(seed)
        model.train()
        hparams = _hyperparameters(v, prob)
        factory = get_optimizer(v.optimizer).factory
        optimizer = factory(model, dict(hparams))
        if v.entry != "objective" and isinstance(optimizer, BlockOptimizer):
            loss = prob.make_loss()  # the loop's loss, told to the method (plain entries)
            told = BatchMean(loss) if prob.batch_average else loss
            optimizer = factory(model, {**hparams, "loss_fn": told})
        contenders.append(
            _Contender(v, model, optimizer, hparams, max(warmup, _steady_after(optimizer)))
        )
    most_warmup = max(c.warmup for c in contenders)
    data = _fixed_batches(prob, m, steps + most_warmup, seed)
    loss_fn = prob.make_loss()

    for c in contenders:
        say(f"warm-up: {c.variant.name} ({c.warmup} steps)")
        for _ in range(c.warmup):
            _step(c, data, loss_fn, prob.batch_average)
    for turn in range(repeats):
        for c in contenders:
            gc.collect()
            times = [_step(c, data, loss_fn, prob.batch_average) for _ in range(steps)]
            c.turns.append(times)
            say(
                f"turn {turn + 1}/{repeats} {c.variant.name}: "
                f"{1e3 * statistics.fmean(times):.2f} ms/step"
            )

    counted: dict[str, float] = {}
    for c in contenders:
        # One full period, so that every kind of step is counted in its proportion.
        n = _period(c.optimizer)

        def period(c: _Contender = c, n: int = n) -> None:
            for _ in range(n):
                _step(c, data, loss_fn, prob.batch_average)

        counted[c.variant.name] = counted_flops(period) / n

    x0 = data[0][0]
    geometry = layer_geometry(contenders[0].model, x0)
    items: dict[str, list[CostItem] | None] = {}
    matrices: dict[str, Tensor] = {}
    for c in contenders:
        prefix = f"{c.variant.name}/"
        items[c.variant.name] = floor_items(c.optimizer, geometry, source_prefix=prefix)
        matrices.update(real_factors(c.optimizer, prefix))
    sgd_items = _sgd_items(geometry)
    every_item = [i for its in items.values() if its for i in its] + sgd_items
    floor = measure_floor_model(
        geometry, every_item, x0.dtype, matrices=matrices, repeats=floor_repeats, progress=say
    )

    base = next(c for c in contenders if c.variant.name == BASELINE)
    t_base = min(statistics.fmean(t) for t in base.turns)
    base_bytes = state_bytes(base.optimizer)
    methods: list[dict[str, Any]] = []
    for c in contenders:
        its = items[c.variant.name]
        turn_means = [statistics.fmean(t) for t in c.turns]
        mean_s = min(turn_means)
        ratio = mean_s / t_base
        terms = floor.terms_ms(its) if its is not None else None
        extra_ms = sum(terms[k] for k in FLOOR_TERMS) if terms is not None else None
        floor_ratio = None if extra_ms is None else (1e3 * t_base + extra_ms) / (1e3 * t_base)
        floor_counted = floor.counted_flops(its) if its is not None else None
        counted_extra = counted[c.variant.name] - counted[BASELINE]
        by_layer: dict[str, dict[str, float]] = {}
        for item in its or []:
            row = by_layer.setdefault(item.block, dict.fromkeys(FLOOR_TERMS, 0.0))
            row[item.term] += 1e3 * item.per_step * floor.seconds[item.op]
        held = state_bytes(c.optimizer)
        formula = storage_formula(c.optimizer, geometry)
        itemsize = x0.element_size()
        methods.append(
            {
                "name": c.variant.name,
                "optimizer": c.variant.optimizer,
                "hyperparameters": c.hparams,
                "target": c.variant.target,
                "warmup": c.warmup,
                "mean_ms": 1e3 * mean_s,
                "median_ms": 1e3 * statistics.median([s for t in c.turns for s in t]),
                "turn_means_ms": [1e3 * s for s in turn_means],
                "ratio": ratio,
                "floor_ratio": floor_ratio,
                "measured_over_floor": None if floor_ratio is None else ratio / floor_ratio,
                "floor_extra_ms": extra_ms,
                "floor_terms_ms": terms,
                "floor_by_layer_ms": by_layer,
                "floor_extra_gflop": (
                    None if its is None else sum(floor_flops(its).values()) / 1e9
                ),
                "floor_counted_gflop": None if floor_counted is None else floor_counted / 1e9,
                "counted_gflop_per_step": counted[c.variant.name] / 1e9,
                "counted_extra_gflop": counted_extra / 1e9,
                "executed_beyond_floor_gflop": (
                    None if floor_counted is None else (counted_extra - floor_counted) / 1e9
                ),
                "measured_extra_ms": 1e3 * (mean_s - t_base),
                "meets_target": None if c.variant.target is None else ratio <= c.variant.target,
                "skipped_steps": c.skipped,
                "memory": {
                    "state_bytes": held,
                    "extra_bytes": held - base_bytes,
                    "extra_mb": (held - base_bytes) / 1e6,
                    "formula": None if formula is None else formula.formula,
                    "table": None if formula is None else formula.table,
                    "formula_elements": None if formula is None else formula.elements,
                    "formula_mb": None if formula is None else formula.elements * itemsize / 1e6,
                    "over_formula": (
                        None
                        if formula is None or formula.elements == 0
                        else (held - base_bytes) / (formula.elements * itemsize)
                    ),
                },
                "diagnostics": _diagnostics(c.optimizer),
            }
        )
    periods = [_period(c.optimizer) for c in contenders]
    sgd_gemm_ms = sum(1e3 * floor.seconds[i.op] for i in sgd_items)
    table = floor.table()
    result: dict[str, Any] = {
        "config": {
            "problem": prob.name,
            "batch_size": m,
            "threads": torch.get_num_threads(),
            "dtype": str(x0.dtype),
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "distinct_batches": len(data),
            "amortisation_exact": all(steps % p == 0 for p in periods),
            "order": [c.variant.name for c in contenders],
        },
        "environment": environment("cpu"),
        "methods": methods,
        "floor": {"sgd_measured_ms": 1e3 * t_base, "sgd_gemm_floor_ms": sgd_gemm_ms},
        "layers": [vars(g) for g in floor.layers],
        "ops": table,
        "gemms": {op.label: table[op.label] for op in floor.seconds if isinstance(op, Gemm)},
        "inversions_ms": {
            op.label: 1e3 * s for op, s in floor.seconds.items() if isinstance(op, Decomposition)
        },
    }
    jsonable: dict[str, Any] = to_jsonable(result)
    return jsonable


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def format_overhead(result: Mapping[str, Any]) -> str:
    """Markdown: the timing table (ratio, floor, target, memory), then the floor terms."""
    cfg = result["config"]
    lines = [
        f"{cfg['problem']}, batch {cfg['batch_size']}, {cfg['dtype']}, {cfg['threads']} "
        f"threads; {cfg['repeats']} turns × {cfg['steps']} steps, min over turns of the mean "
        f"(amortisation exact: {'yes' if cfg['amortisation_exact'] else 'no'})",
        "",
        "| variant | ms/step (mean) | ms/step (median) | × sgd-m | floor × | measured / floor "
        "| target | memory beyond sgd-m (MB) | storage formula (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["methods"]:
        target = row["target"]
        verdict = "" if row["meets_target"] is None else (" ✓" if row["meets_target"] else " ✗")
        if row["skipped_steps"]:
            verdict += f" ({row['skipped_steps']} skipped steps: invalid)"
        mem = row["memory"]
        formula = (
            "—"
            if mem["formula"] is None
            else f"{_fmt(mem['formula_mb'], '.2f')} ({mem['formula']}; {mem['table']})"
        )
        lines.append(
            f"| {row['name']} | {_fmt(row['mean_ms'], '.2f')} | {_fmt(row['median_ms'], '.2f')} "
            f"| {_fmt(row['ratio'], '.2f')} | {_fmt(row['floor_ratio'], '.2f')} "
            f"| {_fmt(row['measured_over_floor'], '.2f')} "
            f"| {'—' if target is None else f'≤ {target:g}{verdict}'} "
            f"| {_fmt(mem['extra_mb'], '.2f')} | {formula} |"
        )
    lines += [
        "",
        "Floor terms, ms per step beyond sgd-m (every product at its own measured throughput; "
        "decompositions measured); executed − floor: GFLOP/step the method executes in matrix "
        "products beyond its floor (FlopCounterMode):",
        "",
        "| variant | "
        + " | ".join(FLOOR_TERMS)
        + " | floor extra | measured extra | executed − floor (GFLOP) |",
        "|---|" + "---:|" * (len(FLOOR_TERMS) + 3),
    ]
    for row in result["methods"]:
        terms = row["floor_terms_ms"]
        if terms is None or row["name"] == BASELINE:
            continue
        lines.append(
            f"| {row['name']} | "
            + " | ".join(_fmt(terms[k], ".2f") for k in FLOOR_TERMS)
            + f" | {_fmt(row['floor_extra_ms'], '.2f')} | "
            f"{_fmt(row['measured_extra_ms'], '.2f')} | "
            f"{_fmt(row['executed_beyond_floor_gflop'], '.3f')} |"
        )
    fl = result["floor"]
    lines += [
        "",
        f"sgd-m measured {_fmt(fl['sgd_measured_ms'], '.2f')} ms/step; its own products at the "
        f"same throughput: {_fmt(fl['sgd_gemm_floor_ms'], '.2f')} ms.",
    ]
    skipped = [r["name"] for r in result["methods"] if r["skipped_steps"]]
    if skipped:
        lines.append(f"Warning: skipped (non-finite) steps in {', '.join(skipped)}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _parse_lrs(values: Sequence[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for value in values or []:
        name, sep, number = value.partition("=")
        try:
            lr = float(number)
        except ValueError:
            lr = math.nan
        if not sep or not name or not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr: expected METHOD=VALUE with VALUE ≥ 0, got {value!r}")
        out[name] = lr
    return out


def add_overhead_parser(sub: Any) -> None:
    """Register ``curvlab overhead`` on the CLI's subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "overhead",
        help="per-step time of K-FAC, K-BFGS, K-BFGS(L), TNT, Shampoo over sgd-m, next to "
        "their arithmetic floors and memory",
    )
    p.add_argument("--problem", default="fmnist-autoencoder", help="default fmnist-autoencoder")
    p.add_argument("--batch", type=int, help="batch size m (default: the problem's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per turn (default 60)")
    p.add_argument("--repeats", type=int, default=3, help="turns per method (default 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps per method (default 5; K-BFGS(L) warms up until its pairs are full)",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated method groups from {', '.join(METHODS)} (sgd-m is always "
        f"timed; default {','.join(DEFAULT_METHODS)}; kfac = its five variants)",
    )
    p.add_argument(
        "--inverse-every", type=int, default=20, help="T2 of K-FAC, TNT, Shampoo (default 20)"
    )
    p.add_argument(
        "--kfac-lr",
        type=float,
        default=KFAC_TIMING_LR,
        help=f"K-FAC's learning rate (default {KFAC_TIMING_LR:g}: finite on every variant)",
    )
    p.add_argument(
        "--lr",
        action="append",
        metavar="METHOD=VALUE",
        help="learning rate of one method group or variant (repeatable; defaults: "
        + ", ".join(f"{k} {v:g}" for k, v in TIMING_LR.items())
        + ")",
    )
    p.add_argument(
        "--floor-repeats",
        type=int,
        default=7,
        help="timing groups per floor operation, the best kept (default 7)",
    )
    p.add_argument(
        "--entries",
        default="objective",
        help="comma-separated entry points each method is timed through, interleaved in the same "
        "turns: objective (a curvlab.Objective), closure (a plain closure), backward (the "
        "loop's own loss.backward(), then step()); default objective",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--json", metavar="OUT", help="write every measurement to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def through_entries(variants: Sequence[Variant], entries: Sequence[str]) -> list[Variant]:
    """Every variant through each entry point: the ``"objective"`` one under its own name, the
    others as ``name@entry`` (targets are for the `Objective` path)."""
    known = ("objective", "closure", "backward")
    chosen = [e.strip() for e in entries if e.strip()]
    unknown = [e for e in chosen if e not in known]
    if unknown or not chosen:
        raise ValueError(f"entries: expected some of {', '.join(known)}, got {entries!r}")
    out: list[Variant] = []
    for v in variants:
        for entry in chosen:
            if entry == "objective":
                out.append(v)
            else:
                name = f"{v.name}@{entry}"
                out.append(Variant(name, v.optimizer, v.hparams, None, entry))
    return out


def run_overhead_command(args: argparse.Namespace) -> int:
    """``curvlab overhead``: measure, print the Markdown tables, optionally write the JSON."""
    problem = get_problem(args.problem)
    methods = [m.strip() for m in str(getattr(args, "methods", "")).split(",") if m.strip()]
    variants = default_variants(
        args.inverse_every,
        args.kfac_lr,
        targets=problem.name == TARGET_PROBLEM,
        methods=methods or DEFAULT_METHODS,
        lrs=_parse_lrs(getattr(args, "lr", None)),
    )
    variants = through_entries(variants, str(getattr(args, "entries", "objective")).split(","))
    result = measure_overhead(
        problem,
        batch_size=args.batch,
        threads=args.threads,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        variants=variants,
        progress=not args.no_progress,
        floor_repeats=getattr(args, "floor_repeats", 7),
    )
    print(format_overhead(result))
    if args.json:
        print(write_json(args.json, result))
    return 0
