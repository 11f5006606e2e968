r"""`TensorwiseOptimizer`: block-diagonal over parameter *tensors* (TNT and Shampoo, thesis ch.4).

TNT (thesis Alg 15) and the thesis's Shampoo (Alg 16) precondition each parameter tensor with
a Kronecker product of one factor per tensor mode (`curvlab.curvature.tensor_blocks`). Their
blocks are tensor variables, not layers: a Linear or conv layer gives two blocks (weight and
bias), a BatchNorm layer two 1-way blocks, and any other parameter (Embedding, LayerNorm, …)
its own block (thesis §4.3.1, spec §4, A11).

Why not `curvlab.optim.base.LayerwiseOptimizer`: that base requires Linear/Conv2d layers,
merges the bias into the weight matrix as a homogeneous column (K-FAC's structure, which TNT
explicitly does not use, spec §4.2) and sends every other parameter to a plain-gradient
fallback with a warning, while TNT and Shampoo precondition *every* parameter the same way.
So this base subclasses `torch.optim.Optimizer` directly and keeps the conventions of
`LayerwiseOptimizer`: the model comes first; optional parameter groups; hyperparameters are
validated from ``param_groups`` at every step; all state lives in ``optimizer.state`` (per
tensor under the parameter, method-wide values in `global_state`, the label sampler's random
state saved by `state_dict`); a non-finite loss, gradient or statistic skips the step and
leaves parameters and state untouched (``last_step_info``); a failed decomposition keeps the
previous preconditioner.

The step, common to Alg 15 and Alg 16 (T1 = ``curvature_every``, T2 = ``inverse_every``)::

    gradient pass on M_t (TNT: + the sampled-label backward when t ≡ 0 mod T1) → ∇̄_l, Ḡ_l
    for every tensor l:
        ∇̂_l = μ ∇̂_l + ∇̄_l                                 heavy ball on the raw gradient
        if t ≡ 0 (mod T1):  Ĝ_l^{(i)} = β Ĝ_l^{(i)} + (1−β) Ḡ_l^{(i)}
        if t ≡ 0 (mod T2):  recompute (F_i + εI)^{-1/r}     TNT: F = Ũ (eq 4.10), r = 1
                                                             Shampoo: F = Ĝ, r = 2k
        p_l = ∇̂_l ×_1 (F_1 + εI)^{-1/r} ×_2 ⋯ ×_k (F_k + εI)^{-1/r}
        W_l = W_l − α (p_l + γ W_l)                          decoupled weight decay

Statistics and inverses are refreshed *before* the step, from the current mini-batch (spec
§13 item 10). Deviations shared by both methods (thesis A9):

* Deviation: without `warm_start` (Alg 15/16 line 2), the statistics are initialised from the
  first mini-batch, whatever T1, and the preconditioners computed at once, because line 18 /
  line 14 needs them at t = 1 and the thesis only defines them through the warm start.
* ``inverse_warmup=True`` (default): preconditioners are also refreshed whenever the statistics
  are updated while t < T2, as the authors' code does (A9); ``False`` gives the printed
  schedule (t ≡ 0 mod T2 only).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.curvature.tensor_blocks import RootMethod, TensorBlock, tensor_shape
from curvlab.distributed import BlockParallel
from curvlab.linalg import all_finite, contractions_bounded
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import DataParallelMixin, GuardedStep
from curvlab.optim.validation import check_hyperparameters

__all__ = ["TensorwiseOptimizer"]

#: Hyperparameters read from every parameter group at every step.
HYPERPARAMETERS = (
    "lr",
    "damping",
    "momentum",
    "weight_decay",
    "ema_decay",
    "curvature_every",
    "inverse_every",
)


def validated(**values: Any) -> dict[str, Any]:
    """The hyperparameters of Alg 15/16, checked (`ValueError` names the first bad one)."""
    return check_hyperparameters(values)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


class TensorwiseOptimizer(GuardedStep, DataParallelMixin, Optimizer):
    """Base of TNT and Shampoo: one `TensorBlock` per parameter tensor.

    Args:
        model: the network (used by `warm_start`; every trainable parameter is a block).
        defaults: the validated hyperparameters (see `validated`).
        params: optional parameter groups over the model's parameters; by default one group
            with every trainable parameter. Parameters in no group are not trained.
        normalise: TNT's trace normalisation of the factors (eq. 4.10).
        root_of_order: r as a function of the tensor order k (TNT: 1, Shampoo: 2k).
        method: how the damped factors are inverted / rooted.
        inverse_warmup: refresh at every statistics update while t < T2 (A9).

    Subclasses say which gradient the statistics come from (`_statistics_loss`, and
    `_statistics_scale` for its scale) and whether the step needs a `curvlab.Objective`.

    Data-parallel: `distribute` (`curvlab.optim.base.DataParallelMixin`). The statistics are
    contractions of a mini-batch gradient, so the *gradient* is averaged over ranks before
    they are formed — the averaged true-label gradient (Shampoo, TNT-EF) or the averaged
    sampled-label gradient (TNT) — which makes them those of the global batch; every rank
    keeps them, each block's roots are refreshed by its owner.
    """

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model)!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("model: it has no trainable parameters")
        super().__init__(params, defaults)
        self.model = model
        self.inverse_warmup = check_bool("inverse_warmup", inverse_warmup)
        model_ids = {id(p) for p in model.parameters()}
        self._group_of: dict[int, int] = {}
        self.blocks: dict[int, TensorBlock] = {}
        # Reused outputs of the statistics products (a cache, not state: each step overwrites
        # them before they are read; see curvlab.curvature.tensor_blocks.mode_statistics).
        self._buffers: dict[int, list[Tensor]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in model_ids:
                    raise ValueError("params: every parameter must belong to the model")
                self._group_of[id(p)] = index
                order = len(tensor_shape(p.shape))
                self.blocks[id(p)] = TensorBlock(
                    p.shape, normalise=normalise, root=root_of_order(order), method=method
                )
        device = self.param_groups[0]["params"][0].device
        self._generator = self.new_sampler(device)
        self.last_step_info: dict[str, Any] = {}
        self._parallel = BlockParallel.local()

    def block_costs(self) -> dict[Hashable, float]:
        """``Σ_i d_i³`` per parameter tensor, keyed like `blocks` (for the owner assignment)."""
        return {id(p): self.blocks[id(p)].refresh_cost() for p in self.params}

    # ------------------------------------------------------------------- state
    @property
    def params(self) -> list[Tensor]:
        """Every optimised parameter, in group order."""
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def global_state(self) -> dict[str, Any]:
        """Method-wide state (step counter, counters, sampler state), in ``state_dict``."""
        state: dict[str, Any] = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("global_step", 0)
        state.setdefault("skipped_steps", 0)
        return state

    def group_of(self, p: Tensor) -> dict[str, Any]:
        """The parameter group of ``p`` (hyperparameters are read from it every step)."""
        return self.param_groups[self._group_of[id(p)]]

    # ------------------------------------------------------------ subclass API
    def _check_closure(self, closure: Any) -> Callable[[], Any] | None:
        """The closure to call (subclasses may require a `curvlab.Objective`)."""
        return closure

    def _statistics_loss(self, objective: Objective, outputs: Tensor, loss: Tensor) -> Tensor:
        """The loss whose gradient gives the statistics in an extra backward pass."""
        raise NotImplementedError

    def _statistics_scale(self, closure: Any, outputs: Tensor | None) -> float:
        """Factor applied to the contractions of the statistics gradient (default 1)."""
        return 1.0

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:  # type: ignore[override]
        """One iteration of thesis Alg 15 (TNT) / Alg 16 (Shampoo) on the closure's batch."""
        closure = self._check_closure(closure)
        for group in self.param_groups:
            validated(**{k: group[k] for k in HYPERPARAMETERS})
        k = self.global_state["global_step"] + 1
        first = not any(TensorBlock.has_statistics(self.state[p]) for p in self.params)
        stats_due = first or k % self.param_groups[0]["curvature_every"] == 0
        # Alg 15 lines 5–7 / Alg 16 line 5.
        loss, stat_grads, outputs = self._gradient_pass(closure, stats_due)
        loss = self.synchronize_gradients(loss)  # data-parallel: mean over ranks
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            self.skip_step(loss, "non-finite loss")
            return loss
        if not all_finite([p.grad for p in self.params if p.grad is not None]):
            self.skip_step(loss, "non-finite gradient")
            return loss
        statistics: dict[int, list[Tensor]] = {}
        fused: dict[int, Tensor] = {}  # statistics gradients to accumulate into the EMA directly
        scale = 1.0
        if stat_grads is not None and self.extra_backward:
            self.average_statistics(list(stat_grads.values()))  # the sampled gradient
        if stat_grads is not None:
            scale = self._statistics_scale(closure, outputs)
            grads = {id(p): g for p, g in stat_grads.items() if p.numel() > 0}
            if self._can_accumulate(grads, scale):
                fused = grads
            else:  # the first statistics, or gradients too large for the a-priori bound
                for key, g in grads.items():
                    stats = self.blocks[key].statistics(g, self._statistic_buffers(key, g))
                    statistics[key] = [s.mul_(scale) for s in stats] if scale != 1.0 else stats
                if not all_finite([s for stats in statistics.values() for s in stats]):
                    self.skip_step(loss, "non-finite curvature statistics")
                    return loss
        updated = bool(statistics) or bool(fused)
        T2 = self.param_groups[0]["inverse_every"]
        refresh_all = k % T2 == 0 or (self.inverse_warmup and k < T2 and updated)
        due: list[tuple[int, TensorBlock, dict[str, Any]]] = []
        by_key = {id(p): p for p in self.params}
        for p in self.params:
            state, block, group = self.state[p], self.blocks[id(p)], self.group_of(p)
            # Alg 15 lines 11–12 / Alg 16 lines 8–9.
            if id(p) in fused:
                block.accumulate(state, fused[id(p)], group["ema_decay"], scale)
            elif id(p) in statistics:
                block.update(state, statistics[id(p)], group["ema_decay"])
            # Alg 15 lines 14–16 / Alg 16 lines 11–12 (and the first preconditioners, A9).
            if TensorBlock.has_statistics(state) and (
                refresh_all or not self.inverse_ready(id(p), TensorBlock.has_preconditioners(state))
            ):
                due.append((id(p), block, state))
        # Data-parallel: each block on its owner rank, then shared (`refresh_blocks`).
        refreshed, failed = self.refresh_blocks(
            due,
            lambda key: self.blocks[key].refresh(
                self.state[by_key[key]], self.group_of(by_key[key])["damping"]
            ),
        )

        def momentum() -> Iterable[tuple[int, Tensor]]:
            for p in self.params:
                if p.grad is not None:  # Alg 15 line 10 / Alg 16 line 7
                    yield id(p), self._momentum(p, p.grad, self.group_of(p))

        def precondition(key: int, direction: Tensor) -> Tensor:
            state = self.state[by_key[key]]
            if TensorBlock.has_preconditioners(state):  # Alg 15 line 18 / Alg 16 line 14
                return self.blocks[key].precondition(state, direction)
            return direction

        def apply(key: int, direction: Tensor) -> None:
            p = by_key[key]  # Alg 15 lines 19–20 / Alg 16 lines 15–16
            self._apply(p, direction, self.group_of(p))

        applied = self.precondition_blocks(momentum(), precondition, apply)
        if not applied:  # a non-finite direction: the parameters keep their values
            self.withhold_update()
        self.global_state["global_step"] = k
        self.last_step_info = {
            "skipped": False,
            "loss": None if loss is None else float(loss),
            "statistics_updated": updated,
            "inverses_refreshed": refreshed > 0,
            "update_applied": applied,
            "failed_refreshes_this_step": failed,
            "skipped_steps": self.global_state["skipped_steps"],
            "failed_refreshes": sum(self.state[p].get("failed_refreshes", 0) for p in self.params),
            "retried_decompositions": sum(
                self.state[p].get("retried_decompositions", 0) for p in self.params
            ),
        }
        return loss

    def _gradient_pass(
        self, closure: Callable[[], Any] | None, stats_due: bool
    ) -> tuple[Tensor | None, dict[Tensor, Tensor] | None, Tensor | None]:
        """The closure's gradient; when due, also the gradients the statistics come from.

        Returns ``(loss, {param: statistics gradient} or None, model outputs or None)``.
        """
        if self.extra_backward and stats_due:
            assert isinstance(closure, Objective)
            objective = closure
            params = [p for p in self.params if p.requires_grad]
            found: dict[Tensor, Tensor] = {}

            def sampled_pass(outputs: Tensor, loss: Tensor) -> None:
                # Alg 15 line 7: another backward pass through the same forward graph.
                if not bool(torch.isfinite(loss)):
                    return  # the step is skipped; labels cannot be sampled from NaN outputs
                with torch.enable_grad():
                    extra = self._statistics_loss(objective, outputs, loss)
                    grads = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
                found.update({p: g for p, g in zip(params, grads, strict=True) if g is not None})

            with torch.enable_grad():
                sampled_loss = objective.forward_backward(before_backward=sampled_pass)
            return sampled_loss, found, objective.outputs
        loss: Tensor | None = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            loss = None if result is None else torch.as_tensor(result).detach()
        outputs = closure.outputs if isinstance(closure, Objective) else None
        if not stats_due:
            return loss, None, outputs
        grads: dict[Tensor, Tensor] = {p: p.grad for p in self.params if p.grad is not None}
        return loss, grads, outputs

    def _statistic_buffers(self, key: int, like: Tensor) -> list[Tensor]:
        buffers = self._buffers.get(key)
        if buffers is None or buffers[0].dtype != like.dtype or buffers[0].device != like.device:
            shape = self.blocks[key].shape
            buffers = [like.new_empty(d, d) for d in shape]
            self._buffers[key] = buffers
        return buffers

    def _can_accumulate(self, grads: dict[int, Tensor], scale: float) -> bool:
        """Whether this step's statistics can go straight into the EMAs (`TensorBlock.accumulate`:
        one product per mode, no buffer, no separate average and no pass over the new
        statistics to check them): every block already has statistics, and the gradients bound
        the new ones a priori (`contractions_bounded`: mode i sums numel/d_i products), so that
        the in-place average cannot become non-finite. Otherwise the statistics are formed in
        buffers and checked before any average changes (the all-or-nothing skip)."""
        by_key = {id(p): p for p in self.params}
        if not all(TensorBlock.has_statistics(self.state[by_key[key]]) for key in grads):
            return False
        lengths = [g.numel() // min(self.blocks[key].shape) for key, g in grads.items()]
        if not contractions_bounded(list(grads.values()), lengths, scale):
            return False
        self._buffers.clear()  # not needed while the fused path holds
        return True

    # ------------------------------------------------------------------ guards
    # ------------------------------------------------------------------ update
    def _momentum(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """∇̂ ← μ∇̂ + ∇̄ (heavy ball, thesis ch.4, no (1−μ)), from ∇̂ = 0."""
        mu = group["momentum"]
        if mu == 0:
            return grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        return buf.mul_(mu).add_(grad)

    @staticmethod
    def _apply(p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        """W ← W − α (p + γ W): decoupled weight decay after preconditioning (thesis §0)."""
        if group["weight_decay"] != 0:
            direction = direction.add(p, alpha=group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    # -------------------------------------------------------------- warm start
    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        batch_average: bool = False,
    ) -> int:
        """Alg 15/16 line 2: ``Ĝ_l^{(i)}`` = the average over ``batches`` (e.g. one epoch) of
        the contractions of each mini-batch's statistics gradient, at the current parameters
        (the authors' running mean, spec A10); then the preconditioners. BatchNorm buffers are
        restored. Returns the number of batches used (batches with non-finite values are
        skipped)."""
        sums: dict[int, list[Tensor]] = {}
        counts: dict[int, int] = {}
        count = 0
        params = [p for p in self.params if p.requires_grad]
        for inputs, targets in batches:
            objective = self.batch_objective(self.model, loss_fn, inputs, targets, batch_average)
            with preserved_buffers(self.model), torch.enable_grad():
                outputs, loss = objective.forward()
                mean = self.parallel.synchronize_gradients(loss.detach(), ())  # over ranks
                if not bool(torch.isfinite(torch.as_tensor(mean))):
                    continue
                extra = self._statistics_loss(objective, outputs, loss)
                grads = torch.autograd.grad(extra, params, allow_unused=True)
            self.average_statistics([g for g in grads if g is not None])  # over ranks
            scale = self._statistics_scale(objective, outputs.detach())
            stats = {
                id(p): self.blocks[id(p)].statistics(g)
                for p, g in zip(params, grads, strict=True)
                if g is not None and p.numel() > 0
            }
            if not all_finite([s for ss in stats.values() for s in ss]):
                continue
            count += 1
            for key, ss in stats.items():
                counts[key] = counts.get(key, 0) + 1
                if key in sums:
                    for total, s in zip(sums[key], ss, strict=True):
                        total.add_(s, alpha=scale)
                else:
                    sums[key] = [s.mul_(scale) for s in ss]
        if count == 0:
            raise ValueError("batches: no batch gave finite statistics for the warm start")
        for p in self.params:
            if id(p) not in sums:
                continue
            state = self.state[p]
            state.pop("statistics", None)
            self.blocks[id(p)].update(state, [s / counts[id(p)] for s in sums[id(p)]], 0.0)
            self.blocks[id(p)].refresh(state, self.group_of(p)["damping"])
        return count
