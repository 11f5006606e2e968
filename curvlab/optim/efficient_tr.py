r"""Efficient trust region (Liu, Lee & Hsieh, [P3]) and its Hybrid TR → SGD method.

"Better Generalization by Efficient Trust Region Method" ([P3]; source labels such as [P3],
[C-TR] and [R]: docs/deviations.md), Algorithm 1 (the outer loop) with the subproblem solved by
its Algorithm 2 (`curvlab.solvers.tr_gd_subproblem`)::

    Algorithm 1 (Stochastic) trust region method
    Input: F, ∇F, ∇²F or their stochastic counterparts; initial guess x⁰, radius r₀
    1  for t = 0, 1, …, N do
    2      g = ∇F(x_t), H = ∇²F(x_t)                   (sub-sampled on the mini-batch, §4.2)
    3      f(z) = ½ zᵀHz + gᵀz,  min over ‖z‖₂ ≤ r_t    (eq. 1)
    4      solve (1) for z_t (Alg 2); q_t = (F(x_t) − F(x_t + z_t)) / (f(0) − f(z_t))
    5      (deterministic) q_t ≥ 0.9: x_{t+1} = x_t + z_t, r_{t+1} = 2 r_t
                           q_t ≥ 0.1: x_{t+1} = x_t + z_t, r_{t+1} = r_t
                           q_t < 0.1: x_{t+1} = x_t,       r_{t+1} = 0.5 r_t
    6      (stochastic)    q_t ≥ 0.9 and ‖g‖ ≥ r_t: x_{t+1} = x_t + z_t,
                                                    r_{t+1} = min{2 r_t, r_max}
                           otherwise:               x_{t+1} = x_t, r_{t+1} = 0.5 r_t
    7  end for
    8  return x_{N+1}

    Algorithm 2 (line 4): z₀ = −α g/‖g‖; at most N1 + 1 GD steps z ← z − η(Hz + g) while
    inside the ball; once on the sphere, Riemannian GD steps up to index N2 with Armijo line
    search and the retraction z ↦ r z/‖z‖ (see `curvlab.solvers.tr_gd`).

`EfficientTR` is Algorithm 1 on `curvlab.optim.modelwise.ModelwiseOptimizer` (the base
evaluates F(x_t + z_t) on the same mini-batch, forms q_t = ρ and leaves the parameters exactly
as they were on a rejected step). Per step: one curvature operator
(`curvlab.autodiff.curvature_operator`, built once and reused by every solver iteration) whose
build is also the gradient pass of line 2 (`evaluate`: loss and g come from it, ``.grad`` is not
filled), the solver (one product per GD step / Armijo trial, one more for f(z_t)), and one
trial forward. The radius rules of lines 5–6 are `curvlab.optim.control`'s
`deterministic_radius_update` and `stochastic_radius_update`.

Paper version (``variant="paper"``, the default):

* ``radius_rule="stochastic"``: line 6 — [P3] §4.2 says the experiments run "actually
  stochastic" TR, with sub-sampled g and H on the same batch. ``"deterministic"`` is line 5.
  The condition "‖g‖ ≥ r_t" is as printed; ``grad_radius_factor`` = c reads it as
  ‖g‖ ≥ c r_t ([R], after the constant η₂ of STORM, Chen et al.; 1 is the paper).
* ``hvp="hessian"``: exact Pearlmutter products (the paper's method "only requires
  Hessian-vector products").
* Experiment settings (§4 bullet "TR", §4.2): N1 = N2 = 1, radius 1, subproblem step size
  η = 0.1 (0.01 for MobileNet) — the defaults here.

Released code ([C-TR] ``iter_TR``; ``variant="code"``), a different algorithm:
``z = −η g``; ``N1`` times ``z ← z − (η/2)(Hz + g)``, ``z ← r z/(‖z‖ + 1e-9)``; ``x ← x + z``
with no ratio test and no radius update (``subproblem="code"``, ``radius_rule="fixed"``), the
products by forward differences ``(∇f(x + εv) − ∇f(x))/ε`` with ε = 1e-5 on the unnormalised
v and the same batch (``hvp="hessian-fd"``, [P3] §4.2). ``variant`` only sets the
defaults of ``subproblem``, ``radius_rule`` and ``hvp``; each may be given on its own (e.g. the
paper's Alg 1 + Alg 2 with finite-difference products, which is what [P3] §4.2 describes).

Where [P3] is silent ([R]) and deviations:

* ``max_radius`` (r_max of line 6) is not given. ``None`` means: the stochastic rule caps at
  the initial ``radius`` ("the trust region radius is set to 1", §4) and the deterministic rule
  has no cap (line 5 as printed).
* Assumption 1 of Alg 2 (η = ``step_size`` < 1/‖H‖) is not enforced (the experiments fix η),
  but checked by the solver against its products (`curvlab.solvers.tr_gd_subproblem`): a
  solve that breaks it reports ``solver_status="step_size_too_large"`` and
  ``hessian_norm_bound`` (a lower bound on ‖H‖) in ``last_step_info``. The step is still
  measured by q_t; a point whose model value rose above f(0) is rejected (below).
* α of Assumption 2 (``init_scale`` 0.5) and the Armijo constants (σ = 1e-4, first trial η,
  shrink 0.5, 20 backtracks) are curvlab's [R] choices, passed through to the solver.
* Extension: ``lr`` scales the accepted step, x_{t+1} = x_t + lr·z_t (1.0 = the paper), so
  that LR schedulers act; q_t is then measured at the step taken, with the model's reduction
  f(0) − f(lr·z_t). With ``lr = 0`` the radius is left unchanged (a zero step says nothing
  about the model's quality).
* Deviation: a non-finite trial loss counts as q_t = −∞ (reject, shrink) because it is the
  worst possible agreement; the paper does not treat it. With ``radius_rule="fixed"`` no
  trial loss is evaluated (the code has no ratio test), so ρ is NaN in ``last_step_info``.
* Deviation: f(0) − f(z_t) ≤ −1e-15 gives q_t = −∞ (reject, shrink), where line 4 divides
  whatever the sign (docs/deviations.md, "A model that predicts no decrease";
  `curvlab.optim.control.reduction_ratio`). Alg 2 can return it with the paper's own settings:
  f(z₀) > 0 when α r ĝᵀHĝ > 2‖g‖, and N1 = 1 GD steps need not reach f < 0. The decision is
  line 5/6's whenever the loss went down (q_t < 0); it differs when the loss went up as the
  model predicted, which the literal q_t ≥ 0.9 would accept and answer with r_{t+1} = 2 r_t.
  |f(0) − f(z_t)| < 1e-15 (round-off) gives q_t = 1 unless the loss went up.
* Deviation: a non-finite curvature product (solver status ``"non_finite"``) skips the step
  (parameters and radius untouched) because no step of the model can be trusted.
* Deviation: the radius never falls below 1e-100 (nor rises above the largest float) because
  the solver divides by r²; the paper's radius sequence is unbounded below.
* Deviation: the finite-difference products are evaluated functionally (the model's
  BatchNorm running statistics do not move and dropout masks are replayed); [C-TR] moves the
  weights in place, which updates BatchNorm statistics a second time.
* The operator's passes are functional (the global RNG is not advanced, BatchNorm running
  statistics move only in the build, once per step, as in a training pass). For a model whose
  training pass draws random numbers (`curvlab.optim.modelwise.has_random_forward`: dropout)
  the step keeps the ordinary training pass (the closure, which fills ``.grad``) for loss and
  g and builds the operator after it: one gradient more per step. The operator and the trial
  loss F(x_t + z_t) of q_t replay the closure's dropout masks
  (`ModelwiseOptimizer.step_randomness`), so that q_t compares one sampled network.

`HybridTRSGD` is [P3] §4's Hybrid: "runs trust region method until the accuracy
no longer increases, and then uses the last epoch to initialize SGD method. When the training
accuracy stabilizes, it returns the final model. Both TR and SGD here follow the same
hyper-parameters above" (SGD: η = 0.1, fixed, no momentum, §4.2). It is a
`curvlab.optim.switching.TwoStage`: ``report_validation(accuracy)`` once per epoch with
``mode="max"`` and ``patience=1`` (the first epoch whose accuracy does not increase: the
literal rule; [P3] gives no patience) switches to ``torch.optim.SGD(lr=sgd_lr)`` over the TR
weights. Returning the model "when the training accuracy stabilizes" is the training loop's
stopping rule, not the optimizer's.
"""

