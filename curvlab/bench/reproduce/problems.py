"""Problems of the reproductions, sized per scale, and the bench-registry entries they add.

Every function returns a `curvlab.bench.problems.Problem` for a scale:

* ``smoke``: generated data (Gaussian blobs as 8×8 "images", low-rank data in [0, 1] for the
  autoencoders) and tiny networks, so tests run in seconds without any data files;
* ``quick``: the papers' networks where a 2-core CPU can train them in minutes (documented
  smaller substitutes otherwise) on subsets of Fashion-MNIST and of the generated CURVES;
* ``full``: the papers' networks on the whole data sets.

Data substitutions (documented in every report): Fashion-MNIST for MNIST; the generated CURVES
of `curvlab.data.generate_curves` for the original CURVES file; small CNNs for VGG16 /
ResNet32 / ResNet-56 / AlexNet; CIFAR-10 only when a local copy is given (``--data-root``).

`register()` adds the full-size problems that have no bench entry yet to
`curvlab.bench.problems.PROBLEMS` (and the ``multistep`` schedule wrapper to
`curvlab.bench.specs.OPTIMIZERS`); it is idempotent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.bench import models
from curvlab.bench.problems import PROBLEMS, MetricName, Problem
from curvlab.bench.reproduce.schedule import MULTISTEP, multistep_spec
from curvlab.bench.specs import OPTIMIZERS
from curvlab.data import (
    ArrayDataset,
    generate_curves,
    load_cifar10,
    load_fashion_mnist,
    make_classification,
)

__all__ = [
    "SReLU",
    "autoencoder",
    "cnn2fc",
    "cnn_classifier",
    "fashion_mnist",
    "fashion_mnist16",
    "fisher_mlp",
    "image_data",
    "mlp_classifier",
    "register",
    "sigmoid_autoencoder",
    "vgg_srelu",
]

FMNIST = "Fashion-MNIST (Debian package dataset-fashion-mnist)"
SMOKE_SIDE = 8
SMOKE_CLASSES = 4


# --------------------------------------------------------------------------- data sets
def _truncate(ds: ArrayDataset, n_train: int | None, n_test: int | None) -> ArrayDataset:
    """The first ``n_train`` / ``n_test`` examples (None: all)."""
    return ArrayDataset(
        ds.name,
        ds.x_train[:n_train],
        ds.y_train[:n_train],
        ds.x_test[:n_test],
        ds.y_test[:n_test],
        ds.num_classes,
    )


@functools.cache
def fashion_mnist(n_train: int | None = None, n_test: int | None = None) -> ArrayDataset:
    """The first ``n_train`` / ``n_test`` Fashion-MNIST images (FileNotFoundError if absent)."""
    return _truncate(load_fashion_mnist(), n_train, n_test)


def _downsample(x: Tensor, side: int) -> Tensor:
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


@functools.cache
def fashion_mnist16(n_train: int | None = None, n_test: int | None = None) -> ArrayDataset:
    """Fashion-MNIST down-scaled to 16×16 (antialiased bilinear), as thesis Fig 4.1's MNIST."""
    ds = fashion_mnist(n_train, n_test)
    return replace(ds, x_train=_downsample(ds.x_train, 16), x_test=_downsample(ds.x_test, 16))


@functools.cache
def _standardised_fmnist(n_train: int | None, n_test: int | None) -> ArrayDataset:
    """thesis §5.8: "inputs scaled to zero mean and unit variance" (per pixel, training-set
    statistics; standard deviations below 0.01 are taken as 0.01)."""
    ds = fashion_mnist(n_train, n_test)
    mean = ds.x_train.mean(dim=0, keepdim=True)
    std = ds.x_train.std(dim=0, keepdim=True).clamp_min(0.01)
    return replace(ds, x_train=(ds.x_train - mean) / std, x_test=(ds.x_test - mean) / std)


@functools.cache
def _cifar10(root: str, n_train: int | None, n_test: int | None) -> ArrayDataset:
    return _truncate(load_cifar10(root), n_train, n_test)


@functools.cache
def _curves(n_train: int, n_test: int) -> ArrayDataset:
    return generate_curves(n_train=n_train, n_test=n_test, seed=0)


