"""Curvature blocks: the preconditioner of one layer, with its tensors in optimizer state.

A block holds no tensors itself. Its methods read and write the layer's state dict (an entry
of ``optimizer.state``), so ``state_dict()`` / ``load_state_dict()`` carry everything.

`KroneckerBlock` keeps EMA'd factors ``A`` (input side) and ``G`` (output side) and their
damped inverse roots, and preconditions a gradient matrix V (d_out × d_a, bias last column):

    P(V) = (G + λ_G I)^{-1/r} V (A + λ_A I)^{-1/r}

with r = 1 for K-FAC (and TNT), r = 2 for TSO-ALRA's F^{-1/2}, r = 4 for Shampoo's order-2
roots. Row-major vec: ``vec(P(V)) = ((G+λ_G I) ⊗ (A+λ_A I))^{-1/r} vec(V)``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import (
    DecompositionError,
    DecompositionInfo,
    add_to_diagonal,
    damped_inverse,
    damped_inverse_root,
    ema_,
    kron_mv,
    kron_to_dense,
    pi_damping,
)

__all__ = ["KroneckerBlock", "count_retry"]

State = dict[str, Any]


def count_retry(state: State, info: DecompositionInfo) -> None:
    """Count in ``state["retried_decompositions"]`` a decomposition that needed a retry (float64
    or more damping, `curvlab.linalg`), so that the optimizers can report it."""
    if info.attempts > 1:
        state["retried_decompositions"] = state.get("retried_decompositions", 0) + 1


class KroneckerBlock:
    """Kronecker-factored block ``G ⊗ A`` of one `KroneckerLayer`.

    Args:
        layer: the layer.
        root: r in ``(factor + λI)^{-1/r}``.
    """

    def __init__(self, layer: KroneckerLayer, root: float = 1.0) -> None:
        self.layer = layer
        self.root = root

    # -------------------------------------------------------------- statistics
    @staticmethod
    def has_statistics(state: State) -> bool:
        return "A" in state

    @staticmethod
    def has_inverses(state: State) -> bool:
        return "A_inv" in state

    def update(self, state: State, A: Tensor, G: Tensor, ema_decay: float) -> None:
        """``A ← β A + (1−β) A_new`` (likewise G); the first update initialises the factors."""
        if "A" not in state:
            state["A"], state["G"] = A.clone(), G.clone()
        else:
            ema_(state["A"], A, ema_decay)
            ema_(state["G"], G, ema_decay)
        state["statistics_updates"] = state.get("statistics_updates", 0) + 1

    def dampings(self, state: State, damping: float, pi: bool) -> tuple[float, float]:
        """(λ_A, λ_G): the π split of thesis Alg 12 line 19, or √λ each (Alg 7, π = 1)."""
        if pi:
            return pi_damping(state["A"], state["G"], damping)
        return math.sqrt(damping), math.sqrt(damping)

    def refresh(self, state: State, damping: float, pi: bool) -> bool:
        """Recompute the damped inverse roots; on failure keep the previous ones.

        Returns whether the refresh succeeded. Each factor is tried in its dtype, then in
        float64 with more damping (`curvlab.linalg`); if that fails too, the previous inverses
        stay and ``state["failed_refreshes"]`` counts it.
        """
        lam_a, lam_g = self.dampings(state, damping, pi)
        try:
            a_inv = self._inverse_root(state, state["A"], lam_a)
            g_inv = self._inverse_root(state, state["G"], lam_g)
        except DecompositionError:
            state["failed_refreshes"] = state.get("failed_refreshes", 0) + 1
            return False
        state["A_inv"], state["G_inv"] = a_inv, g_inv
        state["refreshes"] = state.get("refreshes", 0) + 1
        return True

    def _inverse_root(self, state: State, M: Tensor, damping: float) -> Tensor:
        if self.root == 1.0:
            result, info = damped_inverse(M, damping)
        else:
            result, info = damped_inverse_root(M, damping, self.root)
        count_retry(state, info)
        return result

    # ---------------------------------------------------------- preconditioning
    def precondition(self, state: State, V: Tensor) -> Tensor:
        """``G_inv V A_inv`` for a gradient matrix V of shape (d_out, d_a)."""
        return kron_mv(state["G_inv"], state["A_inv"], V)

    # ------------------------------------------------------------- dense views
    def to_dense(self, state: State) -> Tensor:
        """The undamped curvature approximation ``G ⊗ A`` (row-major vec of V)."""
        return kron_to_dense(state["G"], state["A"])

    def damped_to_dense(self, state: State, damping: float, pi: bool) -> Tensor:
        """``(G + λ_G I) ⊗ (A + λ_A I)``: the matrix whose inverse r-th root preconditions."""
        lam_a, lam_g = self.dampings(state, damping, pi)
        return kron_to_dense(add_to_diagonal(state["G"], lam_g), add_to_diagonal(state["A"], lam_a))

    def statistics(self, state: State) -> list[Tensor]:
        """Tensors that data-parallel training averages over ranks."""
        return [state["A"], state["G"]]

    # ------------------------------------------- data-parallel (curvlab.distributed)
    def refresh_cost(self) -> float:
        """``d_a³ + d_out³``: the work of one `refresh` (for the owner assignment)."""
        return float(self.layer.d_a**3 + self.layer.d_out**3)

    def local_statistics(self, state: State) -> list[Tensor]:
        """``[A, G]``: EMAs of per-batch means over examples, so in a data-parallel run each
        rank keeps those of its own shard; their mean over ranks is taken before a refresh."""
        return [state["A"], state["G"]]

    def inverse_tensors(self, state: State) -> list[Tensor] | None:
        """``[A_inv, G_inv]``, or None before the first successful `refresh`."""
        return [state["A_inv"], state["G_inv"]] if "A_inv" in state else None

    def inverse_templates(self, state: State) -> list[Tensor]:
        """Tensors shaped like the inverses: the factors ``[A, G]``."""
        return [state["A"], state["G"]]

    def load_inverse_tensors(self, state: State, tensors: list[Tensor]) -> None:
        """Store inverses refreshed on another rank."""
        state["A_inv"], state["G_inv"] = tensors
