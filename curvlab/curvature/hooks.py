"""Capture of layer inputs and output gradients during forward and backward passes.

`capture(layers)` is a context manager. Inside it, each forward call of a captured layer

* records the layer input (a forward *pre*-hook, before anything can modify it);
* returns ``h + z`` instead of the layer output h, with ``z`` a zero scalar leaf ("probe"),
  and registers a tensor hook on that returned tensor that records ∂loss/∂h.

Why the probe: (1) in-place activations (``ReLU(inplace=True)``) then modify ``h + z``, not a
tensor we hold, and a tensor hook registered before an in-place change still receives the
gradient of the value before the change; (2) `Capture.backward_to_outputs` can backpropagate
another loss (e.g. with sampled labels) by asking autograd for the gradients of the probes
only: the engine then computes the layers' output gradients and skips every weight gradient.
The cost is one element-wise add per layer call.

Gradients are stored per *phase* (e.g. ``"loss"`` and ``"sampled"``), so one forward pass can
serve two backward passes. Layers called several times in one forward pass (shared layers)
get one record per call. All hooks are removed on exit, also when the body raises.

Records are kept in the dtype of the layer's weight: under mixed precision (``torch.autocast``)
a layer sees and emits bfloat16 / float16 tensors, and its inputs and output gradients are
upcast when recorded, so that statistics formed from them are computed in the parameters'
precision. Without autocast nothing is converted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlab.curvature.layers import KroneckerLayer
from curvlab.objective import Objective

__all__ = ["Capture", "LayerRecord", "capture", "captured_gradient_pass"]


@dataclass
class LayerRecord:
    """What one layer saw: inputs per call and output gradients per phase and call."""

    inputs: list[Tensor] = field(default_factory=list)
    grads: dict[str, dict[int, Tensor]] = field(default_factory=dict)

    def output_grads(self, phase: str) -> list[Tensor]:
        """Output gradients of one phase, ordered like ``inputs`` (forward call order)."""
        by_call = self.grads.get(phase, {})
        return [by_call[i] for i in sorted(by_call)]


class Capture:
    """Records of one `capture` context; ``phase`` names where gradients go next."""

    def __init__(self, layers: Mapping[str, KroneckerLayer]) -> None:
        self.records: dict[str, LayerRecord] = {name: LayerRecord() for name in layers}
        self.phase = "loss"
        self._probes: list[Tensor] = []

    def __getitem__(self, name: str) -> LayerRecord:
        return self.records[name]

    def backward_to_outputs(self, loss: Tensor, *, retain_graph: bool = True) -> None:
        """Backpropagate ``loss`` to the captured layers' outputs only (no weight gradients)."""
        probes = [p for p in self._probes if p.requires_grad]
        if probes:
            torch.autograd.grad(loss, probes, retain_graph=retain_graph, allow_unused=True)

    # -------------------------------------------------------------------- hooks
    def _pre_hook(self, name: str, dtype: torch.dtype) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.records[name].inputs.append(_as_dtype(args[0].detach(), dtype))

        return hook

    def _forward_hook(self, name: str, dtype: torch.dtype) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            call = len(self.records[name].inputs) - 1
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._probes.append(probe)
            out = output + probe

            def grad_hook(grad: Tensor) -> None:
                grads = self.records[name].grads.setdefault(self.phase, {})
                grads[call] = _as_dtype(grad.detach(), dtype)

            out.register_hook(grad_hook)
            return out

        return hook


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` if it is a floating-point tensor of another dtype (mixed precision)."""
    if x.dtype == dtype or not x.is_floating_point():
        return x
    return x.to(dtype)


@contextmanager
def capture(layers: Mapping[str, KroneckerLayer]) -> Iterator[Capture]:
    """Capture inputs and output gradients of ``layers`` inside the ``with`` body."""
    cap = Capture(layers)
    handles: list[RemovableHandle] = []
    try:
        for name, layer in layers.items():
            dtype = layer.weight.dtype
            handles.append(layer.module.register_forward_pre_hook(cap._pre_hook(name, dtype)))
            handles.append(layer.module.register_forward_hook(cap._forward_hook(name, dtype)))
        with torch.enable_grad():
            yield cap
    finally:
        for handle in handles:
            handle.remove()


def captured_gradient_pass(
    layers: Mapping[str, KroneckerLayer],
    objective: Objective,
    sampler: torch.Generator | None,
) -> tuple[Tensor, Capture]:
    """The closure (loss and weight gradients) with layer inputs and output gradients
    recorded (phase ``"loss"``); with a ``sampler``, first one more backward pass through the
    same forward graph with labels sampled from the model (phase ``"sampled"``; output
    gradients only). Returns the loss and the records."""
    with capture(layers) as cap:
        if sampler is None:
            return objective(), cap

        def sampled_pass(outputs: Tensor, loss: Tensor) -> None:
            cap.phase = "sampled"
            cap.backward_to_outputs(objective.sampled_loss(outputs, sampler))
            cap.phase = "loss"

        return objective.forward_backward(before_backward=sampled_pass), cap
