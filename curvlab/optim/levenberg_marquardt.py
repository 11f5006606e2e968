"""`LevenbergMarquardtDamping`: the damping state and step control of thesis ch.5's methods.

Hessian-free (`curvlab.optim.hessian_free`) and SMW-GN / SMW-NG / SMW-NG-BD
(`curvlab.optim.smw`) differ in how they find the direction p_t of thesis Alg 23; both damp the
curvature by λ_t = λ_LM + τ and adapt λ_LM after every step by the Levenberg–Marquardt rule of
thesis §5.2.3 (Martens 2010's heuristic; `curvlab.optim.control.levenberg_marquardt_update`)::

    ρ_t < ε:        λ_LM ← boost·λ_LM
    ρ_t > 1 − ε:    λ_LM ← drop·λ_LM
    then            λ_{t+1} = λ_LM + τ

λ_LM(0) = ``damping`` must be > 0 (`check_initial_damping`: the rule only multiplies it).
Alg 23 then always steps (line 7); with ``accept_threshold=η`` (0 < η < ε) θ moves only when
ρ_t ≥ η (thesis Theorem 6). Deviation: a non-finite ρ_t rejects the step even in the practical
version, and λ_LM is boosted: a non-finite trial loss, or a model reduction ≤ −1e-15, which
Lemma 11 rules out for the exact solve (ρ_t = −∞ then; `curvlab.optim.control.reduction_ratio`,
docs/deviations.md, "A model that predicts no decrease").
"""

from __future__ import annotations

import math
from typing import Any

from curvlab.optim.control import levenberg_marquardt_update
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal
from curvlab.optim.validation import check_range

__all__ = ["LevenbergMarquardtDamping", "check_initial_damping"]


def check_initial_damping(value: Any) -> float:
    """λ_LM(0) (the ``damping`` hyperparameter) as a float > 0.

    The rule above only multiplies λ_LM, so λ_LM(0) = 0 would stay 0 at every step: λ_t = τ
    forever, however bad ρ_t. Thesis §5.2.3 starts from λ_LM(0) = 1, and the proof of Theorem 6
    needs λ_t → ∞ when steps keep being rejected.

    Raises:
        ValueError: ``value`` is not a finite number > 0 (the message names ``damping``).
    """
    damping = check_range("damping", value, 0.0)
    if damping == 0.0:
        raise ValueError(
            "damping: expected a finite number > 0, got 0.0 (λ_LM(0) = 0 stays 0: the "
            "Levenberg–Marquardt rule of thesis §5.2.3 only multiplies it by boost or drop)"
        )
    return damping


class LevenbergMarquardtDamping(ModelwiseOptimizer):
    """Base of the model-wide methods with thesis §5.2.3's LM damping (module docstring).

    λ_LM lives in ``global_state["lambda_lm"]`` (the group's ``damping`` until the first step)
    and the group holds ``tau``, ``epsilon``, ``boost``, ``drop`` and ``accept_threshold``.
    Subclasses supply `propose`, damped by `damping`, with the model's reduction for ρ_t
    (thesis eq. 5.5), which the base's ``step`` measures on the objective's batch S1.
    """

    @property
    def uses_trial_loss(self) -> bool:
        return True  # Alg 23 line 6: ρ_t on S1

    @property
    def damping(self) -> float:
        """The current λ_t = λ_LM + τ (thesis §5.2.3)."""
        return self._lambda_lm() + float(self.param_groups[0]["tau"])

    def _lambda_lm(self) -> float:
        state = self.global_state
        if "lambda_lm" not in state:
            state["lambda_lm"] = float(self.param_groups[0]["damping"])
        return float(state["lambda_lm"])

    def control(self, rho: float, proposal: Proposal) -> bool:
        """LM rule of §5.2.3 on ρ_t; accept always (Alg 23) or when ρ_t ≥ η (Theorem 6)."""
        group = self.param_groups[0]
        self.global_state["lambda_lm"] = levenberg_marquardt_update(
            self._lambda_lm(),
            rho,
            epsilon=float(group["epsilon"]),
            boost=float(group["boost"]),
            drop=float(group["drop"]),
        )
        proposal.info["next_damping"] = self.damping  # λ_{t+1} = λ_LM + τ
        if not math.isfinite(rho):
            return False  # Deviation: a non-finite loss, or no predicted decrease (docstring)
        threshold = group["accept_threshold"]
        return threshold is None or rho >= threshold
