"""K-BFGS / K-BFGS(L) (thesis Alg 9) and K-BFGS-20 / K-BFGS(L)-20 (Alg 4): the direction is
``H_G V H_A`` of the state; the curvature pairs match an independent recomputation from hooks;
warm start, schedules, skipped pairs, bad input. (The conformance checks of each variant:
tests/optim/test_conformance.py, over curvlab.optim.registry.)"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab import Objective
from curvlab.linalg.bfgs import double_damping, dp_dlm_damping
from curvlab.optim.kbfgs import KBFGS
from curvlab.testing.conformance import batches as _batches
from curvlab.testing.conformance import full_loss as _full_loss
from curvlab.testing.conformance import run as _run
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _problem(make_model: Any, n: int, seed: int = 0) -> tuple[nn.Module, list, nn.Module]:
    """A model, n batches and the loss (MLP: MSE regression; CNN: 3-class cross-entropy)."""
    g = torch.Generator().manual_seed(seed)
    if make_model is tiny_cnn:
        x = torch.randn(4 * n, 2, 5, 5, generator=g, dtype=F64)
        y = torch.randint(0, 3, (4 * n,), generator=g)
        return tiny_cnn(), list(zip(x.split(4), y.split(4), strict=True)), nn.CrossEntropyLoss()
    x, y = regression_problem(n=6 * n, d_in=4, d_out=3, seed=seed)
    return tiny_mlp(), list(zip(x.split(6), y.split(6), strict=True)), nn.MSELoss()


def printed_bfgs(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ (thesis eq. 2.6 / 3.11)."""
    rho = 1.0 / (s @ y)
    E = torch.eye(H.shape[0], dtype=H.dtype) - rho * torch.outer(s, y)
    return E @ H @ E.T + rho * torch.outer(s, s)


