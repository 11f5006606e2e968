"""Data sets for the curvlab benchmarks: loaders of on-disk data (never downloaded),
the generated CURVES stand-in, and tiny synthetic problems for tests."""

from __future__ import annotations

from curvlab.data.curves import entropy_floor, generate_curves
from curvlab.data.dataset import ArrayDataset, batches
from curvlab.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_ENV_VAR,
    load_fashion_mnist,
)
from curvlab.data.idx import read_idx, write_idx
from curvlab.data.readers import load_cifar10, load_cifar100, load_mnist, load_svhn
from curvlab.data.synthetic import make_classification, make_regression

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV_VAR",
    "ArrayDataset",
    "batches",
    "entropy_floor",
    "generate_curves",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_mnist",
    "load_svhn",
    "make_classification",
    "make_regression",
    "read_idx",
    "write_idx",
]
