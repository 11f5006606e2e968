"""`Objective`: a training closure that also knows its model outputs and its likelihood.

An `Objective` is what a curvature method needs from one mini-batch. Called with no arguments
it is an ordinary `torch.optim` closure (zero_grad → forward → loss → backward → loss), so any
optimizer accepts it. It also exposes

* ``outputs`` / ``loss`` of the last call (detached);
* the predictive distribution behind the loss, to sample labels from (true Fisher), and
  ``loss_scale`` c: the loss is ``L = c · Σ_n l_n`` with ``l_n`` the per-example negative
  log-likelihood summed over output entries; curvature statistics use it to recover
  per-example gradients (both from `curvlab.losses.LossModel`, which recognises the loss
  modules and their functional forms);
* a functional view (``functional_outputs``, ``loss_at``) for `torch.func` and trial points.

Mixed precision: an `Objective` records the autocast state (device types cpu and cuda: on or
off, and the dtype) at construction and re-enters it around every forward pass it runs
(`Objective.autocast`): the closure, `forward`, the sampled-label loss, the functional view.
Optimizers run their own maths with autocast off (`curvlab.optim.base`), so a step taken inside
``torch.autocast`` still forwards in low precision while curvature statistics, inverses and
updates stay in the parameters' dtype. Labels are sampled in at least float32. Each such
forward clears autocast's weight-cast cache on entry and exit: the cache is keyed by the
parameter tensors and never notices in-place updates, so within one ``torch.autocast`` block
it would otherwise replay the casts of the weights before the last step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.losses import Likelihood, LossModel

__all__ = [
    "AUTOCAST_DEVICES",
    "AutocastState",
    "Objective",
    "autocast_off",
    "autocast_state",
    "preserved_buffers",
    "run_with_autocast",
]

#: Device types whose autocast state is recorded and re-entered.
AUTOCAST_DEVICES: tuple[str, ...] = ("cpu", "cuda")

#: ``((device_type, enabled, dtype), ...)`` for every device type in `AUTOCAST_DEVICES`.
AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def autocast_state() -> AutocastState:
    """The current (thread-local) autocast state of the device types in `AUTOCAST_DEVICES`."""
    return tuple(
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in AUTOCAST_DEVICES
    )


def autocast_off() -> AutocastState:
    """Autocast disabled for every device type in `AUTOCAST_DEVICES` (full precision)."""
    return tuple((device, False, torch.get_autocast_dtype(device)) for device in AUTOCAST_DEVICES)


@contextmanager
def run_with_autocast(state: AutocastState, *, clear_cache: bool = True) -> Iterator[None]:
    """Run the body under the autocast ``state`` (e.g. from `autocast_state`).

    Only the device types whose current state differs are touched, so without autocast
    anywhere this is a no-op. When ``state`` enables autocast for some device type and
    ``clear_cache`` is set, autocast's weight-cast cache is cleared on entry and on exit (the
    cache never notices in-place parameter updates; see the module docstring).
    """
    changes = [
        (device, enabled, dtype)
        for device, enabled, dtype in state
        if torch.is_autocast_enabled(device) != enabled
        or (enabled and torch.get_autocast_dtype(device) != dtype)
    ]
    clear = clear_cache and any(enabled for _, enabled, _ in state)
    if not changes and not clear:
        yield
        return
    with ExitStack() as stack:
        for device, enabled, dtype in changes:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        if clear:
            torch.clear_autocast_cache()
            stack.callback(torch.clear_autocast_cache)
        yield


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) on exit.

    Extra forward passes made for curvature must not move the running statistics that the
    ordinary training forward pass maintains.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


class Objective:
    """A mini-batch loss ``loss_fn(model(inputs), targets)`` usable as an optimizer closure.

    Args:
        model: the network.
        loss_fn: the loss, a module or a function ``loss_fn(outputs, targets)``. Sampling (true
            Fisher) and ``loss_scale`` are available for the losses `curvlab.losses.LossModel`
            recognises (cross-entropy, NLL on log-probabilities, BCE, BCE-with-logits, MSE;
            modules, functional forms or ``functools.partial`` of them), each with
            ``reduction`` ``"mean"`` or ``"sum"``. Any other callable works as a plain closure.
        inputs: the model input batch; its first dimension is the batch size m.
        targets: the labels for ``loss_fn``.
        batch_average: divide a ``reduction="sum"`` loss by m. This gives "sum over output
            entries, mean over examples", the thesis's autoencoder loss (its eq. 2.2 family).
        autocast: the autocast state (`autocast_state`) for its forward passes; default: the
            state at construction. It is re-entered by every forward pass the objective runs
            (`Objective.autocast`), also when it is called outside that ``torch.autocast`` block.

    Raises:
        ValueError: empty batch, mismatched batch sizes, ``reduction="none"``, or
            ``batch_average`` with a mean reduction.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        *,
        batch_average: bool = False,
        autocast: AutocastState | None = None,
    ) -> None:
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError("inputs: need a non-empty batch with the batch as dimension 0")
        if targets.dim() > 0 and targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"targets: batch size {targets.shape[0]} does not match inputs' {inputs.shape[0]}"
            )
        self.loss_model = LossModel(loss_fn)
        reduction = self.loss_model.reduction
        if reduction == "none":
            raise ValueError("loss_fn: reduction='none' does not give a scalar loss")
        if batch_average and reduction != "sum":
            raise ValueError("batch_average: only meaningful with a loss_fn of reduction='sum'")
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.batch_average = batch_average
        self.outputs: Tensor | None = None
        self.loss: Tensor | None = None
        self.autocast_state: AutocastState = autocast_state() if autocast is None else autocast

    def autocast(self) -> AbstractContextManager[None]:
        """The autocast state recorded at construction, re-entered for the body (a no-op when
        it is the current state and autocast is off; see `run_with_autocast`)."""
        return run_with_autocast(self.autocast_state)

    # ------------------------------------------------------------------ closure
    @property
    def batch_size(self) -> int:
        """The number of examples m."""
        return int(self.inputs.shape[0])

    def forward(self) -> tuple[Tensor, Tensor]:
        """Forward pass with autograd enabled: ``(outputs, loss)``, graph kept, no backward."""
        with torch.enable_grad(), self.autocast():
            outputs = self.model(self.inputs)
            loss = self.loss_from_outputs(outputs, self.targets)
        return outputs, loss

    def model_outputs(self) -> Tensor:
        """``model(inputs)`` under the recorded autocast state, in the current grad mode."""
        with self.autocast():
            outputs: Tensor = self.model(self.inputs)
        return outputs

    def loss_from_outputs(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The objective's loss for given model outputs (with ``batch_average`` applied),
        under the recorded autocast state."""
        with run_with_autocast(self.autocast_state, clear_cache=False):
            loss = self.loss_fn(outputs, targets)
        if self.batch_average:
            loss = loss / self.batch_size
        return loss

    def forward_backward(
        self, before_backward: Callable[[Tensor, Tensor], None] | None = None
    ) -> Tensor:
        """zero_grad → forward → ``before_backward(outputs, loss)`` → backward; returns the loss.

        ``before_backward`` may backpropagate other losses through the same graph (with
        ``retain_graph=True``), e.g. the sampled-label loss of the true Fisher, so that one
        forward pass serves both.
        """
        for p in self.model.parameters():
            p.grad = None
        outputs, loss = self.forward()
        if before_backward is not None:
            before_backward(outputs, loss)
        loss.backward()
        self.outputs = outputs.detach()
        self.loss = loss.detach()
        return self.loss

    def __call__(self) -> Tensor:
        """The closure: zero_grad → forward → loss → backward; returns the (detached) loss."""
        return self.forward_backward()

    # --------------------------------------------------------------- likelihood
    @property
    def likelihood(self) -> Likelihood | None:
        """The predictive distribution behind ``loss_fn``, or None if it is not recognised."""
        return self.loss_model.kind

    def loss_scale(self, outputs: Tensor) -> float:
        """c in ``L = c · Σ_n l_n`` (l_n: per-example NLL summed over output entries)."""
        return self.loss_model.scale(outputs, self.batch_size, self.batch_average)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels drawn from the model's predictive distribution at ``outputs``."""
        return self.loss_model.sample(outputs, generator)

    def sampled_loss(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The loss at ``outputs`` against labels sampled from the model (same reduction)."""
        return self.loss_from_outputs(outputs, self.sample_targets(outputs, generator))

    # --------------------------------------------------------------- functional
    def params_and_buffers(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's named trainable parameters and buffers (the functional view's state)."""
        params: dict[str, Tensor] = {
            n: p for n, p in self.model.named_parameters() if p.requires_grad
        }
        buffers = dict(self.model.named_buffers())
        return params, buffers

    def functional_outputs(self, params: Mapping[str, Tensor]) -> Tensor:
        """``model(inputs)`` with the given parameters (for `torch.func` transforms).

        Buffers are passed as copies, so BatchNorm running statistics are never modified.
        """
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        merged: dict[str, Tensor] = {**buffers, **dict(params)}
        with self.autocast():
            out: Tensor = functional_call(self.model, merged, (self.inputs,), strict=False)
        return out

    def functional_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """The loss on this batch as a function of the parameters (for `torch.func`)."""
        return self.loss_from_outputs(self.functional_outputs(params), self.targets)

    @torch.no_grad()
    def loss_at(self, params: Mapping[str, Tensor]) -> Tensor:
        """The loss on this same batch at trial parameters; the model itself is not touched."""
        return self.functional_loss(params).detach()
