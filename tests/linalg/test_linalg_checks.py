"""all_finite: the fast sum path agrees with the exact test, overflow included;
contractions_bounded: the a-priori bound on statistics."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import all_finite, contractions_bounded, gram


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0], True),
        ([float("nan"), 1.0], False),
        ([float("inf"), 1.0], False),
        ([float("inf"), float("-inf")], False),
        ([3e38, 3e38], True),  # finite entries whose float32 sum overflows: exact fallback
    ],
)
def test_all_finite(values: list[float], expected: bool) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite([t, torch.zeros(3, dtype=torch.float64)]) is expected


def test_all_finite_empty_and_mixed_dtypes() -> None:
    assert all_finite([])
    assert all_finite([torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)])
    assert not all_finite([torch.ones(2, dtype=torch.bfloat16), torch.tensor([float("nan")])])


@pytest.mark.parametrize("d", [7, 300])
def test_gram_writes_into_a_view(d: int) -> None:
    X = torch.randn(50, d, dtype=torch.float64)
    big = torch.full((d + 1, d + 1), 7.0, dtype=torch.float64)
    result = gram(X, 0.5, out=big[:d, :d])
    torch.testing.assert_close(big[:d, :d], 0.5 * X.T @ X, rtol=1e-12, atol=1e-12)
    assert result.data_ptr() == big.data_ptr()
    assert torch.equal(big[:d, :d], big[:d, :d].T)
    assert torch.equal(big[d], torch.full((d + 1,), 7.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must have shape"):
        gram(X, out=torch.empty(d, d + 1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("value", "length", "expected"),
    [
        (1.0, 10, True),
        (1e18, 10, True),  # 1e37 ≤ float32 max / 4 ≈ 8.5e37
        (9e18, 1, True),  # 8.1e37
        (1e19, 1, False),  # 1e38 > 8.5e37
        (1e19, 10, False),  # 1e39 would overflow float32
        (-1e19, 10, False),  # the magnitude counts
        (float("nan"), 1, False),
        (float("inf"), 1, False),
    ],
)
def test_contractions_bounded(value: float, length: int, expected: bool) -> None:
    t = torch.tensor([0.5, value], dtype=torch.float32)
    assert contractions_bounded([torch.ones(3), t], [5, length]) is expected


def test_contractions_bounded_scale_dtypes_and_lengths() -> None:
    t = torch.full((4,), 1e18)
    assert contractions_bounded([t], [10])
    assert not contractions_bounded([t], [10], scale=100.0)  # 1e39 · scale
    assert contractions_bounded([t.double()], [10], scale=100.0)  # float64 has room
    assert contractions_bounded([], [])
    with pytest.raises(ValueError, match="lengths"):
        contractions_bounded([t], [1, 2])
    # Every sum of 10 products of entries is within the bound when it holds (float32 here).
    X = torch.full((10, 3), 1.8e18)
    assert contractions_bounded([X], [10]) and torch.isfinite(gram(X)).all()
