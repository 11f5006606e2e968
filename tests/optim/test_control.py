"""Pure step-control rules: ρ with its guards, the TR radius rules of seed 002's Table 1 and
seed 003's Alg 1, ARC's σ, and the thesis's Levenberg–Marquardt rule."""

from __future__ import annotations

import math
import sys

import pytest

from curvlab.optim.control import (
    RHO_GUARD,
    arc_sigma_update,
    classify_step,
    deterministic_radius_update,
    levenberg_marquardt_update,
    reduction_ratio,
    scaled_model_decrease,
    stochastic_radius_update,
    trust_region_update,
)


def test_reduction_ratio_divides_and_guards() -> None:
    assert reduction_ratio(0.3, 0.6) == 0.5
    assert reduction_ratio(-0.3, 0.6) == -0.5
    # [C-AN]: a model decrease below 1e-15 (round-off) counts as ρ = 1 ...
    assert reduction_ratio(1e-3, 0.5 * RHO_GUARD) == 1.0
    assert reduction_ratio(1e-3, -0.5 * RHO_GUARD) == 1.0
    assert reduction_ratio(0.0, 0.0) == 1.0
    assert reduction_ratio(1e-3, None) == 1.0
    # ... unless the loss went up (curvlab: the guard is not there to accept an increase).
    assert reduction_ratio(-1e-3, 0.0) == -math.inf
    assert reduction_ratio(-1e-3, None) == -math.inf
    assert reduction_ratio(1e-3, 2e-15) == pytest.approx(5e11)
    # A non-finite trial loss (or model) rejects.
    assert reduction_ratio(-math.inf, 1.0) == -math.inf
    assert reduction_ratio(math.nan, 1.0) == -math.inf
    assert reduction_ratio(1.0, math.nan) == -math.inf
    assert reduction_ratio(1.0, math.inf) == -math.inf


def test_a_model_that_predicts_an_increase_is_unsuccessful() -> None:
    """Deviation (docs/deviations.md): the papers divide whatever the sign. Where the loss went
    down the literal ratio is negative (the same decision); where it went up as predicted the
    literal ratio is positive, 1 here, and would count as very successful."""
    assert reduction_ratio(0.5, -1.0) == -math.inf  # literal: −0.5, unsuccessful too
    assert reduction_ratio(-1.0, -1.0) == -math.inf  # literal: 1.0, very successful
    assert reduction_ratio(-1e-3, -2 * RHO_GUARD) == -math.inf
    for rho in (reduction_ratio(0.5, -1.0), reduction_ratio(-1.0, -1.0)):
        assert classify_step(rho, 0.0, 0.9) == "unsuccessful"
        assert not deterministic_radius_update(rho, 1.0)[0]
        assert levenberg_marquardt_update(1.0, rho, boost=2.0) == 2.0


def test_scaled_model_decrease_is_minus_the_model_along_the_ray() -> None:
    linear, quadratic, cubic = -2.0, 0.5, 0.25  # gᵀs, ½sᵀBs, σ/3‖s‖³
    for a in (0.0, 0.5, 1.0, 2.0):
        model = a * linear + a**2 * quadratic + a**3 * cubic
        assert scaled_model_decrease(a, linear, quadratic, cubic) == pytest.approx(-model)
    assert scaled_model_decrease(1.0, linear, quadratic) == 1.5


def test_classification_uses_closed_lower_thresholds() -> None:
    assert classify_step(0.95, 0.01, 0.95) == "very_successful"
    assert classify_step(0.9499, 0.01, 0.95) == "successful"
    assert classify_step(0.01, 0.01, 0.95) == "successful"
    assert classify_step(0.0099, 0.01, 0.95) == "unsuccessful"
    assert classify_step(math.nan, 0.01, 0.95) == "unsuccessful"
    assert classify_step(-math.inf, 0.01, 0.95) == "unsuccessful"
    assert classify_step(math.inf, 0.01, 0.95) == "very_successful"


