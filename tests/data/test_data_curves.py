"""Tests of the generated CURVES stand-in."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab.data import entropy_floor, generate_curves
from curvlab.data.curves import _choose_controls, _generate_cached, render_curves


def test_shape_range_and_labels() -> None:
    ds = generate_curves(300, 100, seed=0)
    assert ds.name == "curves" and ds.num_classes is None
    assert ds.x_train.shape == (300, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        # Not blank: every image has a solid stroke core.
        assert bool((x.amax(dim=(1, 2, 3)) > 0.9).all())
    assert ds.y_train.dtype == torch.int64 and not ds.y_train.any()


def test_images_are_thin_strokes_on_zero_background() -> None:
    x = generate_curves(500, 10, seed=1).x_train
    nonzero = x > 0
    per_image = nonzero.float().sum(dim=(1, 2, 3))
    assert bool((per_image >= 25).all()) and bool((per_image <= 160).all())
    assert 50 < float(per_image.mean()) < 90
    # Background exactly zero; most stroke pixels are bright (anti-aliasing only at the edges).
    assert float(nonzero.float().mean()) < 0.15
    values = x[nonzero]
    assert float((values > 0.5).float().mean()) > 0.6
    assert float((values > 0.9).float().mean()) > 0.3
    # Ink per image ~ stroke width (1.5 px) x curve length (14..55 px).
    ink = x.sum(dim=(1, 2, 3))
    assert bool((ink > 15).all()) and bool((ink < 100).all())


def test_entropy_floor_in_target_band() -> None:
    ds = generate_curves(1000, 500, seed=0)
    train, test = entropy_floor(ds.x_train), entropy_floor(ds.x_test)
    assert 15.0 < train < 35.0 and 15.0 < test < 35.0
    assert abs(train - test) < 2.0


def test_no_degenerate_tiny_curves() -> None:
    x = generate_curves(1000, 10, seed=2).x_train[:, 0]
    rows, cols = x.amax(dim=2) > 0.5, x.amax(dim=1) > 0.5
    ar = torch.arange(28)

    def extent(mask: torch.Tensor) -> torch.Tensor:
        hi = torch.where(mask, ar, -1).amax(dim=1)
        lo = torch.where(mask, ar, 99).amin(dim=1)
        return hi - lo

    span = torch.maximum(extent(rows), extent(cols))
    assert int(span.min()) >= 12  # centre line spans >= 14 px
    assert float(span.float().mean()) > 15


def test_choose_controls_prefers_first_qualifying_candidate() -> None:
    tiny = [[10.0, 10.0], [11.0, 12.0], [12.0, 10.0]]
    hairpin = [[4.0, 4.0], [22.0, 22.0], [5.0, 4.0]]
    good_a = [[4.0, 4.0], [14.0, 20.0], [23.0, 6.0]]
    good_b = [[5.0, 20.0], [12.0, 6.0], [22.0, 18.0]]
    cand = torch.tensor([[tiny, hairpin, good_a, good_b], [tiny, hairpin, tiny, tiny]])
    picked = _choose_controls(cand)
    assert torch.equal(picked[0], cand[0, 2])
    # Nothing qualifies: fall back to the widest candidate.
    assert torch.equal(picked[1], cand[1, 1])


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


def test_test_set_independent_of_train_size() -> None:
    a = generate_curves(2100, 40, seed=3)  # more than one chunk
    b = generate_curves(1500, 40, seed=3)
    assert torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.x_train[:1500], b.x_train)


def test_generation_restores_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _generate_cached.cache_clear()
        generate_curves(10, 10, seed=9)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_render_independent_of_threads() -> None:
    gen = torch.Generator().manual_seed(0)
    ctrl = _choose_controls(2.0 + 23.0 * torch.rand(700, 32, 3, 2, generator=gen))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = render_curves(ctrl)
        torch.set_num_threads(2)
        b = render_curves(ctrl)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


def test_render_passes_through_control_points() -> None:
    ctrl = torch.tensor([[[4.0, 4.0], [14.0, 20.0], [23.0, 6.0]]])
    img = render_curves(ctrl)[0]
    assert img.shape == (28, 28) and img.dtype == torch.float32
    # Image rows are y and columns are x; the curve passes through the pixel centres.
    for x, y in ctrl[0].tolist():
        assert float(img[int(y), int(x)]) == 1.0
    assert float(img[0, 27]) == 0.0 and float(img[27, 0]) == 0.0


def test_render_stroke_profile() -> None:
    # Horizontal strokes: on a pixel row (1 px core, faint edges) and between two rows.
    ctrl = torch.tensor(
        [
            [[5.0, 10.0], [12.0, 10.0], [20.0, 10.0]],
            [[5.0, 10.5], [12.0, 10.5], [20.0, 10.5]],
        ]
    )
    img = render_curves(ctrl)
    col = img[:, :, 12]
    assert float(col[0, 10]) == 1.0
    assert float(col[0, 9]) == pytest.approx(1 / 6, abs=1e-5)
    assert float(col[0, 11]) == pytest.approx(1 / 6, abs=1e-5)
    assert float(col[1, 10]) == pytest.approx(5 / 6, abs=1e-5)
    assert float(col[1, 11]) == pytest.approx(5 / 6, abs=1e-5)
    for k, core in ((0, {9, 10, 11}), (1, {10, 11})):
        assert all(float(col[k, r]) == 0.0 for r in range(28) if r not in core)
    # Round caps: nothing beyond 1.125 px from the end points.
    assert not img[:, :, :4].any() and not img[:, :, 22:].any()


def test_render_clamps_points_outside_the_frame() -> None:
    ctrl = torch.tensor([[[-5.0, 3.0], [14.0, 40.0], [30.0, -2.0]]])
    img = render_curves(ctrl)
    assert bool(torch.isfinite(img).all())
    assert float(img.min()) >= 0.0 and float(img.max()) == 1.0


def test_entropy_floor_values() -> None:
    assert entropy_floor(torch.zeros(3, 1, 4, 4)) == 0.0
    assert entropy_floor(torch.ones(2, 5)) == 0.0
    assert entropy_floor(torch.full((4, 10), 0.5)) == pytest.approx(10 * math.log(2))
    # Mean over examples of the per-example sum.
    x = torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.5, 0.0]])
    assert entropy_floor(x) == pytest.approx(1.5 * math.log(2))


def test_entropy_floor_is_the_bce_of_the_data_against_itself() -> None:
    x = generate_curves(64, 1, seed=4).x_train
    bce = torch.nn.functional.binary_cross_entropy(x.double(), x.double(), reduction="sum")
    assert entropy_floor(x) == pytest.approx(float(bce) / x.shape[0], rel=1e-9)
    # No prediction does better than the floor.
    noisy = (x + 0.01 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(
        1e-4, 1 - 1e-4
    )
    worse = torch.nn.functional.binary_cross_entropy(noisy, x, reduction="sum") / x.shape[0]
    assert float(worse) > entropy_floor(x)


def test_entropy_floor_invalid() -> None:
    with pytest.raises(ValueError, match="example"):
        entropy_floor(torch.zeros(0, 784))
    with pytest.raises(ValueError, match="example"):
        entropy_floor(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        entropy_floor(torch.tensor([[0.5, 1.5]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        entropy_floor(torch.tensor([[float("nan")]]))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n_train"):
        generate_curves(-1, 10)
    with pytest.raises(ValueError, match="seed"):
        generate_curves(10, 10, seed=-1)
