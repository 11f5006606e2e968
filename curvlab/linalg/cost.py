r"""What the library's linear algebra executes, described as operations with a known cost.

A cost model lists the work of a step as operations at the shapes where they occur: `Gemm`,
`Matvec`, `RowSum`, `TriangularSolve` and `Decomposition` (together `Op`). Each knows its FLOPs
(a decomposition, which is timed rather than counted, has none), whether
``torch.utils.flop_counter.FlopCounterMode`` counts it, a label, and how to run itself on random
operands (a decomposition: on a given matrix, or on a random SPD matrix of its size), so that a
benchmark can time it on its own. Ops are frozen and hashable: equal operations are timed once.

The functions below say which operations a library routine executes, next to the routine they
describe so that the description changes with it:

* `gram_ops`: `curvlab.linalg.gram` (the blocked upper triangle on CPU for wide matrices);
* `mode_statistics_ops`, `mode_product_op`: one mode of `curvlab.linalg.modes.mode_statistics`
  and `curvlab.linalg.modes.mode_product` (thesis §4.2.1);
* `lbfgs_multiply_ops`: `curvlab.linalg.bfgs.lbfgs_multiply`, the compact L-BFGS product with
  SᵀY and YᵀY known (Byrd, Nocedal & Schnabel 1994, eq. 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.linalg.gram import _BLOCKED_MIN_COLS, _block_size
from curvlab.linalg.inverse import damped_inverse
from curvlab.linalg.roots import damped_inverse_root

__all__ = [
    "Decomposition",
    "Gemm",
    "Matvec",
    "Op",
    "RowSum",
    "TriangularSolve",
    "gram_ops",
    "lbfgs_multiply_ops",
    "mode_product_op",
    "mode_statistics_ops",
]


def _spd(d: int, dtype: torch.dtype) -> Tensor:
    """A symmetric positive definite test matrix like a curvature factor (Gram / rows)."""
    gen = torch.Generator().manual_seed(d)
    X = torch.randn(max(2 * d, 8), d, generator=gen, dtype=dtype)
    return (X.t() @ X) / X.shape[0]


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Gemm:
    """A matrix product ``(rows × inner) @ (inner × cols)``, ``batch`` times.

    ``layout`` says how the operands are stored, as in the library's own calls: ``"nn"`` both
    contiguous (``g @ W``), ``"nt"`` the right one a transposed view (``x @ W.T``,
    ``P @ A.mT``), ``"tn"`` the left one a transposed view (``X.T @ X``). ``accumulate``: the
    product is added in place to an existing matrix (``addmm_``, the rank-2 BFGS update; an
    out-of-place ``addmm`` is costed as its product). ``batch``: one (rows × inner) matrix
    times a batch of (inner × cols) matrices (``torch.matmul``).
    """

    rows: int
    inner: int
    cols: int
    layout: str
    accumulate: bool = False
    batch: int = 1

    @property
    def flops(self) -> int:
        """2·rows·inner·cols·batch."""
        return 2 * self.rows * self.inner * self.cols * self.batch

    @property
    def counted_by_torch(self) -> bool:
        """Whether `FlopCounterMode` counts it (it does not count the in-place ``addmm_``)."""
        return not self.accumulate

    @property
    def label(self) -> str:
        """E.g. ``(1000×785)@(785×1000) nt``."""
        core = f"({self.rows}×{self.inner})@({self.inner}×{self.cols}) {self.layout}"
        if self.batch > 1:
            core = f"{self.batch}× {core}"
        return f"+= {core}" if self.accumulate else core

    def runner(self, dtype: torch.dtype) -> Callable[[], object]:
        """A call executing this product on random operands."""
        if self.layout == "tn":
            left = _randn(self.inner, self.rows, dtype=dtype).t()
        else:
            left = _randn(self.rows, self.inner, dtype=dtype)
        if self.batch > 1:
            right_b = _randn(self.batch, self.inner, self.cols, dtype=dtype, seed=1)
            return lambda: torch.matmul(left, right_b)
        if self.layout == "nt":
            right = _randn(self.cols, self.inner, dtype=dtype, seed=1).t()
        else:
            right = _randn(self.inner, self.cols, dtype=dtype, seed=1)
        out = torch.zeros(self.rows, self.cols, dtype=dtype)
        if self.accumulate:
            return lambda: out.addmm_(left, right)
        return lambda: torch.mm(left, right, out=out)


@dataclass(frozen=True)
class Matvec:
    """``M v`` with M of shape (rows × cols), or ``Mᵀ v`` when ``transposed``."""

    rows: int
    cols: int
    transposed: bool = False

    counted_by_torch = False  # FlopCounterMode does not count aten.mv

    @property
    def flops(self) -> int:
        """2·rows·cols."""
        return 2 * self.rows * self.cols

    @property
    def label(self) -> str:
        return f"({self.rows}×{self.cols}){'ᵀ' if self.transposed else ''}·v"

    def runner(self, dtype: torch.dtype) -> Callable[[], object]:
        M = _randn(self.rows, self.cols, dtype=dtype)
        if self.transposed:
            u = _randn(self.rows, dtype=dtype, seed=1)
            Mt = M.t()
            return lambda: Mt @ u
        v = _randn(self.cols, dtype=dtype, seed=1)
        return lambda: M @ v


@dataclass(frozen=True)
class RowSum:
    """The column sums of a (rows × cols) matrix (a mean over examples, a bias gradient)."""

    rows: int
    cols: int

    counted_by_torch = False

    @property
    def flops(self) -> int:
        """rows·cols additions."""
        return self.rows * self.cols

    @property
    def label(self) -> str:
        return f"Σ_rows ({self.rows}×{self.cols})"

    def runner(self, dtype: torch.dtype) -> Callable[[], object]:
        X = _randn(self.rows, self.cols, dtype=dtype)
        return lambda: X.sum(0)


@dataclass(frozen=True)
class TriangularSolve:
    """``R⁻¹ B`` with R upper triangular (k × k) and B of shape (k × cols)."""

    k: int
    cols: int

    counted_by_torch = False

    @property
    def flops(self) -> int:
        """k²·cols."""
        return self.k * self.k * self.cols

    @property
    def label(self) -> str:
        return f"R⁻¹ ({self.k}×{self.k})·({self.k}×{self.cols})"

    def runner(self, dtype: torch.dtype) -> Callable[[], object]:
        R = torch.triu(_randn(self.k, self.k, dtype=dtype)) + self.k * torch.eye(
            self.k, dtype=dtype
        )
        B = _randn(self.k, self.cols, dtype=dtype, seed=1)
        return lambda: torch.linalg.solve_triangular(R, B, upper=True)


@dataclass(frozen=True)
class Decomposition:
    """A damped inverse (``method="cholesky"``: `curvlab.linalg.damped_inverse`) or inverse
    ``root``-th root (``"eigh"``, ``"coupled_newton"``: `curvlab.linalg.damped_inverse_root`) of
    a d×d factor, timed (not a FLOP estimate).

    ``source`` names the real factor it decomposes (a block's name and the factor's key, see
    `curvlab.curvature.blocks.CurvatureBlock.refresh_matrices`); `runner` uses that matrix when
    it is given one, a random SPD matrix of size d otherwise.
    """

    method: str
    d: int
    root: float = 1
    damping: float = 1.0
    source: str = ""

    counted_by_torch = False  # its matrix products are counted when it is measured

    @property
    def flops(self) -> int:
        return 0

    @property
    def label(self) -> str:
        what = "inverse" if self.method == "cholesky" else f"{self.method} root 1/{self.root:g}"
        where = f" [{self.source}]" if self.source else ""
        return f"{what} d={self.d}{where}"

    def runner(
        self, dtype: torch.dtype, matrices: Mapping[str, Tensor] | None = None
    ) -> Callable[[], object]:
        """A call decomposing ``matrices[source]`` (if there) or a random SPD matrix."""
        M = (matrices or {}).get(self.source) if self.source else None
        matrix = _spd(self.d, dtype) if M is None else M.detach().to(dtype)
        if self.method == "cholesky":
            return lambda: damped_inverse(matrix, self.damping)
        method = self.method
        if method not in ("eigh", "coupled_newton"):
            raise ValueError(f"method: unknown decomposition {method!r}")
        return lambda: damped_inverse_root(
            matrix,
            self.damping,
            self.root,
            method="eigh" if method == "eigh" else "coupled_newton",
        )


Op = Gemm | Matvec | RowSum | TriangularSolve | Decomposition


# --------------------------------------------------------------------------- routines
def gram_ops(n: int, d: int, *, transposed: bool = False, device: str = "cpu") -> list[Gemm]:
    """The matrix products `curvlab.linalg.gram` executes for an (n × d) matrix X.

    ``transposed``: X is a transposed view (the contractions of TNT / Shampoo), which changes
    the operand layout. Wide matrices on CPU (d ≥ 192): one product per block row of the upper
    block triangle, ``X[:, I]ᵀ X[:, I:]``; otherwise the full ``XᵀX``.
    """
    layout = "nt" if transposed else "tn"
    if device != "cpu" or d < _BLOCKED_MIN_COLS:
        return [Gemm(d, n, d, layout)]
    b = _block_size(d)
    return [Gemm(min(i + b, d) - i, n, d - i, layout) for i in range(0, d, b)]


def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    return math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])


def mode_statistics_ops(shape: Sequence[int], mode: int) -> list[Gemm]:
    """The products of the mode-``mode`` contraction ``mat_i(G) mat_i(G)ᵀ`` of a tensor of
    ``shape`` (`curvlab.linalg.modes.mode_statistics`): `gram` of the rows of the
    contraction, the (∏_{j<i} d_j × d_i) view for the last mode, the transposed
    (∏_{j≠i} d_j × d_i) view otherwise."""
    pre, d, post = _split(shape, mode)
    if post == 1:
        return gram_ops(pre, d)
    if pre == 1:
        return gram_ops(post, d, transposed=True)
    return gram_ops(pre * post, d, transposed=True)


def mode_product_op(shape: Sequence[int], mode: int) -> Gemm:
    """The product ``X ×_mode U`` with U (d_i × d_i) of a tensor of ``shape``
    (`curvlab.linalg.modes.mode_product`): ``X Uᵀ`` for the last mode, ``U X`` for the first,
    a batched ``U X_b`` over the leading dimensions for a middle mode."""
    pre, d, post = _split(shape, mode)
    if post == 1:
        return Gemm(pre, d, d, "nt")
    if pre == 1:
        return Gemm(d, d, post, "nn")
    return Gemm(d, d, post, "nn", batch=pre)


def lbfgs_multiply_ops(k: int, d: int, cols: int = 1) -> list[Op]:
    """The compact L-BFGS product H V of `curvlab.linalg.bfgs.lbfgs_multiply` for V of shape
    (d × cols) with k pairs stored as one (2k × d) matrix and SᵀY, YᵀY known: ``[Sᵀ; Yᵀ] V``,
    two k×k triangular solves around ``(YᵀY) r``, and ``γV + [S Y] C`` (an ``addmm``)."""
    return [
        Gemm(2 * k, d, cols, "nn"),
        TriangularSolve(k, cols),
        Gemm(k, k, cols, "nn"),
        TriangularSolve(k, cols),
        Gemm(d, 2 * k, cols, "tn"),
    ]
