"""Factored per-sample Jacobian rows equal explicit per-sample Jacobians / gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.curvature.layers import KroneckerLayer, find_layers
from curvlab.curvature.per_sample import (
    SampleRows,
    jacobian_mv,
    jacobian_tmv,
    layer_gram,
    loss_gradient_rows,
    output_jacobian_rows,
)
from curvlab.testing.models import tiny_cnn, tiny_mlp

F64 = torch.float64


class SharedTwice(nn.Module):
    """One Linear layer applied twice (two calls per forward), then a head on 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))  # x: (N, T, 3)
        return self.head(h).sum(dim=1)


def _model_and_inputs(kind: str) -> tuple[nn.Module, Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return tiny_mlp((4, 5, 3)), torch.randn(5, 4, generator=g, dtype=F64)
    if kind == "mlp-nobias-inplace":
        return tiny_mlp((4, 5, 3), bias=False, inplace=True), torch.randn(
            5, 4, generator=g, dtype=F64
        )
    if kind == "cnn":
        return tiny_cnn(), torch.randn(3, 2, 5, 5, generator=g, dtype=F64)
    torch.manual_seed(0)
    return SharedTwice().to(F64), torch.randn(4, 2, 3, generator=g, dtype=F64)


def _explicit_rows(
    model: nn.Module, per_sample: Callable[[dict[str, Tensor], Tensor], Tensor], x: Tensor
) -> dict[str, Tensor]:
    """Per-sample Jacobian rows (N, k, d_out, d_a) of every layer, by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(per_sample), in_dims=(None, 0))(params, x)  # name → (N, k, *shape)
    rows = {}
    for name, layer in find_layers(model).items():
        prefix = f"{name}." if name else ""
        Jw = jac[prefix + "weight"]
        N, k = Jw.shape[:2]
        Jb = None if layer.bias is None else jac[prefix + "bias"].reshape(N * k, -1)
        rows[name] = torch.stack(
            [
                layer.grad_matrix(w, None if Jb is None else Jb[r])
                for r, w in enumerate(Jw.reshape(N * k, *Jw.shape[2:]))
            ]
        ).reshape(N, k, layer.d_out, layer.d_a)
    return rows


def _check(rows: dict[str, SampleRows], explicit: dict[str, Tensor], layers: dict) -> None:
    assert set(rows) == set(explicit)
    gen = torch.Generator().manual_seed(1)
    for name, R in explicit.items():
        N, k = R.shape[:2]
        flat = R.reshape(N * k, -1)
        methods = ["auto", "kernel", "explicit"]
        for method in methods:
            torch.testing.assert_close(layer_gram(rows[name], method), flat @ flat.T)  # type: ignore[arg-type]
        V = torch.randn(R.shape[2:], generator=gen, dtype=F64)
        torch.testing.assert_close(jacobian_mv(rows[name], V), (R * V).sum(dim=(2, 3)))
        c = torch.randn(N, k, generator=gen, dtype=F64)
        torch.testing.assert_close(jacobian_tmv(rows[name], c), torch.einsum("ik,ikde->de", c, R))


@pytest.mark.parametrize("kind", ["mlp", "mlp-nobias-inplace", "cnn", "shared"])
def test_gauss_newton_rows_equal_per_sample_output_jacobians(kind: str) -> None:
    model, x = _model_and_inputs(kind)
    layers = find_layers(model)

    def outputs_of(params: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, params, (xi[None],)).reshape(-1)

    rows, outputs = output_jacobian_rows(layers, model, x)
    torch.testing.assert_close(outputs, model(x).detach())
    assert all(r.rows_per_sample == outputs[0].numel() for r in rows.values())
    _check(rows, _explicit_rows(model, outputs_of, x), layers)


@pytest.mark.parametrize("kind", ["mlp", "mlp-nobias-inplace", "cnn", "shared"])
def test_fisher_rows_equal_per_sample_loss_gradients(kind: str) -> None:
    model, x = _model_and_inputs(kind)
    layers = find_layers(model)
    n_out = model(x).shape[1]
    targets = torch.randint(0, n_out, (x.shape[0],), generator=torch.Generator().manual_seed(2))

    def summed(outputs: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="sum")

    def loss_of(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, params, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None]).reshape(1)

    rows, _ = loss_gradient_rows(layers, model, x, summed)
    assert all(r.rows_per_sample == 1 for r in rows.values())
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(loss_of), in_dims=(None, 0, 0))(params, x, targets)
    explicit = {}
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        b = None if layer.bias is None else jac[prefix + "bias"][:, 0]
        explicit[name] = torch.stack(
            [
                layer.grad_matrix(w, None if b is None else b[i])
                for i, w in enumerate(jac[prefix + "weight"][:, 0])
            ]
        )[:, None]
    _check(rows, explicit, layers)
    # Σ_l ⟨rows, rows⟩ is the per-sample-gradient Gram matrix (thesis §5.3.3).
    per_sample = vmap(grad(lambda p, xi, yi: loss_of(p, xi, yi).sum()), in_dims=(None, 0, 0))(
        params, x, targets
    )
    G = torch.cat([v.reshape(x.shape[0], -1) for v in per_sample.values()], dim=1)
    total = sum(layer_gram(r) for r in rows.values())
    torch.testing.assert_close(total, G @ G.T)


def test_a_layer_not_called_is_left_out_and_a_bad_batch_dimension_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).to(F64)
    unused = nn.Linear(2, 2).to(F64)
    layers = {**find_layers(model), "unused": KroneckerLayer("unused", unused)}
    rows, _ = output_jacobian_rows(layers, model, torch.randn(4, 3, dtype=F64))
    assert set(rows) == {"0"}

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:  # 5 rows for 2 samples: mixes the batch
            return self.lin(x.T).sum(dim=0)[None].expand(x.shape[0], 2)

    model2 = Transposed().to(F64)
    with pytest.raises(ValueError, match="^model"):
        output_jacobian_rows(find_layers(model2), model2, torch.randn(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="^method"):
        layer_gram(rows["0"], "dense")  # type: ignore[arg-type]
