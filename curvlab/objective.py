"""`Objective`: a training closure that also knows its model outputs and its likelihood.

An `Objective` is what a curvature method needs from one mini-batch. Called with no arguments
it is an ordinary `torch.optim` closure (zero_grad → forward → loss → backward → loss), so any
optimizer accepts it. It also exposes

* ``outputs`` / ``loss`` of the last call (detached);
* the predictive distribution behind the loss, to sample labels from (true Fisher):
  cross-entropy → categorical, BCE / BCE-with-logits → Bernoulli, MSE → Gaussian;
* ``loss_scale`` c: the loss is ``L = c · Σ_n l_n`` with ``l_n`` the per-example negative
  log-likelihood summed over output entries (c = 1/m for a batch mean, 1/numel for an
  element mean, 1 for a sum); curvature statistics use it to recover per-example gradients;
* a functional view (``functional_outputs``, ``loss_at``) for `torch.func` and trial points.

Sampling conventions (per example n, output entries j):

* CE (class-index targets): ``y ~ Categorical(softmax(z))``;
* BCE on probabilities p: ``y ~ Bernoulli(p)``; BCE-with-logits: ``y ~ Bernoulli(sigmoid(z))``;
* MSE: ``l = Σ_j (f_j − y_j)²`` is the NLL of ``N(f, ½ I)`` up to a constant, so
  ``y = f + ε/√2``, ``ε ~ N(0, I)``; then ``E[∇l ∇lᵀ] = ∇²l = 2I`` (the GGN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Likelihood", "Objective", "preserved_buffers"]

Likelihood = Literal["categorical", "bernoulli_logits", "bernoulli", "gaussian"]

_LIKELIHOODS: dict[type[nn.Module], Likelihood] = {
    nn.CrossEntropyLoss: "categorical",
    nn.BCEWithLogitsLoss: "bernoulli_logits",
    nn.BCELoss: "bernoulli",
    nn.MSELoss: "gaussian",
}


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
        loss_fn: a loss module. Sampling (true Fisher) and ``loss_scale`` are available for
            `nn.CrossEntropyLoss` (class-index targets, no weights, no label smoothing),
            `nn.BCELoss`, `nn.BCEWithLogitsLoss` (no weights) and `nn.MSELoss`, each with
            ``reduction`` ``"mean"`` or ``"sum"``. Any other callable works as a plain closure.
        inputs: the model input batch; its first dimension is the batch size m.
        targets: the labels for ``loss_fn``.
        batch_average: divide a ``reduction="sum"`` loss by m. This gives "sum over output
            entries, mean over examples", the thesis's autoencoder loss (its eq. 2.2 family).

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
    ) -> None:
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError("inputs: need a non-empty batch with the batch as dimension 0")
        if targets.dim() > 0 and targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"targets: batch size {targets.shape[0]} does not match inputs' {inputs.shape[0]}"
            )
        reduction = getattr(loss_fn, "reduction", None)
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

    # ------------------------------------------------------------------ closure
    @property
    def batch_size(self) -> int:
        """The number of examples m."""
        return int(self.inputs.shape[0])

    def forward(self) -> tuple[Tensor, Tensor]:
        """Forward pass with autograd enabled: ``(outputs, loss)``, graph kept, no backward."""
        with torch.enable_grad():
            outputs = self.model(self.inputs)
            loss = self.loss_from_outputs(outputs, self.targets)
        return outputs, loss

    def loss_from_outputs(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The objective's loss for given model outputs (with ``batch_average`` applied)."""
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
        """The predictive distribution behind ``loss_fn``, or None if it is not supported."""
        for cls, kind in _LIKELIHOODS.items():
            if type(self.loss_fn) is cls:
                return kind
        return None

    def _check_samplable(self) -> Likelihood:
        kind = self.likelihood
        if kind is None:
            raise ValueError(
                f"loss_fn: cannot sample labels from {type(self.loss_fn).__name__}; the true "
                "Fisher needs nn.CrossEntropyLoss, nn.BCELoss, nn.BCEWithLogitsLoss or nn.MSELoss "
                "(use the empirical Fisher for other losses)"
            )
        if getattr(self.loss_fn, "weight", None) is not None:
            raise ValueError("loss_fn: per-class/element weights are not supported for sampling")
        if getattr(self.loss_fn, "pos_weight", None) is not None:
            raise ValueError("loss_fn: pos_weight is not supported for sampling")
        if getattr(self.loss_fn, "label_smoothing", 0.0):
            raise ValueError("loss_fn: label_smoothing is not supported for sampling")
        return kind

    def loss_scale(self, outputs: Tensor) -> float:
        """c in ``L = c · Σ_n l_n`` (l_n: per-example NLL summed over output entries)."""
        self._check_samplable()
        reduction = getattr(self.loss_fn, "reduction", "mean")
        if reduction == "sum":
            return 1.0 / self.batch_size if self.batch_average else 1.0
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return 1.0 / (outputs.numel() // outputs.shape[1] if outputs.dim() > 1 else 1)
        return 1.0 / outputs.numel()

    @torch.no_grad()
    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels drawn from the model's predictive distribution at ``outputs``."""
        kind = self._check_samplable()
        out = outputs.detach()
        if kind == "categorical":
            if out.dim() != 2:
                raise ValueError("CrossEntropyLoss sampling expects outputs of shape (m, classes)")
            probs = torch.softmax(out.float(), dim=1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if kind in ("bernoulli_logits", "bernoulli"):
            p = torch.sigmoid(out) if kind == "bernoulli_logits" else out.clamp(0.0, 1.0)
            u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            return (u < p).to(out.dtype)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return out + noise * math.sqrt(0.5)

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
        out: Tensor = functional_call(self.model, merged, (self.inputs,), strict=False)
        return out

    def functional_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """The loss on this batch as a function of the parameters (for `torch.func`)."""
        return self.loss_from_outputs(self.functional_outputs(params), self.targets)

    @torch.no_grad()
    def loss_at(self, params: Mapping[str, Tensor]) -> Tensor:
        """The loss on this same batch at trial parameters; the model itself is not touched."""
        return self.functional_loss(params).detach()
