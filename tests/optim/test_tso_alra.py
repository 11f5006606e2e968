"""TSO-ALRA ([P1] Alg 1): the first stage is the dense damped (B ⊗ A)^{-1/2} g with EMA'd
factors and stale roots; the second stage is plain SGD. (The conformance checks of both
classes: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from curvlab import Objective
from curvlab.linalg import add_to_diagonal, kron_to_dense
from curvlab.optim.tso_alra import TSOALRA, TSOALRAFirstStage
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp

Factors = dict[str, tuple[Tensor, Tensor]]


# ------------------------------------------------------------------ references
def _manual_factors(
    model: nn.Sequential, x: Tensor, y: Tensor
) -> tuple[Factors, dict[str, Tensor]]:
    """A = E_n[ā āᵀ], B = E_n[β βᵀ] with β = ∂l_n/∂s (eq. 14) and the gradient matrices
    [∇W, ∇b], from a hand-written forward pass of a Linear/Tanh MLP (mean cross-entropy)."""
    model = copy.deepcopy(model)
    inputs: dict[str, Tensor] = {}
    pre: dict[str, Tensor] = {}
    h = x
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            inputs[name] = h.detach()
            h = module(h)
            h.retain_grad()
            pre[name] = h
        else:
            h = module(h)
    nn.CrossEntropyLoss()(h, y).backward()
    m = x.shape[0]
    factors: Factors = {}
    grads: dict[str, Tensor] = {}
    for name, module in model.named_children():
        if not isinstance(module, nn.Linear):
            continue
        a = torch.cat([inputs[name], torch.ones(m, 1, dtype=x.dtype)], dim=1)
        beta = m * pre[name].grad  # per-example gradient of l_n (the batch loss is the mean)
        factors[name] = (a.T @ a / m, beta.T @ beta / m)
        grads[name] = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
    return factors, grads


def _inv_sqrt_dense(B: Tensor, A: Tensor, eps: float) -> Tensor:
    """((B + εI) ⊗ (A + εI))^{-1/2} by one dense eigendecomposition."""
    M = kron_to_dense(add_to_diagonal(B, eps), add_to_diagonal(A, eps))
    mu, U = torch.linalg.eigh(M)
    return (U * mu.rsqrt()) @ U.T


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _layer_deltas(model: nn.Sequential, before: list[Tensor]) -> dict[str, Tensor]:
    after = dict(zip([id(p) for p in model.parameters()], _params(model), strict=True))
    old = dict(zip([id(p) for p in model.parameters()], before, strict=True))
    deltas = {}
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            dw = after[id(module.weight)] - old[id(module.weight)]
            db = after[id(module.bias)] - old[id(module.bias)]
            deltas[name] = torch.cat([dw, db[:, None]], dim=1)
    return deltas


def _cls_batch(seed: int, m: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (m,), generator=g
    )


# ------------------------------------------------------------- the direction
def test_one_datum_direction_is_dense_inverse_sqrt_of_exact_fisher_block() -> None:
    """One datum: B ⊗ A = g gᵀ is the exact empirical Fisher block of each layer (eq. 14 is
    exact), and the step is −η ((B + εI) ⊗ (A + εI))^{-1/2} g."""
    model = tiny_mlp((4, 5, 3))
    x, y = _cls_batch(0, m=1)
    eps, lr = 1e-3, 0.5
    opt = TSOALRAFirstStage(model, lr=lr, eps=eps, inverse_every=1, init="first_batch")
    reference, grads = _manual_factors(model, x, y)
    before = _params(model)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    deltas = _layer_deltas(model, before)
    for name, (A, B) in reference.items():
        state = opt.layer_state(name)
        torch.testing.assert_close(state["A"], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["G"], B, rtol=1e-12, atol=1e-14)
        g = grads[name].reshape(-1)
        torch.testing.assert_close(kron_to_dense(B, A), torch.outer(g, g), rtol=1e-10, atol=1e-14)
        expected = -lr * (_inv_sqrt_dense(B, A, eps) @ g)
        torch.testing.assert_close(deltas[name].reshape(-1), expected, rtol=1e-8, atol=1e-12)


def test_ema_factors_and_stale_roots_follow_algorithm_1() -> None:
    """Eqs. 17–18 from A⁰ = B⁰ = I; roots of the factors at s·T_int (line 8); T_int = 3."""
    model = tiny_mlp((4, 5, 3))
    ema, eps, lr, T = 0.8, 1e-4, 0.3, 3
    opt = TSOALRAFirstStage(model, lr=lr, ema_decay=ema, inverse_every=T, eps=eps)
    ref = {
        name: (
            torch.eye(layer.d_a, dtype=torch.float64),
            torch.eye(layer.d_out, dtype=torch.float64),
        )
        for name, layer in opt.layers.items()
    }
    roots = {name: (A.clone(), B.clone()) for name, (A, B) in ref.items()}  # s = 0
    for t in range(1, 8):
        x, y = _cls_batch(t)
        batch, grads = _manual_factors(model, x, y)
        for name, (A_new, B_new) in batch.items():  # eqs. 17–18, γ = 1 − ema
            A, B = ref[name]
            ref[name] = (ema * A + (1 - ema) * A_new, ema * B + (1 - ema) * B_new)
        if t % T == 0:
            roots = {name: (A.clone(), B.clone()) for name, (A, B) in ref.items()}
        before = _params(model)
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
        assert opt.last_step_info["roots_refreshed"] == (t % T == 0)
        assert opt.last_step_info["root_refreshes"] == t // T
        deltas = _layer_deltas(model, before)
        for name, (A, B) in ref.items():
            state = opt.layer_state(name)
            torch.testing.assert_close(state["A"], A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(state["G"], B, rtol=1e-12, atol=1e-14)
            g = grads[name].reshape(-1)
            A_s, B_s = roots[name]
            expected = -lr * (_inv_sqrt_dense(B_s, A_s, eps) @ g)
            torch.testing.assert_close(deltas[name].reshape(-1), expected, rtol=1e-8, atol=1e-13)
            if t < T:  # identity roots: an SGD step scaled by (1 + ε)^{-1}
                torch.testing.assert_close(deltas[name], -lr / (1 + eps) * grads[name])


def test_conv_direction_equals_dense_damped_kronecker_root() -> None:
    model = tiny_cnn()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    eps, lr = 1e-2, 1.0
    opt = TSOALRAFirstStage(model, lr=lr, eps=eps, inverse_every=1, init="first_batch")
    before = dict(zip([id(p) for p in model.parameters()], _params(model), strict=True))
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    for name, layer in opt.layers.items():
        state = opt.layer_state(name)
        block = opt.blocks[name]
        dense = block.damped_to_dense(state, eps)
        torch.testing.assert_close(
            dense, kron_to_dense(add_to_diagonal(state["G"], eps), add_to_diagonal(state["A"], eps))
        )
        mu, U = torch.linalg.eigh(dense)
        V = layer.grad_matrix(layer.weight.grad, None if layer.bias is None else layer.bias.grad)
        expected = -lr * ((U * mu.rsqrt()) @ U.T @ V.reshape(-1))
        old = [before[id(p)] for p in layer.params]
        delta = layer.grad_matrix(
            layer.weight.detach() - old[0],
            None if layer.bias is None else layer.bias.detach() - old[1],
        )
        torch.testing.assert_close(delta.reshape(-1), expected, rtol=1e-8, atol=1e-12)


def test_factors_describe_the_loss_as_reduced() -> None:
    """Sum reduction: A unchanged, B = m · B(mean) (F^{-1/2} is not scale-free)."""
    x, y = _cls_batch(3)
    states = []
    for reduction in ("mean", "sum"):
        model = tiny_mlp((4, 5, 3))
        opt = TSOALRAFirstStage(model, init="first_batch")
        opt.step(Objective(model, nn.CrossEntropyLoss(reduction=reduction), x, y))
        states.append({n: opt.layer_state(n) for n in opt.layers})
    for name in states[0]:
        torch.testing.assert_close(states[1][name]["A"], states[0][name]["A"])
        torch.testing.assert_close(states[1][name]["G"], x.shape[0] * states[0][name]["G"])


def test_true_fisher_option_samples_labels_and_resumes_bit_identically() -> None:
    x, y = _cls_batch(4, m=32)
    model = tiny_mlp((4, 5, 3))
    emp = TSOALRAFirstStage(copy.deepcopy(model), init="first_batch")
    emp.step(Objective(emp.model, nn.CrossEntropyLoss(), x, y))
    opt = TSOALRAFirstStage(model, init="first_batch", fisher="true", inverse_every=2)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    for name in opt.layers:
        torch.testing.assert_close(opt.layer_state(name)["A"], emp.layer_state(name)["A"])
        assert not torch.allclose(opt.layer_state(name)["G"], emp.layer_state(name)["G"])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for t in range(3):
        opt.step(Objective(model, nn.CrossEntropyLoss(), *_cls_batch(10 + t, m=32)))
    resumed = tiny_mlp((4, 5, 3), seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = TSOALRAFirstStage(resumed, init="first_batch", fisher="true", inverse_every=2)
    opt2.load_state_dict(saved)
    for t in range(3):
        opt2.step(Objective(resumed, nn.CrossEntropyLoss(), *_cls_batch(10 + t, m=32)))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fallback_parameters_take_the_plain_gradient() -> None:
    model = tiny_cnn(batchnorm=True)
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="fallback"):
        opt = TSOALRAFirstStage(model, lr=0.1)
    bn = model[1]
    w = bn.weight.detach().clone()
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    torch.testing.assert_close(bn.weight.detach(), w - 0.1 * bn.weight.grad)


# ------------------------------------------------------------ the two stages
def test_second_stage_is_plain_sgd_with_the_carried_learning_rate() -> None:
    model = tiny_mlp()
    x, y = regression_problem()
    opt = TSOALRA(model, lr=0.05, weight_decay=1e-3, inverse_every=2, switch_at_step=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        assert opt.stage == 1
        opt.step(Objective(model, nn.MSELoss(), x, y))
        sched.step()
    assert opt.stage == 2 and opt.last_step_info["switched"]
    assert isinstance(opt.second, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 * 0.5**3 and group["momentum"] == 0.0
    assert group["weight_decay"] == 1e-3 and group["initial_lr"] == 0.05
    before = _params(model)
    opt.step(Objective(model, nn.MSELoss(), x, y))  # eq. 1 (with the carried decay)
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), q - group["lr"] * (p.grad + 1e-3 * q))
    assert opt.last_step_info["stage"] == 2 and not opt.last_step_info["switched"]


def test_switch_at_epoch_and_patience_drive_the_paper_rules() -> None:
    model = tiny_mlp()
    opt = TSOALRA(model, switch_at_epoch=2)
    assert not opt.end_epoch() and opt.stage == 1
    assert opt.end_epoch() and opt.stage == 2
    opt = TSOALRA(tiny_mlp(), patience=2)
    assert [opt.report_validation(v) for v in (1.0, 0.8, 0.9, 0.8)] == [False] * 3 + [True]
    assert opt.schedule["switch"]["reason"] == "patience"


# ------------------------------------------------------------------ validation
def test_tso_alra_needs_a_switch_criterion() -> None:
    with pytest.raises(ValueError, match="^switch_at_epoch"):
        TSOALRA(tiny_mlp())


def test_learning_rate_set_later_is_checked_in_the_sgd_stage() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = TSOALRA(model, switch_at_step=1)
    x, y = regression_problem()
    opt.step(Objective(model, nn.MSELoss(), x, y))  # now in the SGD stage
    assert opt.stage == 2
    opt.param_groups[0]["lr"] = math.nan
    with pytest.raises(ValueError, match="^lr"):
        opt.step(Objective(model, nn.MSELoss(), x, y))