def _matrix(layer: Any, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return layer.grad_matrix(w, b)


def _params(layer: Any) -> torch.Tensor:
    return _matrix(
        layer,
        layer.weight.detach().clone(),
        None if layer.bias is None else layer.bias.detach().clone(),
    )


class _Probe:
    """Independent per-layer record: inputs, outputs and ∂L/∂h via plain module hooks."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module
    ) -> None:
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        handles = []
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                handles.append(module.register_forward_hook(self._hook))
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            outs = list(self.outputs.values())
            grads = torch.autograd.grad(loss, outs)
        for h in handles:
            h.remove()
        self.grads = dict(zip(self.outputs, grads, strict=True))
        self.m = x.shape[0]

    def _hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.inputs[module] = args[0].detach()
        self.outputs[module] = out

    def rows(self, module: nn.Module) -> torch.Tensor:
        """ā_t(n) as rows, with the homogeneous 1 when there is a bias (F.unfold for convs)."""
        x = self.inputs[module]
        if isinstance(module, nn.Conv2d):
            cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            r = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            r = x
        if module.bias is not None:
            r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], dim=1)
        return r

    def locations(self, module: nn.Module) -> int:
        out = self.outputs[module]
        return out.numel() // (self.m * out.shape[1])

    def h_bar(self, module: nn.Module) -> torch.Tensor:
        out = self.outputs[module].detach()
        return out.mean(dim=(0, 2, 3)) if out.dim() == 4 else out.mean(0)

    def g_bar(self, module: nn.Module) -> torch.Tensor:
        """(1/|T|) Σ_{n,t} ∂L/∂h_t(n): per-example gradients m·∂L/∂h averaged (thesis A1)."""
        g = self.grads[module]
        total = g.sum(dim=(0, 2, 3)) if g.dim() == 4 else g.sum(0)
        return total / self.locations(module)


def _stored_pairs(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """K-BFGS(L)'s stored pairs as rows, oldest first (read out of the ring buffer)."""
    k, start = state["pair_count"], state["pair_start"]
    order = [(start + i) % k for i in range(k)]
    return state["SY"][0, order], state["SY"][1, order]


def _dense_H_g(opt: KBFGS, state: dict, lam_g: float) -> torch.Tensor:
    """H_G of the state: the matrix, or the BFGS recursion over the stored pairs from γI."""
    if opt.memory is None:
        return state["H_g"]
    gamma = 1.0 / lam_g if opt.variant == "ch3" else 1.0
    H = gamma * torch.eye(state["SY"].shape[2], dtype=F64)
    for s, y in zip(*_stored_pairs(state), strict=True):
        H = printed_bfgs(H, s, y)
    return H


# ------------------------------------------------------------------------- direction
@pytest.mark.parametrize("memory", [None, 2])
@pytest.mark.parametrize("variant", ["ch3", "ch2"])
@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_direction_equals_dense_kronecker_product_of_the_state(make_model, variant, memory) -> None:
    """W ← W − α (H_G V H_A + γ W) (CNN: with weight decay γ), from the state before the
    step; K-BFGS(L): the ring buffer has wrapped (five pairs pushed into p = 2)."""
    model, batches, loss_fn = _problem(make_model, 6)
    lr, lam = 0.05, 0.5
    wd = 0.1 if make_model is tiny_cnn else 0.0
    opt = KBFGS(
        model, lr=lr, damping=lam, momentum=0.0, weight_decay=wd, variant=variant, memory=memory
    )
    for x, y in batches[:5]:  # five curvature updates: more pairs than memory = 2
        opt.step(Objective(model, loss_fn, x, y))
    x, y = batches[5]
    probe = _Probe(model, x, y, loss_fn)
    states = {n: copy.deepcopy(opt.layer_state(n)) for n in opt.layers}
    before = {n: _params(layer) for n, layer in opt.layers.items()}
    opt.step(Objective(model, loss_fn, x, y))
    for name, layer in opt.layers.items():
        state = states[name]
        module = layer.module
        # V = [∇W, ∇b] from the independent pass: Σ_{n,t} ∂L/∂h_t ā_tᵀ.
        g_rows = probe.grads[module]
        g_rows = (
            g_rows.flatten(2).transpose(1, 2).reshape(-1, g_rows.shape[1])
            if g_rows.dim() == 4
            else g_rows
        )
        V = g_rows.T @ probe.rows(module)
        T = probe.locations(module)
        lam_g = math.sqrt(lam / T) if variant == "ch3" else math.sqrt(lam)
        H_g = _dense_H_g(opt, state, lam_g)
        if opt.memory is not None:
            assert state["pair_count"] == 2  # FIFO kept the last p pairs
            assert state["pair_start"] == 1  # oldest in row 1: the ring has wrapped
        # vec column-major: vec(H_G V H_A) = (H_A ⊗ H_G) vec(V) (thesis eq. 2.4).
        vec = torch.kron(state["H_a"], H_g) @ V.T.reshape(-1)
        expected = -lr * (vec.reshape(V.shape[1], V.shape[0]).T + wd * before[name])
        torch.testing.assert_close(_params(layer) - before[name], expected, rtol=1e-8, atol=1e-12)


# -------------------------------------------------------------------- curvature pairs
@pytest.mark.parametrize("variant", ["ch3", "ch2"])
@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_curvature_update_matches_independent_recomputation(make_model, variant) -> None:
    """One curvature step recomputed from plain hooks: s_G, y_G from h̄, D̄h at θ and θ⁺
    (EMA β), damping with the current H_G and μ2 = λ_G, H_A's Hessian-action pair from the
    first pass (ch.3: that batch's A; ch.2: EMA of A), λ split by |T| in ch.3."""
    model, batches, loss_fn = _problem(make_model, 3, seed=2)
    lam, beta = 0.4, 0.6
    opt = KBFGS(model, lr=0.1, damping=lam, ema_decay=beta, variant=variant)
    for x, y in batches[:2]:
        opt.step(Objective(model, loss_fn, x, y))
    x, y = batches[2]
    old = {n: copy.deepcopy(opt.layer_state(n)) for n in opt.layers}
    at_theta = _Probe(model, x, y, loss_fn)
    opt.step(Objective(model, loss_fn, x, y))
    at_plus = _Probe(model, x, y, loss_fn)
    for name, layer in opt.layers.items():
        module, state, prev = layer.module, opt.layer_state(name), old[name]
        T = at_theta.locations(module)
        lam_a, lam_g = (
            (math.sqrt(T * lam), math.sqrt(lam / T)) if variant == "ch3" else (math.sqrt(lam),) * 2
        )
        # H_A (Alg 9 lines 16–17; Alg 4 lines 20–23)
        rows = at_theta.rows(module)
        A_batch = rows.T @ rows / at_theta.m
        A = A_batch if variant == "ch3" else beta * prev["A"] + (1 - beta) * A_batch
        s_a = prev["H_a"] @ rows.mean(0)
        y_a = A @ s_a + lam_a * s_a
        torch.testing.assert_close(
            state["H_a"], printed_bfgs(prev["H_a"], s_a, y_a), rtol=1e-8, atol=1e-10
        )
        if variant == "ch2":
            torch.testing.assert_close(state["A"], A, rtol=1e-10, atol=1e-12)
        # H_G (Alg 9 lines 19–21; Alg 4 lines 16–18)
        s = beta * prev["s_g"] + (1 - beta) * (at_plus.h_bar(module) - at_theta.h_bar(module))
        y_ = beta * prev["y_g"] + (1 - beta) * (at_plus.g_bar(module) - at_theta.g_bar(module))
        torch.testing.assert_close(state["s_g"], s, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(state["y_g"], y_, rtol=1e-8, atol=1e-12)
        damp = dp_dlm_damping if variant == "ch3" else double_damping
        s_t, y_t = damp(s, y_, prev["H_g"] @ y_, 0.2, lam_g)
        torch.testing.assert_close(
            state["H_g"], printed_bfgs(prev["H_g"], s_t, y_t), rtol=1e-8, atol=1e-10
        )


def test_initial_matrices_follow_each_chapter() -> None:
    """Alg 9 line 3: H_G = λ_G⁻¹ I; Alg 4 line 3: H_G = I; H_A = (A + λ_A I)⁻¹ of batch 1."""
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    y = torch.randint(0, 3, (4,))
    for variant in ("ch3", "ch2"):
        model = tiny_cnn()
        opt = KBFGS(model, lr=0.0, damping=2.0, variant=variant, curvature_every=5)
        probe = _Probe(model, x, y, nn.CrossEntropyLoss())
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
        for name, layer in opt.layers.items():
            T = probe.locations(layer.module)
            lam_a, lam_g = (
                (math.sqrt(2 * T), math.sqrt(2 / T)) if variant == "ch3" else (math.sqrt(2),) * 2
            )
            state = opt.layer_state(name)
            eye = torch.eye(layer.d_out, dtype=F64)
            torch.testing.assert_close(state["H_g"], eye / lam_g if variant == "ch3" else eye)
            rows = probe.rows(layer.module)
            A = rows.T @ rows / 4
            torch.testing.assert_close(
                state["H_a"] @ (A + lam_a * torch.eye(A.shape[0], dtype=F64)),
                torch.eye(A.shape[0], dtype=F64),
            )


def test_warm_start_averages_A_over_all_examples() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(m, 2, 5, 5, generator=g, dtype=F64) for m in (3, 5)]
    data = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in xs]
    opt = KBFGS(model, damping=0.5, variant="ch2")
    assert opt.warm_start(data, nn.CrossEntropyLoss()) == 2
    probe = _Probe(model, torch.cat(xs), torch.zeros(8, dtype=torch.long), nn.CrossEntropyLoss())
    for name, layer in opt.layers.items():
        rows = probe.rows(layer.module)
        A = rows.T @ rows / 8
        torch.testing.assert_close(opt.layer_state(name)["A"], A)
        damped = A + math.sqrt(0.5) * torch.eye(A.shape[0], dtype=F64)
        torch.testing.assert_close(opt.layer_state(name)["H_a"], torch.linalg.inv(damped))
    with pytest.raises(ValueError, match="^batches"):
        opt.warm_start([])


