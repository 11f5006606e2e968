"""`KroneckerBlock`: the ``G ⊗ A`` block of one layer (K-FAC, K-FAC-EF, TSO-ALRA).

The block keeps EMA'd factors ``A`` (input side, ``(d_a, d_a)``) and ``G`` (output side,
``(d_out, d_out)``) and their damped inverse roots, and preconditions a gradient matrix V
(``d_out × d_a``, bias last column, `curvlab.curvature.layers.KroneckerLayer`):

    P(V) = (G + λ_G I)^{-1/r} V (A + λ_A I)^{-1/r}

with r = 1 for K-FAC, r = 2 for TSO-ALRA's F^{-1/2}. Row-major vec:
``vec(P(V)) = ((G+λ_G I) ⊗ (A+λ_A I))^{-1/r} vec(V)``.

How the damping λ is split between the factors (``split``):

* ``"pi"``: the trace-norm π of Martens & Grosse (2015, sec. 6.3), thesis Alg 12 line 19:
  λ_A = π√λ, λ_G = √λ/π (`curvlab.linalg.pi_damping`);
* ``"sqrt"``: π = 1, λ_A = λ_G = √λ (thesis Alg 7);
* ``"each"``: λ added to each factor's eigenvalues, λ_A = λ_G = λ (TSO-ALRA, seed 001 §III-A).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from curvlab.curvature.blocks.base import CurvatureBlock, State, count_retry
from curvlab.curvature.cost import CostItem, LayerShape, StorageFormula, cost_items
from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import (
    DecompositionError,
    add_to_diagonal,
    damped_inverse,
    damped_inverse_root,
    ema_,
    kron_mv,
    kron_to_dense,
    pi_damping,
)
from curvlab.linalg.cost import Decomposition, Gemm, Op, RowSum, gram_ops

__all__ = ["DampingSplit", "KroneckerBlock"]

DampingSplit = Literal["pi", "sqrt", "each"]


class KroneckerBlock(CurvatureBlock):
    """Kronecker-factored block ``G ⊗ A`` of one `KroneckerLayer`.

    Args:
        layer: the layer.
        root: r in ``(factor + λI)^{-1/r}``.
        split: how the damping is split between the factors (module docstring).
    """

    layer: KroneckerLayer

    def __init__(self, layer: KroneckerLayer, root: float = 1.0, split: DampingSplit = "pi"):
        self.layer = layer
        self.name = layer.name
        self.root = root
        self.split_rule: DampingSplit = split

    @property
    def params(self) -> list[nn.Parameter]:
        return self.layer.params

    # ------------------------------------------------------------ gradient form
    def gradient(self, tensors: list[Tensor]) -> Tensor:
        return self.layer.grad_matrix(tensors[0], tensors[1] if len(tensors) > 1 else None)

    def split(self, matrix: Tensor) -> list[Tensor]:
        return self.layer.split(matrix)

    # -------------------------------------------------------------- statistics
    @staticmethod
    def has_statistics(state: State) -> bool:
        return "A" in state

    @staticmethod
    def is_ready(state: State) -> bool:
        return "A_inv" in state

    def drop_statistics(self, state: State) -> None:
        state.pop("A", None)
        state.pop("G", None)

    def update(self, state: State, statistics: Sequence[Tensor], ema_decay: float) -> None:
        """``A ← β A + (1−β) A_new`` (likewise G); the first update initialises the factors."""
        A, G = statistics
        if "A" not in state:
            state["A"], state["G"] = A.clone(), G.clone()
        else:
            ema_(state["A"], A, ema_decay)
            ema_(state["G"], G, ema_decay)
        state["statistics_updates"] = state.get("statistics_updates", 0) + 1

    def dampings(self, state: State, damping: float) -> tuple[float, float]:
        """(λ_A, λ_G) of the block's ``split`` rule."""
        if self.split_rule == "pi":
            return pi_damping(state["A"], state["G"], damping)
        if self.split_rule == "sqrt":
            return math.sqrt(damping), math.sqrt(damping)
        return damping, damping

    # ---------------------------------------------------------------- inverses
    def refresh(self, state: State, damping: float) -> bool:
        """Recompute the damped inverse roots; on failure keep the previous ones.

        Each factor is tried in its dtype, then in float64 with more damping
        (`curvlab.linalg`); if that fails too, the previous inverses stay and
        ``state["failed_refreshes"]`` counts it.
        """
        lam_a, lam_g = self.dampings(state, damping)
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

    def refresh_cost(self) -> float:
        """``d_a³ + d_out³``: the work of one `refresh`."""
        return float(self.layer.d_a**3 + self.layer.d_out**3)

    # ---------------------------------------------------------- preconditioning
    def precondition(self, state: State, V: Tensor, damping: float = 0.0) -> Tensor:
        """``G_inv V A_inv`` for a gradient matrix V of shape (d_out, d_a)."""
        return kron_mv(state["G_inv"], state["A_inv"], V)

    # ------------------------------------------------------------- dense views
    def to_dense(self, state: State) -> Tensor:
        """The undamped curvature approximation ``G ⊗ A`` (row-major vec of V)."""
        return kron_to_dense(state["G"], state["A"])

    def damped_to_dense(self, state: State, damping: float) -> Tensor:
        """``(G + λ_G I) ⊗ (A + λ_A I)``: the matrix whose inverse r-th root preconditions."""
        lam_a, lam_g = self.dampings(state, damping)
        return kron_to_dense(add_to_diagonal(state["G"], lam_g), add_to_diagonal(state["A"], lam_a))

    # ------------------------------------------- data-parallel (curvlab.distributed)
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

    # ------------------------------------------------- cost (curvlab.curvature.cost)
    def cost(
        self, shape: LayerShape | None, *, statistics: float, refresh: float, damping: float
    ) -> list[CostItem]:
        """The block's work per step, for a layer with r rows, fan-in n, d_out outputs and
        d_a = n + 1 (bias) (thesis Alg 12; TSO-ALRA: seed 001 Alg 1):

        * ``factor_A``, ``factor_G`` (Alg 12 line 14; seed 001 line 3), ``statistics`` per
          step: the GEMMs of `curvlab.linalg.gram` on the (r×n) inputs and the (r×d_out)
          output gradients (the upper block triangle for ≥ 192 columns) and, with a bias, the
          column sums of the inputs;
        * ``precondition`` (Alg 12 line 8; seed 001 line 8), every step:
          ``G⁻¹ V`` (d_out×d_out)(d_out×d_a), then ``(G⁻¹V) A⁻ᵀ`` (d_out×d_a)(d_a×d_a);
        * ``inversion`` (Alg 12 lines 17–19; seed 001 line 5), ``refresh`` per step: the damped
          inverse (`curvlab.linalg.damped_inverse`) or inverse root (eigh,
          `curvlab.linalg.damped_inverse_root`) of A and of G, measured (sources
          ``name:A``, ``name:G``; `refresh_matrices`).

        Conv layers are costed as their im2col GEMMs (r = m·|T| rows).
        """
        assert shape is not None, "a Kronecker block is costed at its layer's shape"
        name, r, n, do, da = self.name, shape.rows, shape.fan_in, shape.d_out, shape.d_a
        a_ops: list[Op] = list(gram_ops(r, n))
        if shape.bias:
            a_ops.append(RowSum(r, n))
        root: float = 1
        if self.root == 1:  # as `_inverse_root`
            method, what = "cholesky", "(A + λ_A I)⁻¹, (G + λ_G I)⁻¹"
        else:
            method, root = "eigh", self.root
            what = f"(A + λ_A I)^(-1/{root:g}), (G + λ_G I)^(-1/{root:g})"
        inverses = [
            Decomposition(method, da, root, damping, f"{name}:A"),
            Decomposition(method, do, root, damping, f"{name}:G"),
        ]
        return [
            *cost_items("factor_A", a_ops, statistics, name, "A = āᵀā / m"),
            *cost_items("factor_G", gram_ops(r, do), statistics, name, "G = ĝᵀĝ"),
            *cost_items(
                "precondition",
                [Gemm(do, do, da, "nn"), Gemm(do, da, da, "nt")],
                1.0,
                name,
                "G⁻¹ V A⁻ᵀ",
            ),
            *cost_items("inversion", inverses, refresh, name, what),
        ]

    def refresh_matrices(self, state: State) -> dict[str, Tensor]:
        """The undamped factors A and G (``name:A``, ``name:G``), once there are statistics."""
        if not self.has_statistics(state):
            return {}
        return {f"{self.name}:{key}": state[key].detach().clone() for key in ("A", "G")}

    def storage(self) -> StorageFormula:
        """``d_a² + d_out²``: A and G, thesis Table 3.1 (K-FAC's row; the inverses and
        reused buffers it keeps as well are not in the formula)."""
        layer = self.layer
        return StorageFormula(
            layer.d_a**2 + layer.d_out**2, "Σ d_a² + d_out²", "thesis Table 3.1, KFAC"
        )
