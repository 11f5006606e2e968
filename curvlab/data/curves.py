"""A generated stand-in for the CURVES data set of Hinton & Salakhutdinov (2006).

The original CURVES images (``digs3pts_1.mat``: 20000 train / 10000 test 28x28 images of
thin smooth curves through three random points, used for the deep-autoencoder benchmark of
Hinton & Salakhutdinov and of Martens' Hessian-free optimisation) cannot be downloaded here,
so :func:`generate_curves` builds a data set of the same kind deterministically from a seed.
It is *not* the original data, and losses on it are not directly comparable with published
ones.

Construction, fully vectorised in torch (float32) and processed in chunks of 1024 images:

1. For every image, 32 candidate triples of control points ``P0, P1, P2`` are drawn
   uniformly from the square ``[2, 25]^2`` (pixel-centre coordinates 0..27). The first
   candidate that qualifies is used: its curve (step 2) spans at least 14 px along x or y
   (half the image), stays inside ``[1, 26]^2`` (checked at 17 points; strokes are not cut
   by the border), does not fold back on itself (angle P0-P1-P2 at least 30 degrees, so no
   hairpins) and has arms ``|P1-P0|, |P2-P1|`` of at least 3 px. About 35% of candidates
   qualify; if none of the 32 does (probability about ``1e-6`` per image) the widest one is
   used.
2. The curve is the quadratic through the three points, parameterised by chord length:
   ``C(0) = P0``, ``C(s) = P1``, ``C(1) = P2`` with ``s = |P1-P0| / (|P1-P0| + |P2-P1|)``
   clamped to ``[0.25, 0.75]`` (Lagrange interpolation), so it is smooth and passes
   through all three points. Curves are 14 to about 55 px long (median 28).
3. ``C`` is resampled at 49 points equally spaced in arc length (arc length estimated from
   65 parameter samples, then inverted by linear interpolation), giving a 48-segment
   polyline with segments of at most about 1.2 px.
4. Each pixel's value is ``clip(1.5 - d / 0.75, 0, 1)``, where ``d`` is the distance from
   its centre to the polyline: a thin anti-aliased stroke 1.5 px wide, solid (value 1)
   within 0.375 px of the curve, with a linear ramp to 0 at 1.125 px, on a background of
   exactly 0. It is evaluated only in a 6x6 pixel window around each segment and combined
   over segments with a maximum (``scatter_reduce`` ``"amax"``, exact and order-free).

The strokes are thin and mostly saturated, as in the original data set. On the
benchmark's data (seed 0, 20000 train / 10000 test) an image has on average 68 non-zero
pixels (9% of the image), 65% of them above 0.5 and 39% above 0.9; every image reaches 1.
Its entropy floor (:func:`entropy_floor`: the mean over images of ``sum_j H(x_j)``, the
smallest BCE loss, summed over pixels, that any reconstruction can reach) is 23.2 nats per
image on both splits, well below the ~55 of the best published training losses on the
original data, so the loss mostly measures reconstruction error. (The previous version of
this generator, a Gaussian-blurred ~2 px stroke, had a floor of 38.1.) Predicting the mean
training image for every input gives a BCE of 153.1. Generating the 30000 images takes
about 1.5 s; :func:`generate_curves` runs on one intra-op thread (the caller's setting is
restored afterwards), because the many small tensor operations gain little from threads and
stall badly when the cores are shared with other processes.

Training and test images come from independent streams derived from ``seed`` (the test set
does not depend on ``n_train``); only fixed-shape, order-fixed operations are used, so the
same seed gives bit-identical data on a given machine whatever the number of threads
(elementwise operations, per-row scans and exact maxima; no floating-point sums across
threads). There are no class labels: ``y`` is all zeros and ``num_classes`` is ``None``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from curvlab.data.dataset import ArrayDataset

__all__ = ["entropy_floor", "generate_curves", "render_curves"]

IMAGE_SIZE = 28
#: Control points are drawn uniformly from ``[_LOW, _HIGH]^2``.
_LOW, _HIGH = 2.0, 25.0
#: A curve qualifies if its bounding box is at least this wide or high (pixels) ...
_MIN_SPAN = 14.0
#: ... stays inside ``[_INSIDE_LOW, _INSIDE_HIGH]^2`` ...
_INSIDE_LOW, _INSIDE_HIGH = 1.0, 26.0
#: ... does not fold back on itself (angle P0-P1-P2 at least 30 degrees) ...
_MAX_COS_ANGLE = math.cos(math.radians(30.0))
#: ... and has both arms ``|P1 - P0|``, ``|P2 - P1|`` at least this long (pixels).
_MIN_ARM = 3.0
_CANDIDATES = 32
#: Parameter samples used to test candidates.
_CHECK_SAMPLES = 17
#: Parameter samples used to estimate arc length.
_DENSE = 65
#: Polyline segments per curve (equal arc length).
_SEGMENTS = 48
#: Stroke half-width and width of the anti-aliasing ramp (pixels): a pixel's value is
#: ``clip((_HALF_WIDTH - distance) / _RAMP + 0.5, 0, 1)``.
_HALF_WIDTH = 0.75
_RAMP = 0.75
#: Pixels considered per segment: offsets ``-2..3`` from the floor of its midpoint. They
#: cover every pixel within Chebyshev distance 2 of the midpoint, which suffices while
#: ``_HALF_WIDTH + _RAMP / 2 + segment_length / 2 <= 2``, i.e. for segments up to 1.75 px
#: (curves up to 84 px long; the longest that qualifies is about 60 px).
_WINDOW = tuple(range(-2, 4))
#: The rasteriser draws on a padded canvas so that every window lies inside it.
_PAD = 2
_CANVAS = IMAGE_SIZE + 4
_CHUNK = 1024


def _length(v: Tensor) -> Tensor:
    """Euclidean length of vectors ``(..., 2)`` (elementwise, no reduction)."""
    return (v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1]).sqrt()


def _quadratic(ctrl: Tensor, t: Tensor) -> Tensor:
    """Evaluate the chord-length-parameterised quadratic through ``ctrl`` ``(..., 3, 2)``.

    ``t`` has shape ``(T,)`` or ``(..., T)``; returns points ``(..., T, 2)``.
    """
    p0, p1, p2 = ctrl[..., 0, :], ctrl[..., 1, :], ctrl[..., 2, :]
    d01 = _length(p1 - p0)
    d12 = _length(p2 - p1)
    s = (d01 / (d01 + d12).clamp_min(1e-6)).clamp(0.25, 0.75)[..., None]
    l0 = (t - s) * (t - 1.0) / s
    l1 = t * (t - 1.0) / (s * (s - 1.0))
    l2 = t * (t - s) / (1.0 - s)
    return (
        l0[..., None] * p0[..., None, :]
        + l1[..., None] * p1[..., None, :]
        + l2[..., None] * p2[..., None, :]
    )


def _dense_curve(ctrl: Tensor) -> Tensor:
    """``_DENSE`` points ``(..., _DENSE, 2)`` equally spaced in the curve's parameter."""
    return _quadratic(ctrl, torch.linspace(0.0, 1.0, _DENSE, dtype=ctrl.dtype))


