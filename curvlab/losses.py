"""The likelihood behind a loss function: what the true Fisher samples, and how it scales.

A curvature method needs two things from a loss that an ordinary closure does not say:

* the predictive distribution it is the negative log-likelihood of, to sample labels from the
  model (the true Fisher): cross-entropy on logits and NLL on log-probabilities →
  categorical; BCE on probabilities and BCE-with-logits → Bernoulli; MSE → Gaussian;
* how it reduces over the batch, ``L = c · Σ_n l_n`` with ``l_n`` the per-example negative
  log-likelihood summed over output entries (c = 1/m for a batch mean, 1/numel for an
  element mean, 1 for a sum), so that statistics can recover per-example gradients.

`LossModel` recognises the loss modules (`nn.CrossEntropyLoss`, `nn.NLLLoss`, `nn.BCELoss`,
`nn.BCEWithLogitsLoss`, `nn.MSELoss`), their functional forms (`F.cross_entropy`,
`F.nll_loss`, `F.binary_cross_entropy`, `F.binary_cross_entropy_with_logits`, `F.mse_loss`)
and ``functools.partial`` of a functional form with keyword options (e.g. ``reduction="sum"``).
Anything else is a plain loss: it works as a closure, and asking for its likelihood raises a
`ValueError` that names the fix.

Sampling conventions (per example n, output entries j):

* categorical (class-index targets): ``y ~ Categorical(softmax(z))`` (log-probabilities:
  ``Categorical(exp(z))``);
* BCE on probabilities p: ``y ~ Bernoulli(p)``; BCE-with-logits: ``y ~ Bernoulli(sigmoid(z))``;
* MSE: ``l = Σ_j (f_j − y_j)²`` is the NLL of ``N(f, ½ I)`` up to a constant, so
  ``y = f + ε/√2``, ``ε ~ N(0, I)``; then ``E[∇l ∇lᵀ] = ∇²l = 2I`` (the GGN).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchMean", "Likelihood", "LossModel"]

Likelihood = Literal["categorical", "categorical_log", "bernoulli_logits", "bernoulli", "gaussian"]

_MODULES: dict[type[nn.Module], Likelihood] = {
    nn.CrossEntropyLoss: "categorical",
    nn.NLLLoss: "categorical_log",
    nn.BCEWithLogitsLoss: "bernoulli_logits",
    nn.BCELoss: "bernoulli",
    nn.MSELoss: "gaussian",
}
_FUNCTIONS: dict[Callable[..., Tensor], Likelihood] = {
    F.cross_entropy: "categorical",
    F.nll_loss: "categorical_log",
    F.binary_cross_entropy_with_logits: "bernoulli_logits",
    F.binary_cross_entropy: "bernoulli",
    F.mse_loss: "gaussian",
}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_RECOGNISED = (
    "nn.CrossEntropyLoss / F.cross_entropy, nn.NLLLoss / F.nll_loss (log-probabilities), "
    "nn.BCELoss / F.binary_cross_entropy, nn.BCEWithLogitsLoss / "
    "F.binary_cross_entropy_with_logits or nn.MSELoss / F.mse_loss"
)


class BatchMean:
    """``loss_fn(outputs, targets) / m``: a ``reduction="sum"`` loss averaged over the batch's m
    examples ("sum over output entries, mean over examples", the thesis's autoencoder loss;
    `curvlab.Objective`'s ``batch_average``), as a loss a training loop calls and `LossModel`
    recognises."""

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        reduction = LossModel(loss_fn).reduction
        if reduction not in (None, "sum"):
            raise ValueError(
                f"loss_fn: BatchMean averages a reduction='sum' loss over the batch, got "
                f"reduction={reduction!r}"
            )
        self.loss_fn = loss_fn

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs, targets) / outputs.shape[0]


def _name(loss_fn: Any) -> str:
    if isinstance(loss_fn, functools.partial):
        return f"functools.partial({_name(loss_fn.func)}, ...)"
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


class LossModel:
    """The likelihood and reduction of ``loss_fn`` (module docstring).

    Attributes:
        loss_fn: the loss, called as ``loss_fn(outputs, targets)``.
        kind: its `Likelihood`, or None for a loss curvlab does not recognise.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (None when unrecognised).
        options: its other options that matter for sampling (``weight``, ``pos_weight``,
            ``label_smoothing``, ``ignore_index``).
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.loss_fn = loss_fn
        self.kind: Likelihood | None = None
        #: Whether the loss is a batch mean of a summed loss (`BatchMean`).
        self.batch_average = isinstance(loss_fn, BatchMean)
        if isinstance(loss_fn, BatchMean):
            loss_fn = loss_fn.loss_fn
        self.reduction: str | None = getattr(loss_fn, "reduction", None)
        self.options: dict[str, Any] = {}
        module = _MODULES.get(type(loss_fn))  # type: ignore[arg-type]
        if module is not None:
            self.kind = module
            for key in ("weight", "pos_weight", "label_smoothing", "ignore_index"):
                if hasattr(loss_fn, key):
                    self.options[key] = getattr(loss_fn, key)
            return
        func, keywords = loss_fn, {}
        if isinstance(loss_fn, functools.partial) and not loss_fn.args:
            func, keywords = loss_fn.func, dict(loss_fn.keywords)
        kind = _FUNCTIONS.get(func)
        if kind is not None:
            self.kind = kind
            self.reduction = keywords.pop("reduction", "mean")
            self.options = keywords

    # ------------------------------------------------------------------ checks
    def check_reduction(self) -> str:
        """The batch reduction (``"mean"`` or ``"sum"``); `ValueError` naming the fix."""
        if self.kind is None:
            raise ValueError(
                f"loss_fn: curvlab does not know how {_name(self.loss_fn)} reduces over the "
                "batch, which the curvature statistics need to recover per-example gradients; "
                f"use {_RECOGNISED}"
            )
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn: reduction={self.reduction!r} does not give a scalar loss; use "
                "reduction='mean' or 'sum'"
            )
        return self.reduction

    def check_samplable(self) -> Likelihood:
        """The likelihood to sample labels from; `ValueError` naming the fix."""
        if self.kind is None:
            raise ValueError(
                f"loss_fn: cannot sample labels from {_name(self.loss_fn)}: the true Fisher "
                f"needs the likelihood behind the loss, one of {_RECOGNISED}; for another loss "
                "use fisher='empirical'"
            )
        self.check_reduction()
        if self.options.get("weight") is not None:
            raise ValueError("loss_fn: per-class/element weights are not supported for sampling")
        if self.options.get("pos_weight") is not None:
            raise ValueError("loss_fn: pos_weight is not supported for sampling")
        if self.options.get("label_smoothing", 0.0):
            raise ValueError("loss_fn: label_smoothing is not supported for sampling")
        return self.kind

    # --------------------------------------------------------------- scaling
    def scale(self, outputs: Tensor, batch_size: int, batch_average: bool = False) -> float:
        """c in ``L = c · Σ_n l_n`` (l_n: per-example NLL summed over output entries)."""
        if self.check_reduction() == "sum":
            return 1.0 / batch_size if batch_average or self.batch_average else 1.0
        if self.kind in ("categorical", "categorical_log"):
            return 1.0 / (outputs.numel() // outputs.shape[1] if outputs.dim() > 1 else 1)
        return 1.0 / outputs.numel()

    # -------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels drawn from the model's predictive distribution at ``outputs`` (bfloat16 /
        float16 outputs are sampled, and labels returned, in float32)."""
        kind = self.check_samplable()
        out = outputs.detach()
        if out.dtype in _LOW_PRECISION:
            out = out.float()
        if kind in ("categorical", "categorical_log"):
            if out.dim() != 2:
                raise ValueError("CrossEntropyLoss sampling expects outputs of shape (m, classes)")
            logits = out.float()
            probs = torch.softmax(logits, dim=1) if kind == "categorical" else logits.exp()
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if kind in ("bernoulli_logits", "bernoulli"):
            p = torch.sigmoid(out) if kind == "bernoulli_logits" else out.clamp(0.0, 1.0)
            u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            return (u < p).to(out.dtype)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return out + noise * math.sqrt(0.5)
