"""all_finite: the fast sum path agrees with the exact test, overflow included."""

from __future__ import annotations

import pytest
import torch

from curvlab.linalg import all_finite, gram


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
