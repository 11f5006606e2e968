"""Readers for MNIST, CIFAR-10, CIFAR-100 and SVHN in their official on-disk formats.

Nothing is downloaded: each reader takes a ``root`` directory and raises
``FileNotFoundError`` naming the expected files when they are absent. All return an
:class:`~curvlab.data.dataset.ArrayDataset` with float32 images ``(n, C, H, W)`` in
``[0, 1]`` and int64 labels, and cache the decoded tensors in-process.

Accepted layouts (``<root>`` is the argument):

* MNIST: ``<root>/train-images-idx3-ubyte[.gz]`` etc., or ``<root>/MNIST/raw/...``;
* CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or those files
  directly in ``<root>``;
* CIFAR-100: ``<root>/cifar-100-python/{train,test}`` or directly in ``<root>``;
* SVHN: ``<root>/{train_32x32.mat,test_32x32.mat}`` or under ``<root>/svhn/``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.data._files import (
    FileStamp,
    check_label_range,
    images_to_tensor,
    labels_to_tensor,
    stamp,
)
from curvlab.data._mnist_format import IDX_STEMS, find_idx_files, layout_dirs, load_idx_files
from curvlab.data._pickle import load_pickle_dict
from curvlab.data.dataset import ArrayDataset

__all__ = ["load_cifar10", "load_cifar100", "load_mnist", "load_svhn"]

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_FILES = ("train", "test")
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _find_all(dirs: tuple[Path, ...], names: tuple[str, ...], what: str) -> tuple[Path, ...]:
    """Return ``names`` inside the first of ``dirs`` holding all of them, else raise."""
    for directory in dirs:
        paths = tuple(directory / name for name in names)
        if all(p.is_file() for p in paths):
            return paths
    searched = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{what} not found (nothing is downloaded): expected files {', '.join(names)} "
        f"in one of: {searched}"
    )


def load_mnist(root: str | os.PathLike[str]) -> ArrayDataset:
    """Load MNIST from IDX files: images ``(n, 1, 28, 28)``, labels 0..9.

    Accepts ``<root>/train-images-idx3-ubyte[.gz]`` (and siblings) or the torchvision
    layout ``<root>/MNIST/raw/...``.
    """
    location = Path(root).expanduser()
    files = find_idx_files(location, "MNIST")
    if files is None:
        searched = ", ".join(str(d) for d in layout_dirs(location, "MNIST"))
        raise FileNotFoundError(
            f"MNIST not found (nothing is downloaded): expected files "
            f"{', '.join(IDX_STEMS)} (each optionally .gz) in one of: {searched}"
        )
    return load_idx_files(files, "mnist")


def _cifar_split(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into uint8 images ``(n, 3, 32, 32)`` and labels ``(n,)``."""
    batch = load_pickle_dict(path)
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: missing key b'{key}' (found {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (n, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' rows must have 3072 values, got {data.shape[1]}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {data.shape[0]} images but b'{label_key}' has shape {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=4)
def _decode_cifar(
    train_files: tuple[Path, ...],
    test_file: Path,
    label_key: str,
    num_classes: int,
    name: str,
    key: tuple[FileStamp, ...],
) -> ArrayDataset:
    """Decode CIFAR pickles; ``key`` only serves to invalidate the cache."""
    del key
    parts = [_cifar_split(p, label_key) for p in train_files]
    x_test, y_test = _cifar_split(test_file, label_key)
    y_train_t = labels_to_tensor(np.concatenate([y for _, y in parts]))
    y_test_t = labels_to_tensor(y_test)
    check_label_range(y_train_t, num_classes, f"{name} training labels")
    check_label_range(y_test_t, num_classes, f"{test_file}")
    return ArrayDataset(
        name,
        images_to_tensor(np.concatenate([x for x, _ in parts])),
        y_train_t,
        images_to_tensor(x_test),
        y_test_t,
        num_classes,
    )


def load_cifar10(root: str | os.PathLike[str]) -> ArrayDataset:
    """Load CIFAR-10 from the official python batches: images ``(n, 3, 32, 32)``, 10 classes.

    Expects ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (pickled dicts with
    keys ``b'data'``, uint8 ``(n, 3072)``, and ``b'labels'``) in
    ``<root>/cifar-10-batches-py/`` or in ``<root>`` itself.
    """
    location = Path(root).expanduser()
    files = _find_all((location / _CIFAR10_DIR, location), _CIFAR10_FILES, "CIFAR-10")
    return _decode_cifar(files[:-1], files[-1], "labels", 10, "cifar10", stamp(files))


def load_cifar100(root: str | os.PathLike[str]) -> ArrayDataset:
    """Load CIFAR-100 (fine labels) from the official python pickles ``train`` and ``test``.

    Expects them in ``<root>/cifar-100-python/`` or in ``<root>`` itself; keys ``b'data'``
    and ``b'fine_labels'``.
    """
    location = Path(root).expanduser()
    files = _find_all((location / _CIFAR100_DIR, location), _CIFAR100_FILES, "CIFAR-100")
    return _decode_cifar(files[:1], files[1], "fine_labels", 100, "cifar100", stamp(files))


def _svhn_split(path: Path, loadmat: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat`` file into uint8 images ``(n, 3, 32, 32)`` and labels 0..9."""
    try:
        mat = loadmat(str(path))
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, n), got {x.shape}")
    if y.shape[0] != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: SVHN labels must lie in 1..10, got [{y.min()}, {y.max()}]")
    return x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y).astype(np.int64)


@functools.lru_cache(maxsize=2)
def _decode_svhn(files: tuple[Path, ...], loadmat: Any, key: tuple[FileStamp, ...]) -> ArrayDataset:
    """Decode SVHN ``.mat`` files; ``key`` only serves to invalidate the cache."""
    del key
    (x_tr, y_tr), (x_te, y_te) = (_svhn_split(p, loadmat) for p in files)
    return ArrayDataset(
        "svhn",
        images_to_tensor(x_tr),
        torch.from_numpy(y_tr),
        images_to_tensor(x_te),
        torch.from_numpy(y_te),
        num_classes=10,
    )


def load_svhn(root: str | os.PathLike[str]) -> ArrayDataset:
    """Load SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat``.

    ``X`` is stored as ``(32, 32, 3, n)`` and becomes ``(n, 3, 32, 32)``; labels 1..10 with
    10 meaning the digit 0 become 0..9. Needs scipy (imported lazily).
    """
    location = Path(root).expanduser()
    files = _find_all((location, location / "svhn"), _SVHN_FILES, "SVHN")
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy is a test dependency
        raise ImportError(
            "load_svhn needs scipy to read the SVHN .mat files; install it with "
            "`pip install scipy` (or `pip install 'curvlab[bench]'`)"
        ) from exc
    return _decode_svhn(files, loadmat, stamp(files))
