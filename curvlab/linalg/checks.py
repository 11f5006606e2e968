"""Cheap whole-collection finiteness tests (the per-step guards of every optimizer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "contractions_bounded"]


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether no tensor holds a NaN or ±Inf, with one host synchronisation.

    Fast path: the sum of all entries is finite only if every entry is (a NaN or an Inf
    propagates through the sum), so one reduction per tensor decides the common case. A
    non-finite sum can also come from overflow of finite entries, so then the exact test runs.
    """
    if not tensors:
        return True
    total = torch.stack([t.sum().to(torch.float32) for t in tensors]).sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def contractions_bounded(
    tensors: Sequence[Tensor], lengths: Sequence[int], scale: float = 1.0
) -> bool:
    """Whether every tensor is finite and any sum of ``lengths[j]`` products of two entries of
    ``tensors[j]``, times ``|scale|``, stays within a quarter of its dtype's largest value; one
    host synchronisation.

    A sufficient condition for the statistics ``scale · G Gᵀ``-type contractions of a tensor
    (each entry a sum of ``length`` products, ``|entry| ≤ length · max|G|²``) to be finite
    before they are computed, and for an average ``β S + (1−β) ·`` of them with finite
    statistics ``S`` built the same way to stay finite. It reads each tensor once (a min/max
    reduction) instead of the larger contractions, which lets an optimizer fuse the average
    into the products (`curvlab.linalg.gram` with ``beta``) without risking its state.
    """
    if len(tensors) != len(lengths):
        raise ValueError(f"lengths: expected {len(tensors)} entries, got {len(lengths)}")
    if not tensors:
        return True
    extremes = torch.stack([torch.stack(torch.aminmax(t)).to(torch.float64) for t in tensors])
    largest = extremes.abs().amax(dim=1)  # NaN propagates: the comparison below is False
    limits = torch.tensor([torch.finfo(t.dtype).max / 4 for t in tensors], dtype=torch.float64).to(
        largest.device
    )
    counts = torch.tensor([float(n) for n in lengths], dtype=torch.float64).to(largest.device)
    return bool((largest.square() * counts * abs(scale) <= limits).all())
