"""Tests of the MNIST, CIFAR-10/100 and SVHN readers on tiny files in the official formats."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.data import load_cifar10, load_cifar100, load_mnist, load_svhn

IdxSetWriter = Callable[..., tuple[np.ndarray, np.ndarray]]


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0)


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize(("subdir", "gz"), [("", True), ("MNIST/raw", False)])
def test_mnist_layouts(tmp_path: Path, write_idx_set: IdxSetWriter, subdir: str, gz: bool) -> None:
    images, labels = write_idx_set(tmp_path / subdir, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.y_test.shape == (3,)
    torch.testing.assert_close(ds.x_train[:, 0], _as_float(images), rtol=0, atol=1e-7)
    assert ds.y_train.tolist() == labels.tolist()


def test_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert os.path.join("MNIST", "raw") in str(info.value)


# --------------------------------------------------------------------------- CIFAR


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _write_cifar_batch(
    path: Path, images: np.ndarray, labels: list[int], label_key: bytes, protocol: int = 2
) -> None:
    batch = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": images.reshape(len(images), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10(tmp_path: Path, protocol: int) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    train_images, train_labels = [], []
    for i in range(1, 6):
        images, labels = _cifar_images(2, seed=i), [i, 9 - i]
        _write_cifar_batch(directory / f"data_batch_{i}", images, labels, b"labels", protocol)
        train_images.append(images)
        train_labels += labels
    test_images = _cifar_images(3, seed=0)
    _write_cifar_batch(directory / "test_batch", test_images, [0, 1, 2], b"labels", protocol)

    ds = load_cifar10(tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train, _as_float(np.concatenate(train_images)))
    torch.testing.assert_close(ds.x_test, _as_float(test_images))
    assert ds.y_train.tolist() == train_labels and ds.y_test.tolist() == [0, 1, 2]
    assert torch.equal(load_cifar10(directory).x_train, ds.x_train)  # batch dir itself works


def test_cifar100(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    images = _cifar_images(4, seed=5)
    _write_cifar_batch(directory / "train", images, [0, 42, 99, 7], b"fine_labels")
    _write_cifar_batch(directory / "test", images[:2], [5, 6], b"fine_labels")
    ds = load_cifar100(tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    torch.testing.assert_close(ds.x_train, _as_float(images))
    assert ds.y_train.tolist() == [0, 42, 99, 7] and ds.y_test.tolist() == [5, 6]


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_5.*test_batch"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path)
    _write_cifar_batch(tmp_path / "train", _cifar_images(2, 0), [1, 2], b"coarse_labels")
    _write_cifar_batch(tmp_path / "test", _cifar_images(2, 0), [1, 2], b"fine_labels")
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar100(tmp_path)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "train", _cifar_images(2, 0), [1, 2], b"fine_labels")
    with (tmp_path / "test").open("wb") as f:
        pickle.dump({b"data": _Evil(), b"fine_labels": [1]}, f, protocol=2)
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar100(tmp_path)


# --------------------------------------------------------------------------- SVHN


def _write_svhn(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from scipy.io import savemat

    savemat(str(path), {"X": images.transpose(2, 3, 1, 0), "y": labels.reshape(-1, 1)})


def test_svhn(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    train = _cifar_images(4, seed=1)  # (n, 3, 32, 32)
    test = _cifar_images(2, seed=2)
    _write_svhn(tmp_path / "train_32x32.mat", train, np.array([10, 1, 5, 10], dtype=np.uint8))
    _write_svhn(tmp_path / "test_32x32.mat", test, np.array([9, 10], dtype=np.uint8))
    ds = load_svhn(tmp_path)
    assert ds.name == "svhn" and ds.num_classes == 10
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ds.x_train, _as_float(train))
    torch.testing.assert_close(ds.x_test, _as_float(test))
    assert ds.y_train.tolist() == [0, 1, 5, 0] and ds.y_test.tolist() == [9, 0]
    assert ds.y_train.dtype == torch.int64


def test_svhn_missing_and_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("train_32x32.mat, test_32x32.mat")):
        load_svhn(tmp_path)
    pytest.importorskip("scipy")
    images = _cifar_images(1, seed=0)
    _write_svhn(tmp_path / "train_32x32.mat", images, np.array([11], dtype=np.uint8))
    _write_svhn(tmp_path / "test_32x32.mat", images, np.array([1], dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape("1..10")):
        load_svhn(tmp_path)
