r"""The ARC cubic subproblem by Lanczos: Cartis, Gould & Toint (2011), as in the SCR code [C-SCR].

Adaptive cubic regularisation (a reconstruction, [R]: Kohler, Adolphs & Lucchi [P2] give no ARC
algorithm, only that their norms "can directly be transferred to the cubic regularization
framework"; source labels: docs/deviations.md) minimises the model

.. math::

    m(s) = g^\top s + \tfrac12 s^\top H s + \tfrac{\sigma}{3} \lVert s\rVert_M^3,
    \qquad \lVert s\rVert_M^2 = \textstyle\sum_i M_i s_i^2 ,

with ``M`` the diagonal norm matrix of the ellipsoidal trust region (Adagrad / RMSProp, [P2] §3;
``M = 1`` is the spherical model). With ``D = diag(√M)``, ``u = D s``, ``ĝ = D⁻¹ g`` and
``Ĥ = D⁻¹ H D⁻¹`` the model is spherical in ``u``. The solver (Cartis, Gould & Toint 2011, ARC
Part I, §6.2; Kohler & Lucchi's SCR code ``solve_ARC_subproblem``, ``'lanczos'``)::

    1  γ = ‖ĝ‖ ;  q_1 = ĝ / γ
    2  for j = 1, 2, …, max_iters:
    3      one Lanczos step on Ĥ → T_j = tridiag(β, α, β), β_j, Q_j           (lanczos.py)
    4      y_j = argmin_y  γ e_1ᵀ y + ½ yᵀ T_j y + σ/3 ‖y‖³                    (secular equation)
    5      if β_j |e_jᵀ y_j| ≤ min(κ, ‖y_j‖ / max(1, σ)) · γ : stop            (SCR rule)
    6  u = Q_j y_j ;  s = D⁻¹ u

``β_j |e_jᵀ y_j|`` is the norm of the model gradient at ``u = Q_j y_j`` (the reduced gradient
vanishes, only the component along ``q_{j+1}`` remains).

Line 4, the small problem, is solved densely in float64 (Cartis, Gould & Toint 2011, Thm 3.1):
its global minimiser is ``y(λ) = −(T + λI)⁻¹ γ e_1`` with ``λ = σ‖y(λ)‖`` and
``λ ≥ max(0, −θ_min)`` (θ the eigenvalues of ``T``). With ``T = V diag(θ) Vᵀ`` and ``c = γ Vᵀe_1``
the secular equation ``φ(λ) = 1/‖y(λ)‖ − σ/λ = 0``, ``‖y(λ)‖² = Σ c_i²/(θ_i + λ)²``, has a
concave increasing left-hand side, and is solved by Newton's method safeguarded by bisection on
the bracket ``(max(0, −θ_min), λ_U]`` with ``λ_U = (−θ_min + sqrt(θ_min² + 4σγ))/2``, where
``φ(λ_U) ≥ 0``. In the hard case (``c`` has no weight on the eigenspace of ``θ_min < 0`` and
``φ(−θ_min) ≥ 0``) ``λ = −θ_min`` and a multiple of the bottom eigenvector is added so that
``‖y‖ = λ/σ``.

The model decrease ``m(0) − m(s) = −(γ y_1 + ½ yᵀT y + σ/3 ‖y‖³)`` is computed in the small
space. Deviation from SCR: when the Krylov space becomes invariant the reduced solution is
returned as exact (SCR falls back to a dense solve of the full problem, which a matrix-free
solver cannot do); this misses only a hard case of the full problem whose eigenvector lies outside
the Krylov space.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from curvlab.solvers.lanczos import LanczosProcess
from curvlab.solvers.result import (
    CONVERGED,
    MAX_ITERATIONS,
    Matvec,
    SolverResult,
    check_iterations,
    check_norm_matrix_diag,
    check_positive,
    check_vector,
    non_finite_step,
    zero_step,
)

__all__ = ["cubic_subproblem", "minimize_cubic_dense"]

_SECULAR_MAX_ITERS = 200


def _secular(theta: np.ndarray, c: np.ndarray, sigma: float, lam: float) -> tuple[float, float]:
    """``φ(λ) = 1/‖y(λ)‖ − σ/λ`` and its derivative (all ``θ_i + λ > 0``)."""
    shifted = theta + lam
    w = c / shifted
    norm2 = float(w @ w)
    norm = math.sqrt(norm2)
    if norm == 0.0:
        return math.inf, 0.0
    d_norm2 = -2.0 * float(w @ (w / shifted))  # d‖y‖²/dλ
    value = 1.0 / norm - sigma / lam
    derivative = -0.5 * d_norm2 / (norm2 * norm) + sigma / lam**2
    return value, derivative


def minimize_cubic_dense(
    T: np.ndarray, g: np.ndarray, sigma: float
) -> tuple[np.ndarray, float, bool]:
    """Global minimiser of ``gᵀy + ½ yᵀT y + σ/3 ‖y‖³`` for a small dense symmetric ``T``.

    Float64 NumPy; used for the reduced problem on the Lanczos tridiagonal matrix (line 4).

    Returns:
        ``(y, λ, hard_case)`` with ``λ = σ‖y‖`` the multiplier of the optimality conditions
        ``(T + λI) y = −g``, ``T + λI ⪰ 0``.
    """
    theta, V = np.linalg.eigh(T)
    c = V.T @ g
    gamma = float(np.linalg.norm(g))
    if gamma == 0.0:
        if theta[0] >= 0.0:
            return np.zeros_like(g), 0.0, False
        lam = -float(theta[0])  # pure negative curvature: step along the bottom eigenvector
        return V[:, 0] * (lam / sigma), lam, True
    scale = max(1.0, float(np.max(np.abs(theta))))
    eps = np.finfo(np.float64).eps
    lo = max(0.0, -float(theta[0]))
    hi = 0.5 * (-float(theta[0]) + math.sqrt(float(theta[0]) ** 2 + 4.0 * sigma * gamma))
    hi = max(hi, lo * (1.0 + 4.0 * eps) + 4.0 * eps * scale)

    # Hard case: no weight on the eigenspace of θ_min < 0, and φ(−θ_min) ≥ 0 on the rest.
    if theta[0] < 0.0:
        degenerate = theta <= theta[0] + 1e3 * eps * scale
        if float(np.linalg.norm(c[degenerate])) <= 1e3 * eps * gamma:
            rest = ~degenerate
            y_rest = -c[rest] / (theta[rest] + lo)
            rest_norm = float(np.linalg.norm(y_rest))
            if rest_norm <= lo / sigma:
                z = np.zeros_like(c)
                z[rest] = y_rest
                bottom = int(np.argmax(degenerate))  # first index of the eigenspace
                z[bottom] = math.sqrt(max(0.0, (lo / sigma) ** 2 - rest_norm**2))
                return V @ z, lo, True

    lam = hi
    for _ in range(_SECULAR_MAX_ITERS):
        value, derivative = _secular(theta, c, sigma, lam)
        if value == 0.0:
            break
        if value < 0.0:
            lo = lam
        else:
            hi = lam
        newton = lam - value / derivative if derivative > 0.0 else math.nan
        following = newton if lo < newton < hi else 0.5 * (lo + hi)
        converged = abs(following - lam) <= 4.0 * eps * lam or hi - lo <= 4.0 * eps * hi
        lam = following
        if converged:
            break
    z = -c / (theta + lam)
    return V @ z, lam, False


def cubic_subproblem(
    matvec: Matvec,
    grad: Tensor,
    sigma: float,
    *,
    norm_matrix_diag: Tensor | None = None,
    max_iters: int | None = None,
    tol: float = 0.1,
    reorthogonalize: bool = True,
) -> SolverResult:
    """Minimise ``gᵀs + ½ sᵀHs + σ/3 ‖s‖_M³`` in growing Krylov spaces (ARC, Lanczos).

    Args:
        matvec: ``v ↦ H v`` with ``H`` symmetric (indefinite allowed).
        grad: The gradient ``g``, a flat float32 / float64 tensor.
        sigma: The cubic regularisation weight ``σ > 0``.
        norm_matrix_diag: Diagonal ``M > 0`` of the norm (``None``: ``M = 1``, spherical).
        max_iters: Maximum Krylov dimension (products with ``H``); default ``len(grad)``.
        tol: ``κ`` of the SCR stopping rule (``krylov_tol``, default 0.1 as in [C-SCR]).
        reorthogonalize: Full reorthogonalisation of the Lanczos basis (default on).

    Returns:
        A :class:`SolverResult`: ``solution`` the step ``s``, ``residual_norm`` the model gradient
        norm ``β_j |e_jᵀ y_j|`` in the scaled variables ``u = D s`` (the Euclidean ``‖∇m(s)‖``
        for ``M = 1``), ``model_decrease = m(0) − m(s) ≥ 0``, status ``"converged"`` (line 5, or
        an invariant Krylov space), ``"max_iterations"`` or ``"non_finite"``; ``info`` holds the
        multiplier ``"lambda" = σ‖s‖_M``, ``"hard_case"``, ``"invariant_subspace"``,
        ``"matvecs"``.
    """
    check_vector(grad, "grad")
    sigma = check_positive(sigma, "sigma")
    tol = check_positive(tol, "tol", allow_zero=True)
    max_iters = check_iterations(max_iters, "max_iters", grad.numel())
    norm_finite = True
    if norm_matrix_diag is None:
        scaled_grad, scaled_matvec = grad, matvec
        d_inv: Tensor | None = None
    else:
        norm_finite = check_norm_matrix_diag(norm_matrix_diag, grad)
        d_inv = torch.rsqrt(norm_matrix_diag)  # D⁻¹ = diag(1/√M)
        scaled_grad = grad * d_inv  # ĝ = D⁻¹ g

        def scaled_matvec(v: Tensor) -> Tensor:  # Ĥ v = D⁻¹ H D⁻¹ v
            assert d_inv is not None
            return matvec(v * d_inv) * d_inv

    gamma = float(torch.linalg.vector_norm(scaled_grad))  # line 1
    if not (math.isfinite(gamma) and norm_finite):
        return non_finite_step(grad)
    if gamma == 0.0:
        return zero_step(grad, CONVERGED, residual_norm=0.0)

    process = LanczosProcess(scaled_matvec, scaled_grad, gamma, reorthogonalize=reorthogonalize)
    status = MAX_ITERATIONS
    while process.size < max_iters:
        process.step()  # line 3
        if process.non_finite:
            return non_finite_step(grad, iterations=process.size + 1, matvecs=process.size + 1)
        j = process.size
        T = np.diag(np.asarray(process.alphas))
        if j > 1:
            off = np.asarray(process.betas[:-1])
            T += np.diag(off, 1) + np.diag(off, -1)
        e1 = np.zeros(j)
        e1[0] = gamma
        y, lam, hard = minimize_cubic_dense(T, e1, sigma)  # line 4
        y_norm = float(np.linalg.norm(y))
        residual = process.betas[-1] * abs(float(y[-1]))
        if process.invariant:
            status = CONVERGED
            break
        if residual <= min(tol, y_norm / max(1.0, sigma)) * gamma:  # line 5
            status = CONVERGED
            break

    model = gamma * float(y[0]) + 0.5 * float(y @ T @ y) + sigma / 3.0 * y_norm**3
    y_t = torch.as_tensor(y, dtype=grad.dtype, device=grad.device)
    step = process.basis.T @ y_t  # line 6: u = Q y
    if d_inv is not None:
        step = step * d_inv  # s = D⁻¹ u
    return SolverResult(
        solution=step,
        iterations=process.size,
        residual_norm=residual,
        status=status,
        model_decrease=-model,
        info={
            "matvecs": process.size,
            "lambda": lam,
            "hard_case": hard,
            "invariant_subspace": process.invariant,
        },
    )