@pytest.mark.parametrize(
    ("rho", "radius", "expected", "accepted", "outcome"),
    [
        (1.0, 0.05, 0.05 * 1.1, True, "very_successful"),  # Δ ← γ₁Δ, γ₁ = 1.1
        (0.95, 0.05, 0.05 * 1.1, True, "very_successful"),
        (2.0, 9.5, 10.0, True, "very_successful"),  # capped at Δ_max = 10
        (0.5, 0.05, 0.05, True, "successful"),  # kept
        (0.01, 0.05, 0.05, True, "successful"),
        (0.005, 0.05, 0.05 / 1.5, False, "unsuccessful"),  # Δ ← Δ/γ₂, γ₂ = 1.5
        (-3.0, 0.05, 0.05 / 1.5, False, "unsuccessful"),
        (-math.inf, 0.05, 0.05 / 1.5, False, "unsuccessful"),
        (math.nan, 0.05, 0.05 / 1.5, False, "unsuccessful"),
    ],
)
def test_trust_region_rule_follows_table_1(
    rho: float, radius: float, expected: float, accepted: bool, outcome: str
) -> None:
    update = trust_region_update(radius, rho)  # defaults: Table 1 (uniform/Adagrad rows)
    assert update.value == expected
    assert update.accepted is accepted
    assert update.outcome == outcome


def test_trust_region_rule_rmsprop_row_and_seed_003_rule() -> None:
    # Table 1, RMSProp row: γ₂ = 1.75.
    assert trust_region_update(1e-4, 0.0, decrease=1.75).value == 1e-4 / 1.75
    # Seed 003 Alg. 1 (deterministic): q ≥ 0.9 → 2r; 0.1 ≤ q < 0.9 keep; q < 0.1 → r/2.
    rule = dict(eta1=0.1, eta2=0.9, increase=2.0, decrease=2.0, max_radius=math.inf)
    assert trust_region_update(1.0, 0.95, **rule).value == 2.0
    assert trust_region_update(1.0, 0.5, **rule).value == 1.0
    rejected = trust_region_update(1.0, 0.05, **rule)
    assert rejected.value == 0.5 and not rejected.accepted


@pytest.mark.parametrize(
    ("rho", "sigma", "expected", "accepted"),
    [
        (0.95, 1.0, 0.5, True),  # σ ← σ/γ₂
        (0.9, 1e-16, 1e-16, True),  # floored at σ_min
        (0.5, 1.0, 1.0, True),
        (0.1, 1.0, 1.0, True),
        (0.09, 1.0, 2.0, False),  # σ ← γ₁σ
        (math.nan, 1.0, 2.0, False),
        (-math.inf, 1.0, 2.0, False),
    ],
)
def test_arc_sigma_rule_follows_scr_defaults(
    rho: float, sigma: float, expected: float, accepted: bool
) -> None:
    update = arc_sigma_update(sigma, rho)
    assert update.value == expected
    assert update.accepted is accepted


def test_levenberg_marquardt_rule() -> None:
    # Defaults: thesis ch.5 (ε = 1/4, boost = 1.01, drop = 0.99).
    assert levenberg_marquardt_update(1.0, 0.1) == 1.01  # ρ < ε: boost
    assert levenberg_marquardt_update(1.0, math.nan) == 1.01
    assert levenberg_marquardt_update(1.0, 0.8) == 0.99  # ρ > 1 − ε: drop
    assert levenberg_marquardt_update(1.0, 0.5) == 1.0
    assert levenberg_marquardt_update(2.0, 0.0, epsilon=0.1, boost=3.0) == 6.0


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.1, 3.0),  # ρ < ε: boost
        (-math.inf, 3.0),
        (math.nan, 3.0),  # Deviation: NaN counts as a failure
        (0.9, 1.0),  # ρ > 1 − ε: drop
        (math.inf, 1.0),
        (0.5, 2.0),  # in between: unchanged
        (0.25, 2.0),  # the thesis's comparisons are strict: the boundaries are "in between"
        (0.75, 2.0),
    ],
)
def test_levenberg_marquardt_rule_is_thesis_5_2_3(rho: float, expected: float) -> None:
    assert levenberg_marquardt_update(2.0, rho, epsilon=0.25, boost=1.5, drop=0.5) == expected