from __future__ import annotations

import functools
import sys
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.autodiff import DEFAULT_FD_EPSILON, CurvatureOperator
from curvlab.distributed import Communicator
from curvlab.objective import Objective
from curvlab.optim.control import deterministic_radius_update, stochastic_radius_update
from curvlab.optim.modelwise import (
    ModelwiseOptimizer,
    Proposal,
    SkipStep,
    has_random_forward,
)
from curvlab.optim.switching import DataParallelSGD, TwoStage
from curvlab.optim.validation import check_choice, check_int, check_range
from curvlab.solvers import tr_gd_subproblem
from curvlab.solvers.result import NON_FINITE

__all__ = ["EfficientTR", "HybridTRSGD"]

Variant = Literal["paper", "code"]
RadiusRule = Literal["stochastic", "deterministic", "fixed"]
Subproblem = Literal["paper", "code"]
Hvp = Literal["hessian", "hessian-fd"]
Monitor = Literal["min", "max"]

#: What ``variant`` sets unless given: [P3] Alg 1 + Alg 2, or [C-TR] ``iter_TR``.
_VARIANTS: dict[str, dict[str, str]] = {
    "paper": {"subproblem": "paper", "radius_rule": "stochastic", "hvp": "hessian"},
    "code": {"subproblem": "code", "radius_rule": "fixed", "hvp": "hessian-fd"},
}

