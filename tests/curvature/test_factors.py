"""K-FAC factors equal dense references; in the exact cases K-FAC equals the GGN block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.curvature import capture, find_layers, input_factor, output_factor
from curvlab.linalg import kron_to_dense
from curvlab.testing.dense import expected_kfac_factors, layer_ggn_block
from curvlab.testing.models import deep_linear, tiny_mlp


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Reference unfold by explicit loops: (m, T, C·kh·kw) in (channel, kh, kw) order."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = nn.functional.pad(x, (pw, pw, ph, ph))
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_factors_equal_loop_reference(bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1, bias=bias).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    x, y = torch.randn(5, 2, 6, 5, dtype=torch.float64), torch.randint(0, 4, (5,))
    objective = Objective(model, nn.CrossEntropyLoss(), x, y)
    layers = find_layers(model)
    h = conv(x)
    h.retain_grad()
    loss = objective.loss_from_outputs(model[1:](h), y)
    loss.backward()
    with capture(layers) as cap:
        objective()
    layer = layers["0"]
    m = 5
    a = _patches(x, conv)  # (m, T, d)
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
    T = a.shape[1]
    A_ref = torch.einsum("ntd,nte->de", a, a) / m  # thesis (3.9): sum over t, mean over n
    g = h.grad.flatten(2).transpose(1, 2)  # (m, T, I), ∂L/∂h of the batch-mean loss
    per_example = m * g  # thesis A1: per-example gradients of a mean loss
    G_ref = torch.einsum("nti,ntj->ij", per_example, per_example) / (m * T)
    A = input_factor(layer, cap["0"].inputs, m)
    G = output_factor(
        layer, cap["0"].output_grads("loss"), m, objective.loss_scale(objective.outputs)
    )
    torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_equals_exact_ggn_block_deep_linear_one_datum(reduction: str) -> None:
    """Deep linear network, one datum, MSE: A ⊗ E[G] is exactly the layer's GGN block."""
    model = deep_linear((3, 4, 5, 2))
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    objective = Objective(model, nn.MSELoss(reduction=reduction), x, y)
    layers = find_layers(model)
    factors = expected_kfac_factors(layers, objective)
    for name, layer in layers.items():
        A, G = factors[name]
        torch.testing.assert_close(
            kron_to_dense(G, A), layer_ggn_block(objective, layer), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")], ids=["mean", "sum"]
)
def test_empirical_fisher_factors_exact_for_one_datum(loss_fn: nn.Module) -> None:
    """With one datum, A ⊗ G_EF = ∇L ∇Lᵀ / c (the empirical Fisher of L), any network."""
    model = tiny_mlp((4, 5, 3), inplace=True)
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    objective = Objective(model, loss_fn, x, y)
    layers = find_layers(model)
    with capture(layers) as cap:
        objective()
    c = objective.loss_scale(objective.outputs)
    for name, layer in layers.items():
        A = input_factor(layer, cap[name].inputs, 1)
        G = output_factor(layer, cap[name].output_grads("loss"), 1, c)
        v = layer.grad_matrix(layer.weight.grad, layer.bias.grad).reshape(-1)
        torch.testing.assert_close(kron_to_dense(G, A), torch.outer(v, v) / c, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_sampled_factor_matches_expectation_in_the_mean() -> None:
    """Monte Carlo: the sampled-label G averages to the exact expectation."""
    model = tiny_mlp((4, 6, 3))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    objective = Objective(model, nn.CrossEntropyLoss(), x, y)
    layers = find_layers(model)
    expected = expected_kfac_factors(layers, objective)
    gen = torch.Generator().manual_seed(0)
    total = {name: torch.zeros_like(expected[name][1]) for name in layers}
    n = 3000
    with capture(layers) as cap:
        outputs, _ = objective.forward()
        c = objective.loss_scale(outputs)
        for i in range(n):
            cap.phase = f"s{i}"
            cap.backward_to_outputs(objective.sampled_loss(outputs, gen))
    for name, layer in layers.items():
        for i in range(n):
            total[name] += output_factor(layer, cap[name].output_grads(f"s{i}"), 8, c)
        torch.testing.assert_close(total[name] / n, expected[name][1], rtol=0.1, atol=0.02)
