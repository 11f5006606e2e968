r"""Arithmetic floors and memory of the curvature methods, for ``curvlab overhead``.

A method's *floor* is the time that the work it must do beyond an SGD-m step takes on this
machine: every matrix product, matrix–vector product, reduction and triangular solve of that
work at the shape where it really occurs, each timed on its own at the current thread count
(no single peak number), plus the *measured* time of its amortised decompositions (inverses,
inverse roots). A floor is a list of `FloorItem`\ s, an operation (`Gemm`, `Matvec`, `RowSum`,
`TriangularSolve`, `Decomposition`) with the number of times it occurs per step (``1/T1`` for
statistics, ``1/T2`` for decompositions) and the term of the overhead table it belongs to
(`FLOOR_TERMS`). Elementwise work (EMAs, damping, the loss and its derivative, the activation
functions' backward, the mirror copies of `curvlab.linalg.gram`) and Python overhead are not
counted, so the floor is a lower bound of the method's extra time.

Per Linear layer with r rows (the batch m), fan-in n, d_out outputs and d_a = n + 1 (bias),
and per parameter tensor of shape d_1×…×d_k (TNT, Shampoo):

K-FAC (thesis Alg 12; statistics every T1, inverses every T2)
    extra_forward (``statistics="after_step"``): ``x Wᵀ``, (r×n)(n×d_out), / T1.
    statistics_backward (after the step, or sampled labels): layer-output gradients only,
    ``g W`` (r×d_out)(d_out×n), for the layers whose input needs a gradient, / T1.
    factor_A, factor_G: the block GEMMs of `curvlab.linalg.gram` on the (r×n) inputs and the
    (r×d_out) output gradients (upper block triangle for ≥ 192 columns) and, with a bias, the
    column sums of the inputs, / T1.
    precondition: ``G⁻¹ V`` (d_out×d_out)(d_out×d_a) and ``(G⁻¹V) A⁻ᵀ`` (d_out×d_a)(d_a×d_a).
    inversion: `curvlab.linalg.damped_inverse` of A and G, measured, / T2.

K-BFGS, K-BFGS(L) (thesis Alg 9; curvature every T; no decomposition at all)
    extra_forward and statistics_backward: the second pass at the new weights (line 13); it
    needs only the pre-activations and their gradients, not weight gradients, / T.
    factor_A: ā (column sums of the inputs), s_A = H_A ā, the matrix-free Hessian action
    ``Ã s_A = (1/m) Xᵀ(X s_A)`` (two matrix–vector products over the r×n inputs, eq. 3.15;
    K-BFGS-20's ``a_update="ema"`` instead forms A by `gram` and multiplies it), H_A y_A and the
    rank-2 BFGS update of H_A (an ``addmm`` with inner dimension 2), / T.
    factor_G: h̄ = [W b] ā at the old and new weights, ā⁺ of the second pass, D̄h and D̄h⁺
    (column sums of the output gradients), then for BFGS H_G y (Powell damping) and H_G ỹ
    and the rank-2 update of H_G; for L-BFGS with p pairs (the steady state: the buffer is full)
    one compact product H_G y (Powell damping) and the update of the p×p matrices SᵀY and YᵀY
    for the new pair (three (p×d_out) matrix–vector products), / T.
    precondition: ``V H_A`` (d_out×d_a)(d_a×d_a), then ``H_G (V H_A)`` (d_out×d_out)(d_out×d_a),
    or for L-BFGS the compact form (Byrd, Nocedal & Schnabel 1994) with SᵀY, YᵀY known:
    ``[S;Y](VH_A)`` (2p×d_out)(d_out×d_a), two p×p triangular solves and a (p×p)(p×d_a)
    product on p×d_a right-hand sides, and ``[S;Y]ᵀ C`` (d_out×2p)(2p×d_a).

TNT and Shampoo (thesis Alg 15, 16; statistics every T1, inverses / roots every T2)
    statistics_backward, statistics_weight_grad (TNT with sampled labels only): the second
    backward pass through the forward graph of the gradient pass, with the weight gradients
    (the statistics are contractions of the sampled weight gradient) and the bias sums, / T1.
    factor_G, factor_A: the contractions ``mat_i(G) mat_i(G)ᵀ`` by `gram`, mode 0 (the output
    side of a weight, and every bias) under factor_G and the other modes under factor_A, / T1.
    precondition: one mode product per mode, ``U₀ X`` (d_out×d_out)(d_out×n) and ``X U₁ᵀ``
    (d_out×n)(n×n) for a weight, ``x Uᵀ`` (1×d)(d×d) for a bias.
    inversion: every factor's Cholesky inverse (TNT) or eigh / coupled-Newton inverse
    ``2k``-th root (Shampoo), measured on the optimizer's own factors when they are given
    (`real_factors`), on a random SPD matrix of the same size otherwise, / T2.

`measure_floor_model` times every distinct operation once; `FloorModel.terms_ms` and
`FloorModel.flops` add them up per term. `counted_flops` of a floor is what
`torch.utils.flop_counter.FlopCounterMode` sees of it (matrix products only, plus the matrix
products inside the decompositions), so that it can be compared with the FLOPs a step
really executes.

Memory (`state_bytes`, `storage_formula`): the bytes of every tensor an optimizer keeps
between steps (its ``state`` and tensor caches held as attributes), and the storage formulas
of thesis Tables 3.1 (K-FAC, K-BFGS, K-BFGS(L), Adam; beyond SGD-m, whose momentum is the DW
column) and 4.1 (TNT, Shampoo: Σ_i d_i² per tensor), evaluated with constant 1.

Conv layers are costed as their im2col GEMMs and TNT / Shampoo's 3-way conv tensors by their
batched mode products (an approximation); the floors are exact in form for MLPs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from curvlab.curvature.factors import FactorBuffers
from curvlab.curvature.layers import find_layers
from curvlab.curvature.tensor_blocks import tensor_shape
from curvlab.linalg import damped_inverse, damped_inverse_root
from curvlab.linalg.gram import _BLOCKED_MIN_COLS, _block_size
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.tensorwise import TensorwiseOptimizer

__all__ = [
    "FLOOR_TERMS",
    "Decomposition",
    "FloorItem",
    "FloorModel",
    "Gemm",
    "LayerGeometry",
    "Matvec",
    "Op",
    "RowSum",
    "StorageFormula",
    "TensorSpec",
    "TriangularSolve",
    "best_time",
    "counted_flops",
    "floor_flops",
    "floor_items",
    "gram_gemms",
    "kbfgs_floor",
    "kfac_floor",
    "layer_geometry",
    "measure_floor_model",
    "real_factors",
    "state_bytes",
    "storage_formula",
    "tensorwise_floor",
]

FLOOR_TERMS = (
    "extra_forward",
    "statistics_backward",
    "statistics_weight_grad",
    "factor_A",
    "factor_G",
    "precondition",
    "inversion",
)
"""The components of a floor, in milliseconds per step beyond SGD-m."""


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class LayerGeometry:
    """The matrix-form sizes of one Kronecker layer in one forward pass.

    Attributes:
        name: module name.
        rows: r = m·|T|, rows of the layer's matrix form (m for a Linear layer).
        fan_in: d_in (without the bias coordinate).
        d_out: output width.
        bias: whether the layer has a trainable bias (d_a = d_in + 1).
        input_grad: whether backpropagation continues below this layer (its input needs a
            gradient); False for the first layer of a network.
        input_shape, output_shape: tensor shapes seen in the forward pass.
    """

    name: str
    rows: int
    fan_in: int
    d_out: int
    bias: bool
    input_grad: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def d_a(self) -> int:
        """Input-side factor size: fan-in plus the bias coordinate."""
        return self.fan_in + int(self.bias)


def layer_geometry(model: nn.Module, inputs: Tensor) -> list[LayerGeometry]:
    """Sizes of ``model``'s Kronecker layers, from one forward pass on ``inputs``.

    A layer called several times is described by its first call.
    """
    layers = find_layers(model)
    seen: dict[str, tuple[Tensor, bool]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles: list[RemovableHandle] = []

    def pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, (args[0].detach(), bool(args[0].requires_grad)))

        return hook

    def post_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            shapes.setdefault(name, tuple(output.shape))

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.module.register_forward_pre_hook(pre_hook(name)))
            handles.append(layer.module.register_forward_hook(post_hook(name)))
        with torch.enable_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    out: list[LayerGeometry] = []
    for name, layer in layers.items():
        if name not in seen:
            continue
        x, needs_grad = seen[name]
        rows = layer.input_rows(x)
        out.append(
            LayerGeometry(
                name=name,
                rows=int(rows.shape[0]),
                fan_in=int(rows.shape[1]),
                d_out=layer.d_out,
                bias=layer.bias is not None,
                input_grad=needs_grad,
                input_shape=tuple(x.shape),
                output_shape=shapes[name],
            )
        )
    return out


# --------------------------------------------------------------------------- timing helpers
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


@dataclass(frozen=True)
class FloorItem:
    """One operation of a floor: ``per_step`` occurrences per step, in table column ``term``."""

    term: str
    op: Op
    per_step: float
    layer: str
    what: str


# --------------------------------------------------------------------------- building blocks
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


def _items(term: str, ops: Iterable[Op], per_step: float, layer: str, what: str) -> list[FloorItem]:
    return [FloorItem(term, op, per_step, layer, what) for op in ops]


def _lbfgs_vector(k: int, d: int) -> list[Op]:
    """The compact L-BFGS product H v for one vector, SᵀY and YᵀY known."""
    return [
        Gemm(2 * k, d, 1, "nn"),  # [Sᵀv; Yᵀv]
        TriangularSolve(k, 1),
        Gemm(k, k, 1, "nn"),  # YᵀY r
        TriangularSolve(k, 1),
        Gemm(d, 2 * k, 1, "tn"),  # γv + [S Y] c (addmm)
    ]


def _lbfgs_matrix(k: int, d: int, cols: int) -> list[Op]:
    """The compact L-BFGS product H V for V of shape (d × cols), SᵀY and YᵀY known."""
    return [
        Gemm(2 * k, d, cols, "nn"),
        TriangularSolve(k, cols),
        Gemm(k, k, cols, "nn"),
        TriangularSolve(k, cols),
        Gemm(d, 2 * k, cols, "tn"),  # γV + [S Y] C (addmm)
    ]


# --------------------------------------------------------------------------- method floors
def kfac_floor(
    geometry: Sequence[LayerGeometry],
    *,
    curvature_every: int,
    inverse_every: int,
    after_step: bool,
    sampled: bool,
    damping: float = 1.0,
) -> list[FloorItem]:
    """K-FAC's floor (thesis Alg 12; see the module docstring)."""
    stats = 1.0 / curvature_every
    out: list[FloorItem] = []
    for g in geometry:
        if after_step:
            out += _items(
                "extra_forward", [Gemm(g.rows, g.fan_in, g.d_out, "nt")], stats, g.name, "x Wᵀ"
            )
        if (after_step or sampled) and g.input_grad:
            out += _items(
                "statistics_backward",
                [Gemm(g.rows, g.d_out, g.fan_in, "nn")],
                stats,
                g.name,
                "g W (output gradients only)",
            )
        a_ops: list[Op] = list(gram_gemms(g.rows, g.fan_in))
        if g.bias:
            a_ops.append(RowSum(g.rows, g.fan_in))
        out += _items("factor_A", a_ops, stats, g.name, "A = āᵀā / m")
        out += _items("factor_G", gram_gemms(g.rows, g.d_out), stats, g.name, "G = ĝᵀĝ")
        out += _items(
            "precondition",
            [Gemm(g.d_out, g.d_out, g.d_a, "nn"), Gemm(g.d_out, g.d_a, g.d_a, "nt")],
            1.0,
            g.name,
            "G⁻¹ V A⁻ᵀ",
        )
        out += _items(
            "inversion",
            [
                Decomposition("cholesky", g.d_a, 1, damping),
                Decomposition("cholesky", g.d_out, 1, damping),
            ],
            1.0 / inverse_every,
            g.name,
            "(A + λ_A I)⁻¹, (G + λ_G I)⁻¹",
        )
    return out


