"""Tests of the generated CURVES stand-in."""

from __future__ import annotations

import pytest
import torch

from curvlab.data import generate_curves
from curvlab.data.curves import _generate_cached, render_curves


def test_shape_range_and_labels() -> None:
    ds = generate_curves(300, 100, seed=0)
    assert ds.name == "curves" and ds.num_classes is None
    assert ds.x_train.shape == (300, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32
    assert float(ds.x_train.min()) >= 0.0
    assert torch.equal(ds.x_train.amax(dim=(1, 2, 3)), torch.ones(300))
    assert ds.y_train.dtype == torch.int64 and not ds.y_train.any()


def test_images_are_thin_curves() -> None:
    x = generate_curves(300, 10, seed=1).x_train
    bright = (x > 0.5).float().mean(dim=(1, 2, 3))
    assert bool((bright > 0).all()), "blank image"
    assert float(bright.max()) < 0.25 and 0.02 < float(bright.mean()) < 0.12
    # Most of the image is background, and the stroke is soft (intermediate grey values).
    assert float((x == 0).float().mean()) > 0.5
    assert float(((x > 0.05) & (x < 0.95)).float().mean()) > 0.03


def test_deterministic_and_seed_dependent() -> None:
    a = generate_curves(200, 50, seed=7)
    _generate_cached.cache_clear()
    b = generate_curves(200, 50, seed=7)
    assert a is not b
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    c = generate_curves(200, 50, seed=8)
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_train[:50], a.x_test)
    # Cached: same arguments give the same object.
    assert generate_curves(200, 50, seed=7) is b


def test_test_set_independent_of_train_size_and_threads() -> None:
    a = generate_curves(100, 40, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = generate_curves(37, 40, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.x_train[:37], b.x_train)


def test_render_passes_through_control_points() -> None:
    ctrl = torch.tensor([[[4.0, 4.0], [14.0, 20.0], [23.0, 6.0]]])
    img = render_curves(ctrl)[0]
    # Image rows are y and columns are x; the stroke fades at its two ends.
    (x0, y0), (x1, y1), (x2, y2) = (map(int, p) for p in ctrl[0].tolist())
    assert float(img[y1, x1]) > 0.9
    assert float(img[y0, x0]) > 0.5 and float(img[y2, x2]) > 0.5
    assert float(img[0, 27]) == 0.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n_train"):
        generate_curves(-1, 10)
    with pytest.raises(ValueError, match="seed"):
        generate_curves(10, 10, seed=-1)
