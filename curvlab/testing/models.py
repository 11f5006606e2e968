"""Tiny seeded models and problems for tests and examples (float64 by default)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["deep_linear", "regression_problem", "tiny_cnn", "tiny_mlp"]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp(
    widths: tuple[int, ...] = (4, 5, 3),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
    inplace: bool = False,
) -> nn.Sequential:
    """Linear–tanh–…–Linear (or ReLU(inplace) when ``inplace``)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True) if inplace else nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def deep_linear(
    widths: tuple[int, ...] = (3, 4, 2), *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """A deep linear network (no activations): K-FAC's exact case with one datum."""
    torch.manual_seed(seed)
    return nn.Sequential(
        *[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    ).to(dtype)


def tiny_cnn(
    *, seed: int = 0, dtype: torch.dtype = torch.float64, batchnorm: bool = False
) -> nn.Sequential:
    """Conv(2→3, k3, stride 2, pad 1) – ReLU – Conv(3→2, k2, dilation 2, no bias) – Linear."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Conv2d(2, 3, 3, stride=2, padding=1)]
    if batchnorm:
        mods.append(nn.BatchNorm2d(3))
    mods += [
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 1 * 1, 3),
    ]
    return nn.Sequential(*mods).to(dtype)


def regression_problem(
    n: int = 16, d_in: int = 4, d_out: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Inputs and targets of a noisy random linear-plus-tanh map."""
    g = _seeded(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, d_out, generator=g, dtype=dtype)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, d_out, generator=g, dtype=dtype)
    return x, y
