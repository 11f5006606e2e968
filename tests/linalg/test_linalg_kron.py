"""Tests for curvlab.linalg.kron: the row-major Kronecker identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import kron_mv, kron_to_dense

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(
    d_g=st.integers(1, 6),
    d_a=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_kron_to_dense_matches_kron_mv(d_g: int, d_a: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(d_g, d_g, generator=gen, dtype=torch.float64)
    A = torch.randn(d_a, d_a, generator=gen, dtype=torch.float64)
    X = torch.randn(d_g, d_a, generator=gen, dtype=torch.float64)
    M = kron_to_dense(G, A)
    assert M.shape == (d_g * d_a, d_g * d_a)
    assert torch.equal(M, torch.kron(G, A))
    expected = kron_mv(G, A, X)
    torch.testing.assert_close(G @ X @ A.T, expected)
    torch.testing.assert_close((M @ X.reshape(-1)).reshape(d_g, d_a), expected)


@SETTINGS
@given(batch=st.integers(1, 4), d_g=st.integers(1, 5), d_a=st.integers(1, 5))
def test_kron_mv_batched(batch: int, d_g: int, d_a: int) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + d_g * 10 + d_a)
    G = torch.randn(d_g, d_g, generator=gen, dtype=torch.float64)
    A = torch.randn(d_a, d_a, generator=gen, dtype=torch.float64)
    X = torch.randn(batch, 2, d_g, d_a, generator=gen, dtype=torch.float64)
    out = kron_mv(G, A, X)
    assert out.shape == X.shape
    M = kron_to_dense(G, A)
    for b in range(batch):
        for c in range(2):
            torch.testing.assert_close(out[b, c].reshape(-1), M @ X[b, c].reshape(-1))


def test_kron_shape_errors() -> None:
    G, A = torch.eye(3), torch.eye(2)
    with pytest.raises(ValueError):
        kron_mv(G, A, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        kron_mv(G, A, torch.zeros(3))
    with pytest.raises(ValueError):
        kron_to_dense(G, torch.zeros(2))