#: Radius guards (module docstring): r² must stay a normal float for the solver.
_MIN_RADIUS = 1e-100
_MAX_RADIUS = sys.float_info.max


# --------------------------------------------------------------------------- the optimizer
class EfficientTR(ModelwiseOptimizer):
    """[P3] Algorithm 1 with the Algorithm 2 subproblem solver (see the module docstring).

    Args:
        model: the network (its trainable parameters form the flat vector x).
        radius: r₀ ([P3] §4: 1; [C-TR]'s later-stage scripts use 2). With
            ``radius_rule="fixed"`` it is the radius of every step, read at every step.
        lr: step scale, x ← x + lr·z (extension, 1.0 = the paper; lets schedulers act).
        step_size: η of Alg 2 line 5 (§4.2: 0.1; 0.01 for MobileNet); the code's η'.
        n1: N1 of Alg 2 (§4: 1); the number of inner steps of the code's loop.
        n2: N2 of Alg 2 (§4: 1); unused by the code's loop.
        variant: ``"paper"`` or ``"code"``: the defaults of the next three.
        radius_rule: ``"stochastic"`` (Alg 1 line 6), ``"deterministic"`` (line 5) or
            ``"fixed"`` ([C-TR]: every step accepted, no trial loss, r = ``radius``).
        subproblem: ``"paper"`` (Alg 2) or ``"code"`` ([C-TR] ``iter_TR`` loop).
        hvp: ``"hessian"`` (exact, Pearlmutter) or ``"hessian-fd"`` (forward differences).
        fd_epsilon: ε of the finite differences ([C-TR]: 1e-5).
        max_radius: r_max (see the module docstring for ``None``).
        very_successful: 0.9 of Alg 1 lines 5–6.
        successful: 0.1 of Alg 1 line 5.
        expand: 2 of Alg 1 lines 5–6.
        shrink: 0.5 of Alg 1 lines 5–6.
        grad_radius_factor: c in "‖g‖ ≥ c·r_t" of line 6 (1 in the paper).
        init_scale: α of Assumption 2, z₀ = −α r g/‖g‖ ([R] 0.5).
        armijo_sigma, armijo_shrink, armijo_max_backtracks: Alg 2 line 14 ([R] 1e-4, 0.5, 20).

    ``step`` takes a `curvlab.Objective`. ``last_step_info``: ``loss``, ``trial_loss``,
    ``rho`` (q_t), ``accepted``, ``radius`` (r_t), ``next_radius`` (r_{t+1}),
    ``radius_update``, ``grad_norm``, ``predicted_reduction``, ``solver_status`` (
    ``"step_size_too_large"`` when a product showed ``step_size`` ≥ 1/‖H‖, Assumption 1),
    ``solver_iterations``, ``phase1_iterations``, ``phase2_iterations``, ``hit_boundary``,
    ``hvp_products``, ``hessian_norm_bound`` (max ‖Hz‖/‖z‖ of the solver's products; None for
    the code's loop), ``step_norm``.

    Loss and gradient come from the curvature operator's build (`evaluate`), so ``.grad`` is
    not filled by ``step`` (it is for a model whose training pass is random: dropout).
    """

    def __init__(
        self,
        model: nn.Module,
        radius: float = 1.0,
        *,
        lr: float = 1.0,
        step_size: float = 0.1,
        n1: int = 1,
        n2: int = 1,
        variant: Variant = "paper",
        radius_rule: RadiusRule | None = None,
        subproblem: Subproblem | None = None,
        hvp: Hvp | None = None,
        fd_epsilon: float = DEFAULT_FD_EPSILON,
        max_radius: float | None = None,
        very_successful: float = 0.9,
        successful: float = 0.1,
        expand: float = 2.0,
        shrink: float = 0.5,
        grad_radius_factor: float = 1.0,
        init_scale: float = 0.5,
        armijo_sigma: float = 1e-4,
        armijo_shrink: float = 0.5,
        armijo_max_backtracks: int = 20,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model)!r}")
        self.variant = check_choice("variant", variant, tuple(_VARIANTS))
        preset = _VARIANTS[self.variant]
        self.radius_rule = check_choice(
            "radius_rule",
            preset["radius_rule"] if radius_rule is None else radius_rule,
            ("stochastic", "deterministic", "fixed"),
        )
        self.subproblem = check_choice(
            "subproblem",
            preset["subproblem"] if subproblem is None else subproblem,
            ("paper", "code"),
        )
        self.hvp = check_choice(
            "hvp", preset["hvp"] if hvp is None else hvp, ("hessian", "hessian-fd")
        )
        defaults = _validated(
            radius=radius,
            lr=lr,
            step_size=step_size,
            n1=n1,
            n2=n2,
            fd_epsilon=fd_epsilon,
            max_radius=max_radius,
            very_successful=very_successful,
            successful=successful,
            expand=expand,
            shrink=shrink,
            grad_radius_factor=grad_radius_factor,
            init_scale=init_scale,
            armijo_sigma=armijo_sigma,
            armijo_shrink=armijo_shrink,
            armijo_max_backtracks=armijo_max_backtracks,
        )
        super().__init__(model, defaults)
        self._operator: CurvatureOperator | None = None
        self.model = model

    # -------------------------------------------------------------------- hooks
    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        _validated(**{k: group[k] for k in _HYPERPARAMETERS})

    @property
    def uses_trial_loss(self) -> bool:
        return self.radius_rule != "fixed"  # [C-TR] has no ratio test

    @property
    def radius(self) -> float:
        """r_t, the radius of the next step."""
        group = self.param_groups[0]
        if self.radius_rule == "fixed":
            return float(group["radius"])
        return float(self.global_state.setdefault("radius", float(group["radius"])))

    def end_step(self) -> None:
        self._operator = None  # no autograd graph outlives the step

    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Alg 1 line 2: g and H on the batch from one pass. The curvature operator's build is
        the gradient pass (it moves BatchNorm running statistics once), so a step costs one
        gradient plus the solver's products (``.grad`` is not filled). A model whose training
        pass is random keeps the closure (docstring)."""
        if has_random_forward(objective.model):
            return super().evaluate(objective)  # the operator is built in `propose`
        self._operator = self._build_operator(objective, update_buffers=True)
        return self._operator.loss, self._operator.gradient()

    def _build_operator(
        self, objective: Objective, update_buffers: bool = False
    ) -> CurvatureOperator:
        """H on the batch as products (exact or forward differences), built once per step."""
        group = self.param_groups[0]
        return self.curvature_operator(
            objective,
            self.hvp,
            fd_epsilon=group["fd_epsilon"] if self.hvp == "hessian-fd" else None,
            update_buffers=update_buffers,
        )

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Alg 1 lines 2–4: H on the batch, z_t by Alg 2, the model's predicted reduction."""
        group = self.param_groups[0]
        radius = self.radius
        if self._operator is None:  # the closure gave loss and g (stateful training pass)
            self._operator = self._build_operator(objective)
        operator = self._operator
        # Lines 3–4: z_t ≈ argmin_{‖z‖ ≤ r_t} ½ zᵀHz + gᵀz (Alg 2, or the code's loop).
        result = tr_gd_subproblem(
            operator.matvec,
            grad,
            radius,
            n1=group["n1"],
            n2=group["n2"],
            step_size=group["step_size"],
            init_scale=group["init_scale"],
            armijo_sigma=group["armijo_sigma"],
            armijo_shrink=group["armijo_shrink"],
            armijo_max_backtracks=group["armijo_max_backtracks"],
            variant=self.subproblem,  # type: ignore[arg-type]
            compute_model_decrease=self.uses_trial_loss,
        )
        if result.status == NON_FINITE:
            raise SkipStep("non-finite curvature product in the subproblem solver")
        z = result.solution
        lr = float(group["lr"])
        predicted: float | None = None
        if result.model_decrease is not None:  # f(0) − f(z_t), the denominator of q_t
            predicted = result.model_decrease
            if lr != 1.0:  # extension: the model's reduction at the step lr·z_t
                gz = float(grad @ z)
                zhz = 2.0 * (-result.model_decrease - gz)
                predicted = -lr * gz - 0.5 * lr * lr * zhz
        info = {
            "radius": radius,
            "grad_norm": float(torch.linalg.vector_norm(grad)),
            "predicted_reduction": predicted,
            "solver_status": result.status,
            "solver_iterations": result.iterations,
            "phase1_iterations": result.info.get("phase1_iterations", 0),
            "phase2_iterations": result.info.get("phase2_iterations", 0),
            "hit_boundary": result.hit_boundary,
            "hvp_products": operator.products,
            "hessian_norm_bound": result.info.get("hessian_norm_bound"),
        }
        return Proposal(z if lr == 1.0 else lr * z, predicted, info)

    def control(self, rho: float, proposal: Proposal) -> bool:
        """Alg 1 line 5 or 6 (or the code's unconditional step): accept?, r_{t+1}."""
        group = self.param_groups[0]
        info = proposal.info
        radius = float(info["radius"])
        if self.radius_rule == "fixed":  # [C-TR]: every step accepted, radius unchanged
            info.update(next_radius=float(group["radius"]), radius_update="fixed")
            return True
        if float(group["lr"]) == 0.0:  # extension: a zero step leaves r_t as it is
            info.update(next_radius=radius, radius_update="none (lr = 0)")
            return True
        if self.radius_rule == "deterministic":  # line 5
            max_radius = group["max_radius"]
            accepted, new = deterministic_radius_update(
                rho,
                radius,
                very_successful=group["very_successful"],
                successful=group["successful"],
                expand=group["expand"],
                shrink=group["shrink"],
                max_radius=None if max_radius is None else float(max_radius),
            )
        else:  # line 6
            max_radius = group["max_radius"]
            accepted, new = stochastic_radius_update(
                rho,
                radius,
                float(info["grad_norm"]),
                max_radius=float(group["radius"] if max_radius is None else max_radius),
                very_successful=group["very_successful"],
                grad_radius_factor=group["grad_radius_factor"],
                expand=group["expand"],
                shrink=group["shrink"],
            )
        new = min(max(new, _MIN_RADIUS), _MAX_RADIUS)  # Deviation: guards (module docstring)
        self.global_state["radius"] = new
        update = "expand" if new > radius else "shrink" if new < radius else "keep"
        info.update(next_radius=new, radius_update=update)
        return accepted