def test_a_init_identity() -> None:
    model, batches, loss_fn = _problem(tiny_mlp, 1)
    opt = KBFGS(model, a_init="identity", curvature_every=2)
    opt.step(Objective(model, loss_fn, *batches[0]))
    for name, layer in opt.layers.items():
        torch.testing.assert_close(opt.layer_state(name)["H_a"], torch.eye(layer.d_a, dtype=F64))


# ------------------------------------------------------------------ schedule, memory
def test_curvature_every_T_steps_only() -> None:
    model, batches, loss_fn = _problem(tiny_mlp, 6)
    opt = KBFGS(model, curvature_every=3, memory=2)
    flags, sizes = [], []
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
        flags.append(opt.last_step_info["curvature_updated"])
        sizes.append(opt.layer_state("0")["pair_count"])
    assert flags == [False, False, True, False, False, True]
    assert sizes == [0, 0, 1, 1, 1, 2]


def test_lbfgs_keeps_only_the_last_p_pairs() -> None:
    model, batches, loss_fn = _problem(tiny_mlp, 5)
    opt = KBFGS(model, memory=2)
    pushed = []
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
        pushed.append(_stored_pairs(opt.layer_state("2"))[0][-1].clone())
    state = opt.layer_state("2")
    assert state["SY"].shape[1] == 2  # the buffer never grows beyond p
    torch.testing.assert_close(_stored_pairs(state)[0], torch.stack(pushed[-2:]))


