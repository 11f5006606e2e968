"""A generated stand-in for the CURVES data set of Hinton & Salakhutdinov (2006).

The original CURVES images (``digs3pts_1.mat``: 20000 train / 10000 test grey 28x28 images
of smooth curves through three random points, used for the deep-autoencoder benchmark of
Hinton & Salakhutdinov and of Martens' Hessian-free optimisation) cannot be downloaded here,
so :func:`generate_curves` builds a statistically similar set deterministically from a seed.

Construction, fully vectorised in torch and processed in fixed-size chunks:

1. Three control points ``P0, P1, P2`` are drawn uniformly from the square
   ``[3, 24]^2`` (pixel-centre coordinates 0..27).
2. The curve is the quadratic through the three points, parameterised by chord length:
   ``C(0) = P0``, ``C(s) = P1``, ``C(1) = P2`` with ``s = |P1-P0| / (|P1-P0| + |P2-P1|)``
   clamped to ``[0.25, 0.75]`` (Lagrange interpolation), so it is smooth and passes
   through all three points.
3. ``C`` is evaluated at 128 parameter values. Each sample is splatted onto the 28x28 grid
   with bilinear weights scaled by its share of arc length, which gives an ink density
   proportional to the curve's length in each pixel, independent of its speed.
4. The density is blurred with a separable Gaussian (sigma 0.7 px), divided by the peak of
   a straight stroke and clipped to 1 (a soft, anti-aliased stroke about two pixels wide),
   then each image is divided by its maximum so that it peaks at exactly 1.

Training and test images come from independent streams derived from ``seed`` (the test set
does not depend on ``n_train``); only fixed-shape, order-fixed operations are used, so the
same seed gives bit-identical data. There are no class labels: ``y`` is all zeros and
``num_classes`` is ``None``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from curvlab.data.dataset import ArrayDataset

__all__ = ["generate_curves", "render_curves"]

IMAGE_SIZE = 28
_MARGIN = 3.0
_SAMPLES = 128
_SIGMA = 0.7
_CHUNK = 2048


def _gaussian_taps(sigma: float, radius: int) -> list[float]:
    """Normalised 1-D Gaussian filter taps for offsets ``-radius..radius``."""
    w = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(w)
    return [v / total for v in w]


_TAPS = _gaussian_taps(_SIGMA, 2)
#: Peak density of an infinitely long straight stroke lying between two pixel rows
#: (the dimmest case); dividing by it and clipping makes every stroke core saturate.
_STROKE_PEAK = 0.5 * (_TAPS[2] + _TAPS[3])


def _blur_axis(img: Tensor, dim: int) -> Tensor:
    """Convolve ``(b, H, W)`` images with the Gaussian taps along ``dim`` (1 or 2), zero-padded."""
    r = len(_TAPS) // 2
    size = img.shape[dim]
    pad = (r, r, 0, 0) if dim == 2 else (0, 0, r, r)
    padded = torch.nn.functional.pad(img, pad)
    out = torch.zeros_like(img)
    for k, w in enumerate(_TAPS):
        out += w * padded.narrow(dim, k, size)
    return out


def _blur(img: Tensor) -> Tensor:
    """Separable Gaussian blur of ``(b, H, W)`` images (elementwise ops: deterministic)."""
    return _blur_axis(_blur_axis(img, 2), 1)


def _curve_points(ctrl: Tensor) -> tuple[Tensor, Tensor]:
    """Sample the quadratic through ``ctrl`` ``(b, 3, 2)``.

    Returns points ``(b, K, 2)`` and weights ``(b, K)``: each sample's share of arc length
    (trapezoidal rule).
    """
    p0, p1, p2 = ctrl[:, 0], ctrl[:, 1], ctrl[:, 2]
    d01 = (p1 - p0).norm(dim=1)
    d12 = (p2 - p1).norm(dim=1)
    s = (d01 / (d01 + d12).clamp_min(1e-6)).clamp(0.25, 0.75)[:, None]
    t = torch.linspace(0.0, 1.0, _SAMPLES, dtype=ctrl.dtype)[None, :]
    l0 = (t - s) * (t - 1.0) / s
    l1 = t * (t - 1.0) / (s * (s - 1.0))
    l2 = t * (t - s) / (1.0 - s)
    pts = l0[..., None] * p0[:, None] + l1[..., None] * p1[:, None] + l2[..., None] * p2[:, None]
    seg = (pts[:, 1:] - pts[:, :-1]).norm(dim=2)
    weights = torch.nn.functional.pad(seg, (0, 1)) + torch.nn.functional.pad(seg, (1, 0))
    return pts, 0.5 * weights


def _splat(pts: Tensor, weights: Tensor, size: int) -> Tensor:
    """Bilinearly splat weighted points ``(b, K, 2)`` (x, y) onto ``(b, size, size)`` grids."""
    b = pts.shape[0]
    base = pts.floor()
    frac = pts - base
    base_i = base.to(torch.int64)
    flat = torch.zeros(b * size * size, dtype=pts.dtype)
    offset = (torch.arange(b) * (size * size))[:, None]
    for dx in (0, 1):
        for dy in (0, 1):
            wx = frac[..., 0] if dx else 1.0 - frac[..., 0]
            wy = frac[..., 1] if dy else 1.0 - frac[..., 1]
            ix = base_i[..., 0] + dx
            iy = base_i[..., 1] + dy
            inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
            index = offset + iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)
            value = torch.where(inside, weights * wx * wy, torch.zeros_like(weights))
            flat.index_add_(0, index.reshape(-1), value.reshape(-1))
    return flat.view(b, size, size)


def render_curves(ctrl: Tensor) -> Tensor:
    """Render curves through control points ``ctrl`` ``(b, 3, 2)`` (x, y in pixels).

    Returns float32 images ``(b, 28, 28)`` in ``[0, 1]``, each with maximum 1 unless the
    curve misses the grid entirely (then all zeros).
    """
    ctrl = ctrl.to(torch.float64)
    pts, weights = _curve_points(ctrl)
    density = _blur(_splat(pts, weights, IMAGE_SIZE))
    img = (density / _STROKE_PEAK).clamp_(max=1.0)
    peak = img.amax(dim=(1, 2), keepdim=True)
    img = torch.where(peak > 0, img / peak.clamp_min(1e-12), img)
    return img.to(torch.float32)


def _stream_seeds(seed: int) -> tuple[int, int]:
    """Two independent 64-bit seeds (train, test) derived from ``seed``."""
    train, test = np.random.SeedSequence(seed).spawn(2)
    return int(train.generate_state(1, np.uint64)[0]), int(test.generate_state(1, np.uint64)[0])


def _generate_split(n: int, stream_seed: int) -> Tensor:
    """``n`` images ``(n, 1, 28, 28)`` from the stream ``stream_seed``."""
    gen = torch.Generator().manual_seed(stream_seed)
    low, high = _MARGIN, IMAGE_SIZE - 1 - _MARGIN
    ctrl = low + (high - low) * torch.rand(n, 3, 2, generator=gen, dtype=torch.float64)
    out = torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK, 0] = render_curves(ctrl[start : start + _CHUNK])
    return out


def generate_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0) -> ArrayDataset:
    """Generate the CURVES stand-in: float32 images ``(n, 1, 28, 28)`` in ``[0, 1]``.

    Args:
        n_train: Number of training images (the original has 20000).
        n_test: Number of test images (the original has 10000).
        seed: Non-negative seed; equal seeds give bit-identical data.

    Returns:
        ``ArrayDataset`` named ``"curves"`` with all-zero int64 labels and
        ``num_classes=None``. Results are cached in-process: repeated calls with the same
        arguments return the same object (treat its tensors as read-only).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sizes must be non-negative, got n_train={n_train}, n_test={n_test}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return _generate_cached(n_train, n_test, seed)


@functools.lru_cache(maxsize=4)
def _generate_cached(n_train: int, n_test: int, seed: int) -> ArrayDataset:
    """Cached body of :func:`generate_curves`."""
    train_seed, test_seed = _stream_seeds(seed)
    return ArrayDataset(
        "curves",
        _generate_split(n_train, train_seed),
        torch.zeros(n_train, dtype=torch.int64),
        _generate_split(n_test, test_seed),
        torch.zeros(n_test, dtype=torch.int64),
        None,
    )
