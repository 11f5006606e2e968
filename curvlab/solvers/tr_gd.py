r"""Liu et al.'s trust-region subproblem solver: GD in the ball, then Riemannian GD on the sphere.

Liu, Lee & Hsieh, "Better Generalization by Efficient Trust Region Method" ([P3]; source labels
such as [P3], [C-TR] and [R]: docs/deviations.md), §3, Algorithm 2, for
:math:`\min_{\lVert z\rVert \le 1} f(z) = \tfrac12 z^\top H z + g^\top z`::

     1  Initialize z_0 and η so that Assumption 1, 2 are met.
     2  boundary = false
     3  for t = 0, 1, …, N1 do
     4      if ‖z_t‖ < 1 then
     5          z_{t+1} = z_t − η (H z_t + g)
     6      else
     7          boundary = true
     8          break
     9      end if
    10  end for
    11  if boundary = false then return z_{N1+1}
    13  for t' = t, t + 1, …, N2 do
    14      Choose α_{t'} by Armijo line search
    15      z_{t'+1} = (z_{t'} − α_{t'} (I − z_{t'} z_{t'}ᵀ)(H z_{t'} + g))
                       / ‖z_{t'} − α_{t'} (I − z_{t'} z_{t'}ᵀ)(H z_{t'} + g)‖
    16  end for
    17  return z_{N2+1}

Assumption 1: ``η < 1/β`` with ``β = ‖H‖_op``. Assumption 2: ``z_0 = −α g/‖g‖``, ``0 < α < 1``.
Line 15 is a gradient step on the sphere with the retraction ``R_z(ξ) = (z + ξ)/‖z + ξ‖``; the
Armijo rule of line 14 accepts ``α`` when ``f(z_{t'}) − f(z_{t'+1}) ≥ σ α ‖grad f(z_{t'})‖²``
(§3.2). Under the assumptions, in the "easy case" ``g⁽¹⁾ ≠ 0`` (component along the bottom
eigenvector), the iterates converge to the global minimiser (Thm. 3), ``‖z_t‖`` increases in
phase I (Thm. 5) and phase II converges linearly (Thm. 8). The "hard case" ``g⁽¹⁾ = 0`` is
ignored, as in the paper ("in practice due to rounding error this case is hardly seen").

How this implementation reads the algorithm:

* Line 5 is the proximal (projected) gradient step of Theorem 3, ``z_{t+1} = Prox(z_t − η∇f)``,
  the projection onto the ball: phase-I iterates never leave the ball, and line 4 finds
  ``‖z_t‖ ≥ 1`` exactly when the projection was active, so phase II starts from the projected
  point on the sphere ([R]: the paper does not say) and a ``z_{N1+1}`` returned by line 11 is
  feasible.
* Radius ``r`` instead of 1 (Alg. 1 calls the unit-ball Alg. 2 with radius r_t): the algorithm
  runs on ``z`` with the ball / sphere of radius ``r``, ``z_0 = −α r g/‖g‖``, tangent projector
  ``I − z zᵀ/r²`` and retraction
  ``r (z + ξ)/‖z + ξ‖``. This is the unit-ball algorithm in ``u = z/r`` with step ``η/r²``, so
  Assumption 1 keeps the form ``η < 1/β`` in ``z``.
* Loop bounds as printed: phase I makes at most ``N1 + 1`` steps, phase II continues the counter
  (``t' = t .. N2``, none when ``t > N2``). With the paper's ``N1 = N2 = 1`` this is the "1–2 inner
  iterations per subproblem" of §4.
* Armijo constants are not given in the paper; curvlab's [R] defaults are used: ``σ = 1e-4``,
  initial ``α = η``, shrink factor 0.5, at most 20 backtracks. A line search that finds no
  acceptable step (round-off level gradients) ends phase II with status
  ``"line_search_failed"``.
* Optional ``tol`` (default 0 = the paper's fixed ``N1``/``N2``): stop when the gradient (phase
  I) or the Riemannian gradient (phase II) has norm ``≤ tol·‖g‖``.
* Assumption 1 is checked, not assumed: every product gives ``‖H z‖/‖z‖ ≤ ‖H‖``, a lower bound
  β̂ on β at no extra cost (its norm joins the host synchronisation the step makes anyway), and
  ``η·β̂ ≥ 1`` proves the assumption false. The iteration still runs as printed (the paper's
  experiments fix η = 0.1 whatever ‖H‖), but the result has status ``"step_size_too_large"``
  instead of ``"max_iterations"`` / ``"converged"`` / ``"line_search_failed"``, and
  ``info["hessian_norm_bound"]`` = β̂. What then happens: for η ∈ [1/β, 2/β) phase I still
  decreases f, but Thm 3's sign invariant z⁽ⁱ⁾g⁽ⁱ⁾ ≤ 0 can break (factors 1 − ηλᵢ < 0), so the
  global minimiser is no longer guaranteed; for η ≥ 2/β the components with |1 − ηλᵢ| > 1 grow
  geometrically, held in the ball only by the projection, and the returned point can be worse
  than z₀, even f(z) > 0 = f(0) (the caller's ratio test then sees a model that predicts an
  increase). Such growth makes ‖Hz‖/‖z‖ approach the eigenvalue that drives it, so it is always
  reported; a violation that no product reveals (g with no component where |λᵢ| ≥ 1/η) is not.

``variant="code"`` is the released code's loop ([C-TR] ``iter_TR``), which is not
Algorithm 2: ``z = −η g``; then ``N1`` times ``z ← z − (η/2)(H z + g)`` and ``z ← r z/(‖z‖ +
1e-9)`` (always projected onto the sphere; ``N1 = 0`` is a plain SGD step); ``N2`` is ignored.

Products with ``H``: one per phase-I step, one per Armijo trial (the accepted trial's ``H z`` is
reused for the next gradient), plus one for the model value at the returned point when
``compute_model_decrease`` (needed for the reduction ratio of Alg. 1). Host synchronisations: one
per phase-I step (line 4) and one per Armijo trial; the code variant makes none in its loop.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from curvlab.solvers.result import (
    CONVERGED,
    LINE_SEARCH_FAILED,
    MAX_ITERATIONS,
    STEP_SIZE_TOO_LARGE,
    Matvec,
    SolverResult,
    check_iterations,
    check_positive,
    check_vector,
    fetch,
    non_finite_step,
    zero_step,
)

__all__ = ["tr_gd_subproblem"]

Variant = Literal["paper", "code"]

#: [C-TR] ``iter_TR``: ``z = radius * z / (z.norm() + 1e-9)``.
_CODE_NORM_EPS = 1e-9


def _check_open_unit(value: float, name: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return v


def tr_gd_subproblem(
    matvec: Matvec,
    grad: Tensor,
    radius: float,
    *,
    n1: int,
    n2: int,
    step_size: float = 0.1,
    init_scale: float = 0.5,
    armijo_sigma: float = 1e-4,
    armijo_shrink: float = 0.5,
    armijo_max_backtracks: int = 20,
    armijo_initial_step: float | None = None,
    tol: float = 0.0,
    variant: Variant = "paper",
    compute_model_decrease: bool = True,
) -> SolverResult:
    """Approximately minimise ``gᵀz + ½ zᵀHz`` over ``‖z‖ ≤ radius`` ([P3] Alg. 2).

    Args:
        matvec: ``v ↦ H v`` with ``H`` symmetric (indefinite allowed; finite differences of
            gradients in the paper's experiments).
        grad: The gradient ``g``, a flat float32 / float64 tensor.
        radius: Trust-region radius ``r > 0`` (1 in the paper's experiments).
        n1: ``N1``, the last phase-I index (at most ``N1 + 1`` gradient steps).
        n2: ``N2``, the last phase-II index (phase II runs ``t' = t .. N2``).
        step_size: ``η`` of line 5 (Assumption 1: ``η < 1/‖H‖``, checked against the products:
            status ``"step_size_too_large"``; 0.1 in the paper's experiments, 0.01 for
            MobileNet). In ``variant="code"`` the code's ``η'`` (not checked: no assumption).
        init_scale: ``α`` of Assumption 2, in (0, 1); not given by the paper ([R] default 0.5).
        armijo_sigma: ``σ`` of the Armijo condition, in (0, 1) ([R] 1e-4).
        armijo_shrink: Backtracking factor, in (0, 1) ([R] 0.5).
        armijo_max_backtracks: Backtracks per phase-II step ([R] 20).
        armijo_initial_step: First trial ``α`` of each line search (default ``step_size``).
        tol: Optional gradient-norm stopping tolerance relative to ``‖g‖`` (0: off, the paper).
        variant: ``"paper"`` (Alg. 2) or ``"code"`` (the released ``iter_TR`` loop).
        compute_model_decrease: Spend one product with ``H`` at the returned point, if not
            already known, to report ``model_decrease`` and the final gradient norm.

    Returns:
        A :class:`SolverResult`: ``iterations`` counts GD plus Riemannian steps;
        ``residual_norm`` is ``‖Hz + g‖`` for an interior / phase-I result and the Riemannian
        gradient norm on the sphere for a phase-II result (at the last evaluated iterate when
        ``compute_model_decrease`` is off and the final product was skipped); ``model_decrease =
        f(0) − f(z)``; ``info`` has ``"phase1_iterations"``, ``"phase2_iterations"``,
        ``"phase1_norms"`` (``‖z_t‖``, paper variant), ``"matvecs"`` and (paper variant)
        ``"hessian_norm_bound"``, the largest ``‖Hz‖/‖z‖`` of its products (≤ ‖H‖). The status
        is ``"step_size_too_large"`` when ``step_size · hessian_norm_bound ≥ 1`` (Assumption 1
        fails; module docstring), except for ``"non_finite"``.
    """
    check_vector(grad, "grad")
    radius = check_positive(radius, "radius")
    n1 = check_iterations(n1, "n1", 0, minimum=0)
    n2 = check_iterations(n2, "n2", 0, minimum=0)
    eta = check_positive(step_size, "step_size")
    init_scale = _check_open_unit(init_scale, "init_scale")
    armijo_sigma = _check_open_unit(armijo_sigma, "armijo_sigma")
    armijo_shrink = _check_open_unit(armijo_shrink, "armijo_shrink")
    armijo_max_backtracks = check_iterations(
        armijo_max_backtracks, "armijo_max_backtracks", 20, minimum=0
    )
    armijo_step = check_positive(
        eta if armijo_initial_step is None else armijo_initial_step, "armijo_initial_step"
    )
    tol = check_positive(tol, "tol", allow_zero=True)
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")

    g = grad
    g_norm = float(torch.linalg.vector_norm(g))
    if not math.isfinite(g_norm):
        return non_finite_step(g)
    if g_norm == 0.0:
        return zero_step(g, CONVERGED, residual_norm=0.0)
    if variant == "code":
        return _code_variant(matvec, g, radius, n1, eta, compute_model_decrease)

    r2 = radius * radius
    matvecs = 0
    z = g * (-init_scale * radius / g_norm)  # line 1, Assumption 2 (scaled to radius r)
    hz: Tensor | None = None
    norms = [init_scale * radius]
    bound = 0.0  # β̂ = max ‖Hz‖/‖z‖ over the products, a lower bound on β = ‖H‖
    on_sphere = False
    boundary = False  # line 2
    status = MAX_ITERATIONS
    residual = math.inf
    phase1 = phase2 = 0
    t = 0
    while t <= n1:  # line 3
        if on_sphere:  # line 4 is false: ‖z_t‖ ≥ r (the projection was active)
            boundary = True  # line 7
            break  # line 8
        hz = matvec(z)
        matvecs += 1
        grad_f = hz + g
        candidate = z - eta * grad_f  # line 5
        candidate_norm_t = torch.linalg.vector_norm(candidate)
        scale = radius / torch.clamp(candidate_norm_t, min=radius)  # Prox: projection on ball
        candidate_norm, grad_norm, hz_norm = fetch(
            candidate_norm_t, torch.linalg.vector_norm(grad_f), torch.linalg.vector_norm(hz)
        )
        if not (math.isfinite(candidate_norm) and math.isfinite(grad_norm)):
            return non_finite_step(g, iterations=phase1, matvecs=matvecs)
        bound = max(bound, hz_norm / norms[-1])  # Assumption 1: ‖H z_t‖/‖z_t‖ ≤ β
        residual = grad_norm
        if grad_norm <= tol * g_norm:  # optional early stop at z_t (H z_t is known)
            status = CONVERGED
            break
        z = candidate * scale
        hz = None
        on_sphere = candidate_norm >= radius
        norms.append(min(candidate_norm, radius))
        phase1 += 1
        t += 1

    f_value: float | None = None
    if boundary:
        if hz is None:
            hz = matvec(z)
            matvecs += 1
        f = 0.5 * (z @ hz) + g @ z
        status = MAX_ITERATIONS
        for _ in range(t, n2 + 1):  # line 13
            grad_f = hz + g
            grad_r = grad_f - ((z @ grad_f) / r2) * z  # (I − z zᵀ/r²)(H z + g)
            grad_r2_t = grad_r @ grad_r
            alpha = armijo_step
            accepted = False
            for _ in range(armijo_max_backtracks + 1):  # line 14: Armijo backtracking
                trial = z - alpha * grad_r
                trial = trial * (radius / torch.linalg.vector_norm(trial))  # line 15 (retraction)
                hz_trial = matvec(trial)
                matvecs += 1
                f_trial_t = 0.5 * (trial @ hz_trial) + g @ trial
                f_trial, f_now, grad_r2, hz_norm, hz_trial_norm = fetch(
                    f_trial_t,
                    f,
                    grad_r2_t,
                    torch.linalg.vector_norm(hz),
                    torch.linalg.vector_norm(hz_trial),
                )
                if not (math.isfinite(f_trial) and math.isfinite(f_now)):
                    return non_finite_step(g, iterations=phase1 + phase2, matvecs=matvecs)
                bound = max(bound, hz_norm / radius, hz_trial_norm / radius)  # on the sphere
                residual = math.sqrt(grad_r2)
                if residual <= tol * g_norm or grad_r2 == 0.0:
                    status = CONVERGED
                    break
                if f_trial <= f_now - armijo_sigma * alpha * grad_r2:
                    accepted = True
                    break
                alpha *= armijo_shrink
            if status == CONVERGED:
                break
            if not accepted:
                status = LINE_SEARCH_FAILED
                break
            z, hz, f = trial, hz_trial, f_trial_t
            phase2 += 1
        if status == MAX_ITERATIONS and compute_model_decrease:  # gradient at the last iterate
            grad_f = hz + g
            grad_r = grad_f - ((z @ grad_f) / r2) * z
            f_value, residual = fetch(f, torch.linalg.vector_norm(grad_r))
        elif compute_model_decrease:
            f_value = float(f)
    elif compute_model_decrease:
        if hz is None:
            hz = matvec(z)
            matvecs += 1
        f_value, residual, hz_norm, z_norm = fetch(
            0.5 * (z @ hz) + g @ z,
            torch.linalg.vector_norm(hz + g),
            torch.linalg.vector_norm(hz),
            torch.linalg.vector_norm(z),
        )
        if z_norm > 0.0:
            bound = max(bound, hz_norm / z_norm)
    if f_value is not None and not (math.isfinite(f_value) and math.isfinite(residual)):
        return non_finite_step(g, iterations=phase1 + phase2, matvecs=matvecs)
    if eta * bound >= 1.0:  # Assumption 1 (η < 1/β) is false: say so (module docstring)
        status = STEP_SIZE_TOO_LARGE

    return SolverResult(
        solution=z,
        iterations=phase1 + phase2,
        residual_norm=residual,
        status=status,
        hit_boundary=boundary or on_sphere,
        model_decrease=None if f_value is None else -f_value,
        info={
            "phase1_iterations": phase1,
            "phase2_iterations": phase2,
            "phase1_norms": norms,
            "matvecs": matvecs,
            "hessian_norm_bound": bound,
        },
    )


def _code_variant(
    matvec: Matvec, g: Tensor, radius: float, n_inner: int, eta: float, model: bool
) -> SolverResult:
    """[C-TR] ``iter_TR``: ``z = −η g``; ``n_inner`` × (half GD step, projection on sphere)."""
    z = -eta * g
    matvecs = 0
    grad_norm_t = torch.linalg.vector_norm(g)
    for _ in range(n_inner):
        grad_f = matvec(z) + g
        matvecs += 1
        grad_norm_t = torch.linalg.vector_norm(grad_f)
        z = z - (0.5 * eta) * grad_f
        z = z * (radius / (torch.linalg.vector_norm(z) + _CODE_NORM_EPS))
    values = [grad_norm_t, torch.linalg.vector_norm(z)]
    if model:
        hz = matvec(z)
        matvecs += 1
        values = [torch.linalg.vector_norm(hz + g), 0.5 * (z @ hz) + g @ z]
    first, second = fetch(*values)
    if not (math.isfinite(first) and math.isfinite(second)):
        return non_finite_step(g, iterations=n_inner, matvecs=matvecs)
    return SolverResult(
        solution=z,
        iterations=n_inner,
        residual_norm=first,
        status=MAX_ITERATIONS,
        hit_boundary=n_inner > 0,
        model_decrease=-second if model else None,
        info={"phase1_iterations": n_inner, "phase2_iterations": 0, "matvecs": matvecs},
    )
