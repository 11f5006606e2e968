"""Tests of ArrayDataset and the batches iterator."""

from __future__ import annotations

import pytest
import torch

from curvlab.data import ArrayDataset, batches


def _xy(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n * 2, dtype=torch.float32).view(n, 2), torch.arange(n)


def test_array_dataset_properties_and_validation() -> None:
    x, y = _xy()
    ds = ArrayDataset("toy", x, y, x[:4], y[:4], num_classes=10)
    assert (ds.n_train, ds.n_test, ds.input_shape) == (10, 4, (2,))
    with pytest.raises(ValueError, match="y_train"):
        ArrayDataset("toy", x, y[:3], x, y, None)
    with pytest.raises(ValueError, match="num_classes"):
        ArrayDataset("toy", x, y, x, y, 0)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_in_order(drop_last: bool) -> None:
    x, y = _xy(10)
    out = list(batches(x, y, 4, drop_last=drop_last))
    sizes = [len(b[1]) for b in out]
    assert sizes == ([4, 4] if drop_last else [4, 4, 2])
    assert torch.equal(torch.cat([b[1] for b in out]), y[: sum(sizes)])
    assert torch.equal(torch.cat([b[0] for b in out]), x[: sum(sizes)])


def test_batches_shuffle_is_a_reproducible_permutation() -> None:
    x, y = _xy(11)
    first = list(batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    again = list(batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    labels = torch.cat([b[1] for b in first])
    assert sorted(labels.tolist()) == list(range(11))
    assert not torch.equal(labels, y)
    assert torch.equal(labels, torch.cat([b[1] for b in again]))
    for xb, yb in first:  # pairs stay aligned
        assert torch.equal(xb, x[yb])
    dropped = list(batches(x, y, 3, shuffle=True, drop_last=True))
    assert [len(b[1]) for b in dropped] == [3, 3, 3]


def test_batches_rejects_bad_arguments() -> None:
    x, y = _xy(5)
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(x, y, 0))
    with pytest.raises(ValueError, match="samples"):
        list(batches(x, y[:4], 2))
