r"""Pure step-control rules of model-based methods: reduction ratio, radius, σ, LM damping.

A model-based step compares the decrease of the loss with the decrease its local model
predicted, the reduction ratio (Conn, Gould & Toint 2000, eq. 6.1.6; seed 002 App. F.1)::

    ρ = (L(θ) − L(θ + s)) / (m(0) − m(s))

and adapts the size of the next step from ρ. Every rule here is a pure function of scalars (no
state, no tensors), so a trust-region radius (seeds 002 and 003), a cubic weight σ (ARC) and a
Levenberg–Marquardt damping (thesis §5.2.3) share one tested implementation. Every model-wide
method with step control takes its rule from here: `trust_region_update` (`EllipsoidalTR`),
`arc_sigma_update` (`ARC`), `deterministic_radius_update` / `stochastic_radius_update`
(`EfficientTR`), `levenberg_marquardt_update` (`HessianFree`, `SMWGN`, `SMWNG`, `SMWNGBD`).

Classification (CGT Alg. 6.1.1, with seed 002's thresholds "accepted if ρ exceeds η₁ …
increased whenever ρ exceeds the very successful threshold η₂", App. F.1)::

    ρ ≥ η₂        very successful   accept, enlarge the region
    η₁ ≤ ρ < η₂   successful        accept, keep it
    ρ < η₁        unsuccessful      reject, shrink it          (ρ = NaN or −∞ included)

The comparisons are ``≥`` as in the released code ([C-AN] ``Ellipsoidal_TR.step_quality``,
[C-SCR] ``scr.py``). [C-AN] is seed 002's code (github.com/jonaskohler/AdaptiveNormsNewton),
[C-SCR] the same group's sub-sampled cubic regularisation code (docs/deviations.md)
(github.com/dalab/subsampled_cubic_regularization).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "RHO_GUARD",
    "Outcome",
    "StepControl",
    "arc_sigma_update",
    "classify_step",
    "deterministic_radius_update",
    "levenberg_marquardt_update",
    "reduction_ratio",
    "scaled_model_decrease",
    "stochastic_radius_update",
    "trust_region_update",
]

Outcome = Literal["very_successful", "successful", "unsuccessful"]

#: |m(0) − m(s)| below this counts as round-off: ρ := 1 unless the loss went up ([C-AN]
#: ``update_procedure_2nd_order``: ρ := 1).
RHO_GUARD = 1e-15


@dataclass(frozen=True)
class StepControl:
    """The result of a step-control rule: the next value, acceptance and the classification."""

    value: float
    accepted: bool
    outcome: Outcome


def reduction_ratio(actual: float, predicted: float | None, *, guard: float = RHO_GUARD) -> float:
    """ρ = actual / predicted reduction (CGT eq. 6.1.6; seed 002 Alg 1 line 6, seed 003 Alg 1
    line 4, thesis eq. 5.5), as `curvlab.optim.ModelwiseOptimizer.step` forms it.

    ::

        actual or predicted not finite     ρ = −∞
        predicted None or |predicted| < guard
                                           ρ = 1, or −∞ if actual < 0
        predicted ≤ −guard                 ρ = −∞            (deviation, below)
        otherwise                          ρ = actual / predicted

    Args:
        actual: ``L(θ) − L(θ + s)`` on the same mini-batch; a non-finite value (an overflowing
            or NaN trial loss) gives ρ = −∞, so the step is rejected and the region shrinks.
        predicted: ``m(0) − m(s)``, or None where a method has no usable prediction.
            ``|predicted| < guard`` is round-off: [C-AN] sets ρ := 1 ("if function or model
            improvement are too small we set the ratio to 1 because of possible numerical
            instabilities"); curvlab does so unless the loss went up (then −∞: the guard
            protects against round-off, not for accepting an increase).
        guard: the round-off threshold (default `RHO_GUARD` = 1e-15, [C-AN]).

    Deviation (docs/deviations.md, "A model that predicts no decrease"): a predicted reduction
    ≤ −guard gives ρ = −∞, where the papers divide whatever the sign. Their analyses never
    meet it (a Cauchy decrease, seed 002 Assumption 2; Alg 2 from z₀ under Assumptions 1–2,
    seed 003 Thm 3; thesis Lemma 11 for the exact LM solve), but a truncated or warm-started
    solver, seed 003's z₀ itself (f(z₀) > 0 when α r ĝᵀHĝ > 2‖g‖) or an ``lr`` > 1 can. The
    decision is the literal ratio's whenever the loss went down (then actual / predicted < 0:
    unsuccessful); it differs where the literal ratio is positive because the loss went up as
    the model predicted, which would count as success and enlarge the region (or drop λ).
    """
    if not math.isfinite(actual):
        return -math.inf
    if predicted is None or (math.isfinite(predicted) and abs(predicted) < guard):
        return -math.inf if actual < 0.0 else 1.0
    if not math.isfinite(predicted) or predicted < 0.0:
        return -math.inf  # Deviation: the model predicts an increase (docstring)
    return actual / predicted


def scaled_model_decrease(
    scale: float, linear: float, quadratic: float, cubic: float = 0.0
) -> float:
    """``m(0) − m(α s)`` for ``m(α s) = α·linear + α²·quadratic + α³·cubic``.

    With ``linear = gᵀs``, ``quadratic = ½ sᵀBs`` and ``cubic = σ/3 ‖s‖³`` this is the
    predicted reduction of a step scaled by α (a learning rate applied to a model step).
    """
    a = scale
    return -(a * linear + a * a * quadratic + a * a * a * cubic)


def classify_step(rho: float, eta1: float, eta2: float) -> Outcome:
    """Very successful (ρ ≥ η₂), successful (η₁ ≤ ρ < η₂) or unsuccessful (otherwise, NaN too)."""
    if rho >= eta2:
        return "very_successful"
    if rho >= eta1:
        return "successful"
    return "unsuccessful"


def trust_region_update(
    radius: float,
    rho: float,
    *,
    eta1: float = 0.01,
    eta2: float = 0.95,
    increase: float = 1.1,
    decrease: float = 1.5,
    max_radius: float = 10.0,
) -> StepControl:
    """The trust-region radius rule of seed 002 (App. F.1; Table 1; [C-AN] ``trust_region.py``).

    ::

        ρ ≥ η₂:       accept,  Δ ← min(increase·Δ, Δ_max)
        η₁ ≤ ρ < η₂:  accept,  Δ unchanged
        ρ < η₁:       reject,  Δ ← Δ / decrease

    Defaults are seed 002's Table 1 (Δ_max = 10, η₂ = 0.95, γ₁ = 1.1, γ₂ = 1.5 uniform /
    Adagrad, 1.75 RMSProp) and [C-AN]'s η₁ = 0.01 (a column lost from Table 1). Seed 003's
    deterministic rule (Alg. 1 line 5, `deterministic_radius_update`) is the same rule with
    ``eta1=0.1, eta2=0.9, increase=2, decrease=2, max_radius=inf``.
    """
    outcome = classify_step(rho, eta1, eta2)
    if outcome == "very_successful":
        return StepControl(min(increase * radius, max_radius), True, outcome)
    if outcome == "successful":
        return StepControl(radius, True, outcome)
    return StepControl(radius / decrease, False, outcome)


def arc_sigma_update(
    sigma: float,
    rho: float,
    *,
    eta1: float = 0.1,
    eta2: float = 0.9,
    increase: float = 2.0,
    decrease: float = 2.0,
    min_sigma: float = 1e-16,
) -> StepControl:
    """The ARC regularisation rule (Cartis, Gould & Toint 2011; [C-SCR] ``scr.py``).

    ::

        ρ ≥ η₂:       accept,  σ ← max(σ / decrease, σ_min)
        η₁ ≤ ρ < η₂:  accept,  σ unchanged
        ρ < η₁:       reject,  σ ← increase·σ

    Defaults are [C-SCR]'s (η₁ = 0.1, η₂ = 0.9, γ₁ = γ₂ = 2, σ_min = 1e-16); seed 002 gives no
    ARC algorithm (§4, footnote 5: its norms "can directly be transferred"), so its use with
    seed 002's norms is a reconstruction.
    """
    outcome = classify_step(rho, eta1, eta2)
    if outcome == "very_successful":
        return StepControl(max(sigma / decrease, min_sigma), True, outcome)
    if outcome == "successful":
        return StepControl(sigma, True, outcome)
    return StepControl(increase * sigma, False, outcome)


def deterministic_radius_update(
    rho: float,
    radius: float,
    *,
    very_successful: float = 0.9,
    successful: float = 0.1,
    expand: float = 2.0,
    shrink: float = 0.5,
    max_radius: float | None = None,
) -> tuple[bool, float]:
    """Seed 003's deterministic radius rule (Alg. 1, line 5): ``(accept, next radius)``.

    Liu, Lee & Hsieh, "Better Generalization by Efficient Trust Region Method" (seed 003)::

        q ≥ 0.9:        accept,  r ← 2r     (capped at ``max_radius`` if given; no cap in Alg. 1)
        0.1 ≤ q < 0.9:  accept,  r kept
        q < 0.1:        reject,  r ← 0.5 r  (NaN q included)

    The same rule as `trust_region_update` with seed 003's constants, in seed 003's parametrisation
    (a shrink factor, an optional cap).
    """
    if rho >= very_successful:
        grown = expand * radius
        return True, grown if max_radius is None else min(grown, max_radius)
    if rho >= successful:
        return True, radius
    return False, shrink * radius


def stochastic_radius_update(
    rho: float,
    radius: float,
    grad_norm: float,
    *,
    max_radius: float,
    very_successful: float = 0.9,
    grad_radius_factor: float = 1.0,
    expand: float = 2.0,
    shrink: float = 0.5,
) -> tuple[bool, float]:
    """Seed 003's stochastic radius rule (Alg. 1, line 6): ``(accept, next radius)``.

    ::

        q ≥ 0.9 and ‖g‖ ≥ c·r:  accept,  r ← min{2r, r_max}
        otherwise:              reject,  r ← 0.5 r      (NaN q included)

    c = ``grad_radius_factor`` (1 in seed 003, "‖g‖ ≥ r_t" as printed; STORM, Chen, Menickelly &
    Scheinberg 2018, has a constant η₂ in its place). Unlike the deterministic rule there is no
    "successful" band: a step is accepted only when it is very successful.
    """
    if rho >= very_successful and grad_norm >= grad_radius_factor * radius:
        return True, min(expand * radius, max_radius)
    return False, shrink * radius


def levenberg_marquardt_update(
    damping: float, rho: float, *, epsilon: float = 0.25, boost: float = 1.01, drop: float = 0.99
) -> float:
    """The Levenberg–Marquardt rule of thesis §5.2.3 (Martens 2010's heuristic): next λ_LM.

    Thesis §5.2.3, with 0 < ε < 1/2 and drop < 1 < boost::

        if ρ_t < ε:            λ_LM ← boost·λ_LM
        else if ρ_t > 1 − ε:   λ_LM ← drop·λ_LM
        else:                  λ_LM unchanged

    (the damping of the next step is then λ_{t+1} = λ_LM + τ, kept by the optimizer). Defaults
    are the thesis's ch.5 settings (ε = 1/4, boost = 1.01, drop = 0.99, "same as in Kiros").
    The step itself is not rejected by this rule.

    Deviation: drops never take a positive λ_LM below the smallest normal double (2.2e-308).
    Below it the products lose their digits: λ_LM reaches 0 (drop ≤ 1/2) or a subnormal that
    boost = 1.01 rounds back to itself, and the rule could never raise it again.
    """
    # Deviation: a NaN ρ counts as ρ < ε (the model failed); the thesis does not treat it.
    if math.isnan(rho) or rho < epsilon:
        return boost * damping
    if rho > 1.0 - epsilon:
        return max(drop * damping, min(damping, sys.float_info.min))  # Deviation: floor
    return damping
