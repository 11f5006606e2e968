"""The bytes an optimizer keeps between steps, and the thesis's storage formulas.

`state_bytes`: the bytes of every tensor an optimizer keeps between steps (its ``state`` and
tensor caches held as attributes). `storage_formula`: the storage formulas of thesis
Tables 3.1 (K-FAC, K-BFGS, K-BFGS(L), Adam; beyond SGD-m, whose momentum is the DW column) and
4.1 (TNT, Shampoo: Σ_i d_i² per tensor), evaluated with constant 1: a curvlab block method
sums its blocks' terms (`curvlab.optim.base.BlockOptimizer.storage_formula`), the
``torch.optim`` optimizers' formulas are here (`TORCH_STORAGE`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.bench.cost.floors import torch_entry
from curvlab.curvature.cost import LayerShape, StorageFormula
from curvlab.curvature.factors import FactorBuffers
from curvlab.optim.base import BlockOptimizer

__all__ = ["TORCH_STORAGE", "StorageFormula", "state_bytes", "storage_formula"]


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, FactorBuffers):
        yield from value.tensors()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps, each storage counted once.

    Walks ``optimizer.state`` and the optimizer's attributes that are tensors or dicts /
    lists / tuples of tensors (caches such as K-FAC's reused factor buffers); parameters and
    their gradients are excluded. Transient memory within a step (captured activations, the
    retained graph) is not included.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    sources: list[Any] = [optimizer.state]
    sources += [v for k, v in vars(optimizer).items() if k not in ("state", "param_groups")]
    seen: set[int] = set()
    total = 0
    for source in sources:
        for t in _tensors(source):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in exclude or ptr in seen:
                continue
            seen.add(ptr)
            total += storage.nbytes()
    return total


def _adam(optimizer: torch.optim.Optimizer) -> StorageFormula:
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return StorageFormula(total, "Σ numel (DW⊙DW)", "thesis Table 3.1, Adam")


#: The storage formulas of ``torch.optim``'s optimizers beyond SGD-m, by class (thesis
#: Table 3.1: SGD-m's momentum is the baseline, Adam adds DW⊙DW).
TORCH_STORAGE: dict[type[torch.optim.Optimizer], Callable[[torch.optim.Optimizer], StorageFormula]]
TORCH_STORAGE = {
    torch.optim.SGD: lambda optimizer: StorageFormula(0, "0", "—"),
    torch.optim.Adam: _adam,
}


def storage_formula(
    optimizer: torch.optim.Optimizer, geometry: Sequence[LayerShape]
) -> StorageFormula | None:
    """The thesis's storage beyond SGD-m for this optimizer on this model (None: no table).

    Table 3.1 (one layer with d_a = J|Δ| + 1 inputs and I = d_out outputs; DW is SGD-m's
    momentum and not counted): K-FAC and K-BFGS ``Σ_l d_a² + d_out²``, K-BFGS(L)
    ``Σ_l d_a² + p·d_out``, Adam ``Σ_l d_out·d_a`` (DW⊙DW); Table 4.1 (TNT, Shampoo):
    ``Σ_tensors Σ_i d_i²``; SGD-m 0.
    """
    if isinstance(optimizer, BlockOptimizer):
        return optimizer.storage_formula(geometry)
    formula = torch_entry(TORCH_STORAGE, optimizer)
    return None if formula is None else formula(optimizer)