_HYPERPARAMETERS = (
    "radius",
    "lr",
    "step_size",
    "n1",
    "n2",
    "fd_epsilon",
    "max_radius",
    "very_successful",
    "successful",
    "expand",
    "shrink",
    "grad_radius_factor",
    "init_scale",
    "armijo_sigma",
    "armijo_shrink",
    "armijo_max_backtracks",
)


def _validated(
    *,
    radius: float,
    lr: float,
    step_size: float,
    n1: int,
    n2: int,
    fd_epsilon: float,
    max_radius: float | None,
    very_successful: float,
    successful: float,
    expand: float,
    shrink: float,
    grad_radius_factor: float,
    init_scale: float,
    armijo_sigma: float,
    armijo_shrink: float,
    armijo_max_backtracks: int,
) -> dict[str, Any]:
    high = check_range("very_successful", very_successful, 0.0, low_open=True)
    return {
        "radius": check_range("radius", radius, 0.0, low_open=True),
        "lr": check_range("lr", lr, 0.0),
        "step_size": check_range("step_size", step_size, 0.0, low_open=True),
        "n1": check_int("n1", n1, 0),
        "n2": check_int("n2", n2, 0),
        "fd_epsilon": check_range("fd_epsilon", fd_epsilon, 0.0, low_open=True),
        "max_radius": None
        if max_radius is None
        else check_range("max_radius", max_radius, 0.0, low_open=True),
        "very_successful": high,
        "successful": check_range("successful", successful, 0.0, high),
        "expand": check_range("expand", expand, 1.0),
        "shrink": check_range("shrink", shrink, 0.0, 1.0, low_open=True, high_open=True),
        "grad_radius_factor": check_range("grad_radius_factor", grad_radius_factor, 0.0),
        "init_scale": check_range(
            "init_scale", init_scale, 0.0, 1.0, low_open=True, high_open=True
        ),
        "armijo_sigma": check_range(
            "armijo_sigma", armijo_sigma, 0.0, 1.0, low_open=True, high_open=True
        ),
        "armijo_shrink": check_range(
            "armijo_shrink", armijo_shrink, 0.0, 1.0, low_open=True, high_open=True
        ),
        "armijo_max_backtracks": check_int("armijo_max_backtracks", armijo_max_backtracks, 0),
    }


