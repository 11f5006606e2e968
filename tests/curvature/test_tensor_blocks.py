"""Tensor machinery of TNT / Shampoo: thesis §4.2.1 definitions, Prop. 1, eq. (4.10), blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.curvature.blocks import TensorBlock
from curvlab.linalg.modes import (
    kron_dense,
    mode_product,
    mode_statistics,
    multi_mode_product,
    tensor_shape,
    trace_normalise,
)


def _param(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float64))


SHAPES = [(5,), (3, 4), (2, 3, 4), (2, 3, 2, 3)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mat(A: torch.Tensor, i: int) -> torch.Tensor:
    """mat_i(A) by the thesis's definition: row j is vec(A^i_j), the j-th slice along mode i."""
    return torch.stack([A.select(i, j).reshape(-1) for j in range(A.shape[i])])


def _spd(d: int, seed: int) -> torch.Tensor:
    X = torch.randn(d + 2, d, generator=_gen(seed), dtype=torch.float64)
    return X.T @ X / (d + 2)


def test_tensor_shapes_follow_thesis_section_4_2() -> None:
    assert tensor_shape(()) == (1,)
    assert tensor_shape((7,)) == (7,)
    assert tensor_shape((3, 5)) == (3, 5)
    assert tensor_shape((8, 4, 3, 3)) == (8, 4, 9)  # conv weight (I, J, kh·kw)
    assert tensor_shape((8, 4, 5)) == (8, 4, 5)  # Conv1d
    assert tensor_shape((8, 4, 2, 3, 3)) == (8, 4, 18)  # Conv3d


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_statistics_are_the_contractions_of_the_definition(shape: tuple[int, ...]) -> None:
    G = torch.randn(shape, generator=_gen(1), dtype=torch.float64)
    stats = mode_statistics(G)
    assert len(stats) == len(shape)
    for i, S in enumerate(stats):
        M = _mat(G, i)
        torch.testing.assert_close(S, M @ M.T, rtol=1e-12, atol=1e-12)
        assert torch.equal(S, S.T)  # exactly symmetric
        torch.testing.assert_close(S.trace(), G.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_proposition_1_mode_products_equal_the_kronecker_product(shape: tuple[int, ...]) -> None:
    X = torch.randn(shape, generator=_gen(2), dtype=torch.float64)
    mats = [
        torch.randn(d + i % 2, d, generator=_gen(10 + i), dtype=torch.float64)  # some rectangular
        for i, d in enumerate(shape)
    ]
    out = multi_mode_product(X, mats)
    expected = kron_dense(mats) @ X.reshape(-1)
    assert out.shape == tuple(U.shape[0] for U in mats)
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_mode_products_of_a_matrix() -> None:
    X = torch.randn(3, 4, generator=_gen(3), dtype=torch.float64)
    U, V = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(mode_product(X, U, 0), U @ X)
    torch.testing.assert_close(mode_product(X, V, 1), X @ V.T)
    with pytest.raises(ValueError, match="mode"):
        mode_product(X, V, 0)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_trace_normalisation_eq_4_10(shape: tuple[int, ...]) -> None:
    # An EMA-like average of several contractions, as the optimizer keeps.
    samples = [torch.randn(shape, generator=_gen(20 + s), dtype=torch.float64) for s in range(4)]
    stats = [sum(parts) / 4 for parts in zip(*map(mode_statistics, samples), strict=True)]
    U = trace_normalise(stats)
    k, n = len(shape), math.prod(shape)
    c0 = (stats[0].trace() / n) ** (1 / k)
    for i, d in enumerate(shape):
        # eq. (4.10) as printed.
        torch.testing.assert_close(U[i], stats[i] / (c0 ** (k - 1) * (n // d)))
        # Same average eigenvalue c0 for every mode.
        torch.testing.assert_close(U[i].trace() / d, c0, rtol=1e-12, atol=0)
        # Tensor-normal property (4.2): Ũ_i ∏_{j≠i} tr(Ũ_j) = E[G^{(i)}].
        others = math.prod(float(U[j].trace()) for j in range(k) if j != i)
        torch.testing.assert_close(U[i] * others, stats[i], rtol=1e-12, atol=1e-14)


def test_trace_normalisation_of_a_vector_and_of_zero_statistics() -> None:
    S = _spd(4, 5)
    (U,) = trace_normalise([S])
    assert torch.equal(U, S)  # k = 1: Ũ_1 = E[G Gᵀ]
    zeros = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)]
    for Z in trace_normalise(zeros):  # a bias before BatchNorm: limit 0, not 0/0
        assert torch.equal(Z, torch.zeros_like(Z))


def _block_with_statistics(shape, *, normalise: bool, root: int, method: str):
    block = TensorBlock("w", _param(shape), normalise=normalise, root=root, method=method)  # type: ignore[arg-type]
    state: dict = {}
    for s in range(3):
        g = torch.randn(shape, generator=_gen(40 + s), dtype=torch.float64)
        block.update(state, block.statistics(g), 0.9)
    return block, state


@pytest.mark.parametrize("shape", [(4,), (3, 2), (3, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("method", ["cholesky", "eigh", "coupled_newton"])
def test_tnt_block_preconditions_with_the_damped_kronecker_inverse(shape, method: str) -> None:
    block, state = _block_with_statistics(shape, normalise=True, root=1, method=method)
    assert block.refresh(state, 0.1)
    V = torch.randn(shape, generator=_gen(7), dtype=torch.float64)
    expected = torch.linalg.solve(block.damped_to_dense(state, 0.1), V.reshape(-1))
    tol = {"rtol": 1e-9, "atol": 1e-9 * float(expected.abs().max())}
    torch.testing.assert_close(block.precondition(state, V).reshape(-1), expected, **tol)
    torch.testing.assert_close(
        block.preconditioner_to_dense(state) @ V.reshape(-1), expected, **tol
    )


@pytest.mark.parametrize("shape", [(4,), (3, 2), (3, 2, 4)], ids=str)
@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_shampoo_block_is_the_inverse_2k_th_root_of_the_damped_kronecker(shape, method) -> None:
    k = len(shape)
    block, state = _block_with_statistics(shape, normalise=False, root=2 * k, method=method)
    assert block.refresh(state, 1e-2)
    dense = block.damped_to_dense(state, 1e-2)
    w, Q = torch.linalg.eigh(dense)
    root = (Q * w.pow(-1.0 / (2 * k))) @ Q.T
    V = torch.randn(shape, generator=_gen(8), dtype=torch.float64)
    expected = root @ V.reshape(-1)
    tol = {"rtol": 1e-9, "atol": 1e-9 * float(expected.abs().max())}
    torch.testing.assert_close(block.precondition(state, V).reshape(-1), expected, **tol)
    # Shampoo's factors are the raw statistics; to_dense is their Kronecker product.
    torch.testing.assert_close(block.to_dense(state), kron_dense(state["statistics"]))


def test_statistics_ema_and_conv_weight_reshape() -> None:
    block = TensorBlock("w", _param((3, 2, 2, 2)), normalise=True, root=1, method="cholesky")
    assert block.shape == (3, 2, 4) and block.order == 3
    g1, g2 = (torch.randn(3, 2, 2, 2, generator=_gen(s), dtype=torch.float64) for s in (1, 2))
    state: dict = {}
    block.update(state, block.statistics(g1), 0.9)
    block.update(state, block.statistics(g2), 0.9)
    for S, a, b in zip(
        state["statistics"],
        mode_statistics(g1.reshape(3, 2, 4)),
        mode_statistics(g2.reshape(3, 2, 4)),
        strict=True,
    ):
        torch.testing.assert_close(S, 0.9 * a + 0.1 * b, rtol=1e-12, atol=1e-15)
    assert state["statistics_updates"] == 2


def test_failed_refresh_keeps_previous_preconditioners() -> None:
    block, state = _block_with_statistics((3, 2), normalise=True, root=1, method="cholesky")
    assert block.refresh(state, 0.1)
    previous = [P.clone() for P in state["preconditioners"]]
    state["statistics"][1][0, 0] = float("nan")  # no retry can repair it
    assert not block.refresh(state, 0.1)
    assert all(torch.equal(P, Q) for P, Q in zip(state["preconditioners"], previous, strict=True))
    assert state["failed_refreshes"] == 1


def test_invalid_block_options() -> None:
    with pytest.raises(ValueError, match="^method"):
        TensorBlock("w", _param((3,)), normalise=False, root=2, method="cholesky")
    with pytest.raises(ValueError, match="^method"):
        TensorBlock("w", _param((3,)), normalise=False, root=2, method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        mode_statistics(torch.tensor(1.0))
