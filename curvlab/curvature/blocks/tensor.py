r"""`TensorBlock`: the per-tensor Kronecker preconditioner of TNT and Shampoo (thesis ch.4).

TNT (thesis Alg 15) and the thesis's Shampoo (Alg 16) precondition every parameter tensor
``W ∈ R^{d_1×⋯×d_k}`` on its own ("blocks correspond to tensor variables, not layers",
§4.3.1), knowing nothing but its shape (`curvlab.linalg.modes.tensor_shape`). The block keeps
the EMA'd mode statistics ``Ĝ^{(i)}`` (contractions of a gradient, thesis §4.2.1) and the
damped inverse roots ``(F_i + εI)^{-1/r}``:

* TNT (``normalise=True, root=1``): ``F_i = Ũ_i`` from eq. (4.10) (`trace_normalise`), then an
  inverse (Cholesky by default, deviation A16 in docs/deviations.md; eigh or coupled Newton);
* Shampoo (``normalise=False, root=2k``): ``F_i = Ĝ^{(i)}``, inverse 2k-th root by coupled
  Newton (thesis Alg 16 line 12) or eigh.

The same ε is added to every factor (thesis §4.3.3). Costs (thesis Table 4.1): statistics
``Σ_i d_i ∏_j d_j``, preconditioning the same, decompositions ``Σ_i d_i³``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from curvlab.curvature.blocks.base import CurvatureBlock, State, count_retry
from curvlab.curvature.cost import CostItem, LayerShape, StorageFormula, cost_items
from curvlab.linalg import (
    DecompositionError,
    add_to_diagonal,
    damped_inverse,
    damped_inverse_root,
    ema_,
)
from curvlab.linalg.cost import Decomposition, mode_product_op, mode_statistics_ops
from curvlab.linalg.modes import (
    kron_dense,
    mode_statistics,
    multi_mode_product,
    tensor_shape,
    trace_normalise,
)

__all__ = ["RootMethod", "TensorBlock"]

#: How a damped factor is inverted / rooted: ``"cholesky"`` (inverse only, r = 1), ``"eigh"``,
#: ``"coupled_newton"`` (Anil et al. 2020; thesis §4.7.2).
RootMethod = Literal["cholesky", "eigh", "coupled_newton"]


class TensorBlock(CurvatureBlock):
    """The Kronecker-factored preconditioner of one parameter tensor (TNT or Shampoo).

    State keys (under the parameter): ``"statistics"`` (the EMA'd ``Ĝ^{(i)}``),
    ``"preconditioners"`` (``(F_i + εI)^{-1/r}``) and counters.

    Args:
        name: the parameter's name in the model.
        param: the parameter.
        normalise: TNT's trace normalisation (eq. 4.10) of the statistics before damping.
        root: r in ``(F_i + εI)^{-1/r}``; 1 for TNT, ``2k`` for Shampoo (see `order`).
        method: how the damped factors are inverted / rooted (`RootMethod`); ``"cholesky"``
            needs ``root == 1``.
    """

    def __init__(
        self,
        name: str,
        param: nn.Parameter,
        *,
        normalise: bool,
        root: int,
        method: RootMethod,
    ) -> None:
        if method not in ("cholesky", "eigh", "coupled_newton"):
            raise ValueError(f"method: expected cholesky, eigh or coupled_newton, got {method!r}")
        if method == "cholesky" and root != 1:
            raise ValueError("method: 'cholesky' computes inverses only (root 1)")
        if root < 1:
            raise ValueError(f"root: expected an integer >= 1, got {root}")
        self.name = name
        self.param = param
        self.param_shape = tuple(int(d) for d in param.shape)
        self.shape = tensor_shape(self.param_shape)
        self.normalise = normalise
        self.root = root
        self.method: RootMethod = method

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.param]

    @property
    def order(self) -> int:
        """k, the number of modes."""
        return len(self.shape)

    # ------------------------------------------------------------ gradient form
    def gradient(self, tensors: list[Tensor]) -> Tensor:
        return tensors[0]

    def split(self, matrix: Tensor) -> list[Tensor]:
        return [matrix]

    # -------------------------------------------------------------- statistics
    def statistics(self, grad: Tensor, out: Sequence[Tensor] | None = None) -> list[Tensor]:
        """``[Ḡ^{(i)}]`` of a parameter-shaped tensor (thesis Alg 15 line 12 / Alg 16 line 9),
        optionally written into reused buffers ``out``."""
        return mode_statistics(grad.reshape(self.shape), out)

    @staticmethod
    def has_statistics(state: State) -> bool:
        return "statistics" in state

    @staticmethod
    def is_ready(state: State) -> bool:
        return "preconditioners" in state

    def accumulate(self, state: State, grad: Tensor, ema_decay: float, scale: float = 1.0) -> None:
        """`update` with ``statistics(grad) · scale`` fused into the EMA: ``Ĝ^{(i)} ← β Ĝ^{(i)}
        + (1−β) · scale · Ḡ^{(i)}`` in one product per mode (no buffer, no separate average
        pass). Needs existing statistics; the caller guarantees the new ones are finite
        (`curvlab.linalg.contractions_bounded`), since the state is written in place."""
        if "statistics" not in state:
            raise RuntimeError("accumulate: no statistics yet (the first update initialises them)")
        mode_statistics(
            grad.reshape(self.shape),
            state["statistics"],
            scale=(1.0 - ema_decay) * scale,
            beta=ema_decay,
        )
        state["statistics_updates"] = state.get("statistics_updates", 0) + 1

    def drop_statistics(self, state: State) -> None:
        state.pop("statistics", None)

    def update(self, state: State, statistics: Sequence[Tensor], ema_decay: float) -> None:
        """``Ĝ^{(i)} ← β Ĝ^{(i)} + (1−β) Ḡ^{(i)}``; the first update initialises ``Ĝ``."""
        if "statistics" not in state:
            state["statistics"] = [s.clone() for s in statistics]
        else:
            for avg, new in zip(state["statistics"], statistics, strict=True):
                ema_(avg, new, ema_decay)
        state["statistics_updates"] = state.get("statistics_updates", 0) + 1

    def factors(self, state: State) -> list[Tensor]:
        """The undamped factors ``F_i``: ``Ũ_i`` (eq. 4.10) for TNT, ``Ĝ^{(i)}`` for Shampoo."""
        stats: list[Tensor] = state["statistics"]
        return trace_normalise(stats) if self.normalise else list(stats)

    # ---------------------------------------------------------------- inverses
    def refresh(self, state: State, damping: float) -> bool:
        """Recompute ``(F_i + εI)^{-1/r}`` for every mode; on failure keep the previous ones.

        Each factor is tried in its dtype, then in float64 with more damping
        (`curvlab.linalg`); if that fails too, the previous preconditioners stay and
        ``state["failed_refreshes"]`` counts it. Returns whether the refresh succeeded.
        """
        try:
            roots = [self._inverse_root(state, F, damping) for F in self.factors(state)]
        except DecompositionError:
            state["failed_refreshes"] = state.get("failed_refreshes", 0) + 1
            return False
        state["preconditioners"] = roots
        state["refreshes"] = state.get("refreshes", 0) + 1
        return True

    def _inverse_root(self, state: State, F: Tensor, damping: float) -> Tensor:
        if self.method == "cholesky":
            result, info = damped_inverse(F, damping)
        else:
            result, info = damped_inverse_root(F, damping, self.root, method=self.method)
        count_retry(state, info)
        return result

    def refresh_cost(self) -> float:
        """``Σ_i d_i³``: the work of one `refresh`."""
        return float(sum(d**3 for d in self.shape))

    # ---------------------------------------------------------- preconditioning
    def precondition(self, state: State, V: Tensor, damping: float = 0.0) -> Tensor:
        """``V ×_1 P_1 ×_2 ⋯ ×_k P_k`` with ``P_i = (F_i + εI)^{-1/r}``, shaped like ``V``."""
        out = multi_mode_product(V.reshape(self.shape), state["preconditioners"])
        return out.reshape(V.shape)

    # ------------------------------------------------------------- dense views
    def to_dense(self, state: State) -> Tensor:
        """``F_1 ⊗ ⋯ ⊗ F_k``: TNT's Fisher approximation / Shampoo's statistics (row-major)."""
        return kron_dense(self.factors(state))

    def damped_to_dense(self, state: State, damping: float) -> Tensor:
        """``(F_1 + εI) ⊗ ⋯ ⊗ (F_k + εI)``, whose ``-1/r`` power preconditions."""
        return kron_dense([add_to_diagonal(F, damping) for F in self.factors(state)])

    def preconditioner_to_dense(self, state: State) -> Tensor:
        """``P_1 ⊗ ⋯ ⊗ P_k``: the matrix `precondition` applies to ``vec(V)``."""
        return kron_dense(state["preconditioners"])

    # ------------------------------------------- data-parallel (curvlab.distributed)
    def local_statistics(self, state: State) -> list[Tensor]:
        """None: the statistics are contractions of a gradient averaged over ranks (not
        linear in the data), so they are the same on every rank already."""
        return []

    def inverse_tensors(self, state: State) -> list[Tensor] | None:
        """The preconditioners ``(F_i + εI)^{-1/r}``, or None before the first `refresh`."""
        roots: list[Tensor] | None = state.get("preconditioners")
        return None if roots is None else list(roots)

    def inverse_templates(self, state: State) -> list[Tensor]:
        """Tensors shaped like the preconditioners: the statistics ``Ĝ^{(i)}``."""
        return list(state["statistics"])

    def load_inverse_tensors(self, state: State, tensors: list[Tensor]) -> None:
        """Store preconditioners refreshed on another rank."""
        state["preconditioners"] = list(tensors)

    # ------------------------------------------------- cost (curvlab.curvature.cost)
    def cost(
        self, shape: LayerShape | None, *, statistics: float, refresh: float, damping: float
    ) -> list[CostItem]:
        """The block's work per step, per mode i of its tensor shape d_1×…×d_k (thesis Alg 15,
        Alg 16; ``shape`` is unused: the block's shape is its parameter's):

        * ``factor_G`` (mode 0: the output side of a weight, and every bias) or ``factor_A``
          (the other modes), ``statistics`` per step (Alg 15 line 12, Alg 16 line 9): the
          contraction ``mat_i(G) mat_i(G)ᵀ`` by `curvlab.linalg.gram`
          (`curvlab.linalg.cost.mode_statistics_ops`);
        * ``precondition`` (Alg 15 line 18, Alg 16 line 14), every step: one mode product per
          mode, ``U₀ X`` (d_out×d_out)(d_out×n) and ``X U₁ᵀ`` (d_out×n)(n×n) for a weight,
          ``x Uᵀ`` (1×d)(d×d) for a bias, batched over the leading modes for a middle mode;
        * ``inversion`` (Alg 15 lines 15–16, Alg 16 line 12), ``refresh`` per step: every
          factor's Cholesky inverse (TNT) or eigh / coupled-Newton inverse ``2k``-th root
          (Shampoo) at ``damping``, measured (source ``name:i``; `refresh_matrices`).

        Conv weights are costed by their 3-way mode products (an approximation of the conv
        tensors' cost); an empty parameter costs nothing.
        """
        if self.param.numel() == 0:
            return []
        name, dims = self.name, self.shape
        out: list[CostItem] = []
        for mode, d in enumerate(dims):
            term = "factor_G" if mode == 0 else "factor_A"
            grams = mode_statistics_ops(dims, mode)
            out += cost_items(term, grams, statistics, name, f"mode-{mode} contraction")
            prod = mode_product_op(dims, mode)
            out += cost_items("precondition", [prod], 1.0, name, f"×_{mode} P_{mode}")
            dec = Decomposition(self.method, d, self.root, damping, f"{name}:{mode}")
            out += cost_items("inversion", [dec], refresh, name, f"mode-{mode} factor")
        return out

    def refresh_matrices(self, state: State) -> dict[str, Tensor]:
        """The undamped factors `factors` (``name:i``), once there are statistics."""
        if not self.has_statistics(state):
            return {}
        return {f"{self.name}:{i}": F.detach().clone() for i, F in enumerate(self.factors(state))}

    def storage(self) -> StorageFormula:
        """``Σ_i d_i²``, thesis Table 4.1 (the statistics; the preconditioners it keeps as well
        are not in the formula)."""
        elements = sum(d * d for d in self.shape) if self.param.numel() > 0 else 0
        return StorageFormula(elements, "Σ_tensors Σ_i d_i²", "thesis Table 4.1")
