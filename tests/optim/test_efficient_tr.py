"""Seed 003's efficient trust region (Alg 1 + Alg 2), its released-code mode, and the Hybrid;
passes per step and no graph after a step. (Its radius rules: tests/optim/test_control.py;
validation and the other conformance checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian

from curvlab import Objective
from curvlab.optim.efficient_tr import EfficientTR, HybridTRSGD
from curvlab.testing.conformance import batches as _batches
from curvlab.testing.conformance import check_state_dict_round_trip
from curvlab.testing.conformance import run as _run
from curvlab.testing.models import regression_problem, tiny_mlp
from curvlab.testing.spies import count_forwards, spy_operators

# --------------------------------------------------------------------------- helpers


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _dense_hessian_and_grad(model: nn.Module, objective: Objective) -> tuple[Tensor, Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(flat: Tensor) -> Tensor:
        parts, off = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = flat[off : off + s.numel()].view(s)
            off += s.numel()
        return objective.functional_loss(parts)

    theta = _flat(model)
    with torch.enable_grad():
        H = hessian(f)(theta)
        g = torch.func.grad(f)(theta)
    return H, g


def _dense_tr_solution(H: Tensor, g: Tensor, radius: float) -> Tensor:
    """Global minimiser of gᵀs + ½ sᵀHs over ‖s‖ ≤ r for positive definite H (secular eq.)."""
    mu, V = torch.linalg.eigh(H)
    gv = V.T @ g

    def s(lam: float) -> Tensor:
        return -(V @ (gv / (mu + lam)))

    if float(s(0.0).norm()) <= radius:
        return s(0.0)
    lo, hi = 0.0, float(g.norm()) / radius
    for _ in range(200):  # ‖s(λ)‖ decreases in λ; ‖s(‖g‖/r)‖ ≤ r
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(s(mid).norm()) > radius else (lo, mid)
    return s(hi)


# --------------------------------------------------------------------------- the step


def _quadratic() -> tuple[nn.Module, Objective]:
    """A linear model with MSE: the loss is a convex quadratic in the parameters."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(torch.float64)
    x, y = regression_problem(n=16, seed=2)
    return model, Objective(model, nn.MSELoss(), x, y)


@pytest.mark.parametrize("radius_factor", [0.3, 2.0])  # boundary and interior solutions
def test_exact_hvp_step_approaches_the_dense_tr_solution(radius_factor: float) -> None:
    model, objective = _quadratic()
    H, g = _dense_hessian_and_grad(model, objective)
    newton = torch.linalg.solve(H, -g)
    radius = radius_factor * float(newton.norm())
    expected = _dense_tr_solution(H, g, radius)
    beta = float(torch.linalg.eigvalsh(H).abs().max())
    opt = EfficientTR(
        model,
        radius,
        step_size=0.9 / beta,  # Assumption 1
        n1=400,
        n2=400,
        radius_rule="deterministic",
    )
    before = _flat(model)
    opt.step(objective)
    info = opt.last_step_info
    step = _flat(model) - before
    assert info["accepted"]
    assert info["hit_boundary"] == (radius_factor < 1.0)
    assert torch.allclose(step, expected, rtol=0, atol=1e-8 * float(expected.norm()))
    assert info["rho"] == pytest.approx(1.0, abs=1e-9)  # the quadratic model is exact
    assert info["next_radius"] == 2.0 * radius  # q ≥ 0.9: line 5 doubles r
    assert info["solver_iterations"] == info["phase1_iterations"] + info["phase2_iterations"]
    assert info["hvp_products"] >= info["solver_iterations"]


def test_lr_scales_the_step_and_the_predicted_reduction() -> None:
    model, objective = _quadratic()
    reference = copy.deepcopy(model)
    opt = EfficientTR(model, 0.2, lr=0.5, radius_rule="deterministic", n1=3, n2=3)
    ref = EfficientTR(reference, 0.2, radius_rule="deterministic", n1=3, n2=3)
    before = _flat(model)
    opt.step(objective)
    ref.step(Objective(reference, nn.MSELoss(), objective.inputs, objective.targets))
    assert torch.allclose(_flat(model) - before, 0.5 * (_flat(reference) - before))
    assert opt.last_step_info["rho"] == pytest.approx(1.0, abs=1e-9)


