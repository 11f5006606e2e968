"""EDF (seed 000): Alg 1 with k = n is the exact damped solve, Alg 2 equals one MINRES step,
λ = a‖g‖^b, W1 / W2 by hand, EDF-H vs EDF-G, the output-space variant, skips, passes per step
(loss and g from the operator's build, which moves BatchNorm statistics once; the closure for
dropout), no graph after a step, invalid combinations. (Validation and the other conformance
checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

import curvlab.optim.edf as edf_module
from curvlab import Objective
from curvlab.optim.edf import EDF, edf_damping, edf_first_order_direction
from curvlab.solvers import SolverResult, minres
from curvlab.testing.models import regression_problem, tiny_mlp
from curvlab.testing.spies import count_forwards, spy_operators

F64 = torch.float64


# --------------------------------------------------------------------------- dense references
@dataclass
class Dense:
    theta: Tensor
    g: Tensor
    H: Tensor  # Hessian of the loss
    G: Tensor  # GGN Jᵀ H_L J
    J: Tensor  # (M, n)
    HL: Tensor  # (M, M)
    u: Tensor  # ∂L/∂φ, flat (M,)


def _unflat(model: nn.Module, v: Tensor) -> dict[str, Tensor]:
    out, o = {}, 0
    for n, p in model.named_parameters():
        out[n] = v[o : o + p.numel()].view_as(p)
        o += p.numel()
    return out


def _dense(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Dense:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(t: Tensor) -> Tensor:
        return functional_call(model, _unflat(model, t), (x,))

    def loss(t: Tensor) -> Tensor:
        return loss_fn(outputs(t), y)

    out = outputs(theta).detach()
    J = jacrev(outputs)(theta).reshape(out.numel(), -1)
    HL = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    u = grad(lambda o: loss_fn(o, y))(out).reshape(-1)
    return Dense(theta, grad(loss)(theta), hessian(loss)(theta), J.T @ HL @ J, J, HL, u)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _problem(loss: str = "mse", n: int = 5) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    model = tiny_mlp((2, 3, 2))  # 17 parameters
    x, y = regression_problem(n=n, d_in=2, d_out=2, seed=4)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.tensor([0, 1, 1, 0, 1][:n])
    return model, nn.MSELoss(), x, y


def _solve(A: Tensor, lam: float, g: Tensor) -> Tensor:
    return torch.linalg.solve(A + lam * torch.eye(len(g), dtype=F64), g)


# --------------------------------------------------------------------------- Alg 1 / Alg 2
@pytest.mark.parametrize(("kind", "loss"), [("ggn", "mse"), ("ggn", "ce"), ("hessian", "mse")])
def test_order_n_is_the_exact_damped_solve(kind: str, loss: str) -> None:
    model, loss_fn, x, y = _problem(loss)
    ref = _dense(model, loss_fn, x, y)
    n = ref.theta.numel()
    opt = EDF(model, lr=1.0, order=n, kind=kind, acceleration="none")  # type: ignore[arg-type]
    opt.step(Objective(model, loss_fn, x, y))
    lam = float(ref.g.norm())  # a = b = 1
    A = ref.G if kind == "ggn" else ref.H
    expected = ref.theta - _solve(A, lam, ref.g)
    torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)
    info = opt.last_step_info
    assert info["damping"] == pytest.approx(lam, rel=1e-12)
    assert info["solver_iterations"] == n and info["matvecs"] == n
    assert info["accepted"] is True


def test_edf_h_uses_the_hessian_and_edf_g_the_ggn() -> None:
    model, loss_fn, x, y = _problem("mse")
    ref = _dense(model, loss_fn, x, y)
    assert float((ref.H - ref.G).norm()) > 0.1 * float(ref.G.norm())  # they differ here
    n = ref.theta.numel()
    lam = float(ref.g.norm())
    steps = {}
    for kind in ("ggn", "hessian"):
        m = copy.deepcopy(model)
        opt = EDF(m, lr=1.0, order=n, kind=kind, acceleration="none")  # type: ignore[arg-type]
        opt.step(Objective(m, loss_fn, x, y))
        steps[kind] = ref.theta - _flat(m)
    torch.testing.assert_close(steps["ggn"], _solve(ref.G, lam, ref.g), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(steps["hessian"], _solve(ref.H, lam, ref.g), rtol=1e-7, atol=1e-9)
    assert float((steps["ggn"] - steps["hessian"]).norm()) > 1e-3


def test_closed_form_equals_minres_with_one_iteration() -> None:
    gen = torch.Generator().manual_seed(0)
    for shift in (0.0, 0.7):
        M = torch.randn(6, 6, generator=gen, dtype=F64)
        A = M + M.T  # symmetric indefinite, like EDF-H's Hessian
        b = torch.randn(6, generator=gen, dtype=F64)
        closed = edf_first_order_direction(lambda v, A=A: A @ v, b, shift)
        ref = minres(lambda v, A=A: A @ v, b, max_iters=1, shift=shift)
        torch.testing.assert_close(closed.solution, ref.solution, rtol=1e-12, atol=1e-14)
        assert closed.residual_norm == pytest.approx(ref.residual_norm, rel=1e-10)
        assert closed.status == ref.status
        Ab = A @ b + shift * b
        assert closed.info["coefficient"] == pytest.approx(float(b @ Ab / (Ab @ Ab)), rel=1e-12)


def test_closed_form_coefficient_can_be_negative_and_is_not_clipped() -> None:
    b = torch.tensor([1.0, 2.0], dtype=F64)
    r = edf_first_order_direction(lambda v: -3.0 * v, b, 0.0)  # gᵀAg < 0
    assert r.info["coefficient"] == pytest.approx(-1.0 / 3.0)
    torch.testing.assert_close(r.solution, -b / 3.0)
    zero = edf_first_order_direction(lambda v: v, torch.zeros(2, dtype=F64), 1.0)
    assert zero.status == "converged" and float(zero.solution.abs().sum()) == 0.0
    singular = edf_first_order_direction(lambda v: -v, b, 1.0)  # (A + λI) g = 0
    assert singular.status == "breakdown" and float(singular.solution.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_order_one_step_is_alg2(kind: str) -> None:
    model, loss_fn, x, y = _problem("ce")
    ref = _dense(model, loss_fn, x, y)
    opt = EDF(model, lr=0.3, order=1, kind=kind, acceleration="none")  # type: ignore[arg-type]
    opt.step(Objective(model, loss_fn, x, y))
    A = (ref.G if kind == "ggn" else ref.H) + float(ref.g.norm()) * torch.eye(len(ref.g), dtype=F64)
    u = A @ ref.g
    c = float(ref.g @ u / (u @ u))
    torch.testing.assert_close(_flat(model), ref.theta - 0.3 * c * ref.g, rtol=1e-10, atol=1e-12)
    assert opt.last_step_info["coefficient"] == pytest.approx(c, rel=1e-10)
    assert opt.last_step_info["matvecs"] == 1


def test_damping_is_a_times_gradient_norm_to_the_b() -> None:
    assert edf_damping(2.0, 0.3, 2.0) == pytest.approx(1.2)
    assert edf_damping(5.0, 0.0, 1.0) == 0.0
    model, loss_fn, x, y = _problem("mse")
    ref = _dense(model, loss_fn, x, y)
    n = ref.theta.numel()
    opt = EDF(model, lr=1.0, order=n, damping_scale=0.3, damping_power=2.0, acceleration="none")
    opt.step(Objective(model, loss_fn, x, y))
    lam = 0.3 * float(ref.g.norm()) ** 2
    assert opt.last_step_info["damping"] == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(
        _flat(model), ref.theta - _solve(ref.G, lam, ref.g), rtol=1e-7, atol=1e-9
    )


# --------------------------------------------------------------------------- W1 / W2
def _alg2_direction(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    ref = _dense(model, loss_fn, x, y)
    u = ref.G @ ref.g + float(ref.g.norm()) * ref.g
    return float(ref.g @ u / (u @ u)) * ref.g


def _set(model: nn.Module, theta: Tensor) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), _unflat(model, theta).values(), strict=True):
            p.copy_(v)


def test_w1_is_ema_momentum_two_steps_by_hand() -> None:
    model, loss_fn, x, y = _problem("mse")
    shadow = copy.deepcopy(model)
    batches = [(x, y), (x.flip(0), y.flip(0) * 0.5)]
    eta, mu = 0.4, 0.8
    opt = EDF(model, lr=eta, order=1, acceleration="w1", alpha=mu)
    m = torch.zeros_like(_flat(model))
    theta = _flat(model)
    for xb, yb in batches:
        d = _alg2_direction(shadow, loss_fn, xb, yb)
        m = mu * m + (1 - mu) * d  # [C-EDF]: m ← μ m + (1 − μ) d ; w ← w − η m
        theta = theta - eta * m
        _set(shadow, theta)
        opt.step(Objective(model, loss_fn, xb, yb))
        torch.testing.assert_close(_flat(model), theta, rtol=1e-10, atol=1e-12)


def test_w2_follows_su_boyd_candes_three_steps_by_hand() -> None:
    model, loss_fn, x, y = _problem("mse")
    shadow = copy.deepcopy(model)
    batches = [(x, y), (x.flip(0), y.flip(0) * 0.5), (x, -y)]
    s, r = 0.3, 3.0
    opt = EDF(model, lr=s, order=1, acceleration="w2")  # alpha defaults to r = 3
    y_k = _flat(model)
    x_prev = y_k.clone()  # x_0 = y_0
    for k, (xb, yb) in enumerate(batches, start=1):
        d = _alg2_direction(shadow, loss_fn, xb, yb)  # at the look-ahead point y_{k−1}
        x_k = y_k - s * d
        y_k = x_k + (k - 1) / (k + r - 1) * (x_k - x_prev)
        x_prev = x_k
        _set(shadow, y_k)
        opt.step(Objective(model, loss_fn, xb, yb))
        torch.testing.assert_close(_flat(model), y_k, rtol=1e-10, atol=1e-12)
        assert opt.last_step_info["w2_iteration"] == k


def test_w2_restart_on_lr_change() -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = EDF(model, lr=0.3, order=1, acceleration="w2", restart_on_lr_change=True)
    for _ in range(3):
        opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["w2_iteration"] == 3
    opt.param_groups[0]["lr"] = 0.1
    before = _flat(model)
    d = _alg2_direction(model, loss_fn, x, y)
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["w2_iteration"] == 1  # restarted: a plain step, no velocity
    torch.testing.assert_close(_flat(model), before - 0.1 * d, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- output space
def test_output_space_exact_limit_equals_parameter_space_solve() -> None:
    model, loss_fn, x, y = _problem("mse", n=3)
    ref = _dense(model, loss_fn, x, y)
    M = ref.u.numel()  # 6 output entries
    opt = EDF(model, lr=1.0, order=M, acceleration="none", space="output")
    opt.step(Objective(model, loss_fn, x, y))
    lam = float(ref.g.norm())
    # push-through: Jᵀ(H_L JJᵀ + λI)⁻¹ ∂L/∂φ = (G + λI)⁻¹ g
    torch.testing.assert_close(
        _flat(model), ref.theta - _solve(ref.G, lam, ref.g), rtol=1e-7, atol=1e-9
    )
    assert opt.last_step_info["matvecs"] == M


def test_output_space_order_one_is_the_released_code_formula() -> None:
    model, loss_fn, x, y = _problem("ce")
    ref = _dense(model, loss_fn, x, y)
    lam = float(ref.g.norm())
    A_out = ref.HL @ ref.J @ ref.J.T + lam * torch.eye(ref.u.numel(), dtype=F64)
    expected = {}
    for k in (1, 2):
        xk = minres(lambda v: A_out @ v, ref.u, max_iters=k).solution
        expected[k] = ref.J.T @ xk  # d = Jᵀ x
    # [C-EDF] output space: k = 1 gives (FᵀA F / ‖A F‖²)·g
    Au = A_out @ ref.u
    torch.testing.assert_close(expected[1], float(ref.u @ Au / (Au @ Au)) * ref.g)
    for k in (1, 2):
        m = copy.deepcopy(model)
        opt = EDF(m, lr=0.5, order=k, acceleration="none", space="output")
        opt.step(Objective(m, loss_fn, x, y))
        torch.testing.assert_close(_flat(m), ref.theta - 0.5 * expected[k], rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- passes per step
@pytest.mark.parametrize(
    ("kind", "space", "order"),
    [("ggn", "parameter", 3), ("hessian", "parameter", 1), ("ggn", "output", 2)],
)
def test_one_step_is_one_gradient_pass_plus_the_products(kind: str, space: str, order: int) -> None:
    model, loss_fn, x, y = _problem("ce")
    ref = _dense(model, loss_fn, x, y)
    opt = EDF(model, lr=1.0, order=order, kind=kind, space=space)  # type: ignore[arg-type]
    refs = spy_operators(opt)
    with torch.no_grad():
        f0 = float(loss_fn(model(x), y))
    with count_forwards(model) as forwards:
        loss = opt.step(Objective(model, loss_fn, x, y))
    info = opt.last_step_info
    # The operator's build is the only forward: its products reuse the kept graphs, and EDF
    # has no trial point. The closure never runs, so .grad stays empty.
    assert forwards[0] == 1
    assert all(p.grad is None for p in model.parameters())
    assert info["matvecs"] == order == info["solver_iterations"]
    # λ = ‖g‖ from the operator's gradient (output space: Jᵀ ∂L/∂φ) is the dense one.
    assert info["damping"] == pytest.approx(float(ref.g.norm()), rel=1e-12)
    assert float(loss) == pytest.approx(f0, rel=1e-14) and info["loss"] == float(loss)
    assert len(refs) == 1 and refs[0]() is None  # no autograd graph outlives the step
    assert opt._operator is None


@pytest.mark.parametrize("space", ["parameter", "output"])
def test_batchnorm_build_is_the_training_pass(space: str) -> None:
    # Parameter space: the operator's build moves the running statistics once, bit-identical to
    # a training pass; the output-space operator cannot, so the closure's pass is kept there.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    _, loss_fn, x, y = _problem("mse")
    reference = copy.deepcopy(model)
    reference(x)
    opt = EDF(model, lr=0.5, order=2, space=space)  # type: ignore[arg-type]
    with count_forwards(model) as forwards:
        opt.step(Objective(model, loss_fn, x, y))
    closure = space == "output"
    assert forwards[0] == (2 if closure else 1)
    assert all((p.grad is not None) is closure for p in model.parameters())
    assert int(model[1].num_batches_tracked) == 1
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name))


def test_batchnorm_and_dropout_models_keep_the_training_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 2)
    ).to(F64)
    _, loss_fn, x, y = _problem("mse")
    opt = EDF(model, lr=0.5, order=2)
    refs = spy_operators(opt)
    with count_forwards(model) as forwards:
        opt.step(Objective(model, loss_fn, x, y))
    assert forwards[0] == 2  # the closure's training pass, then the operator's build
    assert all(p.grad is not None for p in model.parameters())
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and int(bn.num_batches_tracked) == 1
    assert float(bn.running_mean.abs().sum()) > 0.0  # the running statistics moved once
    assert refs[0]() is None


# --------------------------------------------------------------------------- robustness
def test_non_finite_direction_skips_the_step_and_keeps_momentum(monkeypatch: Any) -> None:
    model, loss_fn, x, y = _problem("mse")
    opt = EDF(model, lr=0.5, order=2)
    opt.step(Objective(model, loss_fn, x, y))
    before = _flat(model)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def broken(matvec: Any, b: Tensor, **kw: Any) -> SolverResult:
        return SolverResult(torch.zeros_like(b), 0, float("inf"), "non_finite")

    monkeypatch.setattr(edf_module, "minres", broken)
    opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["skipped"] is True
    assert "non_finite" in opt.last_step_info["reason"]
    assert torch.equal(_flat(model), before)
    for p, b in zip(model.parameters(), buffers, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    assert opt.global_state["skipped_steps"] == 1


@pytest.mark.parametrize("order", [1, 10])
def test_overflowing_gradient_norm_skips_the_step(order: int) -> None:
    # float32 gradient entries of 1e37 are finite, their norm is not: λ = a‖g‖^b overflows
    # (found by `curvlab reproduce edf`, a diverging full-batch run with k = 10).
    model = nn.Linear(1000, 1, bias=False)
    nn.init.constant_(model.weight, 1e-3)
    x = torch.full((1, 1000), 1e37)
    opt = EDF(model, lr=0.5, order=order)
    before = model.weight.detach().clone()
    loss = opt.step(Objective(model, lambda out, _: out.sum(), x, torch.zeros(1)))
    assert torch.isfinite(loss)
    assert opt.last_step_info["skipped"] is True
    assert "damping" in opt.last_step_info["reason"]
    assert torch.equal(model.weight, before)


def test_invalid_combinations() -> None:
    with pytest.raises(ValueError, match="^alpha"):
        EDF(tiny_mlp(), acceleration="w2", alpha=0.0)
    with pytest.raises(ValueError, match="^alpha"):
        EDF(tiny_mlp(), acceleration="none", alpha=0.9)
    with pytest.raises(ValueError, match="^space"):
        EDF(tiny_mlp(), kind="hessian", space="output")
