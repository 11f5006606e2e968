"""Tiny seeded regression and classification problems for tests and examples.

Both generators draw from their own ``torch.Generator`` seeded with ``seed``, so they are
deterministic and never touch the global random state.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["make_classification", "make_regression"]


def _check_positive(**sizes: int) -> None:
    """Raise ``ValueError`` for any non-positive size."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def make_regression(
    n: int,
    d_in: int,
    d_out: int,
    seed: int,
    *,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A noisy linear regression problem ``y = x @ W + b + noise * eps``.

    Args:
        n: Number of samples.
        d_in: Input dimension; ``x`` entries are standard normal.
        d_out: Output dimension; ``W`` has entries of variance ``1 / d_in``.
        seed: Seed of the private generator.
        noise: Standard deviation of the additive Gaussian noise.
        dtype: Floating dtype of ``x`` and ``y`` (e.g. ``torch.float64``).

    Returns:
        ``(x, y)`` of shapes ``(n, d_in)`` and ``(n, d_out)``.
    """
    _check_positive(n=n, d_in=d_in, d_out=d_out)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    w = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=gen, dtype=torch.float64)
    y = x @ w + b + noise * torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def make_classification(
    n: int,
    d_in: int,
    n_classes: int,
    seed: int,
    *,
    separation: float = 2.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A Gaussian-blobs classification problem with balanced classes.

    Class means are standard normal vectors scaled by ``separation``; each sample is its
    class mean plus standard normal noise. Labels cycle through the classes and are then
    shuffled, so every class occurs ``n // n_classes`` or one more times.

    Args:
        n: Number of samples.
        d_in: Input dimension.
        n_classes: Number of classes (at least 2).
        seed: Seed of the private generator.
        separation: Scale of the class means (larger is easier).
        dtype: Floating dtype of ``x``.

    Returns:
        ``(x, y)``: ``x`` of shape ``(n, d_in)`` and int64 labels ``y`` of shape ``(n,)``.
    """
    _check_positive(n=n, d_in=d_in)
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    gen = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(n_classes, d_in, generator=gen, dtype=torch.float64)
    y = (torch.arange(n) % n_classes)[torch.randperm(n, generator=gen)]
    x = means[y] + torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    return x.to(dtype), y
