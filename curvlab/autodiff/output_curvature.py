"""The loss curvature at the network outputs, H_L = ∂²L/∂f² (or the Fisher F_L), applied to r.

The GGN is G = Jᵀ H_L J (thesis §1.2.2, eq. 1.4; the EDF paper [P0], eq. 17; source labels
such as [P0]: docs/deviations.md). For the supported losses H_L is applied analytically,
block-diagonal over examples, with the objective's loss scale c (``L = c · Σ_n l_n``,
`Objective.loss_scale`, which honours ``reduction`` and ``batch_average``):

* cross-entropy (softmax over dim 1), class-index targets: ``H_n = c (diag p − p pᵀ)``;
  probability targets: ``H_n = c s_n (diag p − p pᵀ)`` with ``s_n = Σ_k y_nk`` ([P0] eqs.
  27–29, whose fractions are garbled in the text: the derivatives of eq. 27's loss);
* BCE-with-logits: ``H = c · diag(σ(1 − σ))`` (thesis §1.2.2 prints diag(σ) after
  eq. 1.5; the derivative of the sigmoid gives σ(1 − σ));
* BCE on probabilities p (`nn.BCELoss`): ``∂²l/∂p² = y/p² + (1 − y)/(1 − p)²``, computed as
  ``((p − y)² + y(1 − y)) / (p(1 − p))²``, the derivative of PyTorch's own BCE gradient
  ``(p − y) / max(p(1 − p), 1e-12)`` (same clamp, so p = 0 or 1 stays finite);
* MSE (``l_n = Σ_j (f_j − y_j)²``): ``H = 2c I``.

The Fisher of the predictive distribution (`Objective.sample_targets`) replaces H_L by
``E_{y ~ p(y|f)}[∇_f l ∇_f lᵀ]``. For the canonical links — softmax + CE, sigmoid + BCE on
logits, identity + MSE (Gaussian with variance ½) — this equals H_L (with s_n = 1 for CE), so
``fisher`` and ``ggn`` coincide. For BCE on probabilities the link is not canonical: the Fisher is
``c · diag(1/(p(1 − p)))`` (the y-average of the Hessian above), which differs from the GGN.

Any other loss (custom callables, class weights, ``pos_weight``, label smoothing, ignored
targets) gets H_L r by double backpropagation through the loss alone (output space, one kept
graph): exact, but with no Fisher.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

from curvlab.objective import Objective

__all__ = ["BCE_EPSILON", "OutputCurvature", "output_curvature"]

#: PyTorch's clamp of p(1 − p) in the BCE backward (aten binary_cross_entropy_backward).
BCE_EPSILON = 1e-12


class OutputCurvature(ABC):
    """A symmetric PSD (or, for a custom loss, symmetric) operator on output-shaped tensors."""

    @abstractmethod
    def __call__(self, r: Tensor) -> Tensor:
        """H_L r for ``r`` of the outputs' shape."""


class _Softmax(OutputCurvature):
    """``w · (diag p − p pᵀ) r`` over the class dimension 1, w per example (and position)."""

    def __init__(self, probs: Tensor, weight: Tensor) -> None:
        self.probs = probs
        self.weight = weight  # broadcastable against probs, size 1 in dim 1

    def __call__(self, r: Tensor) -> Tensor:
        pr = self.probs * r
        return self.weight * (pr - self.probs * pr.sum(dim=1, keepdim=True))


class _Diagonal(OutputCurvature):
    """Elementwise ``h ⊙ r`` (h a tensor or a Python scalar)."""

    def __init__(self, diagonal: Tensor | float) -> None:
        self.diagonal = diagonal

    def __call__(self, r: Tensor) -> Tensor:
        return r * self.diagonal


class _Autodiff(OutputCurvature):
    """H_L r = ∂⟨∇_f L, r⟩/∂f: reverse-over-reverse in output space on one kept graph."""

    def __init__(self, objective: Objective, outputs: Tensor) -> None:
        self.outputs = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            # A non-leaf input to the loss module (module hooks such as FlopCounterMode's
            # tracker cannot take a leaf inside autograd.grad).
            loss = objective.loss_from_outputs(
                self.outputs.view_as(self.outputs), objective.targets
            )
            (self.gradient,) = torch.autograd.grad(loss, self.outputs, create_graph=True)

    def __call__(self, r: Tensor) -> Tensor:
        if not self.gradient.requires_grad:  # L is linear in f
            return torch.zeros_like(r)
        with torch.enable_grad():
            (hr,) = torch.autograd.grad(
                self.gradient, self.outputs, grad_outputs=r, retain_graph=True, allow_unused=True
            )
        return torch.zeros_like(r) if hr is None else hr.detach()


def _analytic_likelihood(objective: Objective, outputs: Tensor) -> str | None:
    """The likelihood whose H_L has a closed form here, or None (autodiff fallback)."""
    kind = objective.likelihood
    options = objective.loss_model.options
    if kind is None or kind == "categorical_log":  # NLL is linear in its log-probabilities
        return None
    if options.get("weight") is not None or options.get("pos_weight") is not None:
        return None
    if options.get("label_smoothing", 0.0):
        return None
    targets = objective.targets
    if kind == "categorical":
        if outputs.dim() < 2:
            return None
        if targets.is_floating_point():
            return kind if targets.shape == outputs.shape else None
        ignore = options.get("ignore_index", -100)
        expected = outputs.shape[:1] + outputs.shape[2:]
        if targets.shape != expected or bool((targets == ignore).any()):
            return None
        return kind
    return kind if targets.shape == outputs.shape else None


def output_curvature(
    objective: Objective, outputs: Tensor, kind: Literal["ggn", "fisher"] = "ggn"
) -> OutputCurvature:
    """H_L (``kind="ggn"``) or the Fisher F_L (``"fisher"``) at the detached ``outputs``.

    Raises:
        ValueError: ``kind="fisher"`` for a loss without a supported likelihood.
    """
    outputs = outputs.detach()
    likelihood = _analytic_likelihood(objective, outputs)
    if likelihood is None:
        if kind == "fisher":
            raise ValueError(
                "kind: 'fisher' needs nn.CrossEntropyLoss, nn.BCELoss, nn.BCEWithLogitsLoss or "
                "nn.MSELoss without weights, pos_weight, label smoothing or ignored targets, "
                f"got {type(objective.loss_fn).__name__}; use kind='ggn'"
            )
        return _Autodiff(objective, outputs)
    c = objective.loss_scale(outputs)
    targets = objective.targets.detach()
    if likelihood == "categorical":
        probs = torch.softmax(outputs, dim=1)
        if kind == "ggn" and targets.is_floating_point():
            # [P0] eq. 29: H_j = (s_j/n)(diag θ_j − θ_j θ_jᵀ), s_j = Σ_c y_jc.
            weight = c * targets.to(outputs.dtype).sum(dim=1, keepdim=True)
            return _Softmax(probs, weight)
        return _Softmax(probs, torch.full((), c, dtype=outputs.dtype, device=outputs.device))
    if likelihood == "bernoulli_logits":
        s = torch.sigmoid(outputs)
        return _Diagonal(c * s * (1 - s))
    if likelihood == "bernoulli":
        p = outputs
        var = (p * (1 - p)).clamp_min(BCE_EPSILON)
        if kind == "fisher":
            return _Diagonal(c / var)
        y = targets.to(outputs.dtype)
        return _Diagonal(c * ((p - y).square() + y * (1 - y)) / var.square())
    # gaussian (nn.MSELoss): l_n = Σ_j (f_j − y_j)², the NLL of N(f, ½ I) up to a constant.
    return _Diagonal(2.0 * c)
