r"""The cost of a step beyond SGD-m, as the curvature blocks and the methods describe it.

A block's `~curvlab.curvature.blocks.CurvatureBlock.cost` and a method's
`~curvlab.optim.base.BlockOptimizer.step_cost` list the work a step does beyond an SGD-m step
as `CostItem`\ s: an operation (`curvlab.linalg.cost.Op`) at the shape where it occurs, how
many times it occurs per step (``1/T1`` for statistics, ``1/T2`` for refreshes), the term of
`COST_TERMS` it belongs to and the block (or layer) it is done for. The shapes are those of
one forward pass (`LayerShape`, per Kronecker layer: the rows r of its matrix form, its fan-in,
outputs and bias). Elementwise work (EMAs, damping, the loss and its derivative, the
activations' backward, the mirror copies of `curvlab.linalg.gram`) and Python overhead are
not listed, so the items are a lower bound of a step's extra work.

`StorageFormula`: a block's term of the thesis's storage formulas (Table 3.1: K-FAC, K-BFGS,
K-BFGS(L); Table 4.1: TNT, Shampoo), evaluated with constant 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from curvlab.linalg.cost import Gemm, Op, RowSum

__all__ = [
    "COST_TERMS",
    "CostItem",
    "LayerShape",
    "StorageFormula",
    "cost_items",
    "forward_product",
    "output_gradient_product",
    "weight_gradient_ops",
]

COST_TERMS = (
    "extra_forward",
    "statistics_backward",
    "statistics_weight_grad",
    "factor_A",
    "factor_G",
    "precondition",
    "inversion",
)
"""The terms of a step's extra cost: passes beyond the gradient pass (forward, backward to the
layer outputs, weight gradients), the statistics of the input-side (``factor_A``) and
output-side (``factor_G``) factors, the preconditioning, the refresh (inverses, roots)."""


@dataclass(frozen=True)
class LayerShape:
    """The matrix-form sizes of one Kronecker layer in one forward pass.

    Attributes:
        name: module name (the name of its layer block).
        rows: r = m·|T|, rows of the layer's matrix form (m for a Linear layer).
        fan_in: d_in (without the bias coordinate).
        d_out: output width.
        bias: whether the layer has a trainable bias (d_a = d_in + 1).
        input_grad: whether backpropagation continues below this layer (its input needs a
            gradient); False for the first layer of a network.
    """

    name: str
    rows: int
    fan_in: int
    d_out: int
    bias: bool
    input_grad: bool

    @property
    def d_a(self) -> int:
        """Input-side factor size: fan-in plus the bias coordinate."""
        return self.fan_in + int(self.bias)


@dataclass(frozen=True)
class CostItem:
    """One operation of a step's extra work: ``per_step`` occurrences per step, in ``term``.

    Attributes:
        term: one of `COST_TERMS`.
        op: the operation at the shape where it occurs.
        per_step: occurrences per step (1, ``1/T1``, ``1/T2``).
        block: the block it is done for (a pass's items: the layer).
        what: what it computes, for the report.
    """

    term: str
    op: Op
    per_step: float
    block: str
    what: str


def cost_items(
    term: str, ops: Iterable[Op], per_step: float, block: str, what: str
) -> list[CostItem]:
    """One `CostItem` per operation of ``ops``, all alike otherwise."""
    return [CostItem(term, op, per_step, block, what) for op in ops]


@dataclass(frozen=True)
class StorageFormula:
    """A storage formula of the thesis (constant 1) evaluated on a model, in elements.

    Attributes:
        elements: the formula's value (a block's: its term of the sum).
        formula: the formula, e.g. ``Σ d_a² + d_out²``.
        table: where the thesis gives it, e.g. ``thesis Table 3.1, KFAC``.
    """

    elements: int
    formula: str
    table: str

    @staticmethod
    def total(terms: Sequence[StorageFormula]) -> StorageFormula:
        """The sum of the blocks' terms (their distinct formulas and tables joined)."""
        if not terms:
            return StorageFormula(0, "0", "—")
        formulas = dict.fromkeys(t.formula for t in terms)
        tables = dict.fromkeys(t.table for t in terms)
        return StorageFormula(
            sum(t.elements for t in terms), " + ".join(formulas), "; ".join(tables)
        )


# --------------------------------------------------------------------------- a layer's passes
def forward_product(shape: LayerShape) -> Gemm:
    """The layer's forward product ``x Wᵀ``, (r×n)(n×d_out)."""
    return Gemm(shape.rows, shape.fan_in, shape.d_out, "nt")


def output_gradient_product(shape: LayerShape) -> Gemm:
    """The backward product to the layer's input ``g W``, (r×d_out)(d_out×n)."""
    return Gemm(shape.rows, shape.d_out, shape.fan_in, "nn")


def weight_gradient_ops(shape: LayerShape) -> list[Gemm | RowSum]:
    """The weight gradient ``gᵀ x``, (d_out×r)(r×n), and with a bias its column sums ``Σ g``."""
    ops: list[Gemm | RowSum] = [Gemm(shape.d_out, shape.rows, shape.fan_in, "tn")]
    if shape.bias:
        ops.append(RowSum(shape.rows, shape.d_out))
    return ops
