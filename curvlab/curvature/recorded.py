"""`RecordedBatch`: the user's own passes since the last step, as a curvature method sees them.

In the plain training loop (``loss = loss_fn(model(x), y); loss.backward(); opt.step()``) or
with a plain closure, a block method has no `curvlab.Objective`: it has what its hooks
recorded (`curvlab.curvature.hooks.Recorder`) — the model's calls (inputs, autocast state,
outputs), the layers' inputs and output gradients of the user's backward pass — and the loss
the training loop uses if it was told at construction (``loss_fn=``). A `RecordedBatch`
offers the part of `Objective`'s interface that needs no targets:

* ``batch_size``, ``outputs``, ``loss_scale`` (from the loss's reduction) and ``likelihood``;
* ``model_outputs()``: the recorded calls run again (same inputs, same autocast state), for
  the true Fisher's sampled-label pass;
* ``sampled_loss(outputs)``: the loss against labels sampled from the model.

What needs the targets — the loss at other parameters, the empirical Fisher's pass at the
updated parameters — is available only when the passes came from a plain closure (it is run
again, a full forward and backward pass); otherwise `forward` raises an error that says what to
pass. Several forward calls before one step (gradient accumulation) are one batch: their
outputs are concatenated along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.curvature.hooks import Capture, ModelCall
from curvlab.losses import Likelihood, LossModel
from curvlab.objective import run_with_autocast

__all__ = ["RecordedBatch", "model_output"]


def model_output(output: Any) -> Tensor:
    """The tensor a loss is computed from: the output itself, or the ``logits`` of a dict or a
    `transformers` ``ModelOutput``."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if hasattr(output, "get") else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"model: its output is a {type(output).__name__} without a 'logits' tensor; curvlab "
        "needs the tensor the loss is computed from"
    )


def _batch_size(call: ModelCall) -> int:
    for value in (*call.args, *call.kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("model: a recorded call has no tensor input to take the batch size from")


class RecordedBatch:
    """The user's passes since the last step (module docstring).

    Args:
        model: the network.
        calls: its recorded forward calls (at least one).
        capture: the layers' records of those passes (inputs, output gradients).
        loss_model: the loss the training loop uses, if the method was told it.
        method: the method's name, for error messages.
        closure: the plain closure that made the passes, if any (it can be run again).
        loss: the loss it returned, if any.
    """

    def __init__(
        self,
        model: nn.Module,
        calls: Sequence[ModelCall],
        capture: Capture,
        loss_model: LossModel | None,
        method: str,
        *,
        closure: Callable[[], Any] | None = None,
        loss: Tensor | None = None,
    ) -> None:
        self.model = model
        self.calls = list(calls)
        self.capture = capture
        self.loss_model = loss_model
        self.method = method
        self.closure = closure
        self.loss = loss
        outputs = [model_output(c.output) for c in self.calls if c.output is not None]
        self.outputs: Tensor | None = (
            None if not outputs else outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        )
        self.batch_average = False

    # ------------------------------------------------------------------ batch
    def _calls(self) -> list[ModelCall]:
        if not self.calls:
            raise ValueError(
                f"{self.method}: no forward pass of the model was recorded since the last step "
                "(with autograd on); call opt.step() after your forward and loss.backward(), "
                "pass a closure that runs the model, or a curvlab.Objective"
            )
        return self.calls

    @property
    def batch_size(self) -> int:
        return sum(_batch_size(c) for c in self._calls())

    def _loss(self) -> LossModel:
        if self.loss_model is None:
            raise ValueError(
                f"loss_fn: {self.method} needs to know the loss your training loop uses (its "
                "reduction over the batch, and for the true Fisher its likelihood); pass it at "
                f"construction, e.g. {self.method}(model, ..., loss_fn=nn.CrossEntropyLoss()), "
                "or step with a curvlab.Objective"
            )
        return self.loss_model

    @property
    def likelihood(self) -> Likelihood | None:
        return None if self.loss_model is None else self.loss_model.kind

    def loss_scale(self, outputs: Tensor) -> float:
        """c in ``L = c · Σ_n l_n`` (`curvlab.losses.LossModel.scale`)."""
        return self._loss().scale(outputs, self.batch_size)

    # ----------------------------------------------------------------- passes
    def model_outputs(self) -> Tensor:
        """The recorded calls run again (same inputs and autocast state), in the current grad
        mode; their outputs concatenated."""
        outputs = []
        for call in self._calls():
            with run_with_autocast(call.autocast):
                outputs.append(model_output(self.model(*call.args, **call.kwargs)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def sampled_loss(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The loss at ``outputs`` against labels sampled from the model."""
        loss = self._loss()
        return loss.loss_fn(outputs, loss.sample(outputs, generator))

    def forward(self) -> tuple[Tensor, Tensor]:
        """The loss with the true targets needs them: not available from a recorded pass."""
        raise ValueError(
            f"{self.method}: this step needs the loss with your targets again (the empirical "
            "Fisher's statistics at the updated parameters), which your own backward pass "
            "cannot give; pass a closure, opt.step(closure), or a curvlab.Objective"
        )
