"""Tests of the tiny synthetic problems."""

from __future__ import annotations

import pytest
import torch

from curvlab.data import make_classification, make_regression


def test_regression_shapes_dtype_and_determinism() -> None:
    x, y = make_regression(50, 4, 3, seed=0)
    assert x.shape == (50, 4) and y.shape == (50, 3) and x.dtype == torch.float32
    x2, y2 = make_regression(50, 4, 3, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_regression(50, 4, 3, seed=1)
    assert not torch.equal(x, x3)
    x64, y64 = make_regression(50, 4, 3, seed=0, dtype=torch.float64)
    assert x64.dtype == y64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), x)


def test_regression_is_nearly_linear() -> None:
    x, y = make_regression(400, 5, 2, seed=3, noise=0.01, dtype=torch.float64)
    design = torch.cat([x, torch.ones(400, 1, dtype=x.dtype)], dim=1)
    coef = torch.linalg.lstsq(design, y).solution
    assert (design @ coef - y).pow(2).mean() < 1e-3


def test_classification_shapes_balance_and_determinism() -> None:
    x, y = make_classification(31, 3, 4, seed=0)
    assert x.shape == (31, 3) and y.shape == (31,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [8, 8, 8, 7]
    x2, y2 = make_classification(31, 3, 4, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_classification(31, 3, 4, seed=1)[0], x)
    assert make_classification(31, 3, 4, seed=0, dtype=torch.float64)[0].dtype == torch.float64


def test_classification_is_learnable_by_nearest_mean() -> None:
    x, y = make_classification(600, 8, 3, seed=2, separation=3.0)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    accuracy = (torch.cdist(x, means).argmin(1) == y).float().mean()
    assert accuracy > 0.9


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="d_in"):
        make_regression(3, 0, 1, seed=0)
    with pytest.raises(ValueError, match="n_classes"):
        make_classification(3, 2, 1, seed=0)