# --------------------------------------------------------------------------- Hybrid
class HybridTRSGD(TwoStage):
    """[P3] §4's Hybrid: `EfficientTR` until the accuracy stops increasing, then plain SGD.

    Args:
        model: the network.
        radius, **tr_options: `EfficientTR`'s arguments (lr, step_size, n1, n2, variant, …).
        sgd_lr: the SGD stage's fixed step size (§4.2: 0.1, "best in {10^-n}"; no momentum,
            no weight decay).
        patience: switch at this many consecutive ``report_validation`` values without
            improvement (default 1: the first epoch whose accuracy does not increase).
        mode: ``"max"`` (an accuracy, [P3]) or ``"min"`` (a loss) for ``report_validation``.
        min_delta: an improvement must beat the best value by more than this.
        switch_at_step, switch_at_epoch: the fixed switch points of `TwoStage` (the TR(n) →
            SGD(n) tracks of [P3] §4.5 are ``switch_at_epoch=n``).

    ``first`` is the `EfficientTR`, ``second`` the SGD once switched. The SGD's lr is
    ``sgd_lr``, not carried from the TR's step scale; an LR scheduler meant for the SGD stage
    should be created after the switch (see `TwoStage`).
    """

    def __init__(
        self,
        model: nn.Module,
        radius: float = 1.0,
        *,
        sgd_lr: float = 0.1,
        patience: int | None = 1,
        mode: Monitor = "max",
        min_delta: float = 0.0,
        switch_at_step: int | None = None,
        switch_at_epoch: int | None = None,
        **tr_options: Any,
    ) -> None:
        self.sgd_lr = check_range("sgd_lr", sgd_lr, 0.0)
        first = EfficientTR(model, radius, **tr_options)
        super().__init__(
            first,
            functools.partial(_plain_sgd, lr=self.sgd_lr),
            switch_at_step=switch_at_step,
            switch_at_epoch=switch_at_epoch,
            patience=patience,
            min_delta=min_delta,
            mode=mode,
            carry=(),
        )
        self.model = model

    #: `curvlab bench --nproc`: `distribute(comm)` as the model-wide methods.
    data_parallel = "model-wide"

    def distribute(self, communicator: Communicator | None = None) -> HybridTRSGD:
        """Data-parallel training: the TR stage as `ModelwiseOptimizer.distribute`, the SGD
        stage with the loss and gradients averaged over ranks. Call it before the switch."""
        if self.second is not None:
            raise ValueError("distribute: call it before the switch to the SGD stage")
        first = self.first
        assert isinstance(first, EfficientTR)
        first.distribute(communicator)
        self._factory = partial(
            DataParallelSGD, synchronize=first.synchronize_gradients, lr=self.sgd_lr
        )
        return self


def _plain_sgd(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The hybrid's second stage ([P3] §4.2 / [C-TR]): a fixed step size, no momentum, no
    weight decay (a module-level function, so that the optimizer pickles)."""
    return torch.optim.SGD(groups, lr=lr, momentum=0.0)
