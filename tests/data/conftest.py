"""Fixtures for the data tests: tiny data sets written in the real on-disk formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from curvlab.data.idx import write_idx

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Writes a tiny MNIST-style IDX set into a directory; returns (train_images, train_labels).
IdxSetWriter = Callable[..., tuple[np.ndarray, np.ndarray]]


@pytest.fixture
def write_idx_set() -> IdxSetWriter:
    """Return a function writing 7 train / 3 test 28x28 uint8 images and labels 0..9."""

    def write(
        directory: Path, *, gz: bool = True, seed: int = 0, n_train: int = 7
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = (
            rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n_train, dtype=np.uint8),
            rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=3, dtype=np.uint8),
        )
        for stem, array in zip(IDX_STEMS, arrays, strict=True):
            write_idx(directory / (stem + (".gz" if gz else "")), array)
        return arrays[0], arrays[1]

    return write
