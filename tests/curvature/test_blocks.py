"""KroneckerBlock: a failed refresh keeps the previous inverses; dense views agree."""

from __future__ import annotations

import torch
from torch import nn

from curvlab.curvature import KroneckerBlock, find_layers
from curvlab.curvature.blocks import DampingSplit
from curvlab.linalg import kron_to_dense


def _block(split: DampingSplit = "pi") -> tuple[KroneckerBlock, dict]:
    layer = find_layers(nn.Sequential(nn.Linear(3, 2).double()))["0"]
    return KroneckerBlock(layer, split=split), {}


def test_failed_refresh_keeps_previous_inverses() -> None:
    block, state = _block()
    A, G = torch.eye(4, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
    block.update(state, (A, G), 0.9)
    assert block.refresh(state, 0.1)
    a_inv, g_inv = state["A_inv"].clone(), state["G_inv"].clone()
    state["A"][0, 0] = float("nan")  # adversarial factor: no retry can fix it
    assert not block.refresh(state, 0.1)
    assert torch.equal(state["A_inv"], a_inv) and torch.equal(state["G_inv"], g_inv)
    assert state["failed_refreshes"] == 1


def test_rank_deficient_factor_is_inverted_with_damping() -> None:
    block, state = _block()
    a = torch.randn(4, 1, dtype=torch.float64)
    block.update(state, (a @ a.T, torch.zeros(2, 2, dtype=torch.float64)), 0.9)  # rank 1 and 0
    assert block.refresh(state, 1e-3)
    assert torch.isfinite(state["A_inv"]).all() and torch.isfinite(state["G_inv"]).all()


def test_precondition_matches_inverse_of_damped_dense() -> None:
    block, state = _block()
    X = torch.randn(10, 4, dtype=torch.float64)
    Y = torch.randn(10, 2, dtype=torch.float64)
    block.update(state, (X.T @ X / 10, Y.T @ Y / 10), 0.9)
    block.refresh(state, 0.5)
    V = torch.randn(2, 4, dtype=torch.float64)
    dense = block.damped_to_dense(state, 0.5)
    expected = torch.linalg.solve(dense, V.reshape(-1)).reshape(2, 4)
    torch.testing.assert_close(block.precondition(state, V), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.to_dense(state), kron_to_dense(state["G"], state["A"]))


def test_retried_decomposition_is_counted() -> None:
    block, state = _block()
    a = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block.update(state, (a @ a.T, torch.eye(2, dtype=torch.float64)), 0.9)  # A singular
    assert block.refresh(state, 1e-6)
    assert "retried_decompositions" not in state  # damped: the first Cholesky succeeds
    assert block.refresh(state, 0.0)  # λ = 0: singular A needs a damping retry
    assert state["retried_decompositions"] == 1
