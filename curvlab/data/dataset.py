"""In-memory train/test datasets and a vectorised mini-batch iterator.

Every loader in :mod:`curvlab.data` returns an :class:`ArrayDataset`: image tensors are
float32 in ``[0, 1]`` with shape ``(n, C, H, W)`` and labels of classification problems are
int64 class indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ArrayDataset", "batches"]


@dataclass(frozen=True)
class ArrayDataset:
    """A train/test split held entirely in memory.

    Loaders cache their results in-process, so the tensors of a returned dataset may be
    shared with later calls: treat them as read-only (copy before modifying in place).

    Attributes:
        name: Short identifier, e.g. ``"fashion-mnist"``.
        x_train: Training inputs, first dimension indexes samples.
        y_train: Training targets (int64 class indices for classification problems).
        x_test: Test inputs.
        y_test: Test targets.
        num_classes: Number of classes, or ``None`` for problems without class labels
            (e.g. the CURVES autoencoder benchmark).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int | None

    def __post_init__(self) -> None:
        """Check that inputs and targets agree in length and that the class count is sane."""
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: x_{split} has {x.shape[0]} samples but y_{split} has "
                    f"{y.shape[0]}"
                )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be positive, got {self.num_classes}")

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate over ``(x, y)`` in mini-batches along the first dimension.

    Args:
        x: Inputs, shape ``(n, ...)``.
        y: Targets, shape ``(n, ...)``.
        batch_size: Samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: Visit the samples in a random order drawn once per call.
        generator: Random generator for the permutation (reproducible shuffling).
        drop_last: Skip a final batch smaller than ``batch_size``.

    Yields:
        Pairs ``(x_batch, y_batch)``. Without shuffling they are views of ``x`` and ``y``;
        with shuffling they are gathered copies.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=perm_device)
    perm_x = perm.to(x.device)
    perm_y = perm_x if y.device == x.device else perm.to(y.device)
    for start in range(0, stop, batch_size):
        yield (
            x.index_select(0, perm_x[start : start + batch_size]),
            y.index_select(0, perm_y[start : start + batch_size]),
        )