def test_paper_defaults_take_one_or_two_inner_steps_and_report_everything() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = EfficientTR(model)
    _run(opt, model, _batches(3))
    info = opt.last_step_info
    for key in (
        "rho",
        "radius",
        "next_radius",
        "accepted",
        "solver_iterations",
        "solver_status",
        "predicted_reduction",
        "trial_loss",
        "grad_norm",
        "hvp_products",
    ):
        assert key in info
    assert 1 <= info["solver_iterations"] <= 2  # N1 = N2 = 1 ([P3] §4)
    assert opt.radius == info["next_radius"]


def test_rejected_step_leaves_parameters_exactly() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    # Stochastic rule: ‖g‖ < r = 100 rejects whatever q is (Alg 1 line 6).
    opt = EfficientTR(model, 100.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(Objective(model, nn.MSELoss(), x, y))
    info = opt.last_step_info
    assert not info["accepted"]
    assert info["trial_loss"] is not None and info["grad_norm"] < 100.0
    assert info["next_radius"] == 50.0 and opt.radius == 50.0
    assert opt.global_state["rejected_steps"] == 1
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_deterministic_rule_rejects_a_bad_step_exactly() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    # A huge radius and step size: the (projected) step overshoots and q < 0.1.
    opt = EfficientTR(model, 50.0, step_size=50.0, radius_rule="deterministic")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert opt.last_step_info["rho"] < 0.1 and not opt.last_step_info["accepted"]
    assert opt.radius == 25.0
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


class _OnlyHere(nn.Module):
    """MSE at the outputs it first saw; infinite anywhere else (a trial point)."""

    def __init__(self) -> None:
        super().__init__()
        self.reference: Tensor | None = None

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = ((outputs - targets) ** 2).mean()
        if self.reference is None:
            self.reference = outputs.detach().clone()
        return loss if torch.equal(outputs.detach(), self.reference) else loss * math.inf


def test_non_finite_trial_loss_rejects_and_shrinks() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    opt = EfficientTR(model, 0.1, radius_rule="deterministic")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(Objective(model, _OnlyHere(), x, y))
    info = opt.last_step_info
    assert info["trial_loss"] == math.inf and info["rho"] == -math.inf
    assert not info["accepted"] and opt.radius == 0.05
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_non_finite_curvature_skips_the_step() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    # ε = 1e300: the perturbed gradient overflows, so every product is non-finite.
    opt = EfficientTR(model, 0.5, hvp="hessian-fd", fd_epsilon=1e300)
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(Objective(model, nn.MSELoss(), x, y))
    assert torch.isfinite(loss)
    assert opt.last_step_info["skipped"]
    assert "curvature" in opt.last_step_info["reason"]
    assert opt.radius == 0.5 and opt.global_state["skipped_steps"] == 1
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_plain_closure_is_a_type_error() -> None:
    model = tiny_mlp()
    opt = EfficientTR(model)
    with pytest.raises(TypeError):
        opt.step(lambda: torch.tensor(0.0))


def test_finite_difference_products_match_the_exact_ones() -> None:
    x, y = _batches(1)[0]
    steps = []
    for hvp in ("hessian", "hessian-fd"):
        model = tiny_mlp((4, 8, 3))
        opt = EfficientTR(model, 0.3, hvp=hvp, n1=5, n2=5, radius_rule="deterministic")
        before = _flat(model)
        opt.step(Objective(model, nn.MSELoss(), x, y))
        assert opt.last_step_info["accepted"]
        steps.append(_flat(model) - before)
    assert torch.allclose(steps[1], steps[0], rtol=0, atol=1e-4 * float(steps[0].norm()))
    assert not torch.equal(steps[1], steps[0])  # really a different product


def test_code_variant_is_the_released_fixed_radius_loop() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    objective = Objective(model, nn.MSELoss(), x, y)
    H, g = _dense_hessian_and_grad(model, objective)
    eta, radius = 0.1, 0.7
    # [C-TR] iter_TR with max_inner = 1 (docs/deviations.md), with the exact Hessian.
    z = -eta * g
    z = z - 0.5 * eta * (H @ z + g)
    z = radius * z / (z.norm() + 1e-9)
    opt = EfficientTR(model, radius, variant="code")
    assert (opt.subproblem, opt.radius_rule, opt.hvp) == ("code", "fixed", "hessian-fd")
    before = _flat(model)
    opt.step(objective)
    step = _flat(model) - before
    assert torch.allclose(step, z, rtol=0, atol=1e-5 * radius)
    info = opt.last_step_info
    assert info["accepted"] and info["trial_loss"] is None and math.isnan(info["rho"])
    assert info["radius_update"] == "fixed"


def test_fixed_radius_accepts_every_step_and_follows_the_group_radius() -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(4)
    opt = EfficientTR(model, 0.2, radius_rule="fixed", subproblem="code")
    for i, (x, y) in enumerate(batches):
        if i == 2:
            opt.param_groups[0]["radius"] = 0.05
        before = _flat(model)
        opt.step(Objective(model, nn.MSELoss(), x, y))
        assert opt.last_step_info["accepted"]
        expected = 0.2 if i < 2 else 0.05
        assert float((_flat(model) - before).norm()) == pytest.approx(expected, rel=1e-6)


def test_lr_zero_freezes_parameters_and_radius() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = EfficientTR(model, 0.3, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    _run(opt, model, _batches(3))
    assert opt.radius == 0.3
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- passes per step


@pytest.mark.parametrize(
    ("kwargs", "forwards_per_product", "trial"),
    [
        ({}, 0, 1),  # exact products reuse the kept gradient graph
        ({"hvp": "hessian-fd"}, 1, 1),  # one gradient (a forward) per product
        ({"variant": "code"}, 1, 0),  # [C-TR]: no ratio test, no trial forward
    ],
)
def test_one_step_is_one_gradient_pass_plus_products(
    kwargs: dict[str, Any], forwards_per_product: int, trial: int
) -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _batches(1)[0]
    objective = Objective(model, nn.MSELoss(), x, y)
    _, g = _dense_hessian_and_grad(model, objective)
    opt = EfficientTR(model, 0.3, **kwargs)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        opt.step(objective)
    info = opt.last_step_info
    assert forwards[0] == 1 + forwards_per_product * info["hvp_products"] + trial
    assert all(p.grad is None for p in model.parameters())  # the closure never ran
    assert info["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert refs[0]() is None and opt._operator is None  # no autograd graph outlives the step


@pytest.mark.parametrize("hvp", ["hessian", "hessian-fd"])
def test_batchnorm_model_builds_the_operator_as_its_training_pass(hvp: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = EfficientTR(model, 0.3, hvp=hvp)  # type: ignore[arg-type]
    refs = spy_operators(opt)
    for i, (x, y) in enumerate(_batches(2), start=1):
        reference = copy.deepcopy(model)
        reference(x)  # one training pass at the step's parameters
        with count_forwards(model) as forwards:
            opt.step(Objective(model, nn.MSELoss(), x, y))
        products = opt.last_step_info["hvp_products"] if hvp == "hessian-fd" else 0
        assert forwards[0] == 2 + products  # build (the training pass), fd products, trial
        assert int(model[1].num_batches_tracked) == i  # running statistics move once per step
        for name in ("running_mean", "running_var"):
            assert torch.equal(getattr(model[1], name), getattr(reference[1], name))
    assert all(p.grad is None for p in model.parameters())
    assert all(ref() is None for ref in refs)


def test_dropout_model_keeps_the_training_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = EfficientTR(model, 0.3)
    x, y = _batches(1)[0]
    with count_forwards(model) as forwards:
        opt.step(Objective(model, nn.MSELoss(), x, y))
    assert forwards[0] == 3  # the closure's training pass, the operator's build, the trial
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- Hybrid


def _gradient(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    loss = nn.MSELoss()(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_hybrid_switches_at_a_step_to_plain_sgd() -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(4)
    opt = HybridTRSGD(model, switch_at_step=3, sgd_lr=0.1)
    _run(opt, model, batches[:3])
    assert opt.stage == 2 and opt.last_step_info["switched"]
    assert opt.last_step_info["stage"] == 1 and "rho" in opt.last_step_info
    assert isinstance(opt.second, torch.optim.SGD)
    x, y = batches[3]
    grads = _gradient(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    _run(opt, model, [(x, y)])
    for p, q, d in zip(model.parameters(), before, grads, strict=True):
        # θ ← θ − η∇L, η = 0.1, no momentum
        assert torch.allclose(p, q - 0.1 * d, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("mode", "values", "switch_at"),
    [("max", [0.5, 0.6, 0.6], 3), ("max", [0.5, 0.4], 2), ("min", [1.0, 0.8, 0.9], 3)],
)
def test_hybrid_switches_when_the_accuracy_stops_increasing(
    mode: str, values: list[float], switch_at: int
) -> None:
    model = tiny_mlp((4, 8, 3))
    batches = _batches(len(values))
    opt = HybridTRSGD(model, mode=mode)  # patience 1: the first epoch without improvement
    for i, ((x, y), value) in enumerate(zip(batches, values, strict=True), start=1):
        _run(opt, model, [(x, y)])
        switched = opt.report_validation(value)
        assert switched == (i == switch_at)
    assert opt.stage == 2 and opt.schedule["switch"]["reason"] == "patience"


@pytest.mark.parametrize("rule", ["stochastic", "deterministic"])
def test_radius_survives_state_dict(rule: str) -> None:
    check_state_dict_round_trip(lambda m: EfficientTR(m, 0.3, radius_rule=rule), 3, total=8)


@pytest.mark.parametrize("save_at", [2, 5])  # before and after the switch at step 4
def test_hybrid_resume_across_the_switch_is_bit_identical(save_at: int) -> None:
    check_state_dict_round_trip(lambda m: HybridTRSGD(m, switch_at_step=4), save_at, total=8)


def test_an_uphill_subproblem_point_is_rejected_not_accepted_as_very_successful() -> None:
    """[P3] Alg 2 can return f(z_t) > 0 with the paper's own settings: f(z₀) > 0 when
    α r ĝᵀHĝ > 2‖g‖ (here near a minimiser of a quadratic loss, where the model is exact). The
    literal q_t = (F(x) − F(x + z)) / (f(0) − f(z)) is then 1 (the loss went up exactly as
    predicted) and line 5 would accept and double r; curvlab rejects and halves it
    (docs/deviations.md, "A model that predicts no decrease")."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = x @ torch.ones(4, 1, dtype=torch.float64) + 1e-3 * torch.randn(32, 1, dtype=torch.float64)
    with torch.no_grad():  # near the least-squares solution: ‖g‖ small, curvature O(1)
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T + 1e-3)
    opt = EfficientTR(model, radius=10.0, radius_rule="deterministic", step_size=1e-6)
    before = _flat(model)
    loss = float(opt.step(Objective(model, nn.MSELoss(), x, y)))
    info = opt.last_step_info
    assert info["predicted_reduction"] < 0  # the model predicts an increase ...
    literal = (loss - info["trial_loss"]) / info["predicted_reduction"]
    assert literal == pytest.approx(1.0, rel=1e-6)  # ... which happens: literal q_t = 1
    assert info["rho"] == -math.inf and not info["accepted"]
    assert info["next_radius"] == 5.0
    assert torch.equal(_flat(model), before)


def test_a_step_size_that_breaks_assumption_1_is_reported_in_the_step_info() -> None:
    """η ≥ 1/‖H‖ (Alg 2's Assumption 1): the solver's status says so, with its bound on ‖H‖."""
    model = tiny_mlp((4, 8, 3))
    x, y = regression_problem(n=16, d_out=3, seed=1)
    obj = Objective(model, nn.MSELoss(), x, y)
    H, _ = _dense_hessian_and_grad(model, obj)
    beta = float(torch.linalg.eigvalsh(H).abs().max())
    for step_size, status in ((0.5 / beta, "max_iterations"), (20.0 / beta, "step_size_too_large")):
        opt = EfficientTR(copy.deepcopy(model), step_size=step_size, n1=3, n2=3)
        opt.step(Objective(opt.model, nn.MSELoss(), x, y))
        info = opt.last_step_info
        assert info["solver_status"] == status
        assert 0.0 < info["hessian_norm_bound"] <= beta * (1 + 1e-9)
