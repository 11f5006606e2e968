"""TNT (thesis Alg 15): the direction is the dense damped Kronecker solve of the trace-normalised
factors of the sampled-label statistics; schedules, options, warm start. (Skipped steps,
bad input and the other conformance checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.curvature.blocks import TensorBlock
from curvlab.linalg.modes import tensor_shape
from curvlab.optim.tnt import TNT
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp


def _contractions(G: torch.Tensor) -> list[torch.Tensor]:
    """G^{(i)} = mat_i(G) mat_i(G)ᵀ from the slices (thesis §4.2.1), independent of the code."""
    out = []
    for i in range(G.dim()):
        M = torch.stack([G.select(i, j).reshape(-1) for j in range(G.shape[i])])
        out.append(M @ M.T)
    return out


def _eq_4_10(stats: list[torch.Tensor]) -> list[torch.Tensor]:
    k = len(stats)
    dims = [s.shape[0] for s in stats]
    n = math.prod(dims)
    c0 = (stats[0].trace() / n) ** (1.0 / k)
    return [s / (c0 ** (k - 1) * (n // d)) for s, d in zip(stats, dims, strict=True)]


def _dense_tnt_direction(g: torch.Tensor, stat_grad: torch.Tensor, eps: float) -> torch.Tensor:
    """(⊗_i (Ũ_i + εI))^{-1} vec(g) with Ũ from the contractions of ``stat_grad``."""
    shape = tensor_shape(g.shape)
    U = _eq_4_10(_contractions(stat_grad.reshape(shape)))
    dense = U[0] + eps * torch.eye(U[0].shape[0], dtype=U[0].dtype)
    for Ui in U[1:]:
        dense = torch.kron(dense, Ui + eps * torch.eye(Ui.shape[0], dtype=Ui.dtype))
    return torch.linalg.solve(dense, g.reshape(-1)).reshape(g.shape)


def _problem(make_model):
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    if make_model is tiny_mlp:
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=gen)
    else:
        x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (4,), generator=gen)
    return model, x, y


MODELS = [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batchnorm=True)]


@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("make_model", MODELS, ids=["mlp", "cnn", "cnn-bn"])
def test_direction_equals_dense_kronecker_solve(make_model, fisher: str) -> None:
    model, x, y = _problem(make_model)
    eps = 0.3
    opt = TNT(model, lr=1.0, damping=eps, momentum=0.0, fisher=fisher)  # type: ignore[arg-type]
    objective = Objective(model, nn.CrossEntropyLoss(), x, y)
    # Replay the label sampler to get Alg 15 line 7's gradient independently (mean CE: c·m = 1).
    replay = torch.Generator().set_state(opt._generator.get_state())
    with torch.enable_grad():
        outputs = model(x)
        params = list(model.parameters())
        labels = y if fisher == "empirical" else objective.sample_targets(outputs, replay)
        stat_grads = torch.autograd.grad(nn.CrossEntropyLoss()(outputs, labels), params)
        grads = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), params)
    before = [p.detach().clone() for p in params]
    opt.step(objective)
    assert opt.last_step_info["statistics_updated"] and opt.last_step_info["inverses_refreshed"]
    for p, p0, g, sg in zip(params, before, grads, stat_grads, strict=True):
        # Statistics are the contractions of the batch-mean statistics gradient (line 12).
        for S, R in zip(
            opt.state[p]["statistics"],
            _contractions(sg.reshape(tensor_shape(p.shape))),
            strict=True,
        ):
            torch.testing.assert_close(S, R, rtol=1e-10, atol=1e-15)
        expected = -_dense_tnt_direction(g, sg, eps)
        torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-8, atol=1e-12)


def test_factors_in_state_are_trace_normalised() -> None:
    model, x, y = _problem(tiny_cnn)
    opt = TNT(model, damping=0.1)
    for _ in range(3):
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    for p in model.parameters():
        block, state = opt.block_of(p), opt.state[p]
        U = block.factors(state)
        means = [float(Ui.trace()) / Ui.shape[0] for Ui in U]
        assert all(math.isclose(m, means[0], rel_tol=1e-10) for m in means)
        for i, Ui in enumerate(U):  # Ũ_i ∏_{j≠i} tr(Ũ_j) = Ĝ^{(i)} (eq. 4.2)
            others = math.prod(float(U[j].trace()) for j in range(len(U)) if j != i)
            torch.testing.assert_close(Ui * others, state["statistics"][i], rtol=1e-10, atol=1e-16)


def test_statistic_of_a_non_mean_loss_is_rescaled_to_the_batch_mean_convention() -> None:
    # MSE with reduction="mean" over m·d entries: c = 1/(m·d); the contractions get 1/(c·m) = d.
    model = tiny_mlp((4, 5, 3))
    x, y = regression_problem(n=8)
    opt = TNT(model, fisher="empirical")
    with torch.enable_grad():
        grads = torch.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    opt.step(Objective(model, nn.MSELoss(), x, y))
    for p, g in zip(model.parameters(), grads, strict=True):
        for S, R in zip(
            opt.state[p]["statistics"], _contractions(g.reshape(tensor_shape(p.shape))), strict=True
        ):
            torch.testing.assert_close(S, 3.0 * R, rtol=1e-10, atol=1e-15)


def test_momentum_and_statistics_ema_follow_alg_15() -> None:
    model, x, y = _problem(tiny_mlp)
    x2 = x.flip(0)
    opt = TNT(model, lr=0.0, damping=0.2, momentum=0.9, ema_decay=0.9, fisher="empirical")
    grads = []
    for xb in (x, x2):
        with torch.enable_grad():
            grads.append(
                torch.autograd.grad(nn.CrossEntropyLoss()(model(xb), y), list(model.parameters()))
            )
        opt.step(Objective(model, nn.CrossEntropyLoss(), xb, y))
    for j, p in enumerate(model.parameters()):
        state = opt.state[p]
        g1, g2 = grads[0][j], grads[1][j]
        torch.testing.assert_close(state["momentum_buffer"], 0.9 * g1 + g2)  # heavy ball, line 10
        shape = tensor_shape(p.shape)
        for S, a, b in zip(
            state["statistics"],
            _contractions(g1.reshape(shape)),
            _contractions(g2.reshape(shape)),
            strict=True,
        ):
            torch.testing.assert_close(S, 0.9 * a + 0.1 * b, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("method", ["eigh", "coupled_newton"])
def test_inverse_methods_agree_with_cholesky(method: str) -> None:
    results = []
    for inverse_method in ("cholesky", method):
        model, x, y = _problem(tiny_cnn)
        opt = TNT(model, lr=0.01, damping=0.05, inverse_method=inverse_method)  # type: ignore[arg-type]
        torch.manual_seed(0)
        opt._generator.manual_seed(5)
        for _ in range(3):
            opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("warmup", [False, True])
def test_schedules_statistics_every_T1_inverses_every_T2(warmup: bool) -> None:
    model, x, y = _problem(tiny_mlp)
    opt = TNT(model, curvature_every=2, inverse_every=4, inverse_warmup=warmup)
    flags = []
    for _ in range(8):
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
        info = opt.last_step_info
        flags.append((info["statistics_updated"], info["inverses_refreshed"]))
    # k = 1 bootstraps statistics and inverses (A9); then statistics at even k, inverses at
    # k ≡ 0 mod 4, and with the warm-up also at every statistics update while k < T2.
    assert flags == [
        (True, True),
        (True, warmup),
        (False, False),
        (True, True),
        (False, False),
        (True, False),
        (False, False),
        (True, True),
    ]


def test_warm_start_averages_the_batch_contractions() -> None:
    model = tiny_cnn(batchnorm=True)
    gen = torch.Generator().manual_seed(4)
    batches = [
        (
            torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (3,), generator=gen),
        )
        for _ in range(3)
    ]
    buffers = [b.clone() for b in model.buffers()]
    opt = TNT(model, fisher="empirical", damping=0.1, curvature_every=3, inverse_every=5)
    assert opt.warm_start(batches, nn.CrossEntropyLoss()) == 3
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    params = list(model.parameters())
    expected: list[list[torch.Tensor]] = [[] for _ in params]
    for xb, yb in batches:
        with torch.enable_grad():
            grads = torch.autograd.grad(nn.CrossEntropyLoss()(model(xb), yb), params)
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            expected[j].append(_contractions(g.reshape(tensor_shape(p.shape))))
    for j, p in enumerate(params):
        state = opt.state[p]
        assert TensorBlock.is_ready(state)
        for i, S in enumerate(state["statistics"]):
            torch.testing.assert_close(
                S, sum(e[i] for e in expected[j]) / 3, rtol=1e-10, atol=1e-15
            )
    # The warm start replaces the first-batch bootstrap: with T1 = 3 the first step neither
    # updates the statistics nor refreshes the inverses; it uses the warm-start ones.
    preconditioners = [[P.clone() for P in opt.state[p]["preconditioners"]] for p in params]
    opt.step(Objective(model, nn.CrossEntropyLoss(), *batches[0]))
    assert not opt.last_step_info["statistics_updated"]
    assert not opt.last_step_info["inverses_refreshed"]
    for p, old in zip(params, preconditioners, strict=True):
        assert all(
            torch.equal(a, b) for a, b in zip(opt.state[p]["preconditioners"], old, strict=True)
        )
