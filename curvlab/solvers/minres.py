r"""MINRES with a fixed number of iterations: the EDF paper ([P0]), Appendix A, Algorithm 1.

Paige & Saunders (1975) MINRES for a symmetric, possibly indefinite, system
:math:`(A + \lambda I) x = b`: the iterate :math:`x_k` minimises :math:`\lVert b - (A+\lambda I)
x\rVert` over the Krylov space :math:`K_k(A, b)`, so ``k`` interpolates between a scaled gradient
step (``k = 1``, paper Alg. 2 / eq. 23) and the exact solve (``k = n`` for a nonsingular system).
Algorithm 1 of the paper, with its right-hand side ``g`` renamed ``b``, its damping ``λ`` the
``shift`` and its output ``v`` the solution ``x`` (source labels such as [P0], [C-EDF] and [R]:
docs/deviations.md)::

     1  β = ‖b‖ ; ξ = β ; γ0 = γ1 = 1 ; σ0 = σ1 = 0 ; x = v0 = 0 ; v1 = b ; q0 = q1 = 0
     2  for j = 1 .. k:
     3      v1 = v1 / β
     4      u = A v1 + λ v1                  # paper: R-op, L-op, then "u = u + λg" (see below)
     5      α = ⟨v1, u⟩
     6      u = u − α v1 − β v0
     7      v0 = v1 ; v1 = u
     8      δ = γ1 α − γ0 σ1 β ;  ρ2 = σ1 α + γ0 γ1 β ;  ρ3 = σ0 β
     9      β = ‖v1‖
    10      ρ1 = sqrt(δ² + β²)
    11      γ0 = γ1 ; γ1 = δ / ρ1 ; σ0 = σ1 ; σ1 = β / ρ1
    12      tmp = q0 ; q0 = q1 ; q1 = (v0 − ρ2 q0 − ρ3 tmp) / ρ1
    13      x = x + γ1 ξ q1
    14      ξ = −σ1 ξ

Lines 3–7 are the Lanczos recurrence, lines 8–11 apply the previous two Givens rotations to the
new column of the tridiagonal matrix and compute the next one (γ = cos, σ = sin), lines 12–13
update the search directions and the iterate, and :math:`|\xi|` after line 14 is the residual norm
:math:`\lVert b - (A+\lambda I)x_j\rVert`.

Deviation (typo fix): the extracted line 4 reads "u = u + λg"; the damped operator of eq. 24 needs
``λ v1`` (the paper's Alg. 2 and the released code [C-EDF] use ``λ·v1``).

Deviation (guards the paper does not need in exact arithmetic, [R]): a ``β`` of
line 9 at round-off level, ``β ≤ 100·ε·‖T‖`` (ε the unit round-off of the dtype, ‖T‖ the running
maximum of the column norms ``sqrt(β_old² + α² + β²)`` of the tridiagonal matrix), means that the
Krylov space is invariant: it is set to 0 and line 3 yields ``v1 = 0`` instead of dividing noise
by noise. When then also ``ρ1 ≤ 100·ε·‖T‖`` (the tridiagonal matrix is singular on an invariant
space: an inconsistent singular system) the rotation of line 11 is taken as ``γ1 = 0, σ1 = 1``:
the iterate stays the least-squares solution found so far, ``|ξ|`` keeps its true residual, all
later iterations are no-ops.

A fixed multiple of ε does not recognise an inconsistent singular system in practice: round-off
in the Lanczos vectors is amplified by the three-term recurrence, so on the invariant space β is
far above ε·‖T‖ (measured: n = 12, eigenvalues 0, 0, 0 and nine N(0, 1) draws, float64: β =
5.9e-13 ≈ 2700·ε·‖T‖; 196 of 200 such draws passed the test above), ρ1 = β is then divided into
a noise direction and ‖x‖ grows to 1e9–1e14. So a second test looks at the least-squares
residual ‖A r‖ instead: at iteration j, before the rotation of line 11,
``‖(A + λI) r_{j−1}‖ = |ξ|·hypot(δ, γ1·β)`` (γ1 the previous rotation, β the new one of line 9;
Choi, Paige & Saunders, MINRES-QLP, SIAM J. Sci. Comput. 33(4), 2011), and
``hypot(δ, γ1·β) ≤ √ε·‖T‖`` says that x_{j−1} is a least-squares solution to working accuracy
(‖A r‖ ≤ √ε‖A‖‖r‖): the iteration stops there exactly as above (β = 0, γ1 = 0, σ1 = 1). For a
nonsingular system this needs a condition number above 1/√ε (6.7e7 in float64, 2.9e3 in
float32) and a residual in the eigendirections of the smallest eigenvalues: the system is then
treated as numerically singular. The status of a stop by either test is ``"breakdown"`` when the
residual left is not negligible, ``|ξ| > √ε·‖b‖`` (the system is inconsistent); otherwise the
status follows the usual rule (a consistent singular system that converged). Beyond ``k = n``
iterations the Lanczos vectors lose orthogonality and the least-squares accuracy the recurrence
reaches may stay above √ε, so the test is not guaranteed to fire there.

The guards are branch-free tensor selects, so with ``tol = 0`` (the paper: exactly ``k``
iterations, no tolerance test) the loop makes no host synchronisation; one at the end fetches the
residual and the finiteness check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.solvers.result import (
    BREAKDOWN,
    CONVERGED,
    MAX_ITERATIONS,
    Matvec,
    SolverResult,
    check_iterations,
    check_positive,
    check_vector,
    fetch,
    non_finite_step,
    zero_step,
)

__all__ = ["minres"]

#: Round-off threshold, in units of ε·‖T‖, below which β and ρ1 count as zero.
_ROUND_OFF = 100.0


def minres(
    matvec: Matvec,
    b: Tensor,
    *,
    max_iters: int,
    shift: float = 0.0,
    tol: float = 0.0,
) -> SolverResult:
    """Run ``max_iters`` iterations of MINRES on ``(A + shift·I) x = b`` ([P0] Alg. 1).

    Args:
        matvec: ``v ↦ A v`` with ``A`` symmetric (indefinite and singular are allowed).
        b: Right-hand side, a flat float32 / float64 tensor (the gradient in EDF).
        max_iters: The Krylov order ``k`` of the paper: the number of iterations (products
            with ``A``). ``k = len(b)`` gives the exact solution of a nonsingular system.
        shift: The damping ``λ`` added to the diagonal (EDF: ``λ = a‖g‖^b``); any real number.
        tol: Optional early stop when the residual ``|ξ| ≤ tol · ‖b‖`` (one host
            synchronisation per iteration). The paper's default ``0`` runs exactly ``k``
            iterations without synchronising.

    Returns:
        A :class:`SolverResult` with ``residual_norm = ‖b − (A + shift·I) x‖`` (the recurrence
        value ``|ξ|``) and status ``"converged"`` (residual ``≤ tol·‖b‖``, exactly zero when
        ``tol = 0``), ``"max_iterations"``, ``"breakdown"`` (inconsistent, numerically singular
        system: the least-squares iterate is returned, residual ``> √ε·‖b‖``; see the module
        docstring) or ``"non_finite"`` (zero solution).
    """
    check_vector(b, "b")
    k = check_iterations(max_iters, "max_iters", 1)
    shift = float(shift)
    if not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift}")
    tol = check_positive(tol, "tol", allow_zero=True)

    beta1 = float(torch.linalg.vector_norm(b))
    if not math.isfinite(beta1):
        return non_finite_step(b)
    if beta1 == 0.0:
        return zero_step(b, CONVERGED, residual_norm=0.0)

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=b.dtype, device=b.device)

    zero = scalar(0.0)
    beta, xi = scalar(beta1), scalar(beta1)  # line 1
    gamma0, gamma1, sigma0, sigma1 = scalar(1.0), scalar(1.0), zero, zero
    x = torch.zeros_like(b)
    v0, v1 = torch.zeros_like(b), b
    q0, q1 = torch.zeros_like(b), torch.zeros_like(b)
    breakdown = torch.zeros((), dtype=torch.bool, device=b.device)
    ls_tol = math.sqrt(torch.finfo(b.dtype).eps)  # √ε of the least-squares test (docstring)
    inconsistent = ls_tol * beta1  # a residual |ξ| above this is not round-off
    t_norm = coupling = zero
    iterations = 0
    for _ in range(k):  # line 2
        v1 = v1 * torch.where(beta > 0, 1.0 / beta, zero)  # line 3 (guard: β = 0 → v1 = 0)
        u = matvec(v1)  # line 4
        if shift != 0.0:
            u = u + shift * v1
        alpha = v1 @ u  # line 5
        u = u - alpha * v1 - beta * v0  # line 6
        v0, v1 = v1, u  # line 7
        delta = gamma1 * alpha - gamma0 * sigma1 * beta  # line 8 (β is the previous one)
        rho2 = sigma1 * alpha + gamma0 * gamma1 * beta
        rho3 = sigma0 * beta
        beta_new = torch.linalg.vector_norm(v1)  # line 9
        # column j of T: (β_{j−1}, α_j, β_j); β_0 = 0 (the β of line 1 is ‖b‖, not part of T)
        t_norm = torch.maximum(t_norm, torch.sqrt(coupling**2 + alpha**2 + beta_new**2))
        round_off = _ROUND_OFF * torch.finfo(b.dtype).eps * t_norm
        # guard: x_{j−1} is a least-squares solution, ‖(A + λI) r_{j−1}‖ = |ξ|·hypot(δ, γ1 β)
        # ≤ √ε‖T‖|ξ| (γ1 of the previous rotation; docstring)
        solved = torch.hypot(delta, gamma1 * beta_new) <= ls_tol * t_norm
        # guard: invariant space (β at round-off level) or a least-squares solution: β = 0
        beta = torch.where((beta_new > round_off) & ~solved, beta_new, zero)
        rho1 = torch.hypot(delta, beta)  # line 10
        regular = (rho1 > round_off) & ~solved
        coupling = beta
        inv_rho1 = torch.where(regular, 1.0 / rho1, zero)
        gamma0, gamma1 = gamma1, delta * inv_rho1  # line 11 (guard: ρ1 = 0 → γ1 = 0, σ1 = 1)
        sigma0, sigma1 = sigma1, torch.where(regular, beta * inv_rho1, zero + 1.0)
        breakdown = breakdown | (~regular & (xi.abs() > inconsistent))
        q0, q1 = q1, (v0 - rho2 * q1 - rho3 * q0) * inv_rho1  # line 12
        x = x + (gamma1 * xi) * q1  # line 13
        xi = -sigma1 * xi  # line 14
        iterations += 1
        if tol > 0.0 and float(xi.abs()) <= tol * beta1:
            break

    residual, x_norm, broke = fetch(xi.abs(), torch.linalg.vector_norm(x), breakdown)
    if not (math.isfinite(residual) and math.isfinite(x_norm)):
        return non_finite_step(b, iterations=iterations, matvecs=iterations)
    if broke:
        status = BREAKDOWN
    elif residual <= tol * beta1:
        status = CONVERGED
    else:
        status = MAX_ITERATIONS
    return SolverResult(
        solution=x,
        iterations=iterations,
        residual_norm=residual,
        status=status,
        info={"matvecs": iterations},
    )
