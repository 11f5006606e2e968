"""Captured layer inputs and output gradients reproduce autograd's weight gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.curvature import capture, find_layers

CONVS = {
    "bias": dict(in_channels=2, out_channels=3, kernel_size=3),
    "stride_pad": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
    "dilation_nobias": dict(in_channels=2, out_channels=4, kernel_size=2, dilation=2, bias=False),
    "same": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "reflect": dict(
        in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="reflect"
    ),
    "rect": dict(in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
}


def _check_weight_grads(model: nn.Module, x: torch.Tensor) -> None:
    layers = find_layers(model)
    with capture(layers) as cap:
        loss = (model(x) ** 2).sum()
        loss.backward()
    for name, layer in layers.items():
        rows = torch.cat([layer.input_rows(a) for a in cap[name].inputs])
        if layer.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
        grads = torch.cat([layer.output_rows(g) for g in cap[name].output_grads("loss")])
        expected = layer.grad_matrix(
            layer.weight.grad, None if layer.bias is None else layer.bias.grad
        )
        torch.testing.assert_close(grads.T @ rows, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", CONVS.values(), ids=CONVS.keys())
def test_conv_capture_reproduces_weight_gradient(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(**kwargs), nn.ReLU(inplace=True), nn.Flatten()).double()
    _check_weight_grads(model, torch.randn(3, 2, 7, 6, dtype=torch.float64))


@pytest.mark.parametrize("inplace", [False, True])
def test_linear_capture_with_inplace_activation(inplace: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3, bias=False), nn.ReLU(inplace)
    ).double()
    _check_weight_grads(model, torch.randn(6, 4, dtype=torch.float64))


def test_linear_on_sequences_and_shared_layer() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(4, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    _check_weight_grads(Twice(), torch.randn(5, 3, 4, dtype=torch.float64))


def test_backward_to_outputs_computes_no_weight_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    layers = find_layers(model)
    with capture(layers) as cap:
        out = model(x)
        cap.phase = "probe"
        cap.backward_to_outputs((out**2).sum())
        cap.phase = "loss"
        (out**2).sum().backward()
    for name in layers:
        probe, true = cap[name].output_grads("probe"), cap[name].output_grads("loss")
        torch.testing.assert_close(probe, true, rtol=0, atol=0)
    # The probe pass alone leaves .grad untouched.
    model.zero_grad(set_to_none=True)
    with capture(layers) as cap:
        cap.backward_to_outputs((model(x) ** 2).sum(), retain_graph=False)
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_when_body_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    layers = find_layers(model)
    with pytest.raises(RuntimeError, match="boom"), capture(layers):
        raise RuntimeError("boom")
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    out = model(torch.randn(1, 2))
    assert out.shape == (1, 2)


def test_outputs_pass_through_unchanged_and_a_frozen_layer_still_gets_its_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    layers = find_layers(model)
    model[0].requires_grad_(False)  # frozen after: its output on data needs a probe
    x = torch.randn(6, 4, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    handle = model[2].register_forward_hook(lambda m, a, out: seen.append(out))
    with capture(layers) as cap:
        out = model(x)
        cap.phase = "outputs"
        cap.backward_to_outputs((out**2).sum())
    handle.remove()
    assert seen[0] is out  # no extra op on an output that requires grad
    name = "0"
    assert len(cap[name].output_grads("outputs")) == 1
    # ∂L/∂h₀ by hand: h₁ = W₂ relu(h₀) + b₂, L = Σ h₁².
    h0 = model[0](x)
    expected = (2 * out.detach() @ model[2].weight) * (h0 > 0)
    torch.testing.assert_close(cap[name].output_grads("outputs")[0], expected)


def test_backward_to_outputs_after_the_context_exits_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 2)).double()
    with capture(find_layers(model)) as cap:
        out = model(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inside the capture"):
        cap.backward_to_outputs(out.sum())
