"""Bases of curvlab's optimizers.

`LayerwiseOptimizer` is block-diagonal over layers: every supported layer (`nn.Linear`,
`nn.Conv2d`; see `curvlab.curvature.layers`) gets a curvature block, and every other trainable
parameter (BatchNorm, LayerNorm, Embedding, ...) gets the *fallback update*: the method's own
momentum and weight decay applied to the plain gradient with the same learning rate (thesis
§6.2 for K-FAC, "exactly as in KFAC-Pytorch"; thesis A11). A one-time warning names them.

The base owns what every layer-wise method shares: parameter groups (hyperparameters are read
from ``param_groups`` on every step, so LR schedulers work), the random generator for sampled
labels (in ``state_dict``), the non-finite guard, gradient momentum, decoupled weight decay and
the update. An algorithm file writes its ``step`` as the paper's pseudo-code on top of these.

Thesis conventions (spec §0): momentum acts on the raw gradient, before preconditioning —
heavy-ball ``ĝ ← βĝ + g`` in ch.3/ch.4, an EMA ``ĝ ← βĝ + (1−β)g`` in ch.2 — and weight
decay is decoupled and added after preconditioning: ``W ← W − α (P(ĝ) + γ W)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.curvature.layers import KroneckerLayer, find_layers
from curvlab.linalg import all_finite
from curvlab.objective import Objective

__all__ = ["LayerwiseOptimizer", "MomentumStyle", "require_objective"]

MomentumStyle = Literal["heavy_ball", "ema"]


def require_objective(closure: Any, method: str) -> Objective:
    """The closure as an `Objective`, or a `TypeError` that says what to pass."""
    if isinstance(closure, Objective):
        return closure
    raise TypeError(
        f"{method}.step needs a curvlab.Objective(model, loss_fn, inputs, targets) as its "
        f"closure (it uses the model outputs and the loss's likelihood); got {type(closure)!r}"
    )


class LayerwiseOptimizer(Optimizer):
    """Block-diagonal preconditioning over the model's Linear/Conv2d layers.

    Args:
        model: the network; its supported layers are found by module type.
        defaults: hyperparameters (must include ``lr``, ``momentum``, ``weight_decay``).
        params: optional parameter groups (like any `torch.optim` optimizer) over the model's
            parameters; by default one group with every trainable parameter. A layer's weight
            and bias must share a group; parameters in no group are not trained.
        momentum_style: ``"heavy_ball"`` (thesis ch.3/ch.4) or ``"ema"`` (thesis ch.2).
    """

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        params: Iterable[Any] | None = None,
        momentum_style: MomentumStyle = "heavy_ball",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model)!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("model: it has no trainable parameters")
        super().__init__(params, defaults)
        self.model = model
        self.momentum_style = momentum_style
        model_ids = {id(p) for p in model.parameters()}
        self._group_of: dict[int, int] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in model_ids:
                    raise ValueError("params: every parameter must belong to the model")
                self._group_of[id(p)] = index
        self.layers: dict[str, KroneckerLayer] = {}
        for name, layer in find_layers(model).items():
            groups = {self._group_of.get(id(p)) for p in layer.params}
            if groups == {None}:
                continue
            if len(groups) != 1 or None in groups:
                raise ValueError(
                    f"params: the weight and bias of layer '{name}' must be in one group"
                )
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(
                "model: no trainable nn.Linear or nn.Conv2d (groups=1) layer to precondition"
            )
        covered = {id(p) for layer in self.layers.values() for p in layer.params}
        self.fallback_params = [
            p for g in self.param_groups for p in g["params"] if id(p) not in covered
        ]
        if self.fallback_params:
            owners = sorted(
                {
                    type(m).__name__
                    for m in model.modules()
                    for p in m.parameters(recurse=False)
                    if any(p is q for q in self.fallback_params)
                }
            )
            warnings.warn(
                f"{type(self).__name__}: {len(self.fallback_params)} parameter(s) outside "
                f"Linear/Conv2d layers (in {', '.join(owners)}) get the fallback update: "
                "momentum and weight decay on the plain gradient, same learning rate",
                stacklevel=3,
            )
        device = self.param_groups[0]["params"][0].device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.last_step_info: dict[str, Any] = {}

    # ------------------------------------------------------------------- state
    @property
    def global_state(self) -> dict[str, Any]:
        """Method-wide state (step counter, counters, sampler state), in ``state_dict``."""
        state: dict[str, Any] = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("global_step", 0)
        state.setdefault("skipped_steps", 0)
        return state

    def layer_state(self, name: str) -> dict[str, Any]:
        """The state dict of one layer's curvature block (kept under its weight)."""
        state: dict[str, Any] = self.state[self.layers[name].weight]
        return state

    def group(self, name: str) -> dict[str, Any]:
        """The parameter group of one layer (hyperparameters are read from it every step)."""
        return self.param_groups[self._group_of[id(self.layers[name].weight)]]

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim` state plus the label sampler's random state."""
        self.global_state["sampler_state"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything saved by `state_dict`, the label sampler included."""
        super().load_state_dict(state_dict)
        sampler = self.global_state.get("sampler_state")
        if sampler is not None:
            # torch.optim casts state tensors to the parameter dtype; bytes survive exactly.
            self._generator.set_state(sampler.to(device="cpu", dtype=torch.uint8))

    # ------------------------------------------------------------------ guards
    def grads_finite(self) -> bool:
        """Whether every gradient is finite (one host sync)."""
        return all_finite(
            [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        )

    def skip_step(self, loss: Tensor | None, reason: str) -> None:
        """Record a skipped step; parameters and curvature state stay untouched."""
        self.global_state["skipped_steps"] += 1
        self.last_step_info = {
            "skipped": True,
            "reason": reason,
            "loss": None if loss is None else float(loss),
            "skipped_steps": self.global_state["skipped_steps"],
        }

    # ------------------------------------------------------------------ update
    def _momentum(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """ĝ ← βĝ + g (heavy ball) or ĝ ← βĝ + (1−β)g (EMA), from ĝ = 0 (thesis §0)."""
        beta = group["momentum"]
        if beta == 0:
            return grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        weight = 1.0 if self.momentum_style == "heavy_ball" else 1.0 - beta
        return buf.mul_(beta).add_(grad, alpha=weight)

    @staticmethod
    def _apply(p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        """W ← W − α (p + γ W): decoupled weight decay after preconditioning (thesis §0)."""
        if group["weight_decay"] != 0:
            direction = direction.add(p, alpha=group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    def precondition_and_apply(self, precondition: Callable[[str, Tensor], Tensor]) -> None:
        """Momentum on raw gradients, ``precondition(name, V)`` per layer, then the update.

        ``V`` is the layer's (momentum) gradient matrix (d_out, d_a) with the bias as last
        column. Layers without a gradient in this step are left alone; a missing bias gradient
        counts as zero. Fallback parameters take the momentum gradient as their direction.
        """
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                continue
            group = self.group(name)
            bufs = [
                self._momentum(p, p.grad if p.grad is not None else torch.zeros_like(p), group)
                for p in layer.params
            ]
            V = layer.grad_matrix(bufs[0], bufs[1] if len(bufs) > 1 else None)
            for p, d in zip(layer.params, layer.split(precondition(name, V)), strict=True):
                self._apply(p, d, group)
        for p in self.fallback_params:
            if p.grad is None:
                continue
            group = self.param_groups[self._group_of[id(p)]]
            self._apply(p, self._momentum(p, p.grad, group), group)