def _curve_points(ctrl: Tensor) -> Tensor:
    """Points ``(b, _SEGMENTS + 1, 2)`` on the curves through ``ctrl`` ``(b, 3, 2)``,
    equally spaced in (estimated) arc length, from ``P0`` to ``P2``."""
    dense = _dense_curve(ctrl)
    seg = _length(dense[:, 1:] - dense[:, :-1])
    cum = torch.nn.functional.pad(seg.cumsum(dim=1), (1, 0))
    target = cum[:, -1:] * torch.linspace(0.0, 1.0, _SEGMENTS + 1, dtype=ctrl.dtype)
    hi = torch.searchsorted(cum, target).clamp_(1, _DENSE - 1)
    lo = hi - 1
    c_lo = cum.gather(1, lo)
    frac = ((target - c_lo) / (cum.gather(1, hi) - c_lo).clamp_min(1e-12)).clamp_(0.0, 1.0)
    t = (lo.to(ctrl.dtype) + frac) / (_DENSE - 1)
    return _quadratic(ctrl, t)


def _rasterise(pts: Tensor) -> Tensor:
    """Draw polylines ``(b, K + 1, 2)`` (x, y in pixels) as anti-aliased strokes.

    Returns ``(b, 28, 28)`` images: each pixel is
    ``clip((_HALF_WIDTH - d) / _RAMP + 0.5, 0, 1)`` with ``d`` the distance from its centre
    to the nearest segment.
    """
    b = pts.shape[0]
    pts = pts.clamp(0.0, IMAGE_SIZE - 1.001)  # keeps every window on the canvas
    a = pts[:, :-1]
    d = pts[:, 1:] - a
    corner = (a + 0.5 * d).floor()
    off = torch.tensor(_WINDOW, dtype=pts.dtype)
    n = len(_WINDOW)
    ox, oy = off.repeat(n), off.repeat_interleave(n)  # (n*n,) pixel offsets, x fastest
    # Pixel centre minus segment start, (b, K, n*n).
    rx = (corner[..., 0] - a[..., 0])[..., None] + ox
    ry = (corner[..., 1] - a[..., 1])[..., None] + oy
    dx, dy = d[..., 0:1], d[..., 1:2]
    inv_len2 = 1.0 / (dx * dx + dy * dy).clamp_min(1e-12)
    t = ((rx * dx + ry * dy) * inv_len2).clamp_(0.0, 1.0)
    ex = rx - t * dx
    ey = ry - t * dy
    ink_radius = _HALF_WIDTH + 0.5 * _RAMP
    value = ((ink_radius - (ex * ex + ey * ey).sqrt_()) * (1.0 / _RAMP)).clamp_(0.0, 1.0)
    ci = corner.to(torch.int64) + _PAD
    base = torch.arange(b)[:, None] * (_CANVAS * _CANVAS) + ci[..., 1] * _CANVAS + ci[..., 0]
    index = base[..., None] + (oy * _CANVAS + ox).to(torch.int64)
    canvas = torch.zeros(b * _CANVAS * _CANVAS, dtype=pts.dtype)
    canvas.scatter_reduce_(0, index.reshape(-1), value.reshape(-1), reduce="amax")
    canvas = canvas.view(b, _CANVAS, _CANVAS)
    return canvas[:, _PAD : _PAD + IMAGE_SIZE, _PAD : _PAD + IMAGE_SIZE]


