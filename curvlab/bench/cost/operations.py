r"""Timing the operations a floor is made of, each on its own at the shape where it occurs.

The operations themselves (`curvlab.linalg.cost`: matrix products, reductions, solves,
decompositions) know their FLOPs and how to run on random operands; `best_time` measures a
call at the current thread count (the minimum over groups of calls: the machine's best, a
floor) and `counted_flops` counts what `torch.utils.flop_counter.FlopCounterMode` sees of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["best_time", "counted_flops"]


# --------------------------------------------------------------------------- timing
def best_time(fn: Callable[[], object], repeats: int = 7, min_group_s: float = 2e-3) -> float:
    """Seconds per call of ``fn``: the minimum over ``repeats`` groups of calls.

    A group holds enough calls to last ``min_group_s`` so that tiny operations are not
    dominated by the clock's resolution. The minimum is the machine's best, a floor.
    """
    fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_group_s or number >= 1 << 14:
            break
        number *= 2 if elapsed <= 0 else max(2, math.ceil(min_group_s / elapsed))
    best = elapsed / number
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn`` executes in matrix products (`FlopCounterMode`)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