@functools.cache
def _synthetic_images(
    n_train: int, n_test: int, side: int, classes: int, channels: int, seed: int
) -> ArrayDataset:
    """Gaussian blobs shaped as (channels, side, side) images."""
    x, y = make_classification(n_train + n_test, channels * side * side, classes, seed=seed)
    x = x.reshape(-1, channels, side, side)
    return ArrayDataset("blobs", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


@functools.cache
def _synthetic_unit(n_train: int, n_test: int, dim: int, seed: int) -> ArrayDataset:
    """Autoencoder data in [0, 1]: sigmoid of a rank-3 Gaussian projection."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    z = torch.randn(n, 3, generator=gen) @ torch.randn(3, dim, generator=gen)
    x = torch.sigmoid(2.0 * z).reshape(n, 1, 1, dim)
    zeros = torch.zeros(n, dtype=torch.int64)
    return ArrayDataset("lowrank", x[:n_train], zeros[:n_train], x[n_train:], zeros[n_train:], None)


def image_data(
    scale: str, dataset: str = "fmnist", data_root: Path | None = None
) -> tuple[Callable[[], ArrayDataset], str, tuple[int, int, int]]:
    """(loader, description, input shape (C, H, W)) of a classification data set at ``scale``.

    ``dataset``: ``"fmnist"`` or ``"cifar10"`` (needs ``data_root``). Sizes: quick keeps
    10,000 training and 2,000 test images; full keeps all; smoke generates 8×8 blobs.
    """
    if scale == "smoke":
        shape = (1, SMOKE_SIDE, SMOKE_SIDE)
        return (
            lambda: _synthetic_images(192, 96, SMOKE_SIDE, SMOKE_CLASSES, 1, 0),
            "generated Gaussian blobs as 8×8 images, 4 classes (smoke scale)",
            shape,
        )
    n_train, n_test = (10000, 2000) if scale == "quick" else (None, None)
    size = "all" if n_train is None else f"first {n_train} train / {n_test} test"
    if dataset == "cifar10":
        if data_root is None:
            raise ValueError("dataset: cifar10 needs --data-root")
        root = str(data_root)
        return (
            lambda: _cifar10(root, n_train, n_test),
            f"CIFAR-10 from {root} ({size})",
            (3, 32, 32),
        )
    return (lambda: fashion_mnist(n_train, n_test), f"{FMNIST} ({size})", (1, 28, 28))


# --------------------------------------------------------------------------- networks
class SReLU(nn.Module):
    """Seed 003's smooth ReLU, (x + √(x² + 1)) / 2."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (x + torch.sqrt(x * x + 1.0))


def cnn2fc(
    in_channels: int,
    num_classes: int,
    side: int,
    widths: Sequence[int] = (16, 32),
    hidden: int = 64,
) -> nn.Sequential:
    """Two Conv(5×5) → ReLU → MaxPool blocks and two Linear layers, no BatchNorm.

    The shape of seed 000 §6.1's "CNN with 2 conv layers (ReLU + max-pool) followed by 2 FC
    layers" and a small AlexNet stand-in (seed 001).
    """
    c1, c2 = widths
    pooled = side // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * pooled * pooled, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def vgg_srelu(in_channels: int, num_classes: int, side: int, width: int = 16) -> nn.Sequential:
    """A 4-conv VGG-style stand-in for seed 003's VGG16: Conv3×3 → BN → SReLU blocks, average
    pooling, one Linear classifier, N(0, 0.02) weights (seed 003 §4.2; the init of its code's
    models/net.py)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for block, out in enumerate((width, 2 * width)):
        for _ in range(2):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), SReLU()]
            channels = out
        if block < 2:
            layers.append(nn.AvgPool2d(2))
    layers += [nn.Flatten(), nn.Linear(channels * (side // 4) ** 2, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def sigmoid_autoencoder(widths: Sequence[int]) -> nn.Sequential:
    """Seed 002's autoencoder: sigmoid hidden units except the linear code layer."""
    code = min(range(1, len(widths) - 1), key=lambda i: widths[i])
    return models.mlp(widths, linear_at=(code,), activation=nn.Sigmoid)


def _bce_sum() -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum")


# --------------------------------------------------------------------------- problems
def autoencoder(scale: str, which: str) -> Problem:
    """The thesis's autoencoders (Table 2.4 / 3.6, ReLU, linear code, BCE summed over pixels,
    mean over examples, m = 1000): ``which`` is ``"fmnist"`` (for MNIST) or ``"curves"``.

    quick: the thesis's networks on 5,000 training / 1,000 test examples; full: 60,000 /
    10,000 (Fashion-MNIST) and 20,000 / 10,000 (CURVES); smoke: 16-8-4-8-16 on generated data.
    """
    if which not in ("fmnist", "curves"):
        raise ValueError(f"which: 'fmnist' or 'curves', got {which!r}")
    if scale == "smoke":
        seed = 0 if which == "fmnist" else 1
        return Problem(
            name=f"{which}-autoencoder",
            description=f"smoke stand-in for the {which} autoencoder: 16-8-4-8-16",
            data_source="generated low-rank data in [0, 1] (smoke scale): 256 train / 64 test",
            build=lambda: models.autoencoder([16, 8, 4, 8, 16]),
            make_loss=_bce_sum,
            batch_average=True,
            load_dataset=lambda: _synthetic_unit(256, 64, 16, seed),
            batch_size=64,
            test_metric="test_loss",
            autoencoder=True,
        )
    quick = scale == "quick"
    if which == "fmnist":
        widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
        n_train, n_test = (5000, 1000) if quick else (None, None)
        load: Callable[[], ArrayDataset] = lambda: fashion_mnist(n_train, n_test)  # noqa: E731
        source = f"{FMNIST}, " + ("first 5,000 train / 1,000 test" if quick else "all")
    else:
        widths = [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
        n_tr, n_te = (5000, 1000) if quick else (20000, 10000)
        load = lambda: _curves(n_tr, n_te)  # noqa: E731
        source = f"generated CURVES (curvlab.data.generate_curves, seed 0): {n_tr} / {n_te}"
    return Problem(
        name=f"{which}-autoencoder",
        description=f"thesis autoencoder {'-'.join(map(str, widths))} (ReLU, linear code)",
        data_source=source,
        build=lambda: models.autoencoder(widths),
        make_loss=_bce_sum,
        batch_average=True,
        load_dataset=load,
        batch_size=1000,
        test_metric="test_loss",
        autoencoder=True,
    )


def seed002_autoencoder(scale: str) -> Problem:
    """Seed 002's Fashion-MNIST autoencoder: 784-1000-500-250-30 mirrored, sigmoid units
    except the linear code, pixelwise BCE. quick: the same network on 10,000 examples."""
    if scale == "smoke":
        return replace(
            autoencoder("smoke", "fmnist"),
            name="fmnist-autoencoder-sigmoid",
            build=lambda: sigmoid_autoencoder([16, 8, 4, 8, 16]),
        )
    quick = scale == "quick"
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    n_train, n_test = (10000, 2000) if quick else (None, None)
    return Problem(
        name="fmnist-autoencoder-sigmoid",
        description=f"seed 002 autoencoder {'-'.join(map(str, widths))} (sigmoid, linear code)",
        data_source=f"{FMNIST}, " + ("first 10,000 train / 2,000 test" if quick else "all"),
        build=lambda: sigmoid_autoencoder(widths),
        make_loss=_bce_sum,
        batch_average=True,
        load_dataset=lambda: fashion_mnist(n_train, n_test),
        batch_size=512,
        test_metric="test_loss",
        autoencoder=True,
    )


def mlp_classifier(
    scale: str,
    name: str,
    widths: Sequence[int],
    activation: type[nn.Module],
    *,
    batch_size: int,
    n_train: int | None,
    n_test: int | None,
    standardise: bool = False,
) -> Problem:
    """An MLP classifier on (flattened) Fashion-MNIST; at smoke scale the same activation on
    64-16-4 with generated blobs. ``widths[0]`` must be 784 (or 256 for the 16×16 data)."""
    if scale == "smoke":
        loader, source, _ = image_data("smoke")
        return Problem(
            name=name,
            description=f"smoke stand-in: 64-16-{SMOKE_CLASSES} ({activation.__name__})",
            data_source=source,
            build=lambda: models.mlp([64, 16, SMOKE_CLASSES], activation=activation),
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=loader,
            batch_size=64,  # 192 = 3 × 64: no short last batch (SMW needs N2 ≤ N1)
            test_metric="test_error",
        )
    if standardise:
        load: Callable[[], ArrayDataset] = lambda: _standardised_fmnist(n_train, n_test)  # noqa: E731
    else:
        load = lambda: fashion_mnist(n_train, n_test)  # noqa: E731
    size = "all" if n_train is None else f"first {n_train} train / {n_test} test"
    return Problem(
        name=name,
        description=f"MLP {'-'.join(map(str, widths))} ({activation.__name__}); cross-entropy",
        data_source=f"{FMNIST} ({size})" + ("; standardised per pixel" if standardise else ""),
        build=lambda: models.mlp(list(widths), activation=activation),
        make_loss=nn.CrossEntropyLoss,
        batch_average=False,
        load_dataset=load,
        batch_size=batch_size,
        test_metric="test_error",
    )


def fisher_mlp(scale: str) -> Problem:
    """Thesis Fig 4.1: MLP 256-20-20-20-20-10 (tanh, Martens & Grosse 2015) on 16×16
    down-scaled images (Fashion-MNIST for MNIST); smoke: 16-6-6-6-6-4 on blobs."""
    if scale == "smoke":
        gen = lambda: _synthetic_images(256, 64, 4, SMOKE_CLASSES, 1, 3)  # noqa: E731
        return Problem(
            name="fmnist16-mlp-fisher",
            description="smoke stand-in for Fig 4.1's network: 16-6-6-6-6-4 (tanh)",
            data_source="generated Gaussian blobs in 16 dimensions (smoke scale)",
            build=lambda: models.mlp([16, 6, 6, 6, 6, SMOKE_CLASSES], activation=nn.Tanh),
            make_loss=nn.CrossEntropyLoss,
            batch_average=False,
            load_dataset=gen,
            batch_size=64,
            test_metric="test_error",
        )
    n_train, n_test = (10000, 1000) if scale == "quick" else (None, None)
    return Problem(
        name="fmnist16-mlp-fisher",
        description="thesis Fig 4.1 network 256-20-20-20-20-10 (tanh) on 16×16 images",
        data_source=f"{FMNIST} down-scaled to 16×16 (antialiased bilinear), "
        + ("first 10,000 train / 1,000 test" if n_train else "all"),
        build=lambda: models.mlp([256, 20, 20, 20, 20, 10], activation=nn.Tanh),
        make_loss=nn.CrossEntropyLoss,
        batch_average=False,
        load_dataset=lambda: fashion_mnist16(n_train, n_test),
        batch_size=256,
        test_metric="test_error",
    )


ModelKind = str  # "small-cnn" (BN), "cnn2fc" (no BN), "vgg-srelu"


def cnn_classifier(
    scale: str,
    model: ModelKind,
    *,
    metric: MetricName = "test_error",
    batch_size: int = 128,
    dataset: str = "fmnist",
    data_root: Path | None = None,
    name: str | None = None,
    loader: Callable[[], ArrayDataset] | None = None,
    source: str | None = None,
) -> Problem:
    """A small CNN classifier (the VGG16 / ResNet / AlexNet substitutes).

    ``model``: ``"small-cnn"`` (`curvlab.bench.models.small_cnn`: 2× Conv-BN-ReLU-MaxPool +
    Linear), ``"cnn2fc"`` (`cnn2fc`, no BatchNorm) or ``"vgg-srelu"`` (`vgg_srelu`).
    ``loader``/``source`` replace the scale's data (e.g. a full-batch subset).
    """
    default_loader, default_source, (c, side, _) = image_data(scale, dataset, data_root)
    classes = SMOKE_CLASSES if scale == "smoke" else 10
    builders: dict[str, Callable[[], nn.Module]] = {
        "small-cnn": lambda: models.small_cnn(c, classes, side),
        "cnn2fc": lambda: cnn2fc(c, classes, side),
        "vgg-srelu": lambda: vgg_srelu(c, classes, side),
    }
    if model not in builders:
        raise ValueError(f"model: one of {sorted(builders)}, got {model!r}")
    prefix = "cifar10" if dataset == "cifar10" else "fmnist"
    return Problem(
        name=name or f"{prefix}-{model}" + ("-nll" if metric == "test_loss" else ""),
        description=f"{model} CNN classifier ({c}×{side}×{side} inputs); cross-entropy",
        data_source=source or default_source,
        build=builders[model],
        make_loss=nn.CrossEntropyLoss,
        batch_average=False,
        load_dataset=loader or default_loader,
        batch_size=batch_size,
        test_metric=metric,
        flatten=False,
        eval_batch_size=1000,
    )


def full_batch_subset(
    scale: str, n: int, dataset: str = "fmnist", data_root: Path | None = None
) -> tuple[Callable[[], ArrayDataset], str]:
    """The first ``n`` training images (and as many test images) for full-batch fitting."""
    loader, source, _ = image_data(scale, dataset, data_root)

    def load() -> ArrayDataset:
        return _truncate(loader(), n, n)

    return load, f"{source}; first {n} training images, fitted full-batch"


# --------------------------------------------------------------------------- registry
def _registered_problems() -> list[Problem]:
    """The full-size problems of the reproductions that the bench registry lacks."""
    return [
        fisher_mlp("full"),
        mlp_classifier(
            "full",
            "fmnist-mlp-tanh",
            [784, 128, 10],
            nn.Tanh,
            batch_size=512,
            n_train=None,
            n_test=None,
        ),
        seed002_autoencoder("full"),
        mlp_classifier(
            "full",
            "fmnist-mlp-logistic-std",
            [784, 500, 10],
            nn.Sigmoid,
            batch_size=60,
            n_train=None,
            n_test=None,
            standardise=True,
        ),
        cnn_classifier("full", "small-cnn", metric="test_loss"),
        cnn_classifier("full", "cnn2fc", metric="test_loss"),
        cnn_classifier("full", "cnn2fc"),
        cnn_classifier("full", "vgg-srelu"),
    ]


def register() -> None:
    """Add the reproductions' problems and the ``multistep`` optimizer to the bench registries
    (names that exist already are left alone)."""
    for problem in _registered_problems():
        PROBLEMS.setdefault(problem.name, problem)
    OPTIMIZERS.setdefault(MULTISTEP, multistep_spec())
