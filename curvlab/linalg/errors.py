"""Exceptions raised by :mod:`curvlab.linalg`."""

from __future__ import annotations

__all__ = ["DecompositionError"]


class DecompositionError(RuntimeError):
    """A matrix decomposition failed even after the float64 / extra-damping retries.

    Raised by :func:`curvlab.linalg.damped_inverse`, :func:`curvlab.linalg.damped_solve`,
    :func:`curvlab.linalg.damped_inverse_root` and :func:`curvlab.linalg.symmetric_eigh` when
    every attempt produced a failed factorisation or a non-finite result, and immediately when the
    input itself is not finite (no amount of damping repairs a NaN).
    """
