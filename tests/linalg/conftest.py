"""Shared configuration of the curvlab.linalg tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run each test single-threaded, restoring the thread count afterwards.

    The matrices here are tiny; intra-op threading only adds synchronisation, which turns into
    long stalls when the machine is shared with other processes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
