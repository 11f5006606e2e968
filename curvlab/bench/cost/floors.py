r"""Each method's floor, as the optimizer describes its work beyond an SGD-m step.

A curvlab block method says what a step costs (`curvlab.optim.base.BlockOptimizer.step_cost`:
its extra passes and its blocks' `curvlab.curvature.blocks.CurvatureBlock.cost`, where each
operation is documented with the algorithm lines it executes) and which matrices its refreshes
decompose (`curvlab.optim.base.BlockOptimizer.refresh_matrices`). `floor_items` asks it, at
the layer sizes of a forward pass (`curvlab.bench.cost.geometry.layer_geometry`); the
optimizers of ``torch.optim`` are not curvlab's and have their floors here (`TORCH_FLOORS`:
SGD-m's is empty, it is the baseline). `real_factors` hands the optimizer's own matrices to
the timing of its decompositions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
from torch import Tensor

from curvlab.curvature.cost import CostItem, LayerShape
from curvlab.linalg.cost import Decomposition
from curvlab.optim.base import BlockOptimizer

__all__ = ["TORCH_FLOORS", "floor_items", "real_factors", "torch_entry"]

V = TypeVar("V")

#: The floors of ``torch.optim``'s optimizers, by class: SGD-m is the baseline (nothing beyond
#: itself); the others have no floor model.
TORCH_FLOORS: dict[type[torch.optim.Optimizer], list[CostItem]] = {torch.optim.SGD: []}


def torch_entry(table: Mapping[type[torch.optim.Optimizer], V], optimizer: object) -> V | None:
    """The entry of ``table`` for the optimizer's class or its nearest base class in it."""
    for cls in type(optimizer).__mro__:
        if cls in table:
            return table[cls]
    return None


def _prefixed(item: CostItem, prefix: str) -> CostItem:
    op = item.op
    if not prefix or not isinstance(op, Decomposition) or not op.source:
        return item
    return replace(item, op=replace(op, source=prefix + op.source))


def floor_items(
    optimizer: torch.optim.Optimizer,
    geometry: Sequence[LayerShape],
    *,
    source_prefix: str = "",
) -> list[CostItem] | None:
    """The floor of a configured optimizer at the layer sizes ``geometry`` (None: no floor
    model).

    ``source_prefix`` goes in front of the real-factor names of its decompositions, as in
    `real_factors` (several optimizers' factors in one mapping).
    """
    if isinstance(optimizer, BlockOptimizer):
        return [_prefixed(item, source_prefix) for item in optimizer.step_cost(geometry)]
    floor = torch_entry(TORCH_FLOORS, optimizer)
    return None if floor is None else list(floor)


def real_factors(optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, Tensor]:
    """The undamped matrices the optimizer's refreshes decompose, by ``prefix`` + the source
    name of its decompositions (K-FAC: A and G; TNT: the trace-normalised Ũ_i of eq. 4.10;
    Shampoo: the statistics Ĝ^{(i)}). Empty for other optimizers and for blocks without
    statistics yet."""
    if not isinstance(optimizer, BlockOptimizer):
        return {}
    return {prefix + key: matrix for key, matrix in optimizer.refresh_matrices().items()}