def kbfgs_floor(
    geometry: Sequence[LayerGeometry],
    *,
    curvature_every: int = 1,
    memory: int | None = None,
    a_update: str = "minibatch",
    pair_damping: str = "dp_dlm",
) -> list[FloorItem]:
    """K-BFGS's (``memory=None``) or K-BFGS(L)'s floor (thesis Alg 9; module docstring).

    ``memory``: p, the number of L-BFGS pairs at the steady state (the buffer full).
    """
    c = 1.0 / curvature_every
    k = memory
    out: list[FloorItem] = []
    for g in geometry:
        n, do, da, r = g.fan_in, g.d_out, g.d_a, g.rows
        # Alg 9 line 13: the second pass, pre-activations and their gradients only.
        out += _items("extra_forward", [Gemm(r, n, do, "nt")], c, g.name, "x Wᵀ (second pass)")
        if g.input_grad:
            out += _items(
                "statistics_backward",
                [Gemm(r, do, n, "nn")],
                c,
                g.name,
                "g W (second pass, output gradients only)",
            )
        # Alg 9 lines 16–17: H_A.
        a_ops: list[Op] = [RowSum(r, n), Matvec(da, da)]  # ā, s_A = H_A ā
        if a_update == "minibatch":
            a_ops += [Matvec(r, n), Matvec(r, n, transposed=True)]  # Ã s_A = Xᵀ(X s_A)/m
        else:  # K-BFGS-20 (Alg 4 line 20): A's EMA formed, then A s_A
            a_ops += list(gram_gemms(r, n))
            if g.bias:
                a_ops.append(RowSum(r, n))
            a_ops.append(Matvec(da, da))
        a_ops += [Matvec(da, da), Gemm(da, 2, da, "nn", accumulate=True)]  # H_A y_A, rank 2
        out += _items("factor_A", a_ops, c, g.name, "ā, Hessian-action pair, BFGS on H_A")
        # Alg 9 lines 19–21: H_G.
        g_ops: list[Op] = [
            Matvec(do, da),  # h̄ = [W b] ā (old weights)
            Matvec(do, da),  # h̄⁺ (new weights)
            RowSum(r, n),  # ā⁺ of the second pass
            RowSum(r, do),  # D̄h
            RowSum(r, do),  # D̄h⁺
        ]
        if k is None:
            if pair_damping != "dpi_dlm":
                g_ops.append(Matvec(do, do))  # H_G y (Powell damping)
            g_ops += [Matvec(do, do), Gemm(do, 2, do, "nn", accumulate=True)]  # H_G ỹ, rank 2
        else:
            if pair_damping != "dpi_dlm":
                g_ops += _lbfgs_vector(k, do)  # H_G y (Powell damping)
            g_ops += [Matvec(k, do), Matvec(k, do), Matvec(k, do)]  # new row of SᵀY, YᵀY
        out += _items("factor_G", g_ops, c, g.name, "h̄, D̄h, damped pair, update of H_G")
        # Alg 9 line 9: p = H_G D̂W H_A.
        p_ops: list[Op] = [Gemm(do, da, da, "nn")]
        p_ops += [Gemm(do, do, da, "nn")] if k is None else _lbfgs_matrix(k, do, da)
        out += _items("precondition", p_ops, 1.0, g.name, "H_G (V H_A)")
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of TNT / Shampoo: its name, tensor shape and decomposition."""

    name: str
    shape: tuple[int, ...]
    method: str
    root: int
    damping: float


def tensorwise_floor(
    geometry: Sequence[LayerGeometry],
    tensors: Sequence[TensorSpec],
    *,
    curvature_every: int,
    inverse_every: int,
    extra_backward: bool,
    source_prefix: str | None = None,
) -> list[FloorItem]:
    """TNT's or Shampoo's floor (thesis Alg 15 / 16; see the module docstring).

    ``source_prefix``: the decompositions are timed on the factors ``real_factors`` returns
    under this prefix (None: random SPD matrices).
    """
    stats = 1.0 / curvature_every
    out: list[FloorItem] = []
    if extra_backward:  # Alg 15 line 7: a full backward pass of the sampled-label loss
        for g in geometry:
            if g.input_grad:
                out += _items(
                    "statistics_backward",
                    [Gemm(g.rows, g.d_out, g.fan_in, "nn")],
                    stats,
                    g.name,
                    "g W",
                )
            wg: list[Op] = [Gemm(g.d_out, g.rows, g.fan_in, "tn")]
            if g.bias:
                wg.append(RowSum(g.rows, g.d_out))
            out += _items("statistics_weight_grad", wg, stats, g.name, "gᵀ x, Σ g")
    for t in tensors:
        shape = t.shape
        for mode in range(len(shape)):
            pre, d, post = (
                math.prod(shape[:mode]),
                shape[mode],
                math.prod(shape[mode + 1 :]),
            )
            # curvlab.curvature.tensor_blocks.mode_statistics: rows of the contraction.
            if post == 1:
                grams = gram_gemms(pre, d)
            elif pre == 1:
                grams = gram_gemms(post, d, transposed=True)
            else:
                grams = gram_gemms(pre * post, d, transposed=True)
            term = "factor_G" if mode == 0 else "factor_A"
            out += _items(term, grams, stats, t.name, f"mode-{mode} contraction")
            # mode_product (precondition): one product per mode.
            if post == 1:
                prod = Gemm(pre, d, d, "nt")
            elif pre == 1:
                prod = Gemm(d, d, post, "nn")
            else:
                prod = Gemm(d, d, post, "nn", batch=pre)
            out += _items("precondition", [prod], 1.0, t.name, f"×_{mode} P_{mode}")
            source = "" if source_prefix is None else f"{source_prefix}{t.name}:{mode}"
            out += _items(
                "inversion",
                [Decomposition(t.method, d, t.root, t.damping, source)],
                1.0 / inverse_every,
                t.name,
                f"mode-{mode} factor",
            )
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def floor_items(
    optimizer: torch.optim.Optimizer,
    geometry: Sequence[LayerGeometry],
    *,
    source_prefix: str | None = None,
) -> list[FloorItem] | None:
    """The floor of a configured optimizer, from its settings (None: no floor model).

    K-FAC (`curvlab.optim.kfac.KFAC`), K-BFGS / K-BFGS(L) (`curvlab.optim.kbfgs.KBFGS`), TNT and
    Shampoo (`curvlab.optim.tensorwise.TensorwiseOptimizer`); SGD-m's floor is empty.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return []
    if isinstance(optimizer, KFAC):
        group = optimizer.param_groups[0]
        used = [g for g in geometry if g.name in optimizer.layers]
        return kfac_floor(
            used,
            curvature_every=int(group["curvature_every"]),
            inverse_every=int(group["inverse_every"]),
            after_step=optimizer.statistics == "after_step",
            sampled=optimizer.fisher == "true",
            damping=float(group["damping"]),
        )
    if isinstance(optimizer, KBFGS):
        used = [g for g in geometry if g.name in optimizer.layers]
        return kbfgs_floor(
            used,
            curvature_every=int(optimizer.param_groups[0]["curvature_every"]),
            memory=optimizer.memory,
            a_update=optimizer.a_update,
            pair_damping=optimizer.pair_damping,
        )
    if isinstance(optimizer, TensorwiseOptimizer):
        names = _param_names(optimizer.model)
        tensors = [
            TensorSpec(
                names.get(id(p), f"param{i}"),
                optimizer.blocks[id(p)].shape,
                optimizer.blocks[id(p)].method,
                optimizer.blocks[id(p)].root,
                float(optimizer.group_of(p)["damping"]),
            )
            for i, p in enumerate(optimizer.params)
            if p.numel() > 0
        ]
        group = optimizer.param_groups[0]
        return tensorwise_floor(
            geometry,
            tensors,
            curvature_every=int(group["curvature_every"]),
            inverse_every=int(group["inverse_every"]),
            extra_backward=optimizer.extra_backward,
            source_prefix=source_prefix,
        )
    return None