def render_curves(ctrl: Tensor) -> Tensor:
    """Render curves through control points ``ctrl`` ``(b, 3, 2)`` (x, y in pixels).

    Returns float32 images ``(b, 28, 28)`` in ``[0, 1]`` (rows are y, columns x): thin
    anti-aliased strokes on an exactly-zero background. Parts of a curve outside
    ``[0, 27)^2`` are pressed onto the border.
    """
    return _rasterise(_curve_points(ctrl.to(torch.float32))).contiguous()


def _qualify(cand: Tensor) -> tuple[Tensor, Tensor]:
    """For candidates ``(..., 3, 2)``: whether each qualifies (see the module docstring) and
    its span (larger side of the curve's bounding box), both of shape ``(...)``."""
    dense = _quadratic(cand, torch.linspace(0.0, 1.0, _CHECK_SAMPLES, dtype=cand.dtype))
    span = (dense.amax(dim=-2) - dense.amin(dim=-2)).amax(dim=-1)
    inside = ((dense >= _INSIDE_LOW) & (dense <= _INSIDE_HIGH)).flatten(-2).all(dim=-1)
    u = cand[..., 0, :] - cand[..., 1, :]
    v = cand[..., 2, :] - cand[..., 1, :]
    len_u, len_v = _length(u), _length(v)
    cos_angle = (u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]) / (len_u * len_v).clamp_min(1e-12)
    ok = inside & (span >= _MIN_SPAN) & (cos_angle <= _MAX_COS_ANGLE)
    ok &= torch.minimum(len_u, len_v) >= _MIN_ARM
    return ok, span


def _choose_controls(cand: Tensor) -> Tensor:
    """Pick one control triple per image from candidates ``(b, C, 3, 2)``: the first that
    qualifies, else the widest."""
    ok, span = _qualify(cand)
    pick = torch.where(ok.any(dim=1), ok.to(torch.uint8).argmax(dim=1), span.argmax(dim=1))
    return cand[torch.arange(cand.shape[0]), pick]


def entropy_floor(x: Tensor) -> float:
    """Mean over examples of the summed binary entropy ``sum_j H(x_j)`` of soft targets.

    ``H(y) = -y log y - (1 - y) log(1 - y)`` (nats). Since the binary cross-entropy of a
    prediction ``p`` against a target ``y`` is ``H(y) + KL(y || p) >= H(y)``, this is the
    smallest loss (BCE summed over features, averaged over examples) that any model can
    reach on ``x``: the data set's BCE against itself.

    Args:
        x: Targets ``(n, ...)`` with values in ``[0, 1]``, ``n >= 1``.

    Raises:
        ValueError: ``x`` has no examples or values outside ``[0, 1]``.
    """
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"entropy_floor: need at least one example, got shape {tuple(x.shape)}")
    y = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if y.numel() and not bool(((y >= 0) & (y <= 1)).all()):
        raise ValueError("entropy_floor: values must lie in [0, 1]")
    h = -(torch.xlogy(y, y) + torch.xlogy(1.0 - y, 1.0 - y))
    return float(h.sum(dim=1).mean())


def _stream_seeds(seed: int) -> tuple[int, int]:
    """Two independent 64-bit seeds (train, test) derived from ``seed``."""
    train, test = np.random.SeedSequence(seed).spawn(2)
    return int(train.generate_state(1, np.uint64)[0]), int(test.generate_state(1, np.uint64)[0])


def _generate_split(n: int, stream_seed: int) -> Tensor:
    """``n`` images ``(n, 1, 28, 28)`` from the stream ``stream_seed``."""
    gen = torch.Generator().manual_seed(stream_seed)
    cand = torch.rand(n, _CANDIDATES, 3, 2, generator=gen)
    cand = _LOW + (_HIGH - _LOW) * cand
    out = torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for start in range(0, n, _CHUNK):
        ctrl = _choose_controls(cand[start : start + _CHUNK])
        out[start : start + _CHUNK, 0] = render_curves(ctrl)
    return out


def generate_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0) -> ArrayDataset:
    """Generate the CURVES stand-in: float32 images ``(n, 1, 28, 28)`` in ``[0, 1]``.

    See the module docstring for how the images are built.

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
    # The work is many small tensor operations: threads gain little, and they stall badly
    # (tens of seconds) when the cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_train = _generate_split(n_train, train_seed)
        x_test = _generate_split(n_test, test_seed)
    finally:
        torch.set_num_threads(threads)
    return ArrayDataset(
        "curves",
        x_train,
        torch.zeros(n_train, dtype=torch.int64),
        x_test,
        torch.zeros(n_test, dtype=torch.int64),
        None,
    )
