r"""Ellipsoidal trust region with uniform / Adagrad / RMSProp norms (seed 002).

Kohler, Adolphs & Lucchi, "Adaptive norms for deep learning with regularized Newton methods"
(seed 002, arXiv 1905.09201); [C-AN] below (docs/deviations.md) is the authors' released code
(github.com/jonaskohler/AdaptiveNormsNewton: ``trust_region.py``, ``stcg.py``, the parameter
files). The step minimises the second-order model in an ellipsoid shaped by an
adaptive-gradient preconditioner (eq. 7)::

    s_t ≈ argmin_s  m_t(s) = g_tᵀs + ½ sᵀB_t s   s.t.  ‖s‖_{A_t} ≤ Δ_t,   ‖s‖²_A = sᵀA s

Algorithm (seed 002 Alg. 1 and App. F.1, in the practical form [C-AN] runs; the statement of
Alg. 1 is lost from the paper's text, its form follows the framework of Yao et al. that §4
adapts, the paper's [68])::

    1  Input θ_0, Δ_0, 0 ≤ η₁ ≤ η₂ < 1, γ₁ ≥ 1, γ₂ > 1, Δ_max
    2  for t = 0, 1, …:
    3      one mini-batch: g_t = ∇L(θ_t), B_t = ∇²L(θ_t) by products (same batch throughout)
    4      update A_t with g_t                                            (§3 eqs. 2–3, below)
    5      s_t ≈ argmin m_t(s) s.t. ‖s‖_{A_t} ≤ Δ_t by preconditioned Steihaug–Toint CG
           with preconditioner A_t⁻¹ ("the same matrix as for the ellipsoidal constraint",
           App. F.2) and the stopping rule Eq. 52: ‖∇m(s)‖ ≤ ‖g‖·min(κ, ‖g‖^{1/2})
    6      ρ_t = (L(θ_t) − L(θ_t + s_t)) / (m_t(0) − m_t(s_t))            (same mini-batch)
    7      ρ_t ≥ η₂:       θ_{t+1} = θ_t + s_t,  Δ_{t+1} = min(γ₁Δ_t, Δ_max)   (very successful)
    8      η₁ ≤ ρ_t < η₂:  θ_{t+1} = θ_t + s_t,  Δ_{t+1} = Δ_t                   (successful)
    9      ρ_t < η₁:       θ_{t+1} = θ_t,        Δ_{t+1} = Δ_t / γ₂              (unsuccessful)

Norm matrices, diagonal versions (seed 002 §3: "diagonal preconditioning … in all of our
experiments"; A_t = diag(M_t), the TR norm is ‖s‖²_A = Σ M_i s_i², as in [C-AN])::

    uniform:  M = 1                                              (spherical TR)
    Adagrad:  M_t = sqrt(Σ_{i≤t} g_i² + ε)                       (eq. 2, A = (G_t + εI)^{1/2})
    RMSProp:  M_t = sqrt((1−β) Σ_{i≤t} β^{t−i} g_i² + ε)         (eq. 3, A = ((1−β)G_t + εI)^{1/2})

kept as accumulators v_t = v_{t−1} + g_t² (Adagrad) or v_t = β v_{t−1} + (1−β) g_t² (RMSProp),
v_0 = 0, M_t = sqrt(v_t + ε) (``eps_mode="paper"``). The released code ([C-AN]
``AdagradPreconditioning`` / ``RMSPreconditioning``) starts from v_0 = ε and takes M = sqrt(v_t),
so for RMSProp its ε decays as β^t ε (``eps_mode="code"``; identical for Adagrad).

Defaults (seed 002 App. J, Table 1, the MLP row of each norm; its header is lost from the text,
the columns are named by matching their values with [C-AN]'s MLP parameter files):
Δ_max = 10, η₂ = 0.95, γ₁ = 1.1, γ₂ = 1.5 (uniform, Adagrad) or 1.75 (RMSProp), κ = 0.1. The
lost columns come from the released MLP configs [C-AN]: Δ_0 = 0.05 (uniform, Adagrad) or 1e-4
(RMSProp), η₁ = 0.01, ε = 1e-10, β = 0.8, at most 50 CG iterations. Exact Hessian-vector
products (Pearlmutter 1994, the paper's [55]) as in its experiments; the GGN is an option ("it is
straightforward to replace the Hessian in the TR framework with the GGN matrix", §2).

Options and deviations:

* ``stopping="model_decrease"``: the released code's CG rule (every parameter file sets
  ``precon_stopping_criterion``), which contradicts the paper's Eq. 52 (named in §5 and App. F.2).
* Extension: ``lr`` scales the step (θ ← θ + lr·s, trial loss and predicted reduction taken at
  lr·s); the paper has no learning rate, the default 1.0 is the paper's method. It lets LR
  schedulers act (lr = 0 freezes θ; the step control then keeps Δ, since nothing was measured).
* ρ (line 6) is computed by `ModelwiseOptimizer.step` (`curvlab.optim.control.reduction_ratio`):
  a non-finite trial loss gives ρ = −∞ (reject, shrink). Deviation: [C-AN] sets ρ := 1 when
  |m(0) − m(s)| < 1e-15; here ρ = 1 unless the trial loss went up (then ρ = −∞), because
  accepting a step that increased the loss and enlarging Δ after it is not what the guard
  (round-off protection) is for. Deviation: m(0) − m(s) ≤ −1e-15 (possible with ``lr`` > 1, or
  a solver failure; Steihaug–Toint CG decreases m from 0) gives ρ = −∞ where line 6 and [C-AN]
  divide whatever the sign (docs/deviations.md, "A model that predicts no decrease").
* Non-finite curvature products (solver status ``"non_finite"``, a zero step): the step is
  rejected and Δ kept (the radius did not cause it); ``last_step_info["rho"]`` is NaN.
* Not implemented (extras of [C-AN] that the paper does not describe): the pivot check on the
  full training loss every ``pivot_k`` epochs with batch growth, the first-order warm-start
  epochs (use `curvlab.optim.TwoStage`), and the released code's L2 term ``l2_alpha·Σ‖W‖₂``
  (add regularisation to the loss instead).
* Cost: line 3's curvature operator is built once per step and its build is also the gradient
  pass (`AdaptiveNormNewton.evaluate` takes the loss and g_t from it, so ``.grad`` is not
  filled): one gradient + k products + one trial forward per step. The operator's passes are
  functional (the global RNG not advanced; BatchNorm running statistics move only in the build,
  once per step, as in a training pass); for a model whose training pass draws random numbers
  (`curvlab.optim.modelwise.has_random_forward`: dropout) the ordinary training pass (the
  closure) gives loss and g_t and the operator is built after it (one gradient more), with the
  closure's dropout masks, which the trial loss of line 6 replays too
  (`ModelwiseOptimizer.step_randomness`: ρ_t compares one sampled network). The operator is
  dropped at the end of ``step``: no autograd graph outlives a step.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from curvlab.autodiff import CurvatureOperator
from curvlab.objective import Objective
from curvlab.optim.control import (
    StepControl,
    scaled_model_decrease,
    trust_region_update,
)
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal, has_random_forward
from curvlab.optim.validation import check_choice, check_int, check_range
from curvlab.solvers import steihaug_cg
from curvlab.solvers.result import NON_FINITE

__all__ = [
    "CURVATURES",
    "NORMS",
    "EllipsoidalTR",
    "norm_matrix_diagonal",
    "update_second_moment",
]

Norm = Literal["uniform", "adagrad", "rmsprop"]
EpsMode = Literal["paper", "code"]
Curvature = Literal["hessian", "ggn"]
Stopping = Literal["paper", "model_decrease"]

NORMS: tuple[str, ...] = ("uniform", "adagrad", "rmsprop")
EPS_MODES: tuple[str, ...] = ("paper", "code")
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
STOPPINGS: tuple[str, ...] = ("paper", "model_decrease")

#: Seed 002 Table 1's rows (γ₂) and [C-AN]'s MLP parameter files (Δ_0), per norm.
DEFAULT_RADIUS = {"uniform": 0.05, "adagrad": 0.05, "rmsprop": 1e-4}
DEFAULT_DECREASE = {"uniform": 1.5, "adagrad": 1.5, "rmsprop": 1.75}


# --------------------------------------------------------------------------- norm matrices
def update_second_moment(
    moment: Tensor | None, grad: Tensor, norm: str, *, beta: float, eps: float, eps_mode: str
) -> Tensor | None:
    """The accumulator v_t of the Adagrad / RMSProp ellipsoid after seeing ``grad`` (g_t).

    ``moment`` is v_{t−1} (None before the first step: v_0 = 0, or ε·1 with ``eps_mode="code"``).
    Adagrad: v_t = v_{t−1} + g_t² (eq. 2, diagonal); RMSProp: v_t = β v_{t−1} + (1−β) g_t²
    (eq. 3, diagonal). Returns None for the uniform norm (no accumulator). Pure: returns a new
    tensor.
    """
    if norm == "uniform":
        return None
    if moment is None:
        moment = torch.full_like(grad, eps) if eps_mode == "code" else torch.zeros_like(grad)
    square = grad * grad
    if norm == "adagrad":
        return moment + square
    return beta * moment + (1.0 - beta) * square


def norm_matrix_diagonal(
    moment: Tensor | None, norm: str, *, eps: float, eps_mode: str
) -> Tensor | None:
    """The diagonal M of A_t = diag(M) from the accumulator (None: uniform, M = 1).

    ``eps_mode="paper"``: M = sqrt(v + ε) (eqs. 2–3, εI inside the root at every step);
    ``"code"``: M = sqrt(v) with v_0 = ε ([C-AN]).

    Deviation: with ``"code"`` the RMSProp ε decays as β^t ε for a coordinate whose gradient
    stays 0 and underflows (to 0 where denormals are flushed; float32 after ~360 steps), and an
    ε below the dtype's range vanishes in ``"paper"`` mode; the radicand is floored at the
    dtype's smallest normal number so that the norm stays positive definite.
    """
    if norm == "uniform" or moment is None:
        return None
    radicand = moment + eps if eps_mode == "paper" else moment
    return torch.sqrt(radicand.clamp_min(torch.finfo(moment.dtype).tiny))


# --------------------------------------------------------------------------- validation
def check_shared_hyperparameters(group: dict[str, Any]) -> None:
    """Hyperparameters shared by `EllipsoidalTR` and `curvlab.optim.arc.ARC`."""
    check_range("lr", group["lr"], 0.0)
    check_choice("norm", group["norm"], NORMS)
    check_range("beta", group["beta"], 0.0, 1.0, high_open=True)
    check_range("eps", group["eps"], 0.0, low_open=True)
    check_choice("eps_mode", group["eps_mode"], EPS_MODES)
    check_choice("curvature", group["curvature"], CURVATURES)
    check_range("krylov_tol", group["krylov_tol"], 0.0)
    check_int("max_krylov_dim", group["max_krylov_dim"], 1)
    eta1 = check_range("eta1", group["eta1"], 0.0, 1.0, high_open=True)
    check_range("eta2", group["eta2"], eta1, 1.0, high_open=True)


def _check_trust_region(group: dict[str, Any]) -> None:
    check_shared_hyperparameters(group)
    check_range("radius", group["radius"], 0.0, low_open=True)
    check_range("max_radius", group["max_radius"], 0.0, low_open=True)
    check_range("increase", group["increase"], 1.0)
    check_range("decrease", group["decrease"], 1.0, low_open=True)
    check_choice("stopping", group["stopping"], STOPPINGS)


# --------------------------------------------------------------------------- shared base
class AdaptiveNormNewton(ModelwiseOptimizer):
    """Shared parts of seed 002's regularised Newton methods (ellipsoidal TR, ARC twin).

    Holds the adaptive norm (accumulator in ``global_state["second_moment"]``), builds the
    curvature operator of the step, keeps the cost counters and runs lines 7–9 (`control`): the
    accept / reject decision and the update of the quantity they adapt, Δ_t or σ_t, kept in
    ``global_state[_control_key]``. Subclasses supply `propose` (which takes the step's operator
    from `_step_operator`), ``_control_key`` and the rule of `curvlab.optim.control` (`_rule`).

    `evaluate` takes loss and gradient from the operator's build (line 3), so ``step`` does not
    fill ``.grad`` (except for a model with a stateful training pass, see the module docstring).
    """

    #: The quantity lines 7–9 adapt, ``"radius"`` (Δ_t) or ``"sigma"`` (σ_t): its key in
    #: ``global_state`` and in the group (its initial value); ``last_step_info`` reports the
    #: value used under this key (`propose`) and the next one as ``next_<key>``.
    _control_key: ClassVar[str]

    def __init__(self, params: Iterable[Any] | nn.Module, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._operator: CurvatureOperator | None = None

    @property
    def uses_trial_loss(self) -> bool:
        return True

    def end_step(self) -> None:
        self._operator = None  # no autograd graph outlives the step

    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Line 3: loss and g_t from the build of the step's curvature operator (one gradient
        pass, which moves BatchNorm running statistics once; ``.grad`` is not filled), or from
        the closure for a random training pass (dropout)."""
        if has_random_forward(objective.model):
            return super().evaluate(objective)  # the operator is built in `propose`
        self._operator = self._build_operator(objective, self.param_groups[0], update_buffers=True)
        return self._operator.loss, self._operator.gradient()

    def _step_operator(self, objective: Objective, group: dict[str, Any]) -> CurvatureOperator:
        """The operator built by `evaluate`, or built now (closure path)."""
        if self._operator is None:
            self._operator = self._build_operator(objective, group)
        return self._operator

    def _norm_matrix(self, grad: Tensor, group: dict[str, Any]) -> Tensor | None:
        """Line 4: update the accumulator with g_t and return the diagonal M of A_t."""
        state = self.global_state
        moment = update_second_moment(
            state.get("second_moment"),
            grad,
            group["norm"],
            beta=float(group["beta"]),
            eps=float(group["eps"]),
            eps_mode=group["eps_mode"],
        )
        if moment is None:
            return None
        state["second_moment"] = moment
        return norm_matrix_diagonal(
            moment, group["norm"], eps=float(group["eps"]), eps_mode=group["eps_mode"]
        )

    def _build_operator(
        self, objective: Objective, group: dict[str, Any], update_buffers: bool = False
    ) -> CurvatureOperator:
        """Line 3: B_t as products on this mini-batch (exact Hessian or GGN), built once."""
        return self.curvature_operator(objective, group["curvature"], update_buffers=update_buffers)

    def _control_value(self) -> float:
        """Δ_t or σ_t (``_control_key``); before the first step the group's initial value."""
        key = self._control_key
        return float(self.global_state.setdefault(key, float(self.param_groups[0][key])))

    @abstractmethod
    def _rule(self, value: float, rho: float, group: dict[str, Any]) -> StepControl:
        """Lines 7–9's rule of `curvlab.optim.control` for the adapted quantity at ρ_t."""

    def control(self, rho: float, proposal: Proposal) -> bool:
        """Lines 7–9: accept or reject on ρ_t and update Δ_t or σ_t by `_rule`.

        Non-finite curvature products (solver status ``"non_finite"``) reject the step and keep
        the value (it did not cause them); ``lr = 0`` (the extension's frozen step) accepts and
        keeps it, since nothing was measured.
        """
        group = self.param_groups[0]
        info = proposal.info
        value = self._control_value()
        next_key = f"next_{self._control_key}"
        if info["solver_status"] == NON_FINITE:
            info.update({next_key: value, "outcome": "non_finite"})
            return False
        if float(group["lr"]) == 0.0:  # extension: a frozen step measures nothing
            info.update({next_key: value, "outcome": "frozen"})
            return True
        update = self._rule(value, rho, group)
        self.global_state[self._control_key] = update.value
        info.update({next_key: update.value, "outcome": update.outcome})
        return update.accepted

    def _count(self, products: int, iterations: int) -> None:
        state = self.global_state
        state["curvature_products"] = int(state.get("curvature_products", 0)) + products
        state["solver_iterations"] = int(state.get("solver_iterations", 0)) + iterations

    @staticmethod
    def _predicted(
        lr: float, model_decrease: float, linear: float, cubic: float = 0.0
    ) -> float | None:
        """m(0) − m(lr·s) from the solver's m(0) − m(s), None if not finite; the ρ guards
        (round-off, no predicted decrease) are `control.reduction_ratio`'s (see module)."""
        if lr == 1.0:
            predicted = model_decrease
        else:
            quadratic = -model_decrease - linear - cubic  # ½ sᵀBs
            predicted = scaled_model_decrease(lr, linear, quadratic, cubic)
        return predicted if math.isfinite(predicted) else None