def real_factors(optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, Tensor]:
    """The undamped factors a TNT / Shampoo optimizer decomposes, by ``prefix + name:mode``.

    (TNT: the trace-normalised Ũ_i of eq. 4.10; Shampoo: the statistics Ĝ^{(i)}.) Empty for
    other optimizers and for tensors without statistics yet.
    """
    if not isinstance(optimizer, TensorwiseOptimizer):
        return {}
    names = _param_names(optimizer.model)
    out: dict[str, Tensor] = {}
    for i, p in enumerate(optimizer.params):
        state = optimizer.state[p]
        if "statistics" not in state:
            continue
        name = names.get(id(p), f"param{i}")
        for mode, F in enumerate(optimizer.blocks[id(p)].factors(state)):
            out[f"{prefix}{name}:{mode}"] = F.detach().clone()
    return out


# --------------------------------------------------------------------------- measurement
@dataclass
class FloorModel:
    """Measured seconds (and FLOPs that `FlopCounterMode` sees) of every distinct operation."""

    layers: list[LayerGeometry]
    seconds: dict[Op, float]
    counted: dict[Op, int]

    def terms_ms(self, items: Iterable[FloorItem]) -> dict[str, float]:
        """Milliseconds per step beyond SGD-m, per term of `FLOOR_TERMS`."""
        out = dict.fromkeys(FLOOR_TERMS, 0.0)
        for item in items:
            out[item.term] += 1e3 * item.per_step * self.seconds[item.op]
        return out

    def counted_flops(self, items: Iterable[FloorItem]) -> float:
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


