"""K-FAC: the direction is the dense damped Kronecker solve; schedules, options, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab import KFAC, Objective
from curvlab.testing.models import regression_problem, tiny_cnn, tiny_mlp


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("pi", [True, False])
@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_direction_equals_dense_damped_kronecker_solve(make_model, pi: bool) -> None:
    model = make_model()
    if make_model is tiny_cnn:
        x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    else:
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    damping = 0.3
    opt = KFAC(
        model,
        lr=1.0,
        damping=damping,
        momentum=0.0,
        fisher="empirical",
        statistics="before_step",
        pi_damping=pi,
    )
    before = _snapshot(model)
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    after = dict(zip([id(p) for p in model.parameters()], _snapshot(model), strict=True))
    old = dict(zip([id(p) for p in model.parameters()], before, strict=True))
    for name, layer in opt.layers.items():
        state = opt.layer_state(name)
        V = layer.grad_matrix(layer.weight.grad, None if layer.bias is None else layer.bias.grad)
        dense = opt.blocks[name].damped_to_dense(state, damping)
        expected = -torch.linalg.solve(dense, V.reshape(-1)).reshape(V.shape)
        delta = layer.grad_matrix(
            after[id(layer.weight)] - old[id(layer.weight)],
            None if layer.bias is None else after[id(layer.bias)] - old[id(layer.bias)],
        )
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)


def test_pi_split_multiplies_to_sqrt_damping_squared() -> None:
    model = tiny_mlp()
    x, y = regression_problem()
    opt = KFAC(model, damping=0.5, statistics="before_step")
    opt.step(Objective(model, nn.MSELoss(), x, y))
    for name in opt.layers:
        state = opt.layer_state(name)
        lam_a, lam_g = opt.blocks[name].dampings(state, 0.5)
        assert math.isclose(lam_a * lam_g, 0.5, rel_tol=1e-12)
        ratio = (state["A"].trace() / state["A"].shape[0]) / (
            state["G"].trace() / state["G"].shape[0]
        )
        assert math.isclose(lam_a / lam_g, float(ratio), rel_tol=1e-10)


def test_schedules_refresh_every_T2_and_statistics_every_T1() -> None:
    model = tiny_mlp()
    x, y = regression_problem()
    opt = KFAC(model, curvature_every=2, inverse_every=3)
    infos = []
    for _ in range(6):
        opt.step(Objective(model, nn.MSELoss(), x, y))
        infos.append(
            (opt.last_step_info["statistics_updated"], opt.last_step_info["inverses_refreshed"])
        )
    # k=1 bootstraps the factors and inverses; then statistics at even k (after the step),
    # inverses at k ≡ 0 mod 3 whether or not that step had new statistics (Alg 12 line 17).
    assert infos == [
        (True, True),
        (True, False),
        (False, True),
        (True, False),
        (False, False),
        (True, True),
    ]
    assert opt.layer_state("0")["refreshes"] == 3


def test_warm_start_sets_factors_and_inverses() -> None:
    model = tiny_mlp()
    x, y = regression_problem(n=12)
    opt = KFAC(model)
    used = opt.warm_start([(x[:6], y[:6]), (x[6:], y[6:])], nn.MSELoss())
    assert used == 2
    assert all("A_inv" in opt.layer_state(n) for n in opt.layers)


def test_fallback_params_warned_and_trained() -> None:
    model = tiny_cnn(batchnorm=True)
    with pytest.warns(UserWarning, match="BatchNorm2d"):
        opt = KFAC(model, lr=0.1)
    bn = model[1]
    w0 = bn.weight.detach().clone()
    running = bn.running_mean.clone()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert not torch.equal(bn.weight, w0)
    # One training forward pass moves running stats once; the statistics passes restore them.
    model2 = tiny_cnn(batchnorm=True)
    model2(x)
    torch.testing.assert_close(bn.running_mean, model2[1].running_mean)
    assert not torch.equal(bn.running_mean, running)


def test_plain_closure_and_bad_models_are_rejected() -> None:
    model = tiny_mlp()
    opt = KFAC(model)
    with pytest.raises(ValueError, match="no forward pass of the model was recorded"):
        opt.step(lambda: torch.tensor(0.0))
    with pytest.raises(ValueError, match="model: no trainable nn.Linear"):
        KFAC(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match="model"):
        KFAC([nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]


def test_true_fisher_needs_a_samplable_loss() -> None:
    model = tiny_mlp()
    x, y = regression_problem()
    opt = KFAC(model, statistics="before_step")
    with pytest.raises(ValueError, match="loss_fn: cannot sample"):
        opt.step(Objective(model, nn.L1Loss(), x, y))
    # The empirical Fisher still needs the loss scale, which L1 does not define either.
    opt = KFAC(model, fisher="empirical")
    with pytest.raises(ValueError, match="loss_fn"):
        opt.step(Objective(model, nn.L1Loss(), x, y))


def test_param_groups_each_read_their_own_lr() -> None:
    model = tiny_mlp()
    x, y = regression_problem()
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters())},
    ]
    opt = KFAC(model, lr=0.1, params=groups)
    w0 = model[0].weight.detach().clone()
    w2 = model[2].weight.detach().clone()
    opt.step(Objective(model, nn.MSELoss(), x, y))
    assert torch.equal(model[0].weight, w0)
    assert not torch.equal(model[2].weight, w2)
    with pytest.raises(ValueError, match="same group|one group"):
        KFAC(model, params=[{"params": [model[0].weight]}, {"params": [model[0].bias]}])


def test_layer_outside_the_forward_pass_keeps_its_gradient_and_breaks_nothing() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3).double()
            self.unused = nn.Linear(4, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy()
    x, y = regression_problem()
    # after_step: the first-mini-batch bootstrap, then one statistics pass after each step.
    for statistics, updates in (("before_step", 3), ("after_step", 4)):
        opt = KFAC(model, statistics=statistics)
        before = model.unused.weight.detach().clone()
        for _ in range(3):
            opt.step(Objective(model, nn.MSELoss(), x, y))
            assert opt.last_step_info["skipped"] is False
        assert "A_inv" in opt.layer_state("used") and "A" not in opt.layer_state("unused")
        assert opt.layer_state("used")["statistics_updates"] == updates  # no repeated bootstrap
        assert torch.equal(model.unused.weight, before)  # no gradient, no update
