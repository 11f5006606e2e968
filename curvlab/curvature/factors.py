"""Kronecker factor statistics of one layer from captured inputs and output gradients.

For a layer with rows ``ā_t(n)`` (inputs, bias coordinate appended) and per-example output
gradients ``Dh_t(n)`` over locations t ∈ T, thesis eq. (3.9) (KFC, Grosse & Martens 2016;
for FC layers |T| = 1 and this is Martens & Grosse 2015):

    A = E_n[ Σ_t ā_t ā_tᵀ ]                 (SUM over locations, MEAN over examples)
    G = E_n[ (1/|T|) Σ_t Dh_t Dh_tᵀ ]        (MEAN over locations)

Autograd gives ``ĝ = ∂L/∂h`` of the *batch* loss ``L = c · Σ_n l_n`` (see
`curvlab.Objective.loss_scale`), i.e. ``ĝ = c · Dh``. The curvature of L itself is
``c·m · (A ⊗ G)``, and we return the factors of that (so damping acts on the objective's own
scale): ``A = (1/m) Σ ā āᵀ`` and ``G = (1/(c·|T|)) Σ ĝ ĝᵀ``. For a batch-mean loss (c = 1/m)
this is thesis A1 (docs/deviations.md): per-example gradients are m·ĝ and G is their mean
outer product.

Both functions take an optional ``out`` buffer. An optimizer that recomputes the factors every
step should pass the same buffers each time: a fresh (d, d) result is fresh memory, and on CPU
first touching fresh pages (page faults, kernel zeroing) measured ~15 ms per step on the thesis
autoencoder, as much as the factor products' own mirror copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.curvature.hooks import Capture, capture
from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import gram
from curvlab.objective import preserved_buffers

__all__ = [
    "FactorBuffers",
    "batch_factors",
    "input_factor",
    "layer_factors",
    "output_factor",
    "require_records",
    "statistics_pass",
]


def _homogeneous_gram(rows: Tensor, scale: float, out: Tensor | None) -> Tensor:
    """``scale · [a 1]ᵀ[a 1]`` without materialising the column of ones."""
    n, d = rows.shape
    if out is None:
        out = rows.new_empty((d + 1, d + 1))
    gram(rows, scale, out=out[:d, :d])
    col = rows.sum(dim=0) * scale
    out[:d, d] = col
    out[d, :d] = col
    out[d, d] = n * scale
    return out


def input_factor(
    layer: KroneckerLayer, inputs: list[Tensor], batch_size: int, *, out: Tensor | None = None
) -> Tensor:
    """A = (1/m) Σ_{n,t} ā_t(n) ā_t(n)ᵀ over every call of the layer (thesis eq. 3.9).

    ``out``: a (d_a, d_a) buffer to write into (see the module docstring on reuse)."""
    rows = (
        torch.cat([layer.input_rows(x) for x in inputs])
        if len(inputs) > 1
        else (layer.input_rows(inputs[0]))
    )
    if layer.bias is None:
        return gram(rows, 1.0 / batch_size, out=out)
    return _homogeneous_gram(rows, 1.0 / batch_size, out)


def output_factor(
    layer: KroneckerLayer,
    grads: list[Tensor],
    batch_size: int,
    loss_scale: float,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """G = (1/(c·|T|)) Σ_{n,t} ĝ_t(n) ĝ_t(n)ᵀ, with ĝ = ∂L/∂h and L = c·Σ_n l_n."""
    rows = (
        torch.cat([layer.output_rows(g) for g in grads])
        if len(grads) > 1
        else (layer.output_rows(grads[0]))
    )
    locations = rows.shape[0] / batch_size
    return gram(rows, 1.0 / (loss_scale * locations), out=out)


def layer_factors(
    layers: Mapping[str, KroneckerLayer],
    cap: Capture,
    phase: str,
    batch_size: int,
    loss_scale: float,
    buffers: Callable[[str, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, G) of every layer from one `capture` (output gradients of ``phase``); layers not in
    this forward pass are left out. ``buffers(name, grad)`` may give reused outputs."""
    require_records(cap, layers)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in layers.items():
        record = cap[name]
        grads = record.output_grads(phase)
        if not record.inputs or len(grads) != len(record.inputs):
            continue  # layer unused in this forward pass
        A_out, G_out = buffers(name, grads[0]) if buffers is not None else (None, None)
        factors[name] = (
            input_factor(layer, record.inputs, batch_size, out=A_out),
            output_factor(layer, grads, batch_size, loss_scale, out=G_out),
        )
    return factors


