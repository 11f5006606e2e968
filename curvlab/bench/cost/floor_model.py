r"""A method's floor as a list of timed operations, and its sum per term.

A method's *floor* is the time that the work it must do beyond an SGD-m step takes on this
machine: every matrix product, matrix–vector product, reduction and triangular solve of that
work at the shape where it really occurs, each timed on its own at the current thread count
(no single peak number), plus the *measured* time of its amortised decompositions (inverses,
inverse roots). The work is what the optimizer says a step costs: a list of
`curvlab.curvature.cost.CostItem`\ s (`curvlab.optim.base.BlockOptimizer.step_cost`, made of
its blocks' `curvlab.curvature.blocks.CurvatureBlock.cost`), an operation
(`curvlab.linalg.cost.Op`) with the number of times it occurs per step (``1/T1`` for
statistics, ``1/T2`` for decompositions) and the term of the overhead table it belongs to
(`FLOOR_TERMS`). Elementwise work and Python overhead are not in it, so the floor is a lower
bound of the method's extra time.

`measure_floor_model` times every distinct operation once; `FloorModel.terms_ms` adds the
items up per term. `floor_flops` is the items' analytic FLOPs per term, and
`FloorModel.counted_flops` what `torch.utils.flop_counter.FlopCounterMode` sees of them
(matrix products only, plus the matrix products inside the decompositions), so that it can be
compared with the FLOPs a step really executes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.bench.cost.geometry import LayerGeometry
from curvlab.bench.cost.operations import best_time, counted_flops
from curvlab.curvature.cost import COST_TERMS, CostItem
from curvlab.linalg.cost import Decomposition, Op

__all__ = [
    "FLOOR_TERMS",
    "FloorModel",
    "floor_flops",
    "measure_floor_model",
]

FLOOR_TERMS = COST_TERMS
"""The components of a floor (`curvlab.curvature.cost.COST_TERMS`), in milliseconds per step
beyond SGD-m."""


@dataclass
class FloorModel:
    """Measured seconds (and FLOPs that `FlopCounterMode` sees) of every distinct operation."""

    layers: list[LayerGeometry]
    seconds: dict[Op, float]
    counted: dict[Op, int]

    def terms_ms(self, items: Iterable[CostItem]) -> dict[str, float]:
        """Milliseconds per step beyond SGD-m, per term of `FLOOR_TERMS`."""
        out = dict.fromkeys(FLOOR_TERMS, 0.0)
        for item in items:
            out[item.term] += 1e3 * item.per_step * self.seconds[item.op]
        return out

    def counted_flops(self, items: Iterable[CostItem]) -> float:
        """Per step, the FLOPs of the items that `FlopCounterMode` sees (matrix products)."""
        return float(sum(item.per_step * self.counted[item.op] for item in items))

    def table(self) -> dict[str, dict[str, float]]:
        """Every measured operation: ms, FLOPs and GFLOP/s (JSON-ready)."""
        out: dict[str, dict[str, float]] = {}
        for op, s in self.seconds.items():
            entry = {"ms": 1e3 * s, "flops": float(op.flops)}
            if op.flops:
                entry["gflop_per_s"] = op.flops / s / 1e9
            out[op.label] = entry
        return out


def floor_flops(items: Iterable[CostItem]) -> dict[str, float]:
    """Analytic FLOPs per step and term (decompositions, which are timed, count 0)."""
    out = dict.fromkeys(FLOOR_TERMS, 0.0)
    for item in items:
        out[item.term] += item.per_step * item.op.flops
    return out


def measure_floor_model(
    layers: Sequence[LayerGeometry],
    items: Iterable[CostItem],
    dtype: torch.dtype,
    *,
    matrices: Mapping[str, Tensor] | None = None,
    repeats: int = 7,
    min_group_s: float = 2e-3,
    progress: Callable[[str], None] | None = None,
) -> FloorModel:
    """Time every distinct operation of ``items`` once at the current thread count.

    Args:
        layers: the geometry the items were made from (kept in the model for the report).
        items: the floors of every method to be reported.
        dtype: the training dtype.
        matrices: real factors for the decompositions (`real_factors`).
        repeats, min_group_s: of `best_time` (decompositions: at most 5 groups of ≥ 1 call).
        progress: called with a line of text per kind of operation.
    """
    ops = list(dict.fromkeys(item.op for item in items))
    seconds: dict[Op, float] = {}
    counted: dict[Op, int] = {}
    decompositions = [op for op in ops if isinstance(op, Decomposition)]
    others = [op for op in ops if not isinstance(op, Decomposition)]
    if progress is not None:
        progress(f"floor: timing {len(others)} products / reductions")
    for op in others:
        fn = op.runner(dtype)
        seconds[op] = best_time(fn, repeats, min_group_s)
        counted[op] = op.flops if op.counted_by_torch else 0
    if progress is not None and decompositions:
        progress(f"floor: timing {len(decompositions)} decompositions")
    for dec in decompositions:
        fn = dec.runner(dtype, matrices)
        counted[dec] = counted_flops(fn)
        seconds[dec] = best_time(fn, min(repeats, 5), min_group_s)
    return FloorModel(list(layers), seconds, counted)
