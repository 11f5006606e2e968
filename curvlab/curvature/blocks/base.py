"""`CurvatureBlock`: the curvature of one parameter group, and what every block offers.

A block owns the curvature of one group of parameters — a layer's weight and bias (Kronecker
blocks of K-FAC, TSO-ALRA and K-BFGS) or one parameter tensor (TNT, Shampoo) — and keeps its
tensors in the optimizer's state dict of that group (``optimizer.state[block.params[0]]``),
so that ``state_dict()`` / ``load_state_dict()`` carry everything and a block object holds
no tensor of its own (only reused scratch memory, never read before it is written).

What a block offers (`curvlab.optim.base.BlockOptimizer` calls these, in this order, in its
step):

* ``gradient(tensors)`` / ``split(matrix)``: the block's gradient in the form it
  preconditions (a Kronecker layer's ``[∇W ∇b]`` matrix, a tensor's own shape) and back;
* ``update(state, statistics, ema_decay)``: fold this step's statistics into the block's
  moving averages (the first update initialises them);
* ``refresh(state, damping)``: recompute the inverses / roots; on failure keep the previous
  ones (``state["failed_refreshes"]``) and return False;
* ``precondition(state, V, damping)``: the direction of a gradient-shaped matrix ``V``
  (blocks that damp at `refresh` ignore ``damping``; K-BFGS's L-BFGS base uses it);
* ``to_dense(state)``: the block's curvature matrix on ``vec(V)`` (row-major), for tests on
  tiny sizes;
* the data-parallel exchange of `curvlab.distributed.SharedInverse` (``local_statistics``,
  ``inverse_tensors``, ``inverse_templates``, ``load_inverse_tensors``) and
  ``refresh_cost()``, the work of one refresh, for the owner assignment;
* its cost (`curvlab.curvature.cost`), for the cost model of ``curvlab overhead``:
  ``cost(shape, statistics=, refresh=, damping=)``, the operations of its statistics, refresh
  and preconditioning at the shapes that occur; ``refresh_matrices(state)``, the matrices a
  refresh decomposes (to time the decompositions on them); ``storage()``, its term of the
  thesis's storage formula.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from curvlab.curvature.cost import CostItem, LayerShape, StorageFormula
from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import DecompositionInfo

__all__ = ["CurvatureBlock", "State", "count_retry"]

State = dict[str, Any]


def count_retry(state: State, info: DecompositionInfo) -> None:
    """Count in ``state["retried_decompositions"]`` a decomposition that needed a retry (float64
    or more damping, `curvlab.linalg`), so that the optimizers can report it."""
    if info.attempts > 1:
        state["retried_decompositions"] = state.get("retried_decompositions", 0) + 1


class CurvatureBlock(ABC):
    """The curvature of one parameter group; its tensors live in the state dict it is given.

    Attributes:
        name: the block's key (a layer name, or a parameter name for tensor blocks).
        params: the parameters it covers; the state dict lives under ``params[0]``.
    """

    name: str
    #: The layer of a layer block (Kronecker, K-BFGS); None for a tensor block.
    layer: KroneckerLayer | None = None

    @property
    @abstractmethod
    def params(self) -> list[nn.Parameter]:
        """The parameters the block covers (its state dict lives under the first)."""

    # ------------------------------------------------------------ gradient form
    @abstractmethod
    def gradient(self, tensors: list[Tensor]) -> Tensor:
        """The block's gradient-shaped matrix from tensors shaped like ``params``."""

    @abstractmethod
    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of `gradient`: tensors shaped like ``params``."""

    # --------------------------------------------------------------- statistics
    @staticmethod
    @abstractmethod
    def has_statistics(state: State) -> bool:
        """Whether the block has statistics yet."""

    @staticmethod
    @abstractmethod
    def is_ready(state: State) -> bool:
        """Whether the block can precondition (it has inverses / roots)."""

    def drop_statistics(self, state: State) -> None:
        """Forget the statistics (a warm start replaces them; the next `update` starts anew)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics to drop")

    @abstractmethod
    def update(self, state: State, statistics: Any, ema_decay: float) -> Any:
        """Fold this step's statistics into the block's curvature (what it did, if anything
        to report)."""

    # ---------------------------------------------------------------- refresh
    def refresh(self, state: State, damping: float) -> bool:
        """Recompute the inverses / roots; False (and the previous ones kept) on failure."""
        raise NotImplementedError(f"{type(self).__name__} has no refresh")

    def refresh_cost(self) -> float:
        """The work of one `refresh` (``Σ d³``), for the data-parallel owner assignment."""
        return 0.0

    # -------------------------------------------------------- preconditioning
    @abstractmethod
    def precondition(self, state: State, V: Tensor, damping: float) -> Tensor:
        """The direction of the gradient-shaped ``V`` at the current ``damping`` (needs
        `is_ready`)."""

    # ------------------------------------------------------------- dense view
    @abstractmethod
    def to_dense(self, state: State) -> Tensor:
        """The block's curvature approximation acting on the row-major ``vec(V)``."""

    # ----------------------------------------- data-parallel (curvlab.distributed)
    def local_statistics(self, state: State) -> list[Tensor]:
        """Statistics this rank keeps for its own shard, averaged over ranks before a refresh."""
        return []

    def inverse_tensors(self, state: State) -> list[Tensor] | None:
        """The inverse / root tensors, or None before the first successful refresh."""
        return None

    def inverse_templates(self, state: State) -> list[Tensor]:
        """Tensors shaped like the inverses (to receive them from another rank)."""
        return []

    def load_inverse_tensors(self, state: State, tensors: list[Tensor]) -> None:  # noqa: B027
        """Store inverses refreshed on another rank (none by default)."""

    # ------------------------------------------------- cost (curvlab.curvature.cost)
    @abstractmethod
    def cost(
        self, shape: LayerShape | None, *, statistics: float, refresh: float, damping: float
    ) -> list[CostItem]:
        """The operations of the block's work in a step beyond SGD-m: its statistics (terms
        ``factor_A`` / ``factor_G``, ``statistics`` times per step), its refresh
        (``inversion``, ``refresh`` times per step, at ``damping``) and its preconditioning
        (``precondition``, every step).

        Args:
            shape: the block's layer in the forward pass (None for a tensor block, whose
                shape is its parameter's).
            statistics: statistics updates per step (1/T1).
            refresh: refreshes per step (1/T2; 0 for a block that never refreshes).
            damping: the damping of the refresh.
        """

    def refresh_matrices(self, state: State) -> dict[str, Tensor]:
        """The matrices a `refresh` decomposes (undamped), keyed by the ``source`` names of
        the block's `cost` decompositions; empty without statistics or a refresh."""
        return {}

    @abstractmethod
    def storage(self) -> StorageFormula:
        """The block's term of the thesis's storage formula (thesis Table 3.1 / 4.1)."""