def floor_flops(items: Iterable[FloorItem]) -> dict[str, float]:
    """Analytic FLOPs per step and term (decompositions, which are timed, count 0)."""
    out = dict.fromkeys(FLOOR_TERMS, 0.0)
    for item in items:
        out[item.term] += item.per_step * item.op.flops
    return out


def measure_floor_model(
    layers: Sequence[LayerGeometry],
    items: Iterable[FloorItem],
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


# --------------------------------------------------------------------------- memory
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


@dataclass(frozen=True)
class StorageFormula:
    """A storage formula of the thesis (constant 1) evaluated on a model, in elements."""

    elements: int
    formula: str
    table: str


def storage_formula(
    optimizer: torch.optim.Optimizer, geometry: Sequence[LayerGeometry]
) -> StorageFormula | None:
    """The thesis's storage beyond SGD-m for this optimizer on this model (None: no table).

    Table 3.1 (one layer with d_a = J|Δ| + 1 inputs and I = d_out outputs; DW is SGD-m's
    momentum and not counted): K-FAC and K-BFGS ``Σ_l d_a² + d_out²``, K-BFGS(L)
    ``Σ_l d_a² + p·d_out``, Adam ``Σ_l d_out·d_a`` (DW⊙DW); Table 4.1 (TNT, Shampoo):
    ``Σ_tensors Σ_i d_i²``; SGD-m 0.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return StorageFormula(0, "0", "—")
    if isinstance(optimizer, KFAC | KBFGS):
        used = [g for g in geometry if g.name in optimizer.layers]
        if isinstance(optimizer, KBFGS) and optimizer.memory is not None:
            p = optimizer.memory
            total = sum(g.d_a**2 + p * g.d_out for g in used)
            return StorageFormula(total, f"Σ d_a² + {p}·d_out", "thesis Table 3.1, K-BFGS(L)")
        name = "KFAC" if isinstance(optimizer, KFAC) else "K-BFGS"
        total = sum(g.d_a**2 + g.d_out**2 for g in used)
        return StorageFormula(total, "Σ d_a² + d_out²", f"thesis Table 3.1, {name}")
    if isinstance(optimizer, TensorwiseOptimizer):
        total = sum(
            sum(d * d for d in tensor_shape(p.shape)) for p in optimizer.params if p.numel() > 0
        )
        return StorageFormula(total, "Σ_tensors Σ_i d_i²", "thesis Table 4.1")
    if isinstance(optimizer, torch.optim.Adam):
        total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return StorageFormula(total, "Σ numel (DW⊙DW)", "thesis Table 3.1, Adam")
    return None
