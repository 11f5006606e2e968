"""The networks of the benchmark problems, built from layer widths.

Initialisation is PyTorch's default: the thesis never states one (thesis A17, docs/deviations.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

__all__ = ["autoencoder", "mlp", "small_cnn"]


def mlp(
    widths: Sequence[int],
    *,
    linear_at: Sequence[int] = (),
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]`` with ``activation`` after every hidden layer.

    Args:
        widths: layer widths, input first, output last.
        linear_at: indices (into ``widths``) of hidden layers that get no activation, e.g. an
            autoencoder's code layer.
        activation: the hidden units' module class (ReLU; thesis ch.5 uses logistic units,
            ``nn.Sigmoid``).

    Inputs are flat vectors (the problems flatten images once, when they load them). The output
    layer has no activation: sigmoid and softmax live in the loss (`nn.BCEWithLogitsLoss`,
    `nn.CrossEntropyLoss`).
    """
    if len(widths) < 2:
        raise ValueError(f"widths: need at least an input and an output width, got {widths}")
    layers: list[nn.Module] = []
    last = len(widths) - 1
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < last and i not in linear_at:
            layers.append(activation())
    return nn.Sequential(*layers)


def autoencoder(widths: Sequence[int]) -> nn.Sequential:
    """A deep autoencoder: ReLU hidden units, a linear code layer (the narrowest), logit outputs.

    This is the thesis's Table 2.4 / 3.6 family with sigmoid hidden units replaced by ReLU; the
    output sigmoid is folded into `nn.BCEWithLogitsLoss`.
    """
    code = min(range(1, len(widths) - 1), key=lambda i: widths[i])
    return mlp(widths, linear_at=(code,))


def small_cnn(in_channels: int = 1, num_classes: int = 10, side: int = 28) -> nn.Sequential:
    """Two Conv2d → BatchNorm2d → ReLU → MaxPool2d blocks, then one Linear classifier."""
    pooled = side // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * pooled * pooled, num_classes),
    )
