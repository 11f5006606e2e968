r"""Kronecker-factored matrices in row-major (torch) layout.

A layer's gradient is a matrix ``X`` of shape ``(d_g, d_a)`` (output side × input side, bias as
the last input column), and ``vec`` is the row-major flattening ``X.reshape(-1)``. With this
convention the Kronecker identity reads

.. math::

    (G \otimes A)\,\mathrm{vec}(X) = \mathrm{vec}(G X A^\top),

the row-major counterpart of the column-major identity
:math:`(A \otimes G)\,\mathrm{vec}_c(X) = \mathrm{vec}_c(G X A^\top)` used by Martens & Grosse
(2015, §3), since :math:`\mathrm{vec}(X) = \mathrm{vec}_c(X^\top)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kron_mv", "kron_to_dense"]


def kron_to_dense(G: Tensor, A: Tensor) -> Tensor:
    r"""Materialise the Kronecker product acting on row-major vectorised gradients.

    Returns the dense matrix :math:`M = G \otimes A` of shape ``(d_g·d_a, d_g·d_a)``, which
    satisfies ``M @ X.reshape(-1) == (G @ X @ A.T).reshape(-1)`` for every ``X`` of shape
    ``(d_g, d_a)`` (see the module docstring). Meant for tests and small layers only: the result
    has :math:`(d_g d_a)^2` entries.

    Args:
        G: Output-side factor, shape ``(d_g, d_g)``.
        A: Input-side factor, shape ``(d_a, d_a)``.

    Returns:
        ``torch.kron(G, A)``.
    """
    if G.dim() != 2 or A.dim() != 2:
        raise ValueError(
            f"kron_to_dense expects 2-D factors, got {tuple(G.shape)}, {tuple(A.shape)}"
        )
    return torch.kron(G, A)


def kron_mv(G: Tensor, A: Tensor, X: Tensor) -> Tensor:
    r"""Kronecker matrix–vector product in matrix form: :math:`G X A^\top`.

    Equals ``(kron_to_dense(G, A) @ X.reshape(-1)).reshape(d_g, d_a)`` at a cost of
    :math:`O(d_g d_a (d_g + d_a))` instead of :math:`O(d_g^2 d_a^2)`.

    Args:
        G: Output-side factor, shape ``(d_g, d_g)`` (or a batch broadcastable against ``X``).
        A: Input-side factor, shape ``(d_a, d_a)`` (or a batch broadcastable against ``X``).
        X: Matrix of shape ``(d_g, d_a)`` or a batch ``(..., d_g, d_a)``.

    Returns:
        ``G @ X @ A.mT`` with the broadcast batch shape of the inputs.
    """
    if X.dim() < 2:
        raise ValueError(f"kron_mv expects X of shape (..., d_g, d_a), got {tuple(X.shape)}")
    if G.shape[-1] != X.shape[-2] or A.shape[-1] != X.shape[-1]:
        raise ValueError(
            f"kron_mv shape mismatch: G {tuple(G.shape)}, A {tuple(A.shape)}, X {tuple(X.shape)}"
        )
    return G @ X @ A.mT
