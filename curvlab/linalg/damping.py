"""Damping helpers: factored Tikhonov damping and diagonal shifts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["add_to_diagonal", "pi_damping"]


def pi_damping(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    r"""Split a Tikhonov damping ``damping`` between two Kronecker factors.

    Martens & Grosse (2015, §6.3) approximate :math:`G \otimes A + \gamma I` by
    :math:`(G + \lambda_G I) \otimes (A + \lambda_A I)` with

    .. math::

        \pi = \sqrt{\frac{\operatorname{tr}(A) / \dim A}{\operatorname{tr}(G) / \dim G}},
        \qquad \lambda_A = \pi \sqrt{\gamma}, \qquad \lambda_G = \sqrt{\gamma} / \pi,

    (the trace-norm choice of π, as in thesis Alg. 12, line 19), so that
    :math:`\lambda_A \lambda_G = \gamma` and :math:`\lambda_A / \lambda_G = \pi^2`. When π is
    not finite or not positive (e.g. a factor that is still all zeros) π = 1 is used.

    Args:
        A: Input-side factor, shape ``(d_a, d_a)``.
        G: Output-side factor, shape ``(d_g, d_g)``.
        damping: The total damping γ ≥ 0.

    Returns:
        ``(lambda_A, lambda_G)`` as Python floats (costs one host synchronisation).
    """
    if not damping >= 0.0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite non-negative number, got {damping}")
    if A.dim() != 2 or G.dim() != 2:
        raise ValueError(f"pi_damping expects 2-D factors, got {tuple(A.shape)}, {tuple(G.shape)}")
    mean_a = A.diagonal().sum(dtype=torch.float64) / A.shape[0]
    mean_g = G.diagonal().sum(dtype=torch.float64).to(mean_a.device) / G.shape[0]
    tr_a, tr_g = torch.stack([mean_a, mean_g]).tolist()
    try:
        pi = math.sqrt(tr_a / tr_g)
    except (ZeroDivisionError, ValueError):  # a zero G factor, or a negative ratio
        pi = 1.0
    if not (math.isfinite(pi) and pi > 0.0):
        pi = 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def add_to_diagonal(M: Tensor, value: float | Tensor) -> Tensor:
    r"""Return :math:`M + \text{value}\cdot I` without modifying ``M``.

    Args:
        M: Square matrix ``(d, d)`` or batch ``(..., d, d)``.
        value: Scalar shift, or a tensor broadcastable against the diagonal ``(..., d)``.

    Returns:
        A new tensor with ``value`` added to the diagonal of ``M``.
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"add_to_diagonal expects square matrices, got {tuple(M.shape)}")
    out = M.clone()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(value)
    return out
