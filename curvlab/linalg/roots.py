r"""Inverse p-th roots and eigendecompositions of symmetric PSD matrices.

Shampoo (Gupta et al. 2018; Anil et al. 2020) preconditions with :math:`(M + \lambda I)^{-1/p}`
of its PSD statistics. Two methods are offered:

* ``"eigh"``: with :math:`M + \lambda I = V \operatorname{diag}(\nu) V^\top`
  (``torch.linalg.eigh`` of the *damped* matrix),
  :math:`(M + \lambda I)^{-1/p} = V \operatorname{diag}\big(\max(\nu, \lambda)^{-1/p}\big)
  V^\top`. Clamping at λ (i.e. the eigenvalues of ``M`` at 0) is exact for a PSD ``M``: smaller
  computed eigenvalues are round-off (Weyl's inequality bounds their size by the backward error
  of ``eigh``, Golub & Van Loan 2013, §8.1). The damped matrix is decomposed rather than ``M``
  because Shampoo's statistics are numerically low-rank (hundreds of eigenvalues at round-off
  level next to a few large ones), on which LAPACK's float32 divide-and-conquer ``syevd`` can
  fail to converge; every such failure costs a float64 retry (measured on the thesis
  autoencoder: two of its 1000 × 1000 statistics failed at every refresh, each then taking
  ~3 × as long). The shift by λ removes those failures there and changes nothing in exact
  arithmetic.
* ``"coupled_newton"``: the coupled Newton iteration of Guo & Higham (2006) as used by Shampoo
  (Anil et al. 2020; thesis §4.7.2, Alg 16 line 12), see :func:`coupled_newton_inverse_root`.
  It needs only matrix products, which suits accelerators.

Both methods use the retry policy of :mod:`curvlab.linalg.inverse`: float64 at the same damping,
then damping multiplied by ``growth`` per retry, then
:class:`~curvlab.linalg.errors.DecompositionError`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from curvlab.linalg.errors import DecompositionError
from curvlab.linalg.gram import gram
from curvlab.linalg.inverse import (
    DecompositionInfo,
    _check_policy,
    _check_square,
    _damped,
    _run_with_retries,
    _symmetrise,
    _working_dtype,
)

__all__ = ["coupled_newton_inverse_root", "damped_inverse_root", "symmetric_eigh"]

_NEWTON_MAX_ITERS = 100
#: Tolerances of the coupled Newton attempts in :func:`damped_inverse_root`: the public default
#: 1e-6 in float32 (about its round-off floor), and 1e-10 in float64, which thanks to the quadratic
#: convergence costs about one more iteration and brings ~1e-6 relative accuracy to ~1e-10.
_NEWTON_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
#: A coupled Newton attempt fails (and is retried) when max|M_k - I| ends above this, which
#: happens for singular or numerically singular inputs whose iterates never converge.
_NEWTON_ACCEPT = 1e-3


def _integral_p(p: float) -> int:
    """``p`` as a positive int, or ``ValueError`` (the coupled Newton iteration needs ``M^p``)."""
    if not (math.isfinite(p) and float(p).is_integer() and p >= 1):
        raise ValueError(f"the coupled Newton iteration needs an integer p >= 1, got {p}")
    return int(p)


def coupled_newton_inverse_root(
    M: Tensor, p: int, *, max_iters: int = 100, tol: float = 1e-6
) -> Tensor:
    r"""Inverse p-th root :math:`M^{-1/p}` of an SPD matrix by the coupled Newton iteration.

    The iteration of Guo & Higham (2006), in the form used by Shampoo (Anil et al. 2020;
    thesis §4.7.2): with :math:`\alpha = -1/p` and :math:`z = (1 + p) / (2\lVert M\rVert_F)`,

    .. math::

        X_0 = z^{1/p} I, \quad M_0 = z M, \qquad
        N_k = (1 - \alpha) I + \alpha M_k, \quad X_{k+1} = X_k N_k, \quad
        M_{k+1} = N_k^p M_k .

    All iterates are polynomials in :math:`M`, so :math:`M_k = X_k^p M` throughout, and
    :math:`M_k \to I` implies :math:`X_k \to M^{-1/p}`; the scaling ``z`` puts the spectrum of
    :math:`M_0` in :math:`(0, (1 + p)/2]`, inside the region of convergence. The loop stops when
    :math:`\max|M_{k+1} - I| \le` ``tol`` or after ``max_iters`` steps; if the error grows by more
    than 1.2× (round-off has taken over) the previous iterate is returned.

    The growth guard is skipped on the first step. Each eigenvalue follows the scalar map
    :math:`f(m) = m\,((p + 1 - m)/p)^p`, a product of :math:`p + 1` non-negative factors with mean
    1 for :math:`m \le p + 1`, hence :math:`f(m) \le 1` by the AM–GM inequality. So
    :math:`M_k \preceq I` for every :math:`k \ge 1`, where :math:`E_k = M_k - I` is negative
    semi-definite with :math:`\max_{ij}|(E_k)_{ij}| = \max_i |(E_k)_{ii}|`, a quantity that
    never increases in exact arithmetic. :math:`M_0` however has eigenvalues up to
    :math:`(1 + p)/2`, and the entrywise error of the first step can grow (e.g. from 0.7 to 0.98
    for an ill-conditioned ``M``) without any round-off; stopping there would return
    :math:`z^{1/p} I`.

    The computation stays in ``M``'s dtype: float64 reaches ``tol`` down to ~1e-12, while float32
    stalls around 1e-6 relative accuracy (the divergence guard then returns the best iterate).
    Batches ``(..., d, d)`` are iterated together, using the largest error over the batch.

    Args:
        M: Symmetric positive definite matrix ``(d, d)`` or batch ``(..., d, d)``.
        p: Root order, an integer ≥ 1.
        max_iters: Maximum number of iterations.
        tol: Tolerance on :math:`\max|M_k - I|`.

    Returns:
        The (exactly symmetrised) approximation of :math:`M^{-1/p}`. A singular ``M`` gives a huge
        or non-finite result; callers add damping (see :func:`damped_inverse_root`).
    """
    _check_square(M, "coupled_newton_inverse_root")
    return _coupled_newton(M, _integral_p(p), max_iters, tol)[0]


def _coupled_newton(M: Tensor, p: int, max_iters: int, tol: float) -> tuple[Tensor, float]:
    """The iteration of :func:`coupled_newton_inverse_root`; also returns the final error."""
    d = M.shape[-1]
    alpha = -1.0 / p
    eye = torch.eye(d, dtype=M.dtype, device=M.device)
    if d == 0:
        return M.clone(), 0.0
    z = (1.0 + p) / (2.0 * torch.linalg.matrix_norm(M, ord="fro"))[..., None, None]
    X = z.pow(1.0 / p) * eye
    Mk = z * M
    err = float((Mk - eye).abs().max())
    for k in range(max_iters):
        if not err > tol:  # converged (or NaN, which cannot improve)
            break
        N = (1.0 - alpha) * eye + alpha * Mk
        X_next = X @ N
        M_next = torch.linalg.matrix_power(N, p) @ Mk
        err_next = float((M_next - eye).abs().max())
        # Diverging through round-off: keep the previous iterate. The first step is exempt, as
        # only there the error may legitimately grow (see the docstring).
        if k > 0 and not err_next <= 1.2 * err:
            break
        X, Mk, err = X_next, M_next, err_next
    return _symmetrise(X), err


def damped_inverse_root(
    M: Tensor,
    damping: float,
    p: float,
    *,
    method: Literal["eigh", "coupled_newton"] = "eigh",
    retries: int = 3,
    growth: float = 10.0,
) -> tuple[Tensor, DecompositionInfo]:
    r"""Damped inverse p-th root :math:`(M + \lambda I)^{-1/p}` of a symmetric PSD matrix.

    See the module docstring for the two methods. A failed attempt (``eigh`` raising, or a
    non-finite result, e.g. a zero eigenvalue at :math:`\lambda = 0`) is retried in float64 at the
    same damping, then with the damping multiplied by ``growth`` per retry.

    Args:
        M: Symmetric PSD matrix ``(d, d)`` or batch ``(..., d, d)``; only the lower triangle is
            read by ``eigh``.
        damping: :math:`\lambda \ge 0` added to the (clamped) eigenvalues / the diagonal.
        p: Root order, > 0 (``p = 1`` is the inverse, ``p = 2`` the inverse square root); must
            be an integer for ``method="coupled_newton"``.
        method: ``"eigh"`` (default) or ``"coupled_newton"``.
        retries: Number of retries after the first attempt.
        growth: Damping growth factor per float64 retry (> 1).

    Returns:
        ``(root, info)``: the exactly symmetric result in ``M``'s dtype and how it was obtained.

    Raises:
        DecompositionError: If ``M`` is not finite or all attempts fail.
        ValueError: For an invalid ``p``, ``method`` or retry policy.
    """
    _check_square(M, "damped_inverse_root")
    _check_policy(damping, retries, growth)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"p must be a positive number, got {p}")

    if method == "eigh":

        def attempt(Mw: Tensor, lam: float) -> tuple[Tensor, Tensor] | None:
            try:
                nu, V = torch.linalg.eigh(_damped(Mw, lam))
            except RuntimeError:  # torch.linalg.LinAlgError: eigh did not converge
                return None
            half = nu.clamp_min(lam).pow(-0.5 / p)  # diag(ν^{-1/p}) = diag(half)²
            return _outer_square(V * half.unsqueeze(-2)), torch.isfinite(half).all()

    elif method == "coupled_newton":
        q = _integral_p(p)

        def attempt(Mw: Tensor, lam: float) -> tuple[Tensor, Tensor] | None:
            tol = _NEWTON_TOL[Mw.dtype]
            root, err = _coupled_newton(_damped(Mw, lam), q, _NEWTON_MAX_ITERS, tol)
            converged = err <= _NEWTON_ACCEPT
            return root, torch.tensor(converged, device=root.device)

    else:
        raise ValueError(f"unknown method {method!r}; expected 'eigh' or 'coupled_newton'")

    what = "damped_inverse_root"
    return _run_with_retries(M, damping, retries, growth, attempt, what, M.dtype)


def _outer_square(U: Tensor) -> Tensor:
    r""":math:`U U^\top` (so :math:`V \operatorname{diag}(w) V^\top` for :math:`U = V
    \operatorname{diag}(\sqrt{w})`), exactly symmetric. A matrix goes through
    :func:`~curvlab.linalg.gram.gram` (one block triangle: about half the flops of the full
    product, ~5 of ~20 ms at d = 1000 on the development machine); a batch through one batched
    product and :math:`(R + R^\top)/2`."""
    if U.dim() == 2:
        return gram(U.mT)
    return _symmetrise(U @ U.mT)


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition :math:`M = V \operatorname{diag}(\mu) V^\top` of a symmetric matrix.

    A thin wrapper of ``torch.linalg.eigh`` (only the lower triangle is read; eigenvalues in
    ascending order) that retries in float64 when the first attempt raises or returns non-finite
    values, and casts the result back to ``M``'s dtype. Half precisions are computed in float32.

    Args:
        M: Symmetric matrix ``(d, d)`` or batch ``(..., d, d)``.

    Returns:
        ``(eigenvalues, eigenvectors)`` of shapes ``(..., d)`` and ``(..., d, d)``.

    Raises:
        DecompositionError: If ``M`` is not finite or the float64 attempt fails too.
    """
    _check_square(M, "symmetric_eigh")
    finite_input = torch.isfinite(M).all()
    for dtype in dict.fromkeys((_working_dtype(M.dtype), torch.float64)):
        try:
            mu, V = torch.linalg.eigh(M.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError: eigh did not converge
            ok = torch.zeros((), dtype=torch.bool)
        else:
            mu, V = mu.to(M.dtype), V.to(M.dtype)
            ok = finite_input & torch.isfinite(mu).all() & torch.isfinite(V).all()
        if bool(ok):
            return mu, V
        if not bool(finite_input):
            raise DecompositionError(
                f"symmetric_eigh: input of shape {tuple(M.shape)} is not finite"
            )
    raise DecompositionError(f"symmetric_eigh: eigh failed in float64 on shape {tuple(M.shape)}")