def test_lbfgs_gram_matrices_in_state_equal_recomputation_after_wrap_around() -> None:
    """SᵀY and YᵀY are updated per pushed pair, never recomputed: after 11 pushes into p = 3
    (the ring wrapped three times) they equal the Gram matrices of the stored pairs."""
    model, batches, loss_fn = _problem(tiny_mlp, 11)
    opt = KBFGS(model, memory=3)
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
    for name in opt.layers:
        state = opt.layer_state(name)
        assert (state["pair_count"], state["pair_start"]) == (3, 11 % 3)
        S, Y = _stored_pairs(state)
        torch.testing.assert_close(state["StY"], S @ Y.T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["YtY"], Y @ Y.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(memory=3), dict(memory=3, variant="ch2"), dict()])
def test_resume_across_the_ring_wrap_is_bit_identical(kwargs: dict) -> None:
    """Saved with the oldest pair in row 1 of the ring (4 pairs into p = 3), resumed, and run
    past two more wraps: the same parameters and state as the uninterrupted run."""
    batches = _batches(12)
    model = tiny_mlp((4, 8, 3))
    opt = KBFGS(model, lr=0.1, damping=0.1, **kwargs)
    _run(opt, model, batches[:4])
    if opt.memory is not None:
        assert opt.layer_state("0")["pair_start"] == 1
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _run(opt, model, batches[4:])
    resumed = tiny_mlp((4, 8, 3), seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = KBFGS(resumed, lr=0.1, damping=0.1, **kwargs)
    opt2.load_state_dict(saved_opt)
    _run(opt2, resumed, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in opt.layers:
        a, b = opt.layer_state(name), opt2.layer_state(name)
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert (
                torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
            )


@pytest.mark.parametrize("memory", [None, 2])
def test_bias_gradient_statistics_equal_captured_output_gradients(memory: int | None) -> None:
    """With a bias in every layer, Σ ∂L/∂h comes from the bias gradients and only the inputs
    are recorded; the same run with `capture` (∂L/∂h recorded) agrees to round-off."""
    model, batches, loss_fn = _problem(tiny_mlp, 6)
    other = copy.deepcopy(model)
    opt = KBFGS(model, lr=0.1, memory=memory)
    ref = KBFGS(other, lr=0.1, memory=memory)
    assert opt._sums_from_bias
    ref._sums_from_bias = False
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
        ref.step(Objective(other, loss_fn, x, y))
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for name in opt.layers:
        for key in ("s_g", "y_g", "H_a"):
            torch.testing.assert_close(
                opt.layer_state(name)[key], ref.layer_state(name)[key], rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize("memory", [None, 2])
def test_channels_last_weights_take_the_same_steps(memory: int | None) -> None:
    """A conv weight that is not contiguous (channels_last) cannot be updated through a
    (d_out, d_a) view: the direction is formed instead, with the same result."""
    model, batches, loss_fn = _problem(tiny_cnn, 4)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not other[0].weight.is_contiguous()
    opt = KBFGS(model, lr=0.1, weight_decay=0.01, memory=memory)
    ref = KBFGS(other, lr=0.1, weight_decay=0.01, memory=memory)
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
        ref.step(Objective(other, loss_fn, x, y))
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_keeps_float32_state() -> None:
    """Mixed precision: the forwards run in bfloat16, the statistics, pairs and H in float32."""
    model = tiny_mlp((4, 8, 3), dtype=torch.float32)
    batches = _batches(4, torch.float32)
    opt = KBFGS(model, lr=0.1, damping=0.1, memory=3)
    start = _full_loss(model, batches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            _run(opt, model, batches)
    for name in opt.layers:
        for key, value in opt.layer_state(name).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32, key
    assert opt.layer_state("0")["pair_count"] == 3
    assert _full_loss(model, batches) < start


# -------------------------------------------------------------------- skipped pairs
def test_degenerate_pairs_are_skipped_and_counted() -> None:
    """lr = 0: h⁺ = h and D̄h⁺ = D̄h, so s̃ = ỹ = 0 and no H_G update is possible."""
    model, batches, loss_fn = _problem(tiny_mlp, 2)
    opt = KBFGS(model, lr=0.0)
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
    info = opt.last_step_info
    assert info["skipped_g_pairs"] == 2 and info["skipped_g_pairs_total"] == 4
    assert info["skipped_a_pairs"] == 0
    assert info["yHy_over_sy"] == {"0": None, "2": None}
    for name, layer in opt.layers.items():
        state = opt.layer_state(name)
        assert state["skipped_g_pairs"] == 2
        torch.testing.assert_close(state["H_g"], torch.eye(layer.d_out, dtype=F64) / math.sqrt(0.3))


def test_non_finite_second_pass_is_skipped_without_nan_in_state() -> None:
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.mse_loss(out, target)
        return loss * float("nan") if calls["n"] % 2 == 0 else loss  # every second pass

    model, batches, _ = _problem(tiny_mlp, 3)
    opt = KBFGS(model, memory=3)
    for x, y in batches:
        opt.step(Objective(model, loss_fn, x, y))
    assert opt.last_step_info["skipped_g_pairs_total"] == 6
    for name in opt.layers:
        state = opt.layer_state(name)
        assert state["pair_count"] == 0
        assert torch.equal(state["s_g"], torch.zeros_like(state["s_g"]))
        assert torch.isfinite(state["H_a"]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- BatchNorm
def test_batchnorm_takes_momentum_gradient_at_lr_over_damping_and_keeps_running_stats() -> None:
    model = tiny_cnn(batchnorm=True)
    x, y = torch.randn(4, 2, 5, 5, dtype=F64), torch.randint(0, 3, (4,))
    reference = copy.deepcopy(model)
    reference(x)  # one training forward pass: what the running statistics should see
    bn = model[1]
    with pytest.warns(UserWarning, match="fallback"):
        opt = KBFGS(model, lr=0.2, damping=4.0, momentum=0.0)
    w0 = bn.weight.detach().clone()
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    torch.testing.assert_close(bn.weight.detach(), w0 - (0.2 / 4.0) * bn.weight.grad)
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)


# ------------------------------------------------------------------------ bad input
def test_plain_closure_and_models_without_layers_are_rejected() -> None:
    opt = KBFGS(tiny_mlp())
    with pytest.raises(ValueError, match="^model: no layer was recorded.*a closure must run it"):
        opt.step(lambda: torch.tensor(0.0))
    with pytest.raises(ValueError, match="^model: K-BFGS.*nn.Linear"):
        KBFGS(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"^model: K-BFGS\(L\)-20"):
        KBFGS(nn.Sequential(nn.ReLU()), variant="ch2", memory=5)


def test_display_names() -> None:
    model = tiny_mlp()
    names = {
        (v, m): KBFGS(model, variant=v, memory=m).display_name
        for v in ("ch3", "ch2")
        for m in (None, 100)
    }
    assert names == {
        ("ch3", None): "K-BFGS",
        ("ch3", 100): "K-BFGS(L)",
        ("ch2", None): "K-BFGS-20",
        ("ch2", 100): "K-BFGS(L)-20",
    }


def _run_overflowing_case(**options: Any) -> tuple[KBFGS, nn.Module]:
    """Found by fuzzing: BatchNorm over one unit with two examples makes the first layer's
    output gradient ~1e-10, so sᵀy > 0 but ρ² overflows float32. Three K-BFGS-20 steps."""
    batches = [
        ([[1.5410, -0.2934, -2.1788], [0.5684, -1.0845, -1.3986]], [[0.4033], [0.8380]]),
        ([[-0.7193, -0.4033, -0.5966], [0.1820, -0.8567, 1.1006]], [[-1.0712], [0.1227]]),
        ([[-0.5663, 0.3731, -0.8920], [-1.5091, 0.3704, 1.4565]], [[0.9398], [0.7748]]),
    ]
    torch.manual_seed(24)
    model = nn.Sequential(
        nn.Linear(3, 1, bias=False), nn.BatchNorm1d(1), nn.Tanh(), nn.Linear(1, 1, bias=False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = KBFGS(model, lr=1.0, damping=1.0, variant="ch2", **options)
    for x, y in batches:
        opt.step(Objective(model, nn.MSELoss(), torch.tensor(x), torch.tensor(y)))
    return opt, model


def test_pair_whose_bfgs_correction_overflows_is_skipped_not_applied() -> None:
    """The fuzzing case with K-BFGS: H_G must stay finite."""
    opt, model = _run_overflowing_case()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert bool(torch.isfinite(opt.layer_state("0")["H_g"]).all())
    assert opt.global_state["skipped_g_pairs_total"] >= 1


def test_lbfgs_pair_whose_update_overflows_is_skipped_not_pushed() -> None:
    """The case above with K-BFGS(L): the first layer's pairs have ρ² ≈ 1e40 > float32's
    range; H_G ỹ (from the products of the push) gives the same BFGS-correction check, so
    they are skipped before they enter the ring, whose buffers stay finite."""
    opt, model = _run_overflowing_case(memory=2)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    state = opt.layer_state("0")
    for key in ("SY", "StY", "YtY"):
        assert bool(torch.isfinite(state[key]).all()), key
    assert state["skipped_g_pairs"] >= 1