class EllipsoidalTR(AdaptiveNormNewton):
    """Seed 002's stochastic ellipsoidal trust-region method (see the module docstring).

    Args:
        model: the network (or an iterable of its parameters); one parameter group.
        lr: step scale, an extension (default 1.0 = the paper's method).
        norm: ``"rmsprop"`` (default; the paper's recommended ellipsoid, covered by Lemma 2),
            ``"adagrad"`` or ``"uniform"`` (spherical TR).
        radius: initial radius Δ_0; None: 0.05 (uniform, Adagrad) or 1e-4 (RMSProp) [C-AN].
        max_radius: Δ_max (Table 1: 10).
        eta1: success threshold η₁ ([C-AN]: 0.01).
        eta2: very-successful threshold η₂ (Table 1: 0.95).
        increase: γ₁, Δ ← min(γ₁Δ, Δ_max) after a very successful step (Table 1: 1.1).
        decrease: γ₂, Δ ← Δ/γ₂ after an unsuccessful one; None: 1.5 (uniform, Adagrad) or
            1.75 (RMSProp) (Table 1).
        krylov_tol: κ of the CG stopping rule (Table 1 "krylov tol.": 0.1).
        max_krylov_dim: CG iteration cap ([C-AN] configs: 50).
        stopping: ``"paper"`` (Eq. 52) or ``"model_decrease"`` (released code).
        beta: RMSProp decay β ([C-AN]: 0.8).
        eps: ε of the norm matrices ([C-AN] MLP configs: 1e-10).
        eps_mode: ``"paper"`` (ε inside the root every step) or ``"code"`` (v_0 = ε).
        curvature: ``"hessian"`` (exact, default) or ``"ggn"``.

    ``last_step_info`` (besides the base's ``rho``, ``accepted``, ``loss``, ``trial_loss``,
    ``step_norm``): ``radius`` (Δ_t used), ``next_radius``, ``outcome``, ``solver_status``,
    ``solver_iterations``, ``hit_boundary``, ``model_decrease`` (m(0) − m(s)),
    ``predicted_reduction`` (at lr·s), ``residual_norm`` (‖g + Bs‖), ``curvature_products``.

    Loss and gradient come from the curvature operator's build (`AdaptiveNormNewton.evaluate`):
    ``step`` does not fill ``.grad`` (it does for a model with BatchNorm or dropout).
    """

    _control_key = "radius"

    def __init__(
        self,
        model: nn.Module | Iterable[Any],
        lr: float = 1.0,
        norm: Norm = "rmsprop",
        radius: float | None = None,
        max_radius: float = 10.0,
        eta1: float = 0.01,
        eta2: float = 0.95,
        increase: float = 1.1,
        decrease: float | None = None,
        krylov_tol: float = 0.1,
        max_krylov_dim: int = 50,
        stopping: Stopping = "paper",
        beta: float = 0.8,
        eps: float = 1e-10,
        eps_mode: EpsMode = "paper",
        curvature: Curvature = "hessian",
    ) -> None:
        check_choice("norm", norm, NORMS)
        defaults: dict[str, Any] = dict(
            lr=lr,
            norm=norm,
            radius=DEFAULT_RADIUS[norm] if radius is None else radius,
            max_radius=max_radius,
            eta1=eta1,
            eta2=eta2,
            increase=increase,
            decrease=DEFAULT_DECREASE[norm] if decrease is None else decrease,
            krylov_tol=krylov_tol,
            max_krylov_dim=max_krylov_dim,
            stopping=stopping,
            beta=beta,
            eps=eps,
            eps_mode=eps_mode,
            curvature=curvature,
        )
        _check_trust_region(defaults)
        super().__init__(model, defaults)

    @property
    def radius(self) -> float:
        """The current trust-region radius Δ_t."""
        return self._control_value()

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        _check_trust_region(group)

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Lines 3–5: curvature products, the ellipsoid A_t, the Steihaug–Toint CG step."""
        group = self.param_groups[0]
        radius = self.radius
        norm_diag = self._norm_matrix(grad, group)  # line 4 (A_t includes g_t, eqs. 2–3)
        operator = self._step_operator(objective, group)  # line 3
        # line 5: preconditioner A_t⁻¹, ‖s‖_{A_t} ≤ Δ_t, Eq. 52 (or the released code's rule)
        result = steihaug_cg(
            operator.matvec,
            grad,
            radius,
            norm_matrix_diag=norm_diag,
            tol=float(group["krylov_tol"]),
            max_iters=int(group["max_krylov_dim"]),
            stopping=group["stopping"],
        )
        self._count(operator.products, result.iterations)
        lr = float(group["lr"])
        info: dict[str, Any] = {
            "radius": radius,
            "solver_status": result.status,
            "solver_iterations": result.iterations,
            "hit_boundary": result.hit_boundary,
            "model_decrease": result.model_decrease,
            "residual_norm": result.residual_norm,
            "curvature_products": operator.products,
        }
        if result.status == NON_FINITE or result.model_decrease is None:
            info.update(rho=math.nan, predicted_reduction=None)
            return Proposal(torch.zeros_like(grad), None, info)
        step = result.solution
        predicted = self._predicted(lr, result.model_decrease, float(grad @ step))
        info["predicted_reduction"] = predicted
        return Proposal(lr * step, predicted, info)

    def _rule(self, value: float, rho: float, group: dict[str, Any]) -> StepControl:
        """Lines 7–9's rule for Δ_t: `control.trust_region_update`."""
        return trust_region_update(
            value,
            rho,
            eta1=float(group["eta1"]),
            eta2=float(group["eta2"]),
            increase=float(group["increase"]),
            decrease=float(group["decrease"]),
            max_radius=float(group["max_radius"]),
        )
