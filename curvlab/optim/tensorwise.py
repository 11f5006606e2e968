r"""`TensorwiseOptimizer`: the block methods over parameter *tensors* (TNT and Shampoo, ch.4).

TNT (thesis Alg 15) and the thesis's Shampoo (Alg 16) precondition each parameter tensor with
a Kronecker product of one factor per tensor mode (`curvlab.curvature.blocks.TensorBlock`).
Their blocks are tensor variables, not layers: a Linear or conv layer gives two blocks (weight
and bias), a BatchNorm layer two 1-way blocks, any other parameter its own block (thesis
§4.3.1, §4.3.4 (ii); deviation A11), and there is no fallback update. What both share, on
`BlockOptimizer`'s step (T1 = ``curvature_every``, T2 = ``inverse_every``)::

    gradient pass on M_t (TNT: + the sampled-label backward when t ≡ 0 mod T1) → ∇̄_l, Ḡ_l
    if t ≡ 0 (mod T1):  Ĝ_l^{(i)} = β Ĝ_l^{(i)} + (1−β) Ḡ_l^{(i)}        (statistics)
    if t ≡ 0 (mod T2):  recompute (F_i + εI)^{-1/r}                      (refresh due)
    ∇̂_l = μ ∇̂_l + ∇̄_l;  p_l = ∇̂_l ×_1 P_1 ⋯ ×_k P_k;  W_l = W_l − α (p_l + γ W_l)

Statistics and inverses are refreshed *before* the step, from the current mini-batch. Shared
deviations (A9 in docs/deviations.md):

* without `warm_start` (Alg 15/16 line 2) the statistics are initialised from the first
  mini-batch, whatever T1, and the preconditioners computed at once, because line 18 / 14
  needs them at t = 1 and the thesis defines them only through the warm start;
* ``inverse_warmup=True`` (default): preconditioners are also refreshed whenever the
  statistics are updated while t < T2, as the authors' code does; ``False`` gives the printed
  schedule (t ≡ 0 mod T2 only).

Steady-state statistics go straight into their EMAs (`TensorBlock.accumulate`: one product
per mode, no buffer) when the gradients bound them a priori (`contractions_bounded`);
otherwise they are formed in reused buffers and checked before any EMA changes.

Data-parallel: the statistics are contractions of a mini-batch gradient, so the *gradient* is
averaged over ranks before they are formed — the averaged true-label gradient (Shampoo,
TNT-EF; by the gradient all-reduce) or the averaged sampled-label gradient (TNT) — which
makes them those of the global batch; every rank keeps them, each block's roots are refreshed
by its owner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks import RootMethod, TensorBlock
from curvlab.curvature.cost import (
    CostItem,
    LayerShape,
    cost_items,
    output_gradient_product,
    weight_gradient_ops,
)
from curvlab.linalg import all_finite, contractions_bounded
from curvlab.linalg.modes import tensor_shape
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import BlockOptimizer, Refreshed

__all__ = ["GradientStatistics", "TensorwiseOptimizer", "check_bool"]


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


@dataclass
class GradientStatistics:
    """One step's statistics: gradients whose contractions go straight into the EMAs
    (``fused``), or contractions formed in buffers (``formed``); ``scale`` multiplies both."""

    fused: dict[str, Tensor] = field(default_factory=dict)
    formed: dict[str, list[Tensor]] = field(default_factory=dict)
    scale: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.fused) or bool(self.formed)


class TensorwiseOptimizer(BlockOptimizer):
    """Base of TNT and Shampoo: one `TensorBlock` per parameter tensor (module docstring).

    Args:
        model: the network (every trainable parameter is a block).
        defaults: the validated hyperparameters.
        params: optional parameter groups over the model's parameters.
        normalise: TNT's trace normalisation of the factors (eq. 4.10).
        root_of_order: r as a function of the tensor order k (TNT: 1, Shampoo: 2k).
        method: how the damped factors are inverted / rooted.
        inverse_warmup: refresh at every statistics update while t < T2 (A9).

    Subclasses say which gradient the statistics come from (`statistics_loss`, and
    `statistics_scale` for its scale) and whether it needs an extra backward pass.
    """

    hyperparameters = (
        "lr",
        "damping",
        "momentum",
        "weight_decay",
        "ema_decay",
        "curvature_every",
        "inverse_every",
    )
    #: Whether the statistics come from an extra (sampled-label) backward pass.
    extra_backward: bool = False

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        params: Iterable[Any] | None,
        normalise: bool,
        root_of_order: Callable[[int], int],
        method: RootMethod,
        inverse_warmup: bool,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.inverse_warmup = check_bool("inverse_warmup", inverse_warmup)
        self.normalise, self.root_of_order, self.method = normalise, root_of_order, method
        super().__init__(model, defaults, params=params, loss_fn=loss_fn)
        self._name_of = {id(b.params[0]): n for n, b in self.blocks.items()}
        # Reused outputs of the statistics products (a cache, not state: each step overwrites
        # them before they are read; see curvlab.linalg.modes.mode_statistics).
        self._buffers: dict[str, list[Tensor]] = {}

    def blocks_changed(self) -> None:
        self._name_of = {id(b.params[0]): n for n, b in self.blocks.items()}

    def make_blocks(self, model: nn.Module) -> list[TensorBlock]:
        """A `TensorBlock` per parameter of every group, named as in the model."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [
            TensorBlock(
                names[id(p)],
                cast(nn.Parameter, p),
                normalise=self.normalise,
                root=self.root_of_order(len(tensor_shape(p.shape))),
                method=self.method,
            )
            for p in self.params
        ]

    @property
    def params(self) -> list[Tensor]:
        """Every optimised parameter, in group order."""
        return [p for g in self.param_groups for p in g["params"]]

    def group_of(self, p: Tensor) -> dict[str, Any]:
        """The parameter group of ``p``."""
        return self.param_groups[self._group_of[id(p)]]

    # -------------------------------------------------------------- subclass API
    def statistics_loss(self, objective: Objective, outputs: Tensor, loss: Tensor) -> Tensor:
        """The loss whose gradient gives the statistics in an extra backward pass."""
        raise NotImplementedError

    def statistics_scale(self, closure: Any, outputs: Tensor | None) -> float:
        """Factor applied to the contractions of the statistics gradient (default 1)."""
        return 1.0

    # ----------------------------------------------------------------- the hooks
    def gradient_pass(self, closure: Any, k: int) -> tuple[Tensor | None, Any]:
        """Alg 15 lines 5–7 / Alg 16 line 5: the gradient and, when statistics are due, the
        gradients they come from (``{param: gradient}``)."""
        first = not any(b.has_statistics(self.block_state(n)) for n, b in self.blocks.items())
        due = first or k % self.param_groups[0]["curvature_every"] == 0
        if self.extra_backward and due:
            if isinstance(closure, Objective):
                return self._sampled_pass(closure)
            return closure.loss, self._sampled_gradient(closure)
        loss, _ = super().gradient_pass(closure, k)
        if not due:
            return loss, None
        return loss, {p: p.grad for p in self.params if p.grad is not None}

    def _sampled_pass(self, objective: Objective) -> tuple[Tensor, dict[Tensor, Tensor]]:
        """The closure with, first, Alg 15 line 7: another backward pass through the same
        forward graph (labels sampled from the model) that gives the statistics' gradient."""
        params = [p for p in self.params if p.requires_grad]
        found: dict[Tensor, Tensor] = {}

        def sampled_pass(outputs: Tensor, loss: Tensor) -> None:
            if not bool(torch.isfinite(loss)):
                return  # the step is skipped; labels cannot be sampled from NaN outputs
            with torch.enable_grad():
                extra = self.statistics_loss(objective, outputs, loss)
                grads = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
            found.update({p: g for p, g in zip(params, grads, strict=True) if g is not None})

        with torch.enable_grad():
            loss = objective.forward_backward(before_backward=sampled_pass)
        return loss, found

    def _sampled_gradient(self, batch: Any) -> dict[Tensor, Tensor]:
        """Alg 15 line 7 without an `Objective`: the recorded batch forward again and the
        sampled-label gradient (one more forward and backward pass than with an `Objective`,
        whose sampled backward shares the gradient pass's forward); ``.grad`` is left alone."""
        params = [p for p in self.params if p.requires_grad]
        with preserved_buffers(self.model), torch.enable_grad():
            outputs = batch.model_outputs()
            extra = self.statistics_loss(batch, outputs, outputs)
            grads = torch.autograd.grad(extra, params, allow_unused=True)
        return {p: g for p, g in zip(params, grads, strict=True) if g is not None}

    def statistics(self, closure: Any, record: Any, k: int) -> GradientStatistics | None:
        """Alg 15 line 12 / Alg 16 line 9: the contractions of this step's gradients."""
        if record is None:
            return None
        if self.extra_backward:
            self.average_statistics(list(record.values()))  # data-parallel: the sampled gradient
        outputs = closure.outputs
        scale = self.statistics_scale(closure, outputs)
        grads = {self._name_of[id(p)]: g for p, g in record.items() if p.numel() > 0}
        if self._can_accumulate(grads, scale):
            return GradientStatistics(fused=grads, scale=scale)
        # The first statistics, or gradients too large for the a-priori bound.
        formed = {}
        for name, g in grads.items():
            stats = self.tensor_block(name).statistics(g, self._statistic_buffers(name, g))
            formed[name] = [s.mul_(scale) for s in stats] if scale != 1.0 else stats
        return GradientStatistics(formed=formed, scale=scale)

    def statistics_finite(self, statistics: GradientStatistics) -> bool:
        """Formed statistics are checked (they are the same on every rank: formed from the
        averaged gradient); fused ones are bounded a priori (`_can_accumulate`)."""
        return all_finite([s for stats in statistics.formed.values() for s in stats])

    def update_statistics(self, statistics: GradientStatistics | None, k: int) -> None:
        """Alg 15 lines 11–12 / Alg 16 lines 8–9."""
        if statistics is None:
            return
        for name, grad in statistics.fused.items():
            beta = self.group(name)["ema_decay"]
            self.tensor_block(name).accumulate(self.block_state(name), grad, beta, statistics.scale)
        super().update_statistics(statistics.formed, k)

    def due_before_update(self, k: int, statistics: GradientStatistics | None) -> list[str]:
        """Alg 15 lines 14–16 / Alg 16 lines 11–12, the warm-up refreshes and the first
        preconditioners (A9)."""
        T2 = self.param_groups[0]["inverse_every"]
        refresh_all = k % T2 == 0 or (self.inverse_warmup and k < T2 and bool(statistics))
        return [
            name
            for name, block in self.blocks.items()
            if refresh_all or not self.inverse_ready(name, block.is_ready(self.block_state(name)))
        ]

    def step_information(
        self, statistics: Any, refreshed: Refreshed, info: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "statistics_updated": bool(statistics),
            "inverses_refreshed": refreshed.succeeded > 0,
            "failed_refreshes_this_step": refreshed.failed,
            "failed_refreshes": self.count("failed_refreshes"),
            "retried_decompositions": self.count("retried_decompositions"),
        }

    # -------------------------------------------------------------- helpers
    def tensor_block(self, name: str) -> TensorBlock:
        block = self.blocks[name]
        assert isinstance(block, TensorBlock)
        return block

    def _statistic_buffers(self, name: str, like: Tensor) -> list[Tensor]:
        buffers = self._buffers.get(name)
        if buffers is None or buffers[0].dtype != like.dtype or buffers[0].device != like.device:
            buffers = [like.new_empty(d, d) for d in self.tensor_block(name).shape]
            self._buffers[name] = buffers
        return buffers

    def _can_accumulate(self, grads: dict[str, Tensor], scale: float) -> bool:
        """Whether this step's statistics can go straight into the EMAs (`TensorBlock.accumulate`:
        one product per mode, no buffer, no separate average and no pass over the new
        statistics to check them): every block already has statistics, and the gradients bound
        the new ones a priori (`contractions_bounded`: mode i sums numel/d_i products), so that
        the in-place average cannot become non-finite. Otherwise the statistics are formed in
        buffers and checked before any average changes (the all-or-nothing skip)."""
        if not all(self.blocks[n].has_statistics(self.block_state(n)) for n in grads):
            return False
        lengths = [g.numel() // min(self.tensor_block(n).shape) for n, g in grads.items()]
        if not contractions_bounded(list(grads.values()), lengths, scale):
            return False
        self._buffers.clear()  # not needed while the fused path holds
        return True

    def warm_start_statistics(
        self, objective: Objective
    ) -> tuple[dict[str, list[Tensor]], float] | None:
        """Alg 15/16 line 2: one batch's contractions of the statistics gradient (the
        authors' running mean over the data, deviation A10), weighted by its scale."""
        params = [p for p in self.params if p.requires_grad]
        with torch.enable_grad():
            outputs, loss = objective.forward()
            mean = self.parallel.synchronize_gradients(loss.detach(), ())  # over ranks
            if not bool(torch.isfinite(torch.as_tensor(mean))):
                return None
            extra = self.statistics_loss(objective, outputs, loss)
            grads = torch.autograd.grad(extra, params, allow_unused=True)
        self.average_statistics([g for g in grads if g is not None])  # over ranks
        scale = self.statistics_scale(objective, outputs.detach())
        statistics = {
            self._name_of[id(p)]: self.tensor_block(self._name_of[id(p)]).statistics(g)
            for p, g in zip(params, grads, strict=True)
            if g is not None and p.numel() > 0
        }
        return statistics, scale

    # -------------------------------------------------------------- cost model
    def pass_cost(self, shape: LayerShape) -> list[CostItem]:
        """With `extra_backward` (TNT, Alg 15 line 7), once per T1 steps, at every layer of
        the forward pass: the sampled-label backward pass through the gradient pass's forward
        graph, ``g W`` (r×d_out)(d_out×n) where the input needs a gradient, and the weight
        gradients the statistics are contractions of, ``gᵀ x`` (d_out×r)(r×n) and the bias
        sums. The blocks' contractions, mode products and decompositions:
        `TensorBlock.cost`."""
        if not self.extra_backward:
            return []
        stats, name = self.cost_schedule()[0], shape.name
        out = []
        if shape.input_grad:
            out += cost_items(
                "statistics_backward", [output_gradient_product(shape)], stats, name, "g W"
            )
        wg = weight_gradient_ops(shape)
        return out + cost_items("statistics_weight_grad", wg, stats, name, "gᵀ x, Σ g")

    def cost_warmup_steps(self) -> int:
        """With ``inverse_warmup``, the refreshes at every statistics update of the first T2
        steps (deviation A9)."""
        return int(self.param_groups[0]["inverse_every"]) if self.inverse_warmup else 0
