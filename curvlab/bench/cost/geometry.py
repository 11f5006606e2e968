"""The matrix-form sizes of a model's Kronecker layers, read from one forward pass.

The optimizers' cost models (`curvlab.optim.base.BlockOptimizer.step_cost`) and storage
formulas are written in these sizes (`curvlab.curvature.cost.LayerShape`): per layer the rows r
of its matrix form (the batch m for a Linear layer), its fan-in, its outputs, its bias and
whether backpropagation continues below it; `LayerGeometry` adds the tensor shapes seen, for
the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlab.curvature.cost import LayerShape
from curvlab.curvature.layers import find_layers

__all__ = ["LayerGeometry", "layer_geometry"]


@dataclass(frozen=True)
class LayerGeometry(LayerShape):
    """A `LayerShape` with the tensor shapes seen in the forward pass.

    Attributes:
        input_shape, output_shape: tensor shapes seen in the forward pass.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def layer_geometry(model: nn.Module, inputs: Tensor) -> list[LayerGeometry]:
    """Sizes of ``model``'s Kronecker layers, from one forward pass on ``inputs``.

    A layer called several times is described by its first call.
    """
    layers = find_layers(model)
    seen: dict[str, tuple[Tensor, bool]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles: list[RemovableHandle] = []

    def pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, (args[0].detach(), bool(args[0].requires_grad)))

        return hook

    def post_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            shapes.setdefault(name, tuple(output.shape))

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.module.register_forward_pre_hook(pre_hook(name)))
            handles.append(layer.module.register_forward_hook(post_hook(name)))
        with torch.enable_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    out: list[LayerGeometry] = []
    for name, layer in layers.items():
        if name not in seen:
            continue
        x, needs_grad = seen[name]
        rows = layer.input_rows(x)
        out.append(
            LayerGeometry(
                name=name,
                rows=int(rows.shape[0]),
                fan_in=int(rows.shape[1]),
                d_out=layer.d_out,
                bias=layer.bias is not None,
                input_grad=needs_grad,
                input_shape=tuple(x.shape),
                output_shape=shapes[name],
            )
        )
    return out
