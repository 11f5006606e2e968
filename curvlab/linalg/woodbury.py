r"""Sherman–Morrison–Woodbury solves with a low-rank damped curvature (thesis §5.3.1).

The subsampled Gauss-Newton and natural-gradient matrices of thesis ch.5 have the form

.. math::

    G = \lambda I + s\, J^\top H J, \qquad J \in \mathbb R^{r\times n},\ r \ll n,

with :math:`s = 1/N_2`. GN: :math:`J` stacks the output Jacobians :math:`J_i` and
:math:`H = \operatorname{blkdiag}(H_i)` the loss Hessians w.r.t. the outputs; NG: the rows of
:math:`J` are the per-sample gradients and :math:`H = I`. With the Gram matrix
:math:`K = J J^\top` (:math:`r\times r`) the SMW formula gives, for any vector :math:`v`,

.. math::

    G^{-1} v = \tfrac1\lambda\big(v - s\, J^\top w\big), \qquad
    w = \begin{cases}
        D^{-1} J v,\quad D = \lambda H^{-1} + s K & \text{(5.6), } H \text{ invertible}\\
        H D^{-1} J v,\quad D = \lambda I + s K H & \text{(5.7), any } H
    \end{cases}

so only an :math:`r\times r` system is solved. :func:`woodbury_coefficients` computes
:math:`w` from :math:`K`, :math:`Jv` and :math:`H`, never touching :math:`n`-vectors (the
optimizer forms :math:`J^\top w` by backpropagation); :func:`woodbury_solve` is the same for an
explicit :math:`J`.

Solves: (5.6)'s :math:`D` is symmetric positive definite and is solved by Cholesky
(:func:`~curvlab.linalg.damped_solve`); (5.7)'s :math:`D` is not symmetric and is solved by LU
(``torch.linalg.solve_ex``), as the thesis says. Both use the retry policy of
:mod:`curvlab.linalg.inverse`: the same system in float64, then with a growing damping
:math:`\delta` added to :math:`D`'s diagonal, and :class:`~curvlab.linalg.DecompositionError`
when every attempt fails or the input is not finite. The extra damping keeps the result a
descent direction: :math:`(D + \delta I)^{-1} \preceq D^{-1}`, so the operator
:math:`\frac1\lambda(I - sJ^\top (D+\delta I)^{-1} J)` stays between :math:`G^{-1}` and
:math:`\frac1\lambda I` (for (5.7) the same holds through :math:`H(\lambda I + sKH)^{-1} =
H^{1/2}(\lambda I + sH^{1/2}KH^{1/2})^{-1}H^{1/2}`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from curvlab.linalg.damping import add_to_diagonal
from curvlab.linalg.inverse import (
    DecompositionInfo,
    _run_with_retries,
    damped_inverse,
    damped_solve,
)

__all__ = ["WoodburyForm", "woodbury_coefficients", "woodbury_solve"]

#: ``"symmetric"``: thesis (5.6), needs an invertible H; ``"general"``: (5.7), any PSD H.
WoodburyForm = Literal["symmetric", "general"]


def _check_blocks(H: Tensor, r: int) -> int:
    """Validate block-diagonal ``H`` of shape ``(b, k, k)`` with ``b·k = r``; return ``k``."""
    if H.dim() != 3 or H.shape[-1] != H.shape[-2] or H.shape[0] * H.shape[1] != r:
        raise ValueError(
            f"loss_hessian: expected blocks (b, k, k) with b·k = {r}, got {tuple(H.shape)}"
        )
    return int(H.shape[1])


def _block_diag_mul(M: Tensor, H: Tensor) -> Tensor:
    """``M @ blkdiag(H)`` for ``M`` of shape (r, r) and blocks ``H`` (b, k, k)."""
    b, k, _ = H.shape
    return torch.einsum("rbk,bkl->rbl", M.reshape(M.shape[0], b, k), H).reshape(M.shape)


def _block_diag_mv(H: Tensor, x: Tensor) -> Tensor:
    """``blkdiag(H) @ x`` for blocks ``H`` (b, k, k) and ``x`` of shape (b·k,)."""
    b, k, _ = H.shape
    return torch.einsum("bkl,bl->bk", H, x.reshape(b, k)).reshape(-1)


def woodbury_coefficients(
    gram: Tensor,
    rhs: Tensor,
    damping: float,
    *,
    scale: float = 1.0,
    loss_hessian: Tensor | None = None,
    form: WoodburyForm = "symmetric",
    retries: int = 3,
    growth: float = 10.0,
) -> tuple[Tensor, DecompositionInfo]:
    r"""The SMW coefficients :math:`w` with :math:`G^{-1}v = (v - s J^\top w)/\lambda`.

    Thesis (5.6) / (5.7); see the module docstring.

    Args:
        gram: :math:`K = J J^\top`, shape ``(r, r)``, or a batch ``(..., r, r)`` of independent
            systems (e.g. one per layer for a block-diagonal G) when ``loss_hessian`` is None.
        rhs: :math:`J v`, shape ``(r,)`` (or ``(..., r)`` matching a batched ``gram``).
        damping: :math:`\lambda > 0`.
        scale: :math:`s` (thesis: :math:`1/N_2`).
        loss_hessian: None for :math:`H = I` (NG), else the diagonal blocks :math:`H_i` of
            :math:`H` as ``(b, k, k)`` with ``b·k = r`` (GN: ``b = N_2``, ``k = m_L``).
        form: ``"symmetric"`` (5.6, Cholesky; needs every :math:`H_i` invertible) or
            ``"general"`` (5.7, LU; any PSD :math:`H`, e.g. softmax + cross-entropy).
        retries: retries after the first attempt (float64, then growing damping of D).
        growth: damping growth factor per float64 retry.

    Returns:
        ``(w, info)``: ``w`` shaped like ``rhs``; ``info`` describes the D solve.

    Raises:
        ValueError: on inconsistent shapes or a non-positive ``damping`` / ``scale``.
        DecompositionError: when D (or an :math:`H_i` in (5.6)) cannot be factorised even
            in float64 with extra damping, or is not finite.
    """
    if not (math.isfinite(damping) and damping > 0.0):
        raise ValueError(f"damping: expected a finite number > 0, got {damping}")
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale: expected a finite number > 0, got {scale}")
    if form not in ("symmetric", "general"):
        raise ValueError(f"form: expected 'symmetric' or 'general', got {form!r}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or rhs.shape != gram.shape[:-1]:
        raise ValueError(
            f"gram: expected (..., r, r) matching rhs (..., r), got {tuple(gram.shape)} and "
            f"{tuple(rhs.shape)}"
        )
    r = gram.shape[-1]
    if loss_hessian is None:
        # H = I: (5.6) and (5.7) coincide, D = λI + sK (symmetric positive definite).
        D = add_to_diagonal(gram * scale, damping)
        w, info = damped_solve(D, rhs.unsqueeze(-1), 0.0, retries=retries, growth=growth)
        return w.squeeze(-1), info
    if gram.dim() != 2:
        raise ValueError("gram: a loss_hessian needs one (r, r) system, not a batch")
    _check_blocks(loss_hessian, r)
    H = loss_hessian.to(gram.dtype)
    if form == "symmetric":
        # (5.6): D = λ H⁻¹ + sK; H⁻¹ block by block (Cholesky, same retry policy).
        H_inv, _ = damped_inverse(H, 0.0, retries=retries, growth=growth)
        D = gram * scale
        b, k, _ = H.shape
        idx = torch.arange(b, device=D.device)
        D.view(b, k, b, k)[idx, :, idx, :] += damping * H_inv
        return damped_solve(D, rhs, 0.0, retries=retries, growth=growth)
    # (5.7): D = λI + sKH (not symmetric): LU, then w = H D⁻¹ (Jv).
    D = add_to_diagonal(_block_diag_mul(gram * scale, H), damping)
    vector = rhs.unsqueeze(-1)

    def attempt(Dw: Tensor, extra: float) -> tuple[Tensor, Tensor]:
        A = Dw if extra == 0.0 else add_to_diagonal(Dw, extra)
        X, info = torch.linalg.solve_ex(A, vector.to(Dw.dtype))
        return X, info == 0

    d, info = _run_with_retries(D, 0.0, retries, growth, attempt, "woodbury (5.7)", D.dtype)
    return _block_diag_mv(H, d.squeeze(-1)), info


def woodbury_solve(
    J: Tensor,
    v: Tensor,
    damping: float,
    *,
    scale: float = 1.0,
    loss_hessian: Tensor | None = None,
    form: WoodburyForm = "symmetric",
    retries: int = 3,
    growth: float = 10.0,
) -> tuple[Tensor, DecompositionInfo]:
    r""":math:`(\lambda I + s J^\top H J)^{-1} v` for an explicit ``J`` of shape ``(r, n)``.

    Thesis (5.6) / (5.7) with :math:`K = JJ^\top` formed densely; arguments as in
    :func:`woodbury_coefficients`. Returns ``(x, info)`` with ``x`` shaped like ``v``.
    """
    if J.dim() != 2 or v.shape != J.shape[1:]:
        raise ValueError(f"J: expected (r, n) and v (n,), got {tuple(J.shape)}, {tuple(v.shape)}")
    w, info = woodbury_coefficients(
        J @ J.T,
        J @ v,
        damping,
        scale=scale,
        loss_hessian=loss_hessian,
        form=form,
        retries=retries,
        growth=growth,
    )
    return (v - scale * (J.T @ w)) / damping, info
