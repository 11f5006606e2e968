"""Hyperparameter checks: each raises `ValueError` naming the parameter and the valid range."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["LAYERWISE_RULES", "check_choice", "check_hyperparameters", "check_int", "check_range"]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a finite real in [low, high] (open ends as asked)."""
    lo_ok = _is_real(value) and (value > low if low_open else value >= low)
    hi_ok = _is_real(value) and (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(
            f"{name}: expected a finite number in {lb}{low}, {high}{hb}, got {value!r}"
        )
    return float(value)


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` must be an int ≥ low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    return str(value)


Rule = Callable[[str, Any], Any]

#: The hyperparameters the layer-wise methods share, with the thesis's ranges (one place).
LAYERWISE_RULES: dict[str, Rule] = {
    "lr": lambda n, v: check_range(n, v, 0.0),
    "damping": lambda n, v: check_range(n, v, 0.0, low_open=True),
    "momentum": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "weight_decay": lambda n, v: check_range(n, v, 0.0),
    "ema_decay": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "curvature_every": lambda n, v: check_int(n, v, 1),
    "inverse_every": lambda n, v: check_int(n, v, 1),
    "inverse_warmup": lambda n, v: check_int(n, v, 0),
}


def check_hyperparameters(
    values: Mapping[str, Any], rules: Mapping[str, Rule] = LAYERWISE_RULES
) -> dict[str, Any]:
    """Every value checked by its rule (in ``values``'s order); `ValueError` names the first
    bad one. Returns the checked values (floats as float)."""
    return {name: rules[name](name, value) for name, value in values.items()}