class FactorBuffers:
    """Reused (d_a, d_a) and (d_out, d_out) outputs per layer for `layer_factors` (see the
    module docstring on reuse), in the parameters' dtype (the captured rows are upcast to it
    under mixed precision, `curvlab.curvature.hooks`).

    The factors returned through these buffers are overwritten by the next call: a caller
    that keeps them (an EMA's first value) must copy them, as `KroneckerBlock.update` does.
    """

    def __init__(self, layers: Mapping[str, KroneckerLayer]) -> None:
        self._layers = layers
        self._buffers: dict[str, tuple[Tensor, Tensor]] = {}

    def tensors(self) -> list[Tensor]:
        """Every buffer held (for memory accounting, `curvlab.bench.cost.memory.state_bytes`)."""
        return [t for pair in self._buffers.values() for t in pair]

    def __call__(self, name: str, like: Tensor) -> tuple[Tensor, Tensor]:
        layer = self._layers[name]
        dtype = layer.weight.dtype
        buffers = self._buffers.get(name)
        if buffers is None or buffers[0].dtype != dtype or buffers[0].device != like.device:
            buffers = (
                like.new_empty(layer.d_a, layer.d_a, dtype=dtype),
                like.new_empty(layer.d_out, layer.d_out, dtype=dtype),
            )
            self._buffers[name] = buffers
        return buffers


def require_records(cap: Capture, layers: Mapping[str, KroneckerLayer]) -> None:
    """A pass that recorded no layer at all cannot give statistics: raise an error that says
    why, instead of a step without them (the usual cause: a ``torch.compile``'d model in the
    user's own forward pass, whose compiled code runs without the recording hooks)."""
    if layers and not any(cap[name].inputs for name in layers):
        raise ValueError(
            "model: no layer was recorded in the pass the statistics come from: the model did "
            "not run (a closure must run it), or it is torch.compile'd, and compiled code runs "
            "without the recording hooks; for the statistics of your own backward pass step "
            "without compiling, or let the method make its own pass (a closure, a "
            "curvlab.Objective, or statistics='after_step')"
        )


def batch_factors(
    layers: Mapping[str, KroneckerLayer],
    cap: Capture,
    batch: Any,
    outputs: Tensor,
    sampled: bool,
    buffers: Callable[[str, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """`layer_factors` of a captured pass over ``batch`` (a `curvlab.Objective` or a
    `curvlab.curvature.recorded.RecordedBatch`): the output gradients of the sampled-label
    backward (``sampled``) or of the true loss, scaled by the batch's ``loss_scale``."""
    phase = "sampled" if sampled else "loss"
    m, scale = batch.batch_size, batch.loss_scale(outputs)
    return layer_factors(layers, cap, phase, m, scale, buffers)


def statistics_pass(
    model: nn.Module,
    layers: Mapping[str, KroneckerLayer],
    batch: Any,
    sampler: torch.Generator | None,
    buffers: Callable[[str, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Another pass over ``batch`` for the factors alone (thesis Alg 12 line 12): with a
    ``sampler``, the loss at labels sampled from the model (true Fisher), else the loss at the
    true targets (empirical Fisher); only layer-output gradients are computed, and the
    model's buffers (BatchNorm running statistics) are restored. A plain closure's batch runs
    the closure again (a full backward pass; it needs the targets only it knows)."""
    with preserved_buffers(model), capture(layers) as cap:
        if sampler is not None:
            cap.phase = "sampled"
            outputs = batch.model_outputs()
            cap.backward_to_outputs(batch.sampled_loss(outputs, sampler), retain_graph=False)
        elif getattr(batch, "closure", None) is not None:
            batch.closure()  # the output gradients are recorded by its own backward pass
            outputs = batch.outputs
        else:
            outputs, loss = batch.forward()
            cap.backward_to_outputs(loss, retain_graph=False)
    return batch_factors(layers, cap, batch, outputs.detach(), sampler is not None, buffers)
