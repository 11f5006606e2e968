"""Tests for curvlab.linalg.damping: π-damping split and diagonal shifts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import add_to_diagonal, pi_damping

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _psd(d: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(d, d + 2, generator=gen, dtype=torch.float64)
    return scale * (X @ X.T) / (d + 2)


@SETTINGS
@given(
    d_a=st.integers(1, 8),
    d_g=st.integers(1, 8),
    log_scale_a=st.floats(-6, 6),
    log_scale_g=st.floats(-6, 6),
    damping=st.floats(1e-8, 1e2),
)
def test_pi_damping_product_and_ratio(
    d_a: int, d_g: int, log_scale_a: float, log_scale_g: float, damping: float
) -> None:
    gen = torch.Generator().manual_seed(d_a * 31 + d_g)
    A = _psd(d_a, 10.0**log_scale_a, gen)
    G = _psd(d_g, 10.0**log_scale_g, gen)
    lam_a, lam_g = pi_damping(A, G, damping)
    assert isinstance(lam_a, float) and isinstance(lam_g, float)
    assert lam_a * lam_g == pytest.approx(damping, rel=1e-12)
    pi_sq = (torch.trace(A).item() / d_a) / (torch.trace(G).item() / d_g)
    assert lam_a / lam_g == pytest.approx(pi_sq, rel=1e-10)


def test_pi_damping_float32_and_zero_damping() -> None:
    A = torch.eye(3, dtype=torch.float32) * 4.0
    G = torch.eye(2, dtype=torch.float32)
    lam_a, lam_g = pi_damping(A, G, 0.25)
    assert lam_a == pytest.approx(2.0 * 0.5)
    assert lam_g == pytest.approx(0.5 / 2.0)
    assert pi_damping(A, G, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("A", "G"),
    [
        (torch.zeros(3, 3), torch.eye(2)),
        (torch.eye(3), torch.zeros(2, 2)),
        (torch.zeros(3, 3), torch.zeros(2, 2)),
        (torch.full((3, 3), math.nan), torch.eye(2)),
        (-torch.eye(3), torch.eye(2)),
    ],
)
def test_pi_damping_degenerate_factor_uses_pi_one(A: torch.Tensor, G: torch.Tensor) -> None:
    lam_a, lam_g = pi_damping(A, G, 4.0)
    assert (lam_a, lam_g) == (2.0, 2.0)


def test_pi_damping_rejects_negative_damping() -> None:
    with pytest.raises(ValueError):
        pi_damping(torch.eye(2), torch.eye(2), -1.0)


def test_add_to_diagonal_out_of_place() -> None:
    M = torch.arange(9.0).reshape(3, 3)
    before = M.clone()
    out = add_to_diagonal(M, 2.5)
    assert torch.equal(M, before)
    assert torch.equal(out, before + 2.5 * torch.eye(3))
    batch = torch.zeros(2, 3, 3)
    out_b = add_to_diagonal(batch, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(out_b, torch.diag(torch.tensor([1.0, 2.0, 3.0])).expand(2, 3, 3))
    with pytest.raises(ValueError):
        add_to_diagonal(torch.zeros(2, 3), 1.0)
