r"""Preconditioned Steihaug–Toint CG for the (ellipsoidal) trust-region subproblem.

The subproblem of Kohler, Adolphs & Lucchi's ellipsoidal trust region ([P2] eq. 7 and App. F.2;
source labels such as [P2] and [C-AN]: docs/deviations.md):

.. math::

    \min_s\; m(s) = g^\top s + \tfrac12 s^\top H s
    \quad\text{s.t.}\quad \lVert s\rVert_M \le \Delta ,

solved by the truncated preconditioned CG of Conn, Gould & Toint (2000, *Trust-Region Methods*,
Alg. 7.5.1), with the preconditioner ``M⁻¹`` ("as preconditioning matrix for CG we use the same
matrix as for the ellipsoidal constraint", [P2] App. F.2). The ``M``-norms come from the
recurrences CGT eqs. 7.5.5–7.5.7, so only ``M⁻¹`` is ever applied::

     1  s = 0 ; r = g ; v = M⁻¹ r ; p = −v ; gv = rᵀv ; pMp = gv ; sMp = 0 ; ‖s‖²_M = 0
     2  loop k = 0, 1, …:
     3      κ = pᵀ H p
     4      if κ ≤ 0: s ← s + τ p, τ ≥ 0 the root of ‖s + τp‖_M = Δ; return    # negative curv.
     5      α = gv / κ
     6      if ‖s + αp‖²_M = ‖s‖²_M + 2α sMp + α² pMp ≥ Δ²: s ← s + τ p; return    # boundary
     7      ‖s‖²_M ← ‖s‖²_M + 2α sMp + α² pMp ;  s ← s + α p                        # 7.5.5
     8      r ← r + α H p ;  v = M⁻¹ r
     9      stopping test (below): return s
    10      β = rᵀv / gv ;  gv ← rᵀv
    11      sMp ← β (sMp + α pMp) ;  pMp ← gv + β² pMp                             # 7.5.6, 7.5.7
    12      p ← −v + β p

with the boundary root ``τ = (−sMp + sqrt(sMp² + pMp (Δ² − ‖s‖²_M))) / pMp``. The model decrease
``m(0) − m(s)`` accumulates as ``½ α gv`` per interior step and ``τ gv − ½ τ² κ`` for the final
boundary step (CGT p. 205; the released code's ``model_decrease``).

Stopping rules (line 9):

* ``stopping="paper"`` ([P2] §5, "the classical stopping criterion given in Eq. (52)", App. F.2):
  ``‖r‖₂ ≤ ‖g‖₂ · min(κ, ‖g‖₂^θ)`` with ``κ = tol = 0.1`` ("krylov tol.", Table 1), ``θ = 1/2``.
* ``stopping="model_decrease"`` (the released code [C-AN] ``stcg.py`` with
  ``precon_stopping_criterion: true``, which every parameter file sets): from the second
  iteration on, stop when the relative gain ``(mdec_k − mdec_{k−1}) / mdec_{k−1} ≤
  min(κ, ‖g‖₂^θ)``, or at once when ``mdec_{k−1} = 0``.

Either way the loop also stops after ``max_iters`` products with ``H`` (the released configs use
``max_krylov_dim = 50``). Deviation: an exactly zero residual (``r = 0``) stops the loop as
converged under both rules, since line 12 would give ``p = 0``. The boundary test of line 6 uses
the recurrence for ``‖s + αp‖_M`` (CGT) where the released code computes the norm directly; they
agree in exact arithmetic. Beyond the paper and the code, ``rᵀM⁻¹r ≤ 0`` for ``r ≠ 0`` (a
preconditioner that is not positive definite) ends the loop with status ``"breakdown"``.

One host synchronisation per iteration fetches ``κ``, ``‖r‖`` and ``rᵀv`` together; a boundary
exit costs one more for the residual norm.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from curvlab.solvers.result import (
    BOUNDARY,
    BREAKDOWN,
    CONVERGED,
    MAX_ITERATIONS,
    NEGATIVE_CURVATURE,
    Matvec,
    SolverResult,
    check_iterations,
    check_norm_matrix_diag,
    check_positive,
    check_vector,
    fetch,
    non_finite_step,
    zero_step,
)

__all__ = ["steihaug_cg"]

Stopping = Literal["paper", "model_decrease"]


def _boundary_root(s_norm2: float, s_mp: float, p_mp: float, radius: float) -> float:
    """The root ``τ ≥ 0`` of ``‖s + τp‖²_M = Δ²`` (``‖s‖_M ≤ Δ``), cancellation-free."""
    gap = max(radius * radius - s_norm2, 0.0)
    disc = math.sqrt(s_mp * s_mp + p_mp * gap)
    if s_mp >= 0.0:
        return gap / (s_mp + disc) if gap > 0.0 else 0.0
    return (disc - s_mp) / p_mp


def steihaug_cg(
    matvec: Matvec,
    grad: Tensor,
    radius: float,
    *,
    preconditioner: Matvec | None = None,
    norm_matrix_diag: Tensor | None = None,
    tol: float = 0.1,
    theta: float = 0.5,
    max_iters: int | None = None,
    stopping: Stopping = "paper",
) -> SolverResult:
    """Approximately minimise ``gᵀs + ½ sᵀHs`` subject to ``‖s‖_M ≤ radius`` (CGT Alg. 7.5.1).

    Args:
        matvec: ``v ↦ H v`` with ``H`` symmetric (indefinite allowed).
        grad: The gradient ``g``, a flat float32 / float64 tensor.
        radius: The trust-region radius ``Δ > 0``.
        preconditioner: ``v ↦ M⁻¹ v`` for a general symmetric positive definite norm matrix
            ``M``; exclusive with ``norm_matrix_diag``.
        norm_matrix_diag: The diagonal of ``M`` (Adagrad / RMSProp ellipsoid, [P2] §3); the
            preconditioner is then ``v / M``. With neither, ``M = I`` (spherical region).
        tol: ``κ`` of the stopping rules ("krylov tol.", 0.1 in [P2] Table 1).
        theta: ``θ`` of the stopping rules (``1/2``).
        max_iters: Maximum number of products with ``H`` (default ``len(grad)``).
        stopping: ``"paper"`` (Eq. 52 residual test) or ``"model_decrease"`` (released code).

    Returns:
        A :class:`SolverResult` with ``model_decrease = m(0) − m(s) ≥ 0``, ``residual_norm`` the
        Euclidean ``‖g + Hs‖``, ``hit_boundary`` for the statuses ``"boundary"`` and
        ``"negative_curvature"``; other statuses ``"converged"``, ``"max_iterations"``,
        ``"breakdown"``, ``"non_finite"`` (zero step). ``info["step_norm"]`` is ``‖s‖_M``.
    """
    check_vector(grad, "grad")
    radius = check_positive(radius, "radius")
    tol = check_positive(tol, "tol", allow_zero=True)
    theta = check_positive(theta, "theta", allow_zero=True)
    max_iters = check_iterations(max_iters, "max_iters", grad.numel())
    if stopping not in ("paper", "model_decrease"):
        raise ValueError(f"stopping must be 'paper' or 'model_decrease', got {stopping!r}")
    if preconditioner is not None and norm_matrix_diag is not None:
        raise ValueError("preconditioner and norm_matrix_diag are exclusive (both define M)")

    norm_finite = True
    precondition: Matvec
    if norm_matrix_diag is not None:
        norm_finite = check_norm_matrix_diag(norm_matrix_diag, grad)
        diag = norm_matrix_diag

        def precondition(v: Tensor) -> Tensor:
            return v / diag

    elif preconditioner is not None:
        precondition = preconditioner
    else:

        def precondition(v: Tensor) -> Tensor:
            return v

    # line 1
    r = grad
    v = precondition(r)
    g_norm, gv = fetch(torch.linalg.vector_norm(r), r @ v)
    if not (norm_finite and math.isfinite(g_norm) and math.isfinite(gv)):
        return non_finite_step(grad)
    if g_norm == 0.0:
        return zero_step(grad, CONVERGED, residual_norm=0.0, step_norm=0.0)
    if gv <= 0.0:
        return zero_step(grad, BREAKDOWN, residual_norm=g_norm, step_norm=0.0)
    s = torch.zeros_like(grad)
    p = -v
    p_mp, s_mp, s_norm2 = gv, 0.0, 0.0
    mdec = mdec_previous = 0.0
    gain_bound = min(tol, g_norm**theta)
    residual_threshold = g_norm * gain_bound

    iterations = 0
    r_norm = g_norm
    status = MAX_ITERATIONS
    while True:  # line 2
        hp = matvec(p)
        iterations += 1
        kappa_t = p @ hp  # line 3
        alpha_t = gv / kappa_t  # line 5 (speculative: used only if κ > 0)
        r_next = r + alpha_t * hp  # line 8 (speculative)
        v_next = precondition(r_next)
        kappa, r_norm_next, gv_next = fetch(
            kappa_t, torch.linalg.vector_norm(r_next), r_next @ v_next
        )
        if not math.isfinite(kappa):
            return non_finite_step(grad, iterations=iterations, matvecs=iterations)
        if kappa > 0.0:
            alpha = gv / kappa
            trial_norm2 = s_norm2 + 2.0 * alpha * s_mp + alpha * alpha * p_mp
        else:
            alpha, trial_norm2 = 0.0, math.inf
        if trial_norm2 >= radius * radius:  # lines 4 (κ ≤ 0) and 6
            tau = _boundary_root(s_norm2, s_mp, p_mp, radius)
            s = s + tau * p
            mdec += tau * gv - 0.5 * tau * tau * kappa
            r_norm = float(torch.linalg.vector_norm(r + tau * hp))
            s_norm2 = s_norm2 + 2.0 * tau * s_mp + tau * tau * p_mp
            status = NEGATIVE_CURVATURE if kappa <= 0.0 else BOUNDARY
            break
        if not (math.isfinite(r_norm_next) and math.isfinite(gv_next)):
            return non_finite_step(grad, iterations=iterations, matvecs=iterations)
        s_norm2 = trial_norm2  # line 7
        s = s + alpha * p
        mdec_previous, mdec = mdec, mdec + 0.5 * alpha * gv
        r, v, r_norm = r_next, v_next, r_norm_next  # line 8
        # line 9: stopping test
        if stopping == "paper":
            stop = r_norm <= residual_threshold
        else:
            stop = iterations >= 2 and (
                mdec_previous == 0.0 or (mdec - mdec_previous) / mdec_previous <= gain_bound
            )
        if stop or r_norm == 0.0:
            status = CONVERGED
            break
        if gv_next <= 0.0:  # r ≠ 0 with rᵀM⁻¹r ≤ 0: M⁻¹ is not positive definite
            status = BREAKDOWN
            break
        if iterations >= max_iters:
            break
        beta = gv_next / gv  # line 10
        gv = gv_next
        s_mp = beta * (s_mp + alpha * p_mp)  # line 11 (7.5.6)
        p_mp = gv + beta * beta * p_mp  # (7.5.7)
        p = -v + beta * p  # line 12

    return SolverResult(
        solution=s,
        iterations=iterations,
        residual_norm=r_norm,
        status=status,
        hit_boundary=status in (BOUNDARY, NEGATIVE_CURVATURE),
        model_decrease=mdec,
        info={"matvecs": iterations, "step_norm": math.sqrt(max(s_norm2, 0.0))},
    )
