"""Cheap whole-collection finiteness test (the per-step guard of every optimizer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite"]


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
