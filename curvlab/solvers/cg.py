r"""Preconditioned conjugate gradients for a symmetric positive definite system :math:`A x = b`.

Hestenes–Stiefel CG with a preconditioner :math:`P \approx A^{-1}` (Nocedal & Wright 2006,
*Numerical Optimization*, Alg. 5.3; ``P = I`` gives Alg. 5.2)::

    1  r_0 = b − A x_0 ;  z_0 = P r_0 ;  p_0 = z_0
    2  for k = 0, 1, …:
    3      if ‖r_k‖ ≤ tol · ‖b‖: stop                        # converged
    4      κ_k = p_kᵀ A p_k ;  if κ_k ≤ 0: stop              # A not positive definite on p_k
    5      α_k = r_kᵀ z_k / κ_k
    6      x_{k+1} = x_k + α_k p_k ;  r_{k+1} = r_k − α_k A p_k
    7      z_{k+1} = P r_{k+1} ;  β_k = r_{k+1}ᵀ z_{k+1} / r_kᵀ z_k
    8      p_{k+1} = z_{k+1} + β_k p_k

Non-positive curvature (line 4) ends the solve with status ``"negative_curvature"`` and the last
iterate (Hessian-free optimisation truncates CG the same way); ``rᵀ P r ≤ 0`` for ``r ≠ 0`` means
that the preconditioner is not positive definite (status ``"breakdown"``). One host
synchronisation per iteration fetches the scalars of lines 3–5 together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.solvers.result import (
    BREAKDOWN,
    CONVERGED,
    MAX_ITERATIONS,
    NEGATIVE_CURVATURE,
    Matvec,
    SolverResult,
    check_iterations,
    check_like,
    check_positive,
    check_vector,
    fetch,
    non_finite_step,
    zero_step,
)

__all__ = ["cg"]


def cg(
    matvec: Matvec,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    tol: float = 1e-6,
    max_iters: int | None = None,
) -> SolverResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by preconditioned CG.

    Args:
        matvec: ``v ↦ A v``.
        b: Right-hand side, a flat float32 / float64 tensor.
        x0: Starting point (zero if ``None``); costs one extra product with ``A``.
        preconditioner: ``v ↦ P v`` with ``P`` symmetric positive definite, ``P ≈ A^{-1}``.
        tol: Stop when the (recursively updated) residual ``‖r‖ ≤ tol · ‖b‖``.
        max_iters: Maximum number of products with ``A`` in the loop (default: ``len(b)``, the
            finite-termination bound of exact arithmetic).

    Returns:
        A :class:`SolverResult`; ``residual_norm`` is the recursive ``‖r‖``, ``info["matvecs"]``
        counts all products with ``A``.
    """
    check_vector(b, "b")
    if x0 is not None:
        check_like(x0, b, "x0", "b")
    tol = check_positive(tol, "tol", allow_zero=True)
    max_iters = check_iterations(max_iters, "max_iters", b.numel())

    precondition = preconditioner if preconditioner is not None else (lambda v: v)
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b
    else:
        x = x0.clone()
        r = b - matvec(x)  # line 1
        matvecs += 1
    z = precondition(r)
    p = z
    b_norm, r_norm, rz = fetch(torch.linalg.vector_norm(b), torch.linalg.vector_norm(r), r @ z)
    if not (math.isfinite(b_norm) and math.isfinite(r_norm) and math.isfinite(rz)):
        return non_finite_step(b, matvecs=matvecs)
    if b_norm == 0.0 and x0 is None:
        return zero_step(b, CONVERGED, residual_norm=0.0)

    threshold = tol * b_norm
    status = MAX_ITERATIONS
    iterations = 0
    while True:
        if r_norm <= threshold:  # line 3
            status = CONVERGED
            break
        if rz <= 0.0:  # r ≠ 0 with rᵀPr ≤ 0: P is not positive definite
            status = BREAKDOWN
            break
        if iterations == max_iters:
            break
        Ap = matvec(p)
        matvecs += 1
        iterations += 1
        kappa_t = p @ Ap
        alpha_t = rz / kappa_t  # line 5 (used only when κ > 0, checked below)
        r_next = r - alpha_t * Ap  # line 6
        z_next = precondition(r_next)  # line 7
        kappa, r_norm_next, rz_next = fetch(
            kappa_t, torch.linalg.vector_norm(r_next), r_next @ z_next
        )
        if not (math.isfinite(kappa) and math.isfinite(r_norm_next) and math.isfinite(rz_next)):
            return non_finite_step(b, iterations=iterations, matvecs=matvecs)
        if kappa <= 0.0:  # line 4
            status = NEGATIVE_CURVATURE
            break
        x = x + alpha_t * p  # line 6
        r, z = r_next, z_next
        beta = rz_next / rz  # line 7
        rz, r_norm = rz_next, r_norm_next
        p = z + beta * p  # line 8

    return SolverResult(
        solution=x,
        iterations=iterations,
        residual_norm=r_norm,
        status=status,
        info={"matvecs": matvecs},
    )
