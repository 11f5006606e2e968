"""Tests for curvlab.linalg.cost: the operations each routine is said to execute are the ones
it executes (the matrix-product FLOPs `FlopCounterMode` counts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from curvlab.linalg import gram, lbfgs_multiply
from curvlab.linalg.cost import (
    Decomposition,
    Gemm,
    Op,
    gram_ops,
    lbfgs_multiply_ops,
    mode_product_op,
    mode_statistics_ops,
)
from curvlab.linalg.modes import mode_product, mode_statistics


def _counted(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _flops(ops: Sequence[Op]) -> int:
    return sum(op.flops for op in ops if op.counted_by_torch)


@pytest.mark.parametrize(("n", "d"), [(3, 10), (7, 200), (2, 600)])
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_ops_are_what_gram_executes(n: int, d: int, transposed: bool) -> None:
    X = torch.randn(d, n).t() if transposed else torch.randn(n, d)
    ops = gram_ops(n, d, transposed=transposed)
    assert sum(op.flops for op in ops) == _counted(lambda: gram(X))
    assert all(op.layout == ("nt" if transposed else "tn") for op in ops)
    if d >= 192:  # block upper triangle: about half of the full product
        assert len(ops) > 1 and sum(op.flops for op in ops) < 0.75 * 2 * n * d * d


@pytest.mark.parametrize("shape", [(6,), (7, 5), (4, 3, 5), (3, 200), (2, 3, 4, 5)])
def test_mode_ops_are_what_the_mode_routines_execute(shape: tuple[int, ...]) -> None:
    G = torch.randn(shape)
    stats = [op for mode in range(len(shape)) for op in mode_statistics_ops(shape, mode)]
    assert _flops(stats) == _counted(lambda: mode_statistics(G))
    for mode, d in enumerate(shape):
        U = torch.randn(d, d)
        op = mode_product_op(shape, mode)
        assert op.flops == _counted(lambda U=U, mode=mode: mode_product(G, U, mode))


@pytest.mark.parametrize("cols", [1, 6])
def test_lbfgs_ops_are_what_the_compact_product_executes(cols: int) -> None:
    k, d = 4, 9
    SY = torch.randn(2 * k, d, dtype=torch.float64)
    S, Y = SY[:k], SY[k:]
    StY, YtY = S @ Y.T + 10 * torch.eye(k, dtype=torch.float64), Y @ Y.T
    V = torch.randn(d, cols, dtype=torch.float64) if cols > 1 else torch.randn(d).double()
    ops = lbfgs_multiply_ops(k, d, cols)
    run = lambda: lbfgs_multiply(S, Y, V, 0.5, SY=SY, StY=StY, YtY=YtY)  # noqa: E731
    assert _flops(ops) == _counted(run)


def test_labels_and_decompositions() -> None:
    assert Gemm(3, 4, 5, "nn", batch=2).label == "2× (3×4)@(4×5) nn"
    dec = Decomposition("eigh", 5, 4, 0.1, source="w:0")
    assert dec.label == "eigh root 1/4 d=5 [w:0]" and dec.flops == 0
    assert Decomposition("cholesky", 5).label == "inverse d=5"
    M = torch.eye(5) * 2
    run = Decomposition("cholesky", 5, damping=0.0, source="M").runner(torch.float64, {"M": M})
    inverse, _ = run()  # damped_inverse of the given matrix, not of a random one
    torch.testing.assert_close(inverse, torch.eye(5, dtype=torch.float64) / 2)
    with pytest.raises(ValueError, match="method"):
        Decomposition("svd", 3).runner(torch.float32)
