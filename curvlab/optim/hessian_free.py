r"""Hessian-free: subsampled Gauss-Newton with CG and Levenberg–Marquardt damping (thesis ch.5).

The thesis's ch.5 baseline "HF" (§5.7's cost table, §5.8's experiments) is Martens (2010) as
the thesis describes it: the GGN "approximately solve[d] ... with an LM damping term ... by an
'early-termination' linear CG method" (§5.1), with λ updated by Martens's LM "heuristic"
(§5.6) in the form of §5.2.3, run inside the loop of Alg 23 like SMW-GN (same LM settings,
N2 = N1/2, learning rate α; the direction is the only difference: "SMW-GN ... is always
faster than HF", cost n_HF × O(N2 n), §5.7). With α = ``lr``, λ_t = λ_LM + τ::

    1  for t = 0, 1, 2, ...
    2      S1 = the objective's batch ;  S2 ⊆ S1 with |S2| = N2          # Alg 23 line 3
    3      g_t = (1/N1) Σ_{i∈S1} ∇f_i(θ_t)                                # line 4
    4      B_t = (1/N2) Σ_{i∈S2} J_iᵀ H_i J_i  (R-op / L-op products)      # GN, (5.2)
    5      p_t ≈ −(B_t + λ_t I)⁻¹ g_t  by CG from x₀ = ζ p_{t−1}           # Martens 2010 §4.5
           (at most ``cg_max_iters`` products, stop at ‖r‖ ≤ ``cg_tol``·‖g_t‖)
    6      ρ_t = (f(θ_t) − f(θ_t + p_t)) / (m_t(0) − m_t(p_t))  on S1       # (5.5)
           m_t(0) − m_t(p) = −g_tᵀp − ½ pᵀB_t p
    7      λ_LM ← boost·λ_LM if ρ_t < ε ; drop·λ_LM if ρ_t > 1 − ε         # §5.2.3
    8      θ_{t+1} = θ_t + α p_t                                            # line 7

Defaults are the thesis's ch.5 settings (§5.8, "same as in Kiros"): λ_LM(0) = 1, boost =
1.01, drop = 0.99, ε = 1/4, τ = 0.001, α = 0.1 (MNIST; 0.01 CIFAR-10, 0.05 webspam).
The thesis gives no CG settings (A24, docs/deviations.md); those below follow Martens (2010):

* warm start x₀ = ζ p_{t−1} with ζ = ``warm_start_decay`` = 0.95 (``0`` starts from zero);
  p_{t−1} is the previous CG solution (the direction, before α), kept in ``state``;
* an iteration cap, ``cg_max_iters`` = 250.

Deviations (marked in the code):

* CG stops on the relative residual (``cg_tol``, default 1e-4) or the cap, because
  `curvlab.solvers.cg` has no hook for Martens's relative-progress test on the quadratic.
* No backtracking over CG iterates, no CG preconditioner and no line search: the thesis
  mentions none of them for its HF baseline (Martens 2010 has all three).
* pᵀB_t p for ρ costs one extra GGN product (CG's iterate is not the exact solve, so the
  identity m_t(0) − m_t(p) = ½(−gᵀp + λ‖p‖²) of an exact solve, B_t p = −g_t − λ_t p, does not
  apply).
* As in `curvlab.optim.smw`: ``accept_threshold=η`` accepts only when ρ_t ≥ η (Theorem 6),
  ``ratio_point="step"`` measures ρ at αp_t instead of p_t (eq. 5.5 vs Alg 23 line 7, A21), a
  non-finite trial loss rejects the step (λ_LM boosted), and a non-finite gradient / product /
  CG result skips the step with nothing changed.
* Deviation: a model reduction m_t(0) − m_t(p_t) ≤ −1e-15 gives ρ_t = −∞: the step is not
  taken and λ_LM is boosted (docs/deviations.md, "A model that predicts no decrease"). Lemma 11
  rules it out for the exact solve; a truncated CG from the warm start ζ p_{t−1} can end
  there, and (5.5) would divide whatever the sign.
* Curvature batch: B_t on the first or a random ``curvature_batch_size`` rows of S1 (the
  optimizer's own generator, saved in ``state_dict``), scaled to the objective's loss
  reduction: with L = c Σ_{S1} l_n, B_t is N1 c /(N2 c₂) times the GGN of the S2 loss
  (c₂ its scale), i.e. (1/N2) Σ_{S2} for a batch mean, as (5.2).

Cost per step: with N2 = N1 the GGN operator's build is also the gradient pass of line 3
(`HessianFree.evaluate` takes the loss and g_t from it, so ``.grad`` is not filled): one gradient
+ (CG products + 1) products + one trial forward. With N2 < N1 the operator lives on S2 and
cannot give g_t on S1: the closure computes it (filling ``.grad``), one gradient more. The same
holds for a model whose training pass draws random numbers (`curvlab.optim.modelwise.
has_random_forward`: dropout), because the operator's functional passes do not advance the
global RNG; the operator and the trial loss of ρ_t then replay the closure's dropout masks
(`ModelwiseOptimizer.step_randomness`; with N2 < N1 the operator's masks have S2's shape).
BatchNorm running statistics move in the operator's build, once per step, as in a training
pass.
The operator is dropped at the end of ``step``: no autograd graph outlives a step.

The LM rule of line 7 is `curvlab.optim.control.levenberg_marquardt_update`; λ_LM's state,
λ_t and the accept rule are `curvlab.optim.levenberg_marquardt.LevenbergMarquardtDamping`'s
(shared with `curvlab.optim.smw`); ρ_t is formed by `ModelwiseOptimizer.step` at the trial
point c·p_t (``Proposal.trial_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.autodiff import CurvatureOperator
from curvlab.objective import Objective
from curvlab.optim.levenberg_marquardt import LevenbergMarquardtDamping, check_initial_damping
from curvlab.optim.modelwise import Proposal, SkipStep, has_random_forward
from curvlab.optim.validation import check_choice, check_int, check_range
from curvlab.solvers import cg
from curvlab.solvers.result import NON_FINITE

__all__ = ["HessianFree"]

RatioPoint = Literal["direction", "step"]
Subset = Literal["random", "first"]


class HessianFree(LevenbergMarquardtDamping):
    """Hessian-free: GGN + CG + LM damping, the thesis's ch.5 baseline (Martens 2010).

    Args:
        model: the network (or an iterable of its parameters).
        lr: α of Alg 23 line 7 (thesis: 0.1 MNIST, 0.01 CIFAR-10, 0.05 webspam).
        damping: initial λ_LM > 0 (thesis 1); afterwards λ_LM evolves in ``state``.
        tau: τ > 0 added to λ_LM (thesis 0.001).
        boost: λ_LM factor when ρ < ε (> 1; thesis 1.01, Martens 3/2).
        drop: λ_LM factor when ρ > 1 − ε (in (0, 1); thesis 0.99, Martens 2/3).
        epsilon: ε in (0, 1/2) (thesis and Martens 1/4).
        cg_max_iters: CG iteration cap (Martens 250).
        cg_tol: CG stops when ‖r‖ ≤ cg_tol·‖g‖ (deviation: Martens's progress test).
        warm_start_decay: ζ in [0, 1]: CG starts at ζ p_{t−1} (Martens 0.95; 0 = cold).
        curvature_batch_size: N2 ≤ N1, or None for N2 = N1 (thesis N2 = N1/2).
        accept_threshold: None (Alg 23: always step) or η in (0, ε) (Theorem 6).
        curvature_subset: ``"random"`` S2 ⊆ S1 (Alg 23) or ``"first"`` N2 rows.
        ratio_point: ``"direction"`` (ρ at p_t, literal 5.5) or ``"step"`` (at α p_t).

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` has ``rho``, ``trial_loss``,
    ``predicted_reduction``, λ used (``damping``) and next (``next_damping``), ``accepted``,
    ``cg_iterations``, ``cg_status``, ``cg_residual_norm``, ``matvecs``, ``warm_started``, or
    the reason of a skip. With N2 = N1 the loss and gradient come from the GGN operator's build
    (`evaluate`), so ``step`` does not fill ``.grad`` (it does with N2 < N1, or for a model with
    BatchNorm or dropout: see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module | Any,
        lr: float = 0.1,
        damping: float = 1.0,
        tau: float = 1e-3,
        boost: float = 1.01,
        drop: float = 0.99,
        epsilon: float = 0.25,
        cg_max_iters: int = 250,
        cg_tol: float = 1e-4,
        warm_start_decay: float = 0.95,
        curvature_batch_size: int | None = None,
        accept_threshold: float | None = None,
        curvature_subset: Subset = "random",
        ratio_point: RatioPoint = "direction",
    ) -> None:
        defaults = {
            "lr": lr,
            "damping": damping,
            "tau": tau,
            "boost": boost,
            "drop": drop,
            "epsilon": epsilon,
            "cg_max_iters": cg_max_iters,
            "cg_tol": cg_tol,
            "warm_start_decay": warm_start_decay,
            "curvature_batch_size": curvature_batch_size,
            "accept_threshold": accept_threshold,
        }
        _validate(defaults)
        self.curvature_subset = check_choice(
            "curvature_subset", curvature_subset, ("random", "first")
        )
        self.ratio_point = check_choice("ratio_point", ratio_point, ("direction", "step"))
        super().__init__(model, defaults)
        device = self.params[0].device
        self._generator = self.new_sampler(device)
        self._pending_direction: Tensor | None = None
        self._operator: CurvatureOperator | None = None

    # -------------------------------------------------------------------- hooks
    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        _validate(group)

    def end_step(self) -> None:
        self._pending_direction = None
        self._operator = None  # no autograd graph outlives the step

    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Line 3: loss and g_t on S1. With N2 = N1 they come from the build of line 4's GGN
        operator (one gradient pass; ``.grad`` is not filled); otherwise from the closure."""
        n1 = objective.batch_size
        if self._curvature_batch_size(n1) != n1 or has_random_forward(objective.model):
            return super().evaluate(objective)  # B_t on S2 ≠ S1: the operator cannot give g_t
        self._operator = self.curvature_operator(objective, "ggn", update_buffers=True)
        return self._operator.loss, self._operator.gradient()

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Lines 2–6: S2, B_t, the CG direction p_t and the model's reduction for ρ_t."""
        group = self.param_groups[0]
        lam = self.damping  # λ_t = λ_LM + τ
        matvec, products, n2 = self._curvature(objective)  # lines 2 and 4

        # Line 5: CG on (B + λI) p = −g, warm-started from ζ p_{t−1} (Martens 2010 §4.5).
        def damped(v: Tensor) -> Tensor:
            return matvec(v) + lam * v

        state = self.global_state
        zeta = float(group["warm_start_decay"])
        previous = state.get("previous_direction")
        x0 = None
        if zeta > 0.0 and isinstance(previous, Tensor):
            x0 = zeta * previous
        # Deviation: residual test instead of Martens's relative-progress test (docstring).
        result = cg(
            damped,
            -grad,
            x0=x0,
            tol=float(group["cg_tol"]),
            max_iters=int(group["cg_max_iters"]),
        )
        p = result.solution
        if result.status == NON_FINITE or not bool(torch.isfinite(p).all()):
            # Deviation: skip (nothing changes) because a non-finite product has no useful step.
            raise SkipStep(f"non-finite CG direction (status {result.status})")

        # Line 6: ρ_t (5.5) on S1, model reduction at c·p (c = 1 literal, c = α at the step).
        # Deviation: pᵀB_t p costs one extra product because CG's iterate is not the exact
        # solve, so the identity m(0) − m(p) = ½(−gᵀp + λ‖p‖²) of an exact one does not hold.
        curvature = float(p @ matvec(p))
        gp = float(grad @ p)
        if not (math.isfinite(curvature) and math.isfinite(gp)):
            raise SkipStep("non-finite curvature along the CG direction")
        alpha = float(group["lr"])
        c = 1.0 if self.ratio_point == "direction" else alpha
        predicted = -c * gp - 0.5 * c * c * curvature  # m_t(0) − m_t(c p)
        self._pending_direction = p
        info = {
            "predicted_reduction": predicted,
            "damping": lam,
            "cg_iterations": result.iterations,
            "cg_status": result.status,
            "cg_residual_norm": result.residual_norm,
            "matvecs": products(),
            "warm_started": x0 is not None,
            "damped_model_value": gp + 0.5 * curvature + 0.5 * lam * float(p @ p),
            "curvature_batch_size": n2,
        }
        # Line 8: θ + α p_t; line 6: the base's trial loss f(θ_t + c p_t) on S1 gives ρ_t.
        return Proposal(alpha * p, predicted, info, trial_step=c * p)

    def control(self, rho: float, proposal: Proposal) -> bool:
        """Line 7 (`LevenbergMarquardtDamping.control`: the LM rule on ρ_t, accept always or
        when ρ_t ≥ η), then keep p_t for the next step's warm start."""
        accepted = super().control(rho, proposal)
        if self._pending_direction is not None:  # p_t, the next warm start's base
            self.global_state["previous_direction"] = self._pending_direction
            self._pending_direction = None
        return accepted

    # ---------------------------------------------------------------- helpers
    def _curvature(
        self, objective: Objective
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[], int], int]:
        """B_t v on S2 (scaled to S1's loss reduction), a product counter, and N2."""
        n1 = objective.batch_size
        n2 = self._curvature_batch_size(n1)
        if n2 > n1:
            raise ValueError(
                f"curvature_batch_size: N2 = {n2} exceeds the objective's batch size N1 = {n1} "
                "(thesis Alg 23 needs S2 ⊆ S1)"
            )
        sub, scale = objective, 1.0
        if n2 < n1:
            if self.curvature_subset == "first":
                index = torch.arange(n2, device=objective.inputs.device)
            else:
                perm = torch.randperm(n1, generator=self._generator, device=self._generator.device)
                index = perm[:n2].to(objective.inputs.device)
            targets = objective.targets[index] if objective.targets.dim() > 0 else objective.targets
            sub = Objective(
                objective.model,
                objective.loss_fn,
                objective.inputs[index],
                targets,
                batch_average=objective.batch_average,
                autocast=objective.autocast_state,  # S1's precision (mixed precision)
            )
            scale = _subset_scale(objective, sub, index)
        if self._operator is None:  # N2 < N1, or the closure gave g_t
            self._operator = self.curvature_operator(sub, "ggn")
        op = self._operator

        def matvec(v: Tensor) -> Tensor:
            out = op.matvec(v)
            return out if scale == 1.0 else scale * out

        return matvec, lambda: op.products, n2

    def _curvature_batch_size(self, n1: int) -> int:
        """N2 (``curvature_batch_size``, None: N1)."""
        n2 = self.param_groups[0]["curvature_batch_size"]
        return n1 if n2 is None else int(n2)


def _subset_scale(objective: Objective, sub: Objective, index: Tensor) -> float:
    """N1 c / (N2 c₂): makes the S2 GGN the (1/N2) Σ_{S2} estimate of S1's (thesis 5.2)."""
    outputs = objective.outputs
    if objective.likelihood is None or outputs is None:
        raise ValueError(
            "curvature_batch_size: a curvature subset needs a loss with a known reduction "
            "(nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss or nn.BCELoss)"
        )
    c1 = objective.loss_scale(outputs)
    c2 = sub.loss_scale(outputs[index])
    return (objective.batch_size * c1) / (sub.batch_size * c2)


def _validate(group: dict[str, Any]) -> None:
    check_range("lr", group["lr"], 0.0)
    check_initial_damping(group["damping"])
    check_range("tau", group["tau"], 0.0, low_open=True)
    check_range("boost", group["boost"], 1.0, low_open=True)
    check_range("drop", group["drop"], 0.0, 1.0, low_open=True, high_open=True)
    eps = check_range("epsilon", group["epsilon"], 0.0, 0.5, low_open=True, high_open=True)
    check_int("cg_max_iters", group["cg_max_iters"], 1)
    check_range("cg_tol", group["cg_tol"], 0.0)
    check_range("warm_start_decay", group["warm_start_decay"], 0.0, 1.0)
    if group["curvature_batch_size"] is not None:
        check_int("curvature_batch_size", group["curvature_batch_size"], 1)
    if group["accept_threshold"] is not None:
        check_range(
            "accept_threshold", group["accept_threshold"], 0.0, eps, low_open=True, high_open=True
        )
