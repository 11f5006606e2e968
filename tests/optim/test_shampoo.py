"""Shampoo (thesis Alg 16): the direction is the inverse 2k-th root of the damped dense
Kronecker product of the empirical statistics; options, failed roots, the checked statistics
path. (Skipped steps and the other conformance checks: tests/optim/test_conformance.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.curvature.blocks import TensorBlock
from curvlab.linalg import contractions_bounded
from curvlab.linalg.modes import tensor_shape
from curvlab.optim.shampoo import Shampoo
from curvlab.testing.models import tiny_cnn, tiny_mlp


def _contractions(G: torch.Tensor) -> list[torch.Tensor]:
    """G^{(i)} = mat_i(G) mat_i(G)ᵀ from the slices (thesis §4.2.1), independent of the code."""
    out = []
    for i in range(G.dim()):
        M = torch.stack([G.select(i, j).reshape(-1) for j in range(G.shape[i])])
        out.append(M @ M.T)
    return out


def _dense_root_direction(V: torch.Tensor, stats: list[torch.Tensor], eps: float) -> torch.Tensor:
    """(⊗_i (Ĝ^{(i)} + εI))^{-1/(2k)} vec(V) by an eigendecomposition of the dense product."""
    k = len(stats)
    dense = torch.ones(1, 1, dtype=V.dtype)
    for S in stats:
        dense = torch.kron(dense, S + eps * torch.eye(S.shape[0], dtype=S.dtype))
    w, Q = torch.linalg.eigh(dense)
    return ((Q * w.pow(-1.0 / (2 * k))) @ Q.T @ V.reshape(-1)).reshape(V.shape)


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


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.enable_grad():
        return torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(model.parameters()))


@pytest.mark.parametrize("root_method", ["eigh", "coupled_newton"])
@pytest.mark.parametrize(
    "make_model", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batchnorm=True)], ids=["mlp", "cnn", "bn"]
)
def test_direction_equals_dense_inverse_root(make_model, root_method: str) -> None:
    # Two steps with momentum: the statistics are the EMA of the contractions of the RAW
    # gradients (Alg 16 line 9), the root acts on the momentum buffer μ g1 + g2 (lines 7, 14).
    model, x, y = _problem(make_model)
    x2 = x.flip(0)
    eps, mu, beta = 1e-2, 0.9, 0.9
    opt = Shampoo(model, lr=0.0, damping=eps, momentum=mu, ema_decay=beta, root_method=root_method)  # type: ignore[arg-type]
    g1 = _grads(model, x, y)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    g2 = _grads(model, x2, y)
    for group in opt.param_groups:
        group["lr"] = 1.0
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt.step(Objective(model, nn.CrossEntropyLoss(), x2, y))
    assert opt.last_step_info["inverses_refreshed"]  # warm-up refresh at k < T2 (A9)
    for p, p0, a, b in zip(params, before, g1, g2, strict=True):
        shape = tensor_shape(p.shape)
        stats = [
            beta * s1 + (1 - beta) * s2
            for s1, s2 in zip(
                _contractions(a.reshape(shape)), _contractions(b.reshape(shape)), strict=True
            )
        ]
        for S, R in zip(opt.state[p]["statistics"], stats, strict=True):
            torch.testing.assert_close(S, R, rtol=1e-10, atol=1e-15)
        expected = -_dense_root_direction(mu * a + b, stats, eps)
        tol = max(1e-9 * float(expected.abs().max()), 1e-15)  # a bias before BN: grad ≈ 1e-17
        torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-8, atol=tol)


def test_root_orders_are_twice_the_tensor_order() -> None:
    opt = Shampoo(tiny_cnn(batchnorm=True))
    roots = {tuple(p.shape): opt.block_of(p).root for p in opt.model.parameters()}
    assert roots[(3, 2, 3, 3)] == 6  # conv weight: 3-way (I, J, kh·kw), root −1/6
    assert roots[(3,)] == 2  # biases and BatchNorm parameters: −1/2
    assert roots[(3, 2)] == 4  # Linear weight: −1/4


def test_coupled_newton_and_eigh_agree_over_several_steps() -> None:
    results = []
    for method in ("coupled_newton", "eigh"):
        model, x, y = _problem(tiny_cnn)
        opt = Shampoo(model, lr=0.01, damping=1e-2, root_method=method, inverse_every=2)  # type: ignore[arg-type]
        for xb in (x, x.flip(0), x):
            opt.step(Objective(model, nn.CrossEntropyLoss(), xb, y))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_plain_closure_and_precomputed_gradients_are_accepted() -> None:
    runs = []
    for mode in ("objective", "closure", "none"):
        model, x, y = _problem(tiny_mlp)
        opt = Shampoo(model, lr=0.01, root_method="eigh")

        def closure(model: nn.Module = model, opt=opt, x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            if mode == "objective":
                opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
            elif mode == "closure":
                opt.step(closure)
            else:
                with torch.enable_grad():
                    closure()
                assert opt.step() is None
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_failed_root_keeps_previous_and_is_reported() -> None:
    model, x, y = _problem(tiny_mlp)
    opt = Shampoo(model, lr=0.01, inverse_every=1)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    p = model[0].weight
    previous = [P.clone() for P in opt.state[p]["preconditioners"]]
    opt.state[p]["statistics"][0].fill_(float("inf"))  # corrupt the EMA: no retry can fix it
    opt.param_groups[0]["ema_decay"] = 0.5
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert opt.last_step_info["failed_refreshes"] == 1
    assert all(
        torch.equal(a, b) for a, b in zip(opt.state[p]["preconditioners"], previous, strict=True)
    )


def test_float64_retry_of_a_root_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A float32 eigh that does not converge is retried in float64 (curvlab.linalg) and counted.
    eigh = torch.linalg.eigh

    def eigh_failing_in_float32(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return eigh(A)

    model, x, y = _problem(tiny_mlp)
    model.float()
    opt = Shampoo(model, lr=0.01, inverse_every=1, root_method="eigh")
    opt.step(Objective(model, nn.CrossEntropyLoss(), x.float(), y))
    assert opt.last_step_info["retried_decompositions"] == 0
    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x.float(), y))
    n_factors = sum(p.dim() for p in model.parameters())
    assert opt.last_step_info["retried_decompositions"] == n_factors
    assert opt.last_step_info["failed_refreshes"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _scaled_loss(factor: float) -> Any:
    return lambda out, y: factor * nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize(
    ("factor", "skipped"),
    # 3.5e19: gradients past the a-priori bound of the fused average, statistics still finite
    # (formed in buffers, checked, averaged); 1e22: statistics overflow, the step is skipped.
    [(3.5e19, False), (1e22, True)],
)
def test_large_gradient_takes_the_checked_statistics_path(factor: float, skipped: bool) -> None:
    model, x, y = _problem(tiny_mlp)
    model.float()
    x = x.float()
    opt = Shampoo(model, lr=0.0, momentum=0.0, ema_decay=0.5, root_method="eigh")
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    before = {p: [S.clone() for S in opt.state[p]["statistics"]] for p in model.parameters()}
    with torch.enable_grad():
        grads = torch.autograd.grad(_scaled_loss(factor)(model(x), y), list(model.parameters()))
    lengths = [g.numel() // min(tensor_shape(g.shape)) for g in grads]
    assert not contractions_bounded(list(grads), lengths)  # the fused path is refused
    opt.step(Objective(model, _scaled_loss(factor), x, y))
    assert opt.last_step_info["skipped"] is skipped
    for p, g in zip(model.parameters(), grads, strict=True):
        new = _contractions(g.double().reshape(tensor_shape(p.shape)))
        for S, S0, C in zip(opt.state[p]["statistics"], before[p], new, strict=True):
            if skipped:
                assert torch.equal(S, S0)
            else:
                assert torch.isfinite(S).all()
                torch.testing.assert_close(
                    S.double(), 0.5 * S0.double() + 0.5 * C, rtol=1e-4, atol=0
                )
    if skipped:
        assert opt.last_step_info["reason"] == "non-finite curvature statistics"


def test_steady_state_statistics_are_accumulated_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # From the second step on, the statistics go straight into the EMAs (one product per mode).
    calls: list[int] = []
    accumulate = TensorBlock.accumulate

    def counting(self: TensorBlock, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        accumulate(self, *args, **kwargs)

    monkeypatch.setattr(TensorBlock, "accumulate", counting)
    model, x, y = _problem(tiny_mlp)
    opt = Shampoo(model, lr=0.01, root_method="eigh")
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert not calls  # the first statistics initialise the EMAs
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert len(calls) == len(list(model.parameters()))
    assert opt.last_step_info["statistics_updated"]
