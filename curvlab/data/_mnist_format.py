"""Private: locating and decoding the four IDX files of an MNIST-style dataset.

Accepted layouts under a location ``L`` (each file gzipped or not):

* flat: ``L/train-images-idx3-ubyte[.gz]`` and the three sibling files;
* torchvision: ``L/<TorchvisionName>/raw/train-images-idx3-ubyte[.gz]`` and siblings.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from curvlab.data._files import (
    FileStamp,
    check_label_range,
    first_existing,
    images_to_tensor,
    labels_to_tensor,
    stamp,
)
from curvlab.data.dataset import ArrayDataset
from curvlab.data.idx import read_idx

#: File stems in the order (train images, train labels, test images, test labels).
IDX_STEMS: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

IdxFiles = tuple[Path, Path, Path, Path]


def _candidates(stem: str) -> tuple[str, ...]:
    """File names accepted for ``stem``: gzipped, plain, and the ``name.idx3-ubyte`` variant."""
    dotted = stem.replace("-idx", ".idx")
    return (stem + ".gz", stem, dotted + ".gz", dotted)


def layout_dirs(location: Path, torchvision_name: str) -> tuple[Path, Path]:
    """The directories searched under ``location``: flat, then torchvision-style."""
    return (location, location / torchvision_name / "raw")


def find_idx_files(location: Path, torchvision_name: str) -> IdxFiles | None:
    """Return the four IDX files under ``location`` in either layout, or ``None``."""
    for directory in layout_dirs(location, torchvision_name):
        a, b, c, d = (first_existing(directory, _candidates(stem)) for stem in IDX_STEMS)
        if a is not None and b is not None and c is not None and d is not None:
            return (a, b, c, d)
    return None


def load_idx_files(files: IdxFiles, name: str, num_classes: int = 10) -> ArrayDataset:
    """Decode an MNIST-style file set (cached in-process, keyed on the files' identity)."""
    return _decode(files, name, num_classes, stamp(files))


@functools.lru_cache(maxsize=4)
def _decode(
    files: IdxFiles, name: str, num_classes: int, key: tuple[FileStamp, ...]
) -> ArrayDataset:
    """Read and convert the files; ``key`` only serves to invalidate the cache."""
    del key
    tensors: list[torch.Tensor] = []
    for images_path, labels_path in ((files[0], files[1]), (files[2], files[3])):
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or images.dtype.kind != "u" or images.dtype.itemsize != 1:
            raise ValueError(
                f"{images_path}: expected uint8 images of shape (n, H, W), got "
                f"{images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                f"{images_path.name}), got shape {labels.shape}"
            )
        y = labels_to_tensor(labels)
        check_label_range(y, num_classes, str(labels_path))
        tensors += [images_to_tensor(images[:, None]), y]
    return ArrayDataset(name, tensors[0], tensors[1], tensors[2], tensors[3], num_classes)