# --------------------------------------------------------------------------- seed 003, Alg 1
@pytest.mark.parametrize(
    ("rho", "accept", "radius"),
    [
        (1.5, True, 2.0),
        (0.9, True, 2.0),
        (0.5, True, 1.0),
        (0.1, True, 1.0),
        (0.05, False, 0.5),
        (-3.0, False, 0.5),
        (-math.inf, False, 0.5),
        (math.nan, False, 0.5),
    ],
)
def test_deterministic_rule_is_seed_003_alg1_line5(rho: float, accept: bool, radius: float) -> None:
    assert deterministic_radius_update(rho, 1.0) == (accept, radius)
    # The same rule as trust_region_update with seed 003's constants.
    rule = trust_region_update(
        1.0, rho, eta1=0.1, eta2=0.9, increase=2.0, decrease=2.0, max_radius=math.inf
    )
    assert (rule.accepted, rule.value) == (accept, radius)


def test_deterministic_rule_options() -> None:
    assert deterministic_radius_update(0.95, 1.0, max_radius=1.5) == (True, 1.5)
    assert deterministic_radius_update(0.95, 1.0, very_successful=0.99) == (True, 1.0)
    assert deterministic_radius_update(0.2, 1.0, successful=0.25, shrink=0.25) == (False, 0.25)
    assert deterministic_radius_update(0.95, 1.0, expand=3.0) == (True, 3.0)


@pytest.mark.parametrize(
    ("rho", "grad_norm", "accept", "radius"),
    [
        (0.95, 2.0, True, 2.0),  # q ≥ 0.9 and ‖g‖ ≥ r: r ← min(2r, r_max)
        (0.95, 1.0, True, 2.0),  # ‖g‖ = r counts
        (0.95, 0.99, False, 0.5),  # ‖g‖ < r: reject even a very good step
        (0.5, 5.0, False, 0.5),  # q < 0.9: reject (no "successful" band)
        (math.nan, 5.0, False, 0.5),
        (-math.inf, 5.0, False, 0.5),
    ],
)
def test_stochastic_rule_is_seed_003_alg1_line6(
    rho: float, grad_norm: float, accept: bool, radius: float
) -> None:
    assert stochastic_radius_update(rho, 1.0, grad_norm, max_radius=10.0) == (accept, radius)


def test_stochastic_rule_caps_at_max_radius_and_scales_the_gradient_test() -> None:
    assert stochastic_radius_update(1.0, 1.0, 5.0, max_radius=1.2) == (True, 1.2)
    assert stochastic_radius_update(1.0, 1.0, 1.5, max_radius=9.0, grad_radius_factor=2.0) == (
        False,
        0.5,
    )
    assert stochastic_radius_update(1.0, 1.0, 0.6, max_radius=9.0, grad_radius_factor=0.5) == (
        True,
        2.0,
    )


def test_levenberg_marquardt_drops_stop_at_the_smallest_normal_float() -> None:
    """Without the floor, 0.5ⁿ reaches 0 and 0.99ⁿ a subnormal that boost = 1.01 rounds back to
    itself: λ_LM could never grow again."""
    tiny = sys.float_info.min
    for drop in (0.5, 0.99):
        damping = 1.0
        for _ in range(80_000):
            damping = levenberg_marquardt_update(damping, 1.0, drop=drop)
            if damping == tiny:
                break
        assert damping == tiny
        assert levenberg_marquardt_update(damping, 1.0, drop=drop) == tiny
        assert levenberg_marquardt_update(damping, 0.0) == 1.01 * tiny > tiny  # boost recovers
    assert levenberg_marquardt_update(0.0, 1.0) == 0.0  # the rule itself keeps 0 (validated
    assert levenberg_marquardt_update(1.0, 1.0) == 0.99  # by the optimizers: damping > 0)
