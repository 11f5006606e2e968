r"""The operations a floor is made of, each timed on its own at the shape where it occurs.

`Gemm`, `Matvec`, `RowSum`, `TriangularSolve` and `Decomposition` (together `Op`) each know
their FLOPs, whether `torch.utils.flop_counter.FlopCounterMode` counts them, a label for the
report, and how to run themselves on random operands (decompositions: on a given real factor,
or on a random SPD matrix of the same size). `best_time` measures a call at the current thread
count (the minimum over groups of calls: the machine's best, a floor), `counted_flops` counts
what `FlopCounterMode` sees of it, and `gram_gemms` lists the matrix products
`curvlab.linalg.gram` executes for a given matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from curvlab.linalg import damped_inverse, damped_inverse_root
from curvlab.linalg.gram import _BLOCKED_MIN_COLS, _block_size

__all__ = [
    "Decomposition",
    "Gemm",
    "Matvec",
    "Op",
    "RowSum",
    "TriangularSolve",
    "best_time",
    "counted_flops",
    "gram_gemms",
]


# --------------------------------------------------------------------------- timing
def best_time(fn: Callable[[], object], repeats: int = 7, min_group_s: float = 2e-3) -> float:
    """Seconds per call of ``fn``: the minimum over ``repeats`` groups of calls.

    A group holds enough calls to last ``min_group_s`` so that tiny operations are not
    dominated by the clock's resolution. The minimum is the machine's best, a floor.
    """
    fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_group_s or number >= 1 << 14:
            break
        number *= 2 if elapsed <= 0 else max(2, math.ceil(min_group_s / elapsed))
    best = elapsed / number
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn`` executes in matrix products (`FlopCounterMode`)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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
    out-of-place ``addmm`` is costed as its product). ``batch``:
    one (rows × inner) matrix times a batch of (inner × cols) matrices (``torch.matmul``).
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

    def seconds(self, dtype: torch.dtype) -> float:
        """Best measured seconds of one product at the current thread count."""
        return best_time(self.runner(dtype))


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

    ``source`` names a real factor in the ``matrices`` given to `measure_floor_model`; without
    one (or when it is missing) a random SPD matrix of size d is used.
    """

    method: str
    d: int
    root: int = 1
    damping: float = 1.0
    source: str = ""

    counted_by_torch = False  # its matrix products are counted when it is measured

    @property
    def flops(self) -> int:
        return 0

    @property
    def label(self) -> str:
        what = "inverse" if self.method == "cholesky" else f"{self.method} root 1/{self.root}"
        where = f" [{self.source}]" if self.source else ""
        return f"{what} d={self.d}{where}"

    def runner(
        self, dtype: torch.dtype, matrices: Mapping[str, Tensor] | None = None
    ) -> Callable[[], object]:
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


def gram_gemms(n: int, d: int, *, transposed: bool = False, device: str = "cpu") -> list[Gemm]:
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
