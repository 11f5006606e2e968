r"""ARC with the ellipsoidal norms of seed 002: the cubic-regularisation twin of `EllipsoidalTR`.

Seed 002 gives no ARC algorithm; it only says that "the use of matrix induced norms can directly
be transferred to the cubic regularization framework" (§4, footnote 5). This is therefore a
reconstruction, not the paper's method: Cartis, Gould & Toint's adaptive cubic regularisation
(ARC, Math. Prog. 127, 2011) with the cubic term measured in the A_t-norm, the update rule and
defaults of the same group's sub-sampled cubic regularisation code ([C-SCR], docs/deviations.md:
github.com/dalab/subsampled_cubic_regularization, ``scr.py``)::

    1  Input θ_0, σ_0 > 0, 0 ≤ η₁ ≤ η₂ < 1, γ₁ ≥ 1, γ₂ ≥ 1, σ_min
    2  for t = 0, 1, …:
    3      one mini-batch: g_t = ∇L(θ_t), B_t = ∇²L(θ_t) by products (same batch throughout)
    4      update A_t = diag(M_t) with g_t                   (uniform / Adagrad / RMSProp, as TR)
    5      s_t ≈ argmin m_t(s) = g_tᵀs + ½ sᵀB_t s + (σ_t/3) ‖s‖³_{A_t}
           by Lanczos in the variables u = A_t^{1/2} s (`curvlab.solvers.cubic_subproblem`),
           stopped when ‖∇m‖ ≤ min(κ, ‖u‖/max(1, σ_t))·‖A_t^{-1/2} g_t‖  ([C-SCR])
    6      ρ_t = (L(θ_t) − L(θ_t + s_t)) / (m_t(0) − m_t(s_t))   (cubic term included, [C-SCR])
    7      ρ_t ≥ η₂:       accept,  σ_{t+1} = max(σ_t/γ₂, σ_min)     (very successful)
    8      η₁ ≤ ρ_t < η₂:  accept,  σ_{t+1} = σ_t                     (successful)
    9      ρ_t < η₁:       reject,  σ_{t+1} = γ₁ σ_t                  (unsuccessful)

Defaults ([C-SCR]): σ_0 = 1, η₁ = 0.1, η₂ = 0.9, γ₁ = γ₂ = 2, σ_min = 1e-16, κ = 0.1. The norm
matrices, their defaults (β = 0.8, ε = 1e-10, ``eps_mode``), the curvature choice, the ``lr``
extension, the ρ guard, the handling of non-finite products and the cost per step (the
operator's build is the gradient pass) are those of `curvlab.optim.trust_region` (see its
docstring); the Krylov cap is 50 products as for TR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.objective import Objective
from curvlab.optim.control import StepControl, arc_sigma_update
from curvlab.optim.modelwise import Proposal
from curvlab.optim.trust_region import (
    NORMS,
    AdaptiveNormNewton,
    Curvature,
    EpsMode,
    Norm,
    check_shared_hyperparameters,
)
from curvlab.optim.validation import check_choice, check_range
from curvlab.solvers import cubic_subproblem
from curvlab.solvers.result import NON_FINITE

__all__ = ["ARC"]


def _check_arc(group: dict[str, Any]) -> None:
    check_shared_hyperparameters(group)
    check_range("sigma", group["sigma"], 0.0, low_open=True)
    check_range("min_sigma", group["min_sigma"], 0.0, low_open=True)
    check_range("increase", group["increase"], 1.0)
    check_range("decrease", group["decrease"], 1.0)


class ARC(AdaptiveNormNewton):
    """Adaptive cubic regularisation in the uniform / Adagrad / RMSProp norm (module docstring).

    Args:
        model: the network (or an iterable of its parameters); one parameter group.
        lr: step scale, an extension (default 1.0 = the method as stated).
        norm: ``"rmsprop"`` (default), ``"adagrad"`` or ``"uniform"`` (plain ARC).
        sigma: initial regularisation σ_0 ([C-SCR]: 1).
        min_sigma: floor σ_min of the decrease ([C-SCR]: 1e-16).
        eta1: success threshold η₁ ([C-SCR]: 0.1).
        eta2: very-successful threshold η₂ ([C-SCR]: 0.9).
        increase: γ₁, σ ← γ₁σ after an unsuccessful step ([C-SCR]: 2).
        decrease: γ₂, σ ← max(σ/γ₂, σ_min) after a very successful step ([C-SCR]: 2).
        krylov_tol: κ of the Lanczos stopping rule ([C-SCR]: 0.1).
        max_krylov_dim: Lanczos dimension cap (50).
        beta, eps, eps_mode, curvature: as for `curvlab.optim.trust_region.EllipsoidalTR`.

    ``last_step_info`` (besides the base's ``rho``, ``accepted``, ``loss``, ``trial_loss``,
    ``step_norm``): ``sigma`` (σ_t used), ``next_sigma``, ``outcome``, ``solver_status``,
    ``solver_iterations``, ``model_decrease`` (m(0) − m(s), cubic term included),
    ``predicted_reduction`` (at lr·s), ``residual_norm``, ``multiplier`` (σ‖s‖_A),
    ``hard_case``, ``curvature_products``.

    Loss and gradient come from the curvature operator's build (`AdaptiveNormNewton.evaluate`):
    ``step`` does not fill ``.grad`` (it does for a model with BatchNorm or dropout).
    """

    _control_key = "sigma"

    def __init__(
        self,
        model: nn.Module | Iterable[Any],
        lr: float = 1.0,
        norm: Norm = "rmsprop",
        sigma: float = 1.0,
        min_sigma: float = 1e-16,
        eta1: float = 0.1,
        eta2: float = 0.9,
        increase: float = 2.0,
        decrease: float = 2.0,
        krylov_tol: float = 0.1,
        max_krylov_dim: int = 50,
        beta: float = 0.8,
        eps: float = 1e-10,
        eps_mode: EpsMode = "paper",
        curvature: Curvature = "hessian",
    ) -> None:
        check_choice("norm", norm, NORMS)
        defaults: dict[str, Any] = dict(
            lr=lr,
            norm=norm,
            sigma=sigma,
            min_sigma=min_sigma,
            eta1=eta1,
            eta2=eta2,
            increase=increase,
            decrease=decrease,
            krylov_tol=krylov_tol,
            max_krylov_dim=max_krylov_dim,
            beta=beta,
            eps=eps,
            eps_mode=eps_mode,
            curvature=curvature,
        )
        _check_arc(defaults)
        super().__init__(model, defaults)

    @property
    def sigma(self) -> float:
        """The current regularisation weight σ_t."""
        return self._control_value()

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        _check_arc(group)

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Lines 3–5: curvature products, the ellipsoid A_t, the cubic step by Lanczos."""
        group = self.param_groups[0]
        sigma = self.sigma
        norm_diag = self._norm_matrix(grad, group)  # line 4
        operator = self._step_operator(objective, group)  # line 3
        result = cubic_subproblem(  # line 5
            operator.matvec,
            grad,
            sigma,
            norm_matrix_diag=norm_diag,
            max_iters=int(group["max_krylov_dim"]),
            tol=float(group["krylov_tol"]),
        )
        self._count(operator.products, result.iterations)
        info: dict[str, Any] = {
            "sigma": sigma,
            "solver_status": result.status,
            "solver_iterations": result.iterations,
            "model_decrease": result.model_decrease,
            "residual_norm": result.residual_norm,
            "multiplier": result.info.get("lambda"),
            "hard_case": result.info.get("hard_case"),
            "curvature_products": operator.products,
        }
        if result.status == NON_FINITE or result.model_decrease is None:
            info.update(rho=math.nan, predicted_reduction=None)
            return Proposal(torch.zeros_like(grad), None, info)
        step = result.solution
        weights = torch.ones_like(step) if norm_diag is None else norm_diag
        norm = math.sqrt(float((weights * step * step).sum()))  # ‖s‖_{A_t}
        lr = float(group["lr"])
        predicted = self._predicted(  # line 6's denominator at lr·s, cubic term included
            lr, result.model_decrease, float(grad @ step), sigma / 3.0 * norm**3
        )
        info["predicted_reduction"] = predicted
        return Proposal(lr * step, predicted, info)

    def _rule(self, value: float, rho: float, group: dict[str, Any]) -> StepControl:
        """Lines 7–9's rule for σ_t: `control.arc_sigma_update`."""
        return arc_sigma_update(
            value,
            rho,
            eta1=float(group["eta1"]),
            eta2=float(group["eta2"]),
            increase=float(group["increase"]),
            decrease=float(group["decrease"]),
            min_sigma=float(group["min_sigma"]),
        )
