"""Behaviour every curvlab optimizer must share (one entry per optimizer and variant).

Each must: decrease the loss on a seeded problem; continue bit-identically after a
state_dict round trip (float64); follow LR-scheduler changes of ``group["lr"]``; raise a
ValueError naming the parameter for invalid hyperparameters. A meta-test fails when an
optimizer exported by `curvlab.optim` has no entry here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import curvlab.optim
from curvlab import Objective
from curvlab.optim.switching import TwoStage
from curvlab.testing.models import regression_problem, tiny_mlp


@dataclass
class Case:
    cls: type
    kwargs: dict[str, Any]
    invalid: dict[str, Any] = field(default_factory=dict)


INVALID_KFAC = {
    "lr": -1.0,
    "damping": 0.0,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "ema_decay": 1.5,
    "curvature_every": 0,
    "inverse_every": 2.5,
    "inverse_warmup": -1,
    "fisher": "exact",
    "statistics": "during",
    "momentum_style": "nesterov",
}

INVALID_TSO_ALRA = {
    "lr": -1.0,
    "ema_decay": 0.0,
    "inverse_every": 0,
    "eps": 0.0,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "fisher": "exact",
    "init": "zeros",
}

INVALID_KBFGS = {
    "lr": -1.0,
    "damping": 0.0,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "ema_decay": 1.5,
    "curvature_every": 0,
    "mu1": 1.0,
    "variant": "ch4",
    "memory": 0,
    "pair_damping": "powell",
    "a_update": "exact",
    "a_init": "zeros",
    "damping_split": "pi",
    "g_init": "random",
    "momentum_style": "nesterov",
    "fallback_lr": "adam",
}

INVALID_TNT = {
    "lr": -1.0,
    "damping": 0.0,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "ema_decay": 1.5,
    "curvature_every": 0,
    "inverse_every": 2.5,
    "fisher": "exact",
    "inverse_method": "svd",
    "inverse_warmup": "yes",
}

INVALID_SHAMPOO = {
    "lr": -1.0,
    "damping": 0.0,
    "momentum": 1.0,
    "weight_decay": -0.1,
    "ema_decay": 1.5,
    "curvature_every": 0,
    "inverse_every": 2.5,
    "root_method": "svd",
    "inverse_warmup": 1,
}

INVALID_SMW = {
    "lr": -1.0,
    "damping": 0.0,
    "tau": 0.0,
    "boost": 1.0,
    "drop": 1.0,
    "epsilon": 0.5,
    "curvature_batch_size": 0,
    "accept_threshold": 0.3,
    "curvature_subset": "all",
    "ratio_point": "middle",
    "form": "lu",
}

INVALID_EFFICIENT_TR = {
    "radius": 0.0,
    "lr": -1.0,
    "step_size": 0.0,
    "n1": -1,
    "n2": 1.5,
    "fd_epsilon": 0.0,
    "max_radius": -1.0,
    "very_successful": 0.0,
    "successful": 0.95,
    "expand": 0.5,
    "shrink": 1.0,
    "grad_radius_factor": -1.0,
    "init_scale": 1.0,
    "armijo_sigma": 0.0,
    "armijo_shrink": 1.0,
    "armijo_max_backtracks": -1,
    "variant": "released",
    "radius_rule": "adaptive",
    "subproblem": "steihaug",
    "hvp": "ggn",
}

INVALID_HYBRID = {
    **INVALID_EFFICIENT_TR,
    "sgd_lr": -0.1,
    "patience": 0,
    "mode": "median",
    "min_delta": -1.0,
    "switch_at_step": 0,
    "switch_at_epoch": 2.5,
}

INVALID_EDF = {
    "lr": -1.0,
    "order": 0,
    "damping_scale": -1.0,
    "damping_power": -1.0,
    "kind": "fisher",
    "acceleration": "nesterov",
    "alpha": 1.0,
    "space": "logits",
    "restart_on_lr_change": "yes",
}

INVALID_HF = {
    "lr": -1.0,
    "damping": 0.0,
    "tau": 0.0,
    "boost": 1.0,
    "drop": 1.0,
    "epsilon": 0.5,
    "cg_max_iters": 0,
    "cg_tol": -1.0,
    "warm_start_decay": 1.5,
    "curvature_batch_size": 0,
    "accept_threshold": 0.3,
    "curvature_subset": "all",
    "ratio_point": "both",
}

INVALID_TR = {
    "lr": -1.0,
    "norm": "full",
    "radius": 0.0,
    "max_radius": -1.0,
    "eta1": 1.0,
    "eta2": 0.001,
    "increase": 0.5,
    "decrease": 1.0,
    "krylov_tol": -0.1,
    "max_krylov_dim": 0,
    "stopping": "eq53",
    "beta": 1.0,
    "eps": 0.0,
    "eps_mode": "both",
    "curvature": "fisher",
}

INVALID_ARC = {
    "lr": -1.0,
    "norm": "full",
    "sigma": 0.0,
    "min_sigma": -1.0,
    "eta1": -0.1,
    "eta2": 1.0,
    "increase": 0.5,
    "decrease": 0.9,
    "krylov_tol": float("inf"),
    "max_krylov_dim": 2.5,
    "beta": -0.1,
    "eps": -1e-8,
    "eps_mode": "both",
    "curvature": "fd",
}

CASES: dict[str, Case] = {
    "kfac": Case(curvlab.optim.KFAC, dict(lr=0.1, damping=0.1), INVALID_KFAC),
    "kfac-before-step": Case(
        curvlab.optim.KFAC, dict(lr=0.1, damping=0.1, statistics="before_step")
    ),
    "kfac-ef-ema-alg7": Case(
        curvlab.optim.KFAC,
        dict(
            lr=0.1,
            damping=0.1,
            fisher="empirical",
            pi_damping=False,
            momentum_style="ema",
            inverse_every=3,
            inverse_warmup=3,
            weight_decay=1e-3,
        ),
    ),
    "tso-alra-first-stage": Case(curvlab.optim.TSOALRAFirstStage, dict(lr=0.1), INVALID_TSO_ALRA),
    "tso-alra-first-stage-first-batch": Case(
        curvlab.optim.TSOALRAFirstStage, dict(lr=0.1, init="first_batch", inverse_every=5)
    ),
    "tso-alra": Case(
        curvlab.optim.TSOALRA,
        dict(lr=0.1, inverse_every=5, switch_at_step=20),
        {
            **INVALID_TSO_ALRA,
            "switch_at_step": 0,
            "switch_at_epoch": 2.5,
            "patience": -1,
            "min_delta": -1.0,
        },
    ),
    "tso-alra-switched-early": Case(
        curvlab.optim.TSOALRA, dict(lr=0.1, inverse_every=5, switch_at_step=3)
    ),
    "kbfgs": Case(curvlab.optim.KBFGS, dict(lr=0.1, damping=0.1), INVALID_KBFGS),
    "kbfgs-l": Case(curvlab.optim.KBFGS, dict(lr=0.1, damping=0.1, memory=5)),
    "kbfgs-20": Case(curvlab.optim.KBFGS, dict(lr=0.3, damping=0.1, variant="ch2")),
    "kbfgs-l-20": Case(curvlab.optim.KBFGS, dict(lr=0.3, damping=0.1, variant="ch2", memory=5)),
    "kbfgs-T3-wd": Case(
        curvlab.optim.KBFGS, dict(lr=0.1, damping=0.1, curvature_every=3, weight_decay=1e-3)
    ),
    "tnt": Case(curvlab.optim.TNT, dict(lr=0.01, damping=0.1), INVALID_TNT),
    "tnt-ef-schedule": Case(
        curvlab.optim.TNT,
        dict(
            lr=0.01,
            damping=0.1,
            fisher="empirical",
            curvature_every=2,
            inverse_every=3,
            weight_decay=1e-3,
            inverse_method="coupled_newton",
        ),
    ),
    "shampoo": Case(curvlab.optim.Shampoo, dict(lr=0.01, damping=1e-3), INVALID_SHAMPOO),
    "shampoo-eigh": Case(
        curvlab.optim.Shampoo,
        dict(
            lr=0.01,
            damping=1e-3,
            root_method="eigh",
            curvature_every=2,
            inverse_every=3,
            weight_decay=1e-3,
        ),
    ),
    "smw-gn": Case(curvlab.optim.SMWGN, dict(lr=1.0), INVALID_SMW),
    "smw-ng": Case(curvlab.optim.SMWNG, dict(lr=1.0), INVALID_SMW),
    "smw-ng-bd": Case(curvlab.optim.SMWNGBD, dict(lr=1.0), INVALID_SMW),
    "smw-gn-subsampled": Case(
        curvlab.optim.SMWGN, dict(lr=0.5, curvature_batch_size=8, ratio_point="step")
    ),
    "smw-ng-theorem6": Case(
        curvlab.optim.SMWNG, dict(lr=1.0, curvature_batch_size=8, accept_threshold=0.1)
    ),
    "efficient-tr": Case(curvlab.optim.EfficientTR, dict(), INVALID_EFFICIENT_TR),
    "efficient-tr-deterministic": Case(
        curvlab.optim.EfficientTR, dict(radius_rule="deterministic")
    ),
    "efficient-tr-fd": Case(curvlab.optim.EfficientTR, dict(hvp="hessian-fd")),
    "efficient-tr-code": Case(curvlab.optim.EfficientTR, dict(variant="code", radius=0.3)),
    "hybrid-tr-sgd": Case(curvlab.optim.HybridTRSGD, dict(switch_at_step=20), INVALID_HYBRID),
    "hybrid-tr-sgd-switched-early": Case(curvlab.optim.HybridTRSGD, dict(switch_at_step=3)),
    "edf": Case(curvlab.optim.EDF, {}, INVALID_EDF),
    "edf-k1": Case(curvlab.optim.EDF, dict(order=1)),
    "edf-w2": Case(curvlab.optim.EDF, dict(acceleration="w2", lr=0.2)),
    "edf-h": Case(curvlab.optim.EDF, dict(kind="hessian")),
    "edf-output-space": Case(curvlab.optim.EDF, dict(space="output")),
    "hessian-free": Case(curvlab.optim.HessianFree, {}, INVALID_HF),
    "hessian-free-subset-martens": Case(
        curvlab.optim.HessianFree,
        dict(lr=1.0, curvature_batch_size=8, boost=1.5, drop=2 / 3, cg_max_iters=10),
    ),
    "ellipsoidal-tr": Case(curvlab.optim.EllipsoidalTR, dict(radius=0.05), INVALID_TR),
    "ellipsoidal-tr-uniform": Case(curvlab.optim.EllipsoidalTR, dict(norm="uniform")),
    "ellipsoidal-tr-adagrad": Case(curvlab.optim.EllipsoidalTR, dict(norm="adagrad")),
    "ellipsoidal-tr-code": Case(
        curvlab.optim.EllipsoidalTR,
        dict(radius=0.05, stopping="model_decrease", eps_mode="code"),
    ),
    "ellipsoidal-tr-ggn": Case(curvlab.optim.EllipsoidalTR, dict(norm="uniform", curvature="ggn")),
    "arc": Case(curvlab.optim.ARC, {}, INVALID_ARC),
    "arc-uniform": Case(curvlab.optim.ARC, dict(norm="uniform")),
    "arc-ggn": Case(curvlab.optim.ARC, dict(curvature="ggn")),
}

# Base classes are not optimizers a user picks. TwoStage wraps two optimizers (it cannot be
# built from a model alone): it is conformance-tested through TSOALRA, a TwoStage subclass,
# and in tests/optim/test_switching.py.
NOT_OPTIMIZERS = {"BlockOptimizer", "ModelwiseOptimizer", "TensorwiseOptimizer", "TwoStage"}


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = regression_problem(n=16 * n, seed=1)
    return list(zip(x.split(16), y.split(16), strict=True))


def _run(opt: Any, model: nn.Module, batches: list) -> list[float]:
    return [float(opt.step(Objective(model, nn.MSELoss(), x, y))) for x, y in batches]


def _full_loss(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(float(nn.MSELoss()(model(x), y)) for x, y in batches) / len(batches)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_decreases(case: Case) -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(4)
    opt = case.cls(model, **case.kwargs)
    start = _full_loss(model, batches)
    for _ in range(10):
        _run(opt, model, batches)
    assert _full_loss(model, batches) < 0.7 * start


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_state_dict_round_trip_continues_bit_identically(case: Case) -> None:
    batches = _batches(12)
    model = tiny_mlp((4, 8, 3))
    opt = case.cls(model, **case.kwargs)
    _run(opt, model, batches[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _run(opt, model, batches[5:])
    resumed = tiny_mlp((4, 8, 3), seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = case.cls(resumed, **case.kwargs)
    opt2.load_state_dict(saved_opt)
    _run(opt2, resumed, batches[5:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lr_scheduler_is_respected(case: Case) -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(3)
    opt = case.cls(model, **case.kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    _run(opt, model, batches[:1])
    sched.step()
    frozen = [p.detach().clone() for p in model.parameters()]
    if opt.param_groups[0].get("weight_decay", 0.0):
        opt.param_groups[0]["weight_decay"] = 0.0  # lr = 0 must freeze even with decay
    _run(opt, model, batches[1:])
    for p, q in zip(model.parameters(), frozen, strict=True):
        assert torch.equal(p, q)


INVALID = [
    pytest.param(case, key, value, id=f"{name}-{key}")
    for name, case in CASES.items()
    for key, value in case.invalid.items()
]


@pytest.mark.parametrize(("case", "key", "value"), INVALID)
def test_invalid_hyperparameter_raises_naming_it(case: Case, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key}"):
        case.cls(tiny_mlp(), **{**case.kwargs, key: value})


@pytest.mark.parametrize(
    "case", [c for c in CASES.values() if c.invalid], ids=lambda c: c.cls.__name__
)
def test_invalid_hyperparameter_set_later_is_rejected_at_step(case: Case) -> None:
    model = tiny_mlp((4, 8, 3))
    opt = case.cls(model, **case.kwargs)
    opt.param_groups[0]["lr"] = float("nan")
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="^lr"):
        opt.step(Objective(model, nn.MSELoss(), x, y))


def test_every_exported_optimizer_is_under_test() -> None:
    exported = {
        name
        for name in curvlab.optim.__all__
        if isinstance(getattr(curvlab.optim, name), type)
        and issubclass(getattr(curvlab.optim, name), torch.optim.Optimizer)
    } - NOT_OPTIMIZERS
    tested = {case.cls.__name__ for case in CASES.values()}
    assert exported <= tested, f"missing from the conformance suite: {exported - tested}"
    assert all(
        any(c.cls is getattr(curvlab.optim, n) and c.invalid for c in CASES.values())
        for n in exported
    )


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality of state_dict-like structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, where


def _was_skipped(opt: Any) -> bool:
    info = opt.last_step_info
    return info.get("skipped") is True or info.get("accepted") is False


class _NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: a gradient fault with a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


class _Fault(nn.Module):
    """Appended to the model; when ``active``, every backward pass through it yields NaN (in
    autograd and in functional `torch.func` paths alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NaNBackward.apply(x) if self.active else x


def _without(sd: Any, keys: set[str]) -> Any:
    if isinstance(sd, dict):
        return {k: _without(v, keys) for k, v in sd.items() if k not in keys}
    if isinstance(sd, list):
        return [_without(v, keys) for v in sd]
    return sd


#: Counters that a skipped step advances by design, and TwoStage's schedule (a step-count
#: switch counts every call, skipped or not: curvlab.optim.switching).
_COUNTERS = {"skipped_steps", "rejected_steps", "global_step", "steps", "stage_steps"}
_SCHEDULE = {"stage", "switch", "second"}


@pytest.mark.parametrize("fault", ["nan-loss", "nan-gradient"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_non_finite_step_is_skipped_and_changes_nothing(case: Case, fault: str) -> None:
    """A NaN loss, or a NaN gradient with a finite loss, skips the step:
    parameters and every piece of optimizer state stay exactly as they were (the skip
    counters and the step report aside), the label sampler's random state included."""
    fault_module = _Fault()
    model = nn.Sequential(tiny_mlp((4, 8, 3)), fault_module)
    batches = _batches(3)
    opt = case.cls(model, **case.kwargs)
    _run(opt, model, batches[:2])
    params = [p.detach().clone() for p in model.parameters()]
    saved = copy.deepcopy(opt.state_dict())
    x, y = batches[2]
    if fault == "nan-loss":
        y = torch.full_like(y, float("nan"))
    fault_module.active = fault == "nan-gradient"
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert _was_skipped(opt), opt.last_step_info
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    ignored = _COUNTERS | (_SCHEDULE if isinstance(opt, TwoStage) else set())
    _assert_same(_without(opt.state_dict(), ignored), _without(saved, ignored))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_skipped_step_leaves_the_running_statistics(case: Case) -> None:
    """A NaN batch through a BatchNorm model is skipped and leaves the model's running
    statistics as they were (NaN running statistics would break evaluation later)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    try:
        opt = case.cls(model, **case.kwargs)
    except ValueError as error:  # SMW-GN/NG: no BatchNorm parameters (documented)
        assert "BatchNorm" in str(error)
        pytest.skip("refuses BatchNorm parameters")
    batches = _batches(3)
    _run(opt, model, batches[:2])
    before = copy.deepcopy(model.state_dict())
    x, y = batches[2]
    x = x.clone()
    x[0, 0] = float("nan")
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert _was_skipped(opt), opt.last_step_info
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
