"""Benchmark problems: a model, a loss, a data set and a test metric, built from a seed.

Adding a problem is one `Problem` entry in `PROBLEMS`. Data comes from local files or is
generated; nothing is downloaded. Data sets load lazily, on the first run
that needs them, and are cached for the rest of the process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from curvlab.bench import models
from curvlab.bench.registry import lookup
from curvlab.data import ArrayDataset, generate_curves, load_fashion_mnist, make_classification

__all__ = [
    "PROBLEMS",
    "MetricName",
    "Problem",
    "ProblemData",
    "get_problem",
]

MetricName = Literal["test_loss", "test_error"]


@dataclass(frozen=True)
class ProblemData:
    """Model-ready tensors: inputs and loss targets for the training and test sets."""

    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor

    @property
    def num_train(self) -> int:
        """The number of training examples."""
        return int(self.train_inputs.shape[0])

    def to(self, device: torch.device | str) -> ProblemData:
        """The same data on ``device`` (inputs and targets that are one tensor stay one)."""
        moved: dict[int, Tensor] = {}

        def move(t: Tensor) -> Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        return ProblemData(
            move(self.train_inputs),
            move(self.train_targets),
            move(self.test_inputs),
            move(self.test_targets),
        )


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        name: registry key, e.g. ``"curves-autoencoder"``.
        description: one line for ``curvlab list``.
        data_source: where the data comes from (file path, generator, paper).
        build: builds the network (uses the global RNG; call `make_model` instead).
        make_loss: builds the loss module.
        batch_average: passed to `curvlab.Objective`; True for "sum over outputs, mean over
            examples" losses (``reduction="sum"`` divided by the batch size).
        load_dataset: loads the raw data set (lazily, cached by the loader).
        batch_size: default minibatch size m.
        test_metric: ``"test_loss"`` (the training loss on the test set) or ``"test_error"``
            (percentage of misclassified test examples).
        flatten: flatten inputs to vectors (MLPs) instead of keeping (C, H, W) images.
        autoencoder: the targets are the (flattened) inputs themselves.
        eval_batch_size: batch size of the no-grad full-data-set evaluations.
    """

    name: str
    description: str
    data_source: str
    build: Callable[[], nn.Module]
    make_loss: Callable[[], nn.Module]
    batch_average: bool
    load_dataset: Callable[[], ArrayDataset]
    batch_size: int
    test_metric: MetricName
    flatten: bool = True
    autoencoder: bool = False
    eval_batch_size: int = 5000

    def make_model(self, seed: int) -> nn.Module:
        """The network, initialised from ``seed`` without touching the global RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def data(self, subset: int | None = None) -> ProblemData:
        """Model-ready tensors; ``subset`` keeps the first N training examples (test set whole).

        Raises:
            FileNotFoundError: the data set's files are not installed.
            ValueError: ``subset`` < 1.
        """
        if subset is not None and subset < 1:
            raise ValueError(f"subset: need at least one training example, got {subset}")
        ds = self.load_dataset()
        x_train, y_train = ds.x_train, ds.y_train
        if subset is not None:
            x_train, y_train = x_train[:subset], y_train[:subset]
        train_in, test_in = self._inputs(x_train), self._inputs(ds.x_test)
        if self.autoencoder:
            return ProblemData(train_in, train_in, test_in, test_in)
        return ProblemData(train_in, y_train, test_in, ds.y_test)

    def _inputs(self, x: Tensor) -> Tensor:
        x = x.float()
        return x.reshape(x.shape[0], -1).contiguous() if self.flatten else x.contiguous()


# --------------------------------------------------------------------------- data loaders
@functools.cache
def _fashion_mnist() -> ArrayDataset:
    return load_fashion_mnist()


@functools.cache
def _curves() -> ArrayDataset:
    return generate_curves(n_train=20000, n_test=10000, seed=0)


@functools.cache
def _synthetic() -> ArrayDataset:
    """A 3-class Gaussian-blobs task in 20 dimensions: 512 train, 256 test, fixed seed."""
    n_train, n_test, dim, classes = 512, 256, 20, 3
    x, y = make_classification(n_train + n_test, dim, classes, seed=0)
    return ArrayDataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def _bce_sum() -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum")


_FMNIST_SOURCE = (
    "Fashion-MNIST (Xiao et al. 2017) from the Debian package dataset-fashion-mnist "
    "(/usr/share/datasets/fashion-mnist/); 60,000 train / 10,000 test 28×28 images"
)

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            name="fmnist-autoencoder",
            description="thesis MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, "
            "linear code) on Fashion-MNIST; BCE summed over pixels, mean over examples",
            data_source=_FMNIST_SOURCE + "; architecture from the thesis's Table 2.4 / 3.6 "
            "(MNIST, which is not installed here)",
            build=lambda: models.autoencoder([784, 1000, 500, 250, 30, 250, 500, 1000, 784]),
            make_loss=_bce_sum,
            batch_average=True,
            load_dataset=_fashion_mnist,
            batch_size=1000,
            test_metric="test_loss",
            autoencoder=True,
        ),
        Problem(
            name="curves-autoencoder",
            description="thesis CURVES autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784 "
            "(ReLU, linear code); BCE summed over pixels, mean over examples",
            data_source="CURVES-style images regenerated by curvlab.data.generate_curves "
            "(20,000 train / 10,000 test, seed 0), not the original digs3pts_1.mat; "
            "architecture from the thesis's Table 2.4 / 3.6",
            build=lambda: models.autoencoder(
                [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
            ),
            make_loss=_bce_sum,
            batch_average=True,
            load_dataset=_curves,
            batch_size=1000,
            test_metric="test_loss",
            autoencoder=True,
        ),
        Problem(
            name="fmnist-mlp",
            description="MLP classifier 784-1000-500-10 (ReLU) on Fashion-MNIST; cross-entropy",
            data_source=_FMNIST_SOURCE,
            build=lambda: models.mlp([784, 1000, 500, 10]),
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=_fashion_mnist,
            batch_size=128,
            test_metric="test_error",
        ),
        Problem(
            name="fmnist-mlp-logistic",
            description="thesis ch.5 MLP 784-500-10 with logistic (sigmoid) hidden units on "
            "Fashion-MNIST; softmax cross-entropy; batch N1 = 60",
            data_source=_FMNIST_SOURCE + "; the thesis's §5.8 MNIST network (MNIST is not "
            "installed here)",
            build=lambda: models.mlp([784, 500, 10], activation=nn.Sigmoid),
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=_fashion_mnist,
            batch_size=60,
            test_metric="test_error",
        ),
        Problem(
            name="fmnist-cnn",
            description="small CNN (2× Conv2d-BatchNorm2d-ReLU-MaxPool, Linear) on "
            "Fashion-MNIST; cross-entropy",
            data_source=_FMNIST_SOURCE,
            build=models.small_cnn,
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=_fashion_mnist,
            batch_size=128,
            test_metric="test_error",
            flatten=False,
        ),
        Problem(
            name="synthetic-mlp",
            description="tiny MLP 20-32-32-3 (ReLU) on a synthetic 3-class Gaussian mixture; "
            "cross-entropy; needs no files (smoke tests)",
            data_source="curvlab.data.make_classification (Gaussian blobs, seed 0): 512 train / "
            "256 test points in 20 dimensions",
            build=lambda: models.mlp([20, 32, 32, 3]),
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=_synthetic,
            batch_size=64,
            test_metric="test_error",
        ),
    ]
}


def get_problem(name: str) -> Problem:
    """The registered problem ``name``; `UnknownNameError` lists the valid names."""
    return lookup(PROBLEMS, name, "problem")
