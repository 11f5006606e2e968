"""Behaviour every curvlab optimizer must share, over every configuration of
`curvlab.optim.registry` (the checks: `curvlab.testing.conformance`).

Each configuration must: decrease the loss on a seeded problem (float64 and float32); continue
bit-identically after a state_dict round trip (float64); follow LR-scheduler changes of
``group["lr"]``; skip a step whose loss or gradient is not finite, changing nothing. Each method
must raise a ValueError naming the parameter for every invalid hyperparameter the registry
derives from its ranges, at construction and, for the ones in ``param_groups``, at the next step.
Meta-tests: every optimizer exported by `curvlab.optim` has a `Method`, every constructor
hyperparameter a domain, every method a configuration here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

import curvlab.optim
from curvlab.optim.registry import (
    CONFIGS,
    METHODS,
    Config,
    Method,
    Real,
    conformance_configs,
)
from curvlab.testing import conformance as check
from curvlab.testing.models import tiny_mlp

SUITE = conformance_configs()

# Base classes are not optimizers a user picks. TwoStage wraps two optimizers (it cannot be
# built from a model alone): it is conformance-tested through TSOALRA and HybridTRSGD, its
# subclasses, and in tests/optim/test_switching.py.
NOT_OPTIMIZERS = {"BlockOptimizer", "ModelwiseOptimizer", "TensorwiseOptimizer", "TwoStage"}


def _primary(method: Method) -> Config:
    """The method's first configuration in the suite: the base of its invalid-value cases."""
    return next(c for c in SUITE.values() if c.method is method)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_loss_decreases(config: Config, dtype: torch.dtype) -> None:
    check.check_loss_decreases(config.build, dtype)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_state_dict_round_trip_continues_bit_identically(config: Config) -> None:
    check.check_state_dict_round_trip(config.build)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_lr_scheduler_is_respected(config: Config) -> None:
    check.check_lr_scheduler(config.build)


@pytest.mark.parametrize("fault", check.FAULTS)
@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_non_finite_step_is_skipped_and_changes_nothing(config: Config, fault: str) -> None:
    check.check_non_finite_step_is_skipped(config.build, fault)


@pytest.mark.parametrize("config", SUITE.values(), ids=SUITE.keys())
def test_skipped_step_leaves_the_running_statistics(config: Config) -> None:
    check.check_skip_leaves_running_statistics(config.build)


def _plain_entries(config: Config) -> list[str]:
    """The entry points besides the `Objective` that the configuration takes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = config.build(tiny_mlp((4, 8, 3))).entry_points()
    assert "objective" in entries
    return [e for e in check.ENTRIES if e in entries and e != "objective"]


PLAIN = [
    pytest.param(config, entry, id=f"{name}-{entry}")
    for name, config in SUITE.items()
    for entry in _plain_entries(config)
]


@pytest.mark.parametrize(("config", "entry"), PLAIN)
def test_every_entry_point_conforms(config: Config, entry: str) -> None:
    """Through a plain closure and through the user's own backward pass: the loss decreases,
    a state_dict round trip continues bit-identically, a scheduler's lr = 0 freezes, and a
    non-finite step is skipped changing nothing."""
    check.check_loss_decreases(config.build, torch.float64, entry)
    check.check_state_dict_round_trip(config.build, entry=entry)
    check.check_lr_scheduler(config.build, entry)
    for fault in check.FAULTS:
        check.check_non_finite_step_is_skipped(config.build, fault, entry)


@pytest.mark.parametrize(
    "config",
    [c for c in SUITE.values() if _plain_entries(c)],
    ids=[n for n, c in SUITE.items() if _plain_entries(c)],
)
def test_entry_points_run_the_same_algorithm(config: Config) -> None:
    check.check_entry_points_agree(config.build, _plain_entries(config))


INVALID = [
    pytest.param(_primary(method), key, value, id=f"{name}-{key}-{value!r}")
    for name, method in METHODS.items()
    for key, values in method.invalid_values().items()
    for value in values
]


@pytest.mark.parametrize(("config", "key", "value"), INVALID)
def test_invalid_hyperparameter_raises_naming_it(config: Config, key: str, value: Any) -> None:
    check.check_invalid_hyperparameter(config.build, key, value)


def _in_groups(config: Config) -> list[str]:
    group = config.build(tiny_mlp()).param_groups[0]
    return [key for key in config.method.invalid_values() if key in group]


SET_LATER = [
    # The last derived value: NaN for a real, a non-integer for an integer.
    pytest.param(_primary(method), key, method.invalid_values()[key][-1], id=f"{name}-{key}")
    for name, method in METHODS.items()
    for key in _in_groups(_primary(method))
]


@pytest.mark.parametrize(("config", "key", "value"), SET_LATER)
def test_invalid_hyperparameter_set_later_is_rejected_at_step(
    config: Config, key: str, value: Any
) -> None:
    check.check_invalid_hyperparameter_set_later(config.build, key, value)


# ------------------------------------------------------------------------------- meta-tests
def _exported_optimizers() -> set[str]:
    return {
        name
        for name in curvlab.optim.__all__
        if isinstance(getattr(curvlab.optim, name), type)
        and issubclass(getattr(curvlab.optim, name), torch.optim.Optimizer)
    } - NOT_OPTIMIZERS


def test_every_exported_optimizer_is_in_the_registry_and_under_test() -> None:
    exported = _exported_optimizers()
    assert exported <= set(METHODS), (
        f"missing from curvlab.optim.registry: {exported - set(METHODS)}"
    )
    for name, method in METHODS.items():
        assert method.cls is getattr(curvlab.optim, name)
        assert any(c.method is method for c in SUITE.values()), f"{name}: no configuration"
        assert method.invalid_values(), f"{name}: no invalid value"


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_every_hyperparameter_has_a_domain_and_every_range_a_hyperparameter(
    method: Method,
) -> None:
    domains = method.domains()  # raises for a numeric hyperparameter without a range
    assert set(method.ranges) <= set(domains), set(method.ranges) - set(domains)
    assert set(method.fuzz) <= set(domains) and set(method.invalid) <= set(domains)
    assert method.unchecked <= set(domains)


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_fuzzed_values_and_defaults_lie_in_their_domains(method: Method) -> None:
    domains = method.domains()
    for name, sample in method.fuzz.items():
        assert sample.values_within(domains[name]), (name, sample, domains[name])
    for name, domain in domains.items():
        for value in domain.invalid():
            assert not domain.contains(value), (name, value)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_configurations_name_only_hyperparameters_inside_their_domains(config: Config) -> None:
    domains = config.method.domains()
    for name, value in config.test_kwargs.items():
        assert domains[name].contains(value), (config.name, name, value)
    for name, value in (config.bench.defaults if config.bench else {}).items():
        if name != "warm_start":
            assert domains[name].contains(value), (config.name, name, value)


def test_real_ranges_give_values_just_outside_each_end() -> None:
    assert Real(0.0).invalid()[0] == -0.1 and math.isnan(Real(0.0).invalid()[-1])
    assert Real(0.0, 1.0, high_open=True).invalid()[:2] == (-0.1, 1.0)
    assert Real(0.01, 1.0, high_open=True).invalid()[0] == pytest.approx(0.009)
