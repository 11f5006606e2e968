"""Cost-aware owner assignment: which rank computes each block's inverse or root.

A block's refresh costs about ``Σ_i d_i³`` (one decomposition per factor of size d_i), so
blocks of very different sizes must not be dealt out round-robin. `assign_owners` is the
greedy longest-processing-time rule (Graham 1969): blocks in decreasing cost, each to the
rank with the least work so far. Its largest load is at most (4/3 − 1/(3N)) times the best
possible one. Ties go to the lower index / rank, so every rank computes the same assignment
from the same list of costs without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign_owners", "kronecker_cost", "loads"]


def kronecker_cost(dims: Sequence[int]) -> float:
    """``Σ_i d_i³``: the work of decomposing one block's Kronecker factors of sizes ``dims``."""
    return float(sum(int(d) ** 3 for d in dims))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of every block (greedy longest-processing-time).

    Args:
        costs: one non-negative cost per block, in a fixed block order.
        world_size: the number of ranks N ≥ 1.

    Returns:
        ``owners[i]`` in ``range(world_size)`` for block i.
    """
    if world_size < 1:
        raise ValueError(f"world_size: must be at least 1, got {world_size}")
    if any(not c >= 0 for c in costs):  # also rejects NaN
        raise ValueError("costs: must be non-negative numbers")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += costs[index]
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """The total cost each rank owns under ``owners``."""
    total = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        total[owner] += cost
    return total
