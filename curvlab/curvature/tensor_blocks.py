r"""Per-tensor Kronecker factors: the preconditioners of TNT and Shampoo (thesis ch.4).

TNT (thesis Alg 15) and the thesis's Shampoo (Alg 16) precondition every parameter tensor
``W ∈ R^{d_1×⋯×d_k}`` on its own ("blocks correspond to tensor variables, not layers", §4.3.1),
knowing nothing but its shape. Definitions of thesis §4.2.1 (spec §1.7), row-major ``vec``:

* ``mat_i(A) ∈ R^{d_i × ∏_{j≠i} d_j}``, whose rows are the slices of A along mode i;
* the contraction ``A^{(i)} = mat_i(A) mat_i(A)ᵀ`` (`mode_statistics`);
* the mode-i product ``(A ×_i U)_{…j'_i…} = Σ_{j_i} A_{…j_i…} U_{j'_i j_i}`` (`mode_product`);
* Prop. 1 (eq. 4.3): ``(U_1 ⊗ ⋯ ⊗ U_k) vec(G) = vec(G ×_1 U_1 ×_2 ⋯ ×_k U_k)``, so the
  preconditioner never needs the dense Kronecker product (`kron_dense` builds it for tests).

Tensor shapes (thesis §4.2, spec §4.2; `tensor_shape`): a bias, BatchNorm weight or bias is
1-way, a Linear weight 2-way ``(d_out, d_in)``, a conv weight 3-way ``(I, J, kh·kw)`` (the
authors' ``view(I, J, kh*kw)``: the kernel dimensions are flattened into one "filter" mode).
Weights and biases are separate blocks; there is no homogeneous coordinate.

`TensorBlock` keeps, for one tensor, the EMA'd mode statistics ``Ĝ^{(i)}`` and the damped
inverse roots ``(F_i + εI)^{-1/r}`` in the parameter's optimizer state:

* TNT (``normalise=True, root=1``): ``F_i = Ũ_i`` from eq. (4.10) (`trace_normalise`), then an
  inverse (Cholesky by default, thesis A16; eigh or coupled Newton as options);
* Shampoo (``normalise=False, root=2k``): ``F_i = Ĝ^{(i)}``, inverse 2k-th root by coupled
  Newton (thesis Alg 16 line 12) or eigh.

The same ε is added to every factor (thesis §4.3.3, spec §4.1). Costs per tensor (thesis
Table 4.1): statistics ``Σ_i d_i ∏_j d_j`` (one GEMM per mode, symmetric via
`curvlab.linalg.gram`), preconditioning the same, factor decompositions ``Σ_i d_i³``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from curvlab.curvature.blocks import count_retry
from curvlab.linalg import (
    DecompositionError,
    add_to_diagonal,
    damped_inverse,
    damped_inverse_root,
    ema_,
    gram,
)

__all__ = [
    "RootMethod",
    "TensorBlock",
    "kron_dense",
    "mode_product",
    "mode_statistics",
    "multi_mode_product",
    "tensor_shape",
    "trace_normalise",
]

State = dict[str, Any]
#: How a damped factor is inverted / rooted: ``"cholesky"`` (inverse only, r = 1), ``"eigh"``,
#: ``"coupled_newton"`` (Anil et al. 2020; thesis §6.4, spec §1.6).
RootMethod = Literal["cholesky", "eigh", "coupled_newton"]


def tensor_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The tensor-variable shape TNT and Shampoo precondition (thesis §4.2).

    A scalar becomes a 1-way tensor of length 1; 1- and 2-way tensors keep their shape; a
    tensor of order ≥ 3 keeps its first two dimensions and flattens the rest into one mode, so
    a conv weight ``(I, J, kh, kw)`` is the 3-way ``(I, J, kh·kw)`` of the authors' code
    (``view(I, J, kh*kw)``, spec §4.2), and a Conv3d weight ``(I, J, kd·kh·kw)``.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) == 0:
        return (1,)
    if len(dims) <= 2:
        return dims
    return (dims[0], dims[1], math.prod(dims[2:]))


def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    """(∏ of the dimensions before ``mode``, d_mode, ∏ of those after)."""
    return math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])


def mode_statistics(
    G: Tensor, out: Sequence[Tensor] | None = None, *, scale: float = 1.0, beta: float = 0.0
) -> list[Tensor]:
    r"""The contractions ``G^{(i)} = mat_i(G) mat_i(G)ᵀ``, i = 1..k (thesis §4.2.1).

    One symmetric GEMM per mode through `curvlab.linalg.gram` (bitwise symmetric results; the
    blocked upper-triangle path for wide modes on CPU): the first mode is ``G₁G₁ᵀ`` of the
    ``(d_1, ∏_{j>1} d_j)`` view, the last ``GₖᵀGₖ`` of the ``(∏_{j<k} d_j, d_k)`` view, a middle
    mode moves its axis to the front first. Every trace equals ``‖G‖_F²``.

    Args:
        G: a tensor of order k ≥ 1 (already in its `tensor_shape`).
        out: optional k buffers of shapes ``(d_i, d_i)`` to write into. An optimizer that
            recomputes the statistics every step should reuse them: a fresh large result each
            step pays first-touch page faults on CPU (see `curvlab.curvature.factors`).
        scale: factor of every contraction.
        beta: accumulate into ``out`` (required then): ``out_i ← β out_i + scale · G^{(i)}``
            (`curvlab.linalg.gram`), e.g. an EMA in one pass.

    Returns:
        k symmetric PSD matrices of shapes ``(d_i, d_i)``.
    """
    if G.dim() == 0:
        raise ValueError("mode_statistics: needs a tensor of order >= 1 (see tensor_shape)")
    shape = tuple(G.shape)
    if out is not None and len(out) != len(shape):
        raise ValueError(f"out: expected {len(shape)} buffers, got {len(out)}")
    result = []
    for mode in range(len(shape)):
        pre, d, post = _split(shape, mode)
        if post == 1:  # last mode (or a vector): rows are the (∏_{j<i} d_j) fibres
            rows = G.reshape(pre, d)
        elif pre == 1:  # first mode: mat_1(G) is a plain view
            rows = G.reshape(d, post).t()
        else:
            rows = G.reshape(pre, d, post).transpose(0, 1).reshape(d, pre * post).t()
        result.append(gram(rows, scale, out=None if out is None else out[mode], beta=beta))
    return result


def trace_normalise(statistics: Sequence[Tensor]) -> list[Tensor]:
    r"""TNT's factors ``Ũ_i`` from the statistics ``E[G^{(i)}]`` (thesis eq. 4.10).

    With ``c = 1`` and the same average eigenvalue ``tr(Ũ_i)/d_i`` for every mode:

    .. math::

        c_0 = \Big(\frac{\operatorname{tr} E[G^{(1)}]}{\prod_j d_j}\Big)^{1/k}, \qquad
        \tilde U_i = \frac{E[G^{(i)}]}{c_0^{k-1} \prod_{j \ne i} d_j},

    so that ``tr(Ũ_i)/d_i = c_0`` and ``Ũ_i ∏_{j≠i} tr(Ũ_j) = E[G^{(i)}]`` (eq. 4.2). All
    traces are equal in exact arithmetic; like the authors' code we use the first mode's.
    For k = 1, ``Ũ_1 = E[G Gᵀ]``. A zero statistic (e.g. a bias whose gradient is always 0)
    gives ``Ũ_i = 0``, the limit of eq. 4.10 as the statistic goes to 0 (``Ũ_i`` scales as
    ``‖G‖^{2/k}``), instead of 0/0.
    """
    k = len(statistics)
    if k == 0:
        raise ValueError("trace_normalise: needs at least one statistic")
    if k == 1:
        return [statistics[0].clone()]
    dims = [int(s.shape[0]) for s in statistics]
    numel = math.prod(dims)
    trace = torch.diagonal(statistics[0]).sum()
    c0 = (trace / numel).clamp_min(0.0).pow(1.0 / k)
    out = []
    for stat, d in zip(statistics, dims, strict=True):
        denominator = c0.pow(k - 1) * (numel // d)
        scale = torch.where(denominator > 0, denominator.reciprocal(), torch.zeros_like(c0))
        out.append(stat * scale)
    return out


def mode_product(X: Tensor, U: Tensor, mode: int) -> Tensor:
    r"""``X ×_mode U``: ``B_{…j'…} = Σ_j X_{…j…} U_{j'j}`` (thesis §4.2.1); ``U`` is (d', d_mode).

    For a matrix, ``X ×_0 U = U X`` and ``X ×_1 U = X Uᵀ``. One GEMM (batched over the leading
    dimensions for a middle mode).
    """
    shape = tuple(X.shape)
    pre, d, post = _split(shape, mode)
    if U.dim() != 2 or U.shape[1] != d:
        raise ValueError(f"mode_product: U {tuple(U.shape)} does not act on mode {mode} of {shape}")
    new_shape = (*shape[:mode], U.shape[0], *shape[mode + 1 :])
    if post == 1:
        return (X.reshape(pre, d) @ U.mT).reshape(new_shape)
    if pre == 1:
        return (U @ X.reshape(d, post)).reshape(new_shape)
    return torch.matmul(U, X.reshape(pre, d, post)).reshape(new_shape)


def multi_mode_product(X: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """``X ×_1 U_1 ×_2 ⋯ ×_k U_k`` = (U_1 ⊗ ⋯ ⊗ U_k) vec(X) reshaped (Prop. 1, eq. 4.3)."""
    if len(matrices) != X.dim():
        raise ValueError(
            f"multi_mode_product: {len(matrices)} matrices for a tensor of order {X.dim()}"
        )
    for mode, U in enumerate(matrices):
        X = mode_product(X, U, mode)
    return X


def kron_dense(matrices: Sequence[Tensor]) -> Tensor:
    """``U_1 ⊗ ⋯ ⊗ U_k`` acting on the row-major vec (tests and tiny tensors only)."""
    if not matrices:
        raise ValueError("kron_dense: needs at least one matrix")
    out = matrices[0]
    for U in matrices[1:]:
        out = torch.kron(out, U)
    return out


class TensorBlock:
    """The Kronecker-factored preconditioner of one parameter tensor (TNT or Shampoo).

    Holds no tensors itself: `update`, `refresh` and `precondition` read and write the
    parameter's state dict (an entry of ``optimizer.state``) under the keys ``"statistics"``
    (the EMA'd ``Ĝ^{(i)}``), ``"preconditioners"`` (``(F_i + εI)^{-1/r}``) and counters.

    Args:
        shape: the parameter's shape (reshaped by `tensor_shape`).
        normalise: TNT's trace normalisation (eq. 4.10) of the statistics before damping.
        root: r in ``(F_i + εI)^{-1/r}``; 1 for TNT, ``2k`` for Shampoo (see `order`).
        method: how the damped factors are inverted / rooted (`RootMethod`); ``"cholesky"``
            needs ``root == 1``.
    """

    def __init__(
        self,
        shape: Sequence[int],
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
        self.param_shape = tuple(int(d) for d in shape)
        self.shape = tensor_shape(self.param_shape)
        self.normalise = normalise
        self.root = root
        self.method: RootMethod = method

    @property
    def order(self) -> int:
        """k, the number of modes."""
        return len(self.shape)

    # -------------------------------------------------------------- statistics
    def statistics(self, grad: Tensor, out: Sequence[Tensor] | None = None) -> list[Tensor]:
        """``[Ḡ^{(i)}]`` of a parameter-shaped tensor (thesis Alg 15 line 12 / Alg 16 line 9),
        optionally written into reused buffers ``out``."""
        return mode_statistics(grad.reshape(self.shape), out)

    @staticmethod
    def has_statistics(state: State) -> bool:
        return "statistics" in state

    @staticmethod
    def has_preconditioners(state: State) -> bool:
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

    # ---------------------------------------------------------- preconditioning
    def precondition(self, state: State, V: Tensor) -> Tensor:
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
    def refresh_cost(self) -> float:
        """``Σ_i d_i³``: the work of one `refresh` (for the owner assignment)."""
        return float(sum(d**3 for d in self.shape))

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
