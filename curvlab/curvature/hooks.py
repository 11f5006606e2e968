"""Capture of layer inputs and output gradients during forward and backward passes.

`capture(layers)` is a context manager. Inside it, each forward call of a captured layer

* records the layer input (a forward *pre*-hook, before anything can modify it);
* registers a tensor hook on the layer output h that records ∂loss/∂h, and keeps h's
  *gradient edge* (`torch.autograd.graph.get_gradient_edge`).

Why this works with in-place activations (``ReLU(inplace=True)``): a tensor hook registered
before an in-place change receives the gradient of the value before the change, and the edge
names that value, not the tensor object that the in-place op rewires. `Capture.
backward_to_outputs` backpropagates another loss (e.g. with sampled labels) to the edges only:
the engine then computes the layers' output gradients and skips every weight gradient.

An output that does not require grad (a frozen layer on data) gets a zero scalar leaf added
("probe", ``h + z``) so that its gradient exists; an earlier version did this for every layer,
which cost an element-wise add per layer call and a reduction (z's gradient) per backward.

Gradients are stored per *phase* (e.g. ``"loss"`` and ``"sampled"``), so one forward pass can
serve two backward passes. Layers called several times in one forward pass (shared layers)
get one record per call. All hooks are removed on exit, also when the body raises.

Records are kept in the dtype of the layer's weight: under mixed precision (``torch.autocast``)
a layer sees and emits bfloat16 / float16 tensors, and its inputs and output gradients are
upcast when recorded, so that statistics formed from them are computed in the parameters'
precision. Without autocast nothing is converted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from curvlab.curvature.layers import KroneckerLayer
from curvlab.objective import AutocastState, Objective, autocast_state

__all__ = ["Capture", "LayerRecord", "ModelCall", "Recorder", "capture", "captured_gradient_pass"]


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
        #: where `backward_to_outputs` stops: the outputs' gradient edges (or probes). Cleared
        #: when the context exits: an edge holds its graph node, whose hook holds this object.
        self._targets: list[Any] = []
        self._closed = False

    def __getitem__(self, name: str) -> LayerRecord:
        return self.records[name]

    def backward_to_outputs(self, loss: Tensor, *, retain_graph: bool = True) -> None:
        """Backpropagate ``loss`` to the captured layers' outputs only (no weight gradients)."""
        if self._closed:
            raise RuntimeError("backward_to_outputs: call it inside the capture's with body")
        if self._targets:
            torch.autograd.grad(loss, self._targets, retain_graph=retain_graph, allow_unused=True)

    # -------------------------------------------------------------------- hooks
    def record_input(self, name: str, dtype: torch.dtype, x: Tensor) -> None:
        """A forward call of layer ``name``: its input (before anything can modify it)."""
        self.records[name].inputs.append(_as_dtype(x.detach(), dtype))

    def watch_output(self, name: str, dtype: torch.dtype, output: Tensor) -> Tensor:
        """A forward call's output: keep its gradient edge, record its gradient in the
        backward pass (per phase); returns the output (a probe added when it needs none)."""
        call = len(self.records[name].inputs) - 1
        out = output
        if output.requires_grad:
            self._targets.append(get_gradient_edge(output))
        else:  # a frozen layer on data: a probe makes its output gradient exist
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._targets.append(probe)
            out = output + probe

        def grad_hook(grad: Tensor) -> None:
            grads = self.records[name].grads.setdefault(self.phase, {})
            grads[call] = _as_dtype(grad.detach(), dtype)

        out.register_hook(grad_hook)
        return out

    def _pre_hook(self, name: str, dtype: torch.dtype) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.record_input(name, dtype, args[0])

        return hook

    def _forward_hook(self, name: str, dtype: torch.dtype) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            return self.watch_output(name, dtype, output)

        return hook


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` if it is a floating-point tensor of another dtype (mixed precision)."""
    if x.dtype == dtype or not x.is_floating_point():
        return x
    return x.to(dtype)


@contextmanager
def capture(
    layers: Mapping[str, KroneckerLayer], *, output_gradients: bool = True
) -> Iterator[Capture]:
    """Capture inputs and (unless ``output_gradients=False``: inputs only, by forward
    pre-hooks alone) output gradients of ``layers`` inside the ``with`` body."""
    cap = Capture(layers)
    handles: list[RemovableHandle] = []
    try:
        for name, layer in layers.items():
            dtype = layer.weight.dtype
            handles.append(layer.module.register_forward_pre_hook(cap._pre_hook(name, dtype)))
            if output_gradients:
                hook = cap._forward_hook(name, dtype)
                handles.append(layer.module.register_forward_hook(hook))
        # A torch.compile'd model runs compiled code that module hooks cannot see: the passes
        # that capture run it eagerly (the same function of the same parameters).
        with torch.enable_grad(), torch.compiler.set_stance("force_eager"):
            yield cap
    finally:
        for handle in handles:
            handle.remove()
        cap._targets.clear()  # no reference cycle through the graph outlives the body
        cap._closed = True


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


@dataclass
class ModelCall:
    """One forward call of the model: its inputs, the autocast state it ran under, and its
    (detached) output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    autocast: AutocastState
    output: Any = None


class Recorder:
    """Hooks that stay on a model and record the user's own passes between two steps.

    While ``armed``, every call of ``model`` with autograd enabled records its inputs, its
    autocast state and its output (`ModelCall`), and — with ``layer_records`` — every call of
    a layer of ``layers`` records its input and its output gradient, as `capture` does
    (phase ``"loss"``). Passes under ``torch.no_grad()`` (evaluation) are not recorded.
    `take` hands the records over and starts afresh; `remove` takes the hooks off. The hooks
    hold the recorder weakly: once its owner (the optimizer) is gone they do nothing.
    """

    def __init__(
        self, model: nn.Module, layers: Mapping[str, KroneckerLayer], *, layer_records: bool
    ) -> None:
        self.layers = layers
        self.armed = True
        self.calls: list[ModelCall] = []
        self.capture = Capture(layers)
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_Persistent(self, "on_call"), with_kwargs=True),
            model.register_forward_hook(_Persistent(self, "on_output")),
        ]
        if layer_records:
            for name, layer in layers.items():
                dtype = layer.weight.dtype
                pre = _Persistent(self, "on_layer_input", name, dtype)
                post = _Persistent(self, "on_layer_output", name, dtype)
                self._handles.append(layer.module.register_forward_pre_hook(pre))
                self._handles.append(layer.module.register_forward_hook(post))

    def _recording(self) -> bool:
        return self.armed and torch.is_grad_enabled()

    # ------------------------------------------------------------------ hooks
    def on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._recording():
            self.calls.append(ModelCall(args, dict(kwargs), autocast_state()))

    def on_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._recording() and self.calls and self.calls[-1].output is None:
            self.calls[-1].output = _detached(output)

    def on_layer_input(
        self, name: str, dtype: torch.dtype, module: nn.Module, args: tuple[Any, ...]
    ) -> None:
        if self._recording():
            self.capture.record_input(name, dtype, args[0])

    def on_layer_output(
        self, name: str, dtype: torch.dtype, module: nn.Module, args: Any, output: Tensor
    ) -> Tensor | None:
        if not self._recording() or not self.capture[name].inputs:
            return None
        return self.capture.watch_output(name, dtype, output)

    # ---------------------------------------------------------------- records
    def take(self) -> tuple[list[ModelCall], Capture]:
        """The calls and layer records since the last `take` (the capture closed)."""
        calls, cap = self.calls, self.capture
        self.calls, self.capture = [], Capture(self.layers)
        cap._targets.clear()  # no reference cycle through the graph outlives the records
        cap._closed = True
        return calls, cap

    def clear(self) -> None:
        """Drop the records (e.g. of passes a step with an `Objective` does not use)."""
        self.take()

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Persistent:
    """A hook left on the user's model: ``recorder.<method>(*bound, *hook arguments)``, with
    the recorder held weakly (no-op once it is gone). A copy (``copy.deepcopy(model)``, e.g.
    an EMA model) or a pickle of the model carries it as a no-op (`_Inert`): a copy is not the
    model the optimizer records, and a pickled model must not need curvlab's hooks."""

    def __init__(self, recorder: Recorder, method: str, *bound: Any) -> None:
        self.recorder = weakref.ref(recorder)
        self.method = method
        self.bound = bound

    def __call__(self, *args: Any) -> Any:
        recorder = self.recorder()
        if recorder is None:
            return None
        return getattr(recorder, self.method)(*self.bound, *args)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


class _Inert:
    """What a copied or unpickled model holds in place of a `_Persistent` hook."""

    def __call__(self, *args: Any) -> None:
        return None


def _detached(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    return output
