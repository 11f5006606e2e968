"""`BlockOptimizer`: the base of every block-diagonal method, and its step.

A block method (K-FAC, TSO-ALRA, TNT, Shampoo, K-BFGS) preconditions each parameter group with
its own curvature block (`curvlab.curvature.blocks`): a layer's weight and bias (Kronecker
blocks), or one parameter tensor (tensor blocks). Trainable parameters that no block covers
(e.g. BatchNorm's scale and shift under K-FAC) get the *fallback update*: the method's own
momentum and weight decay on the plain gradient, same learning rate (thesis §3.7.2 and
§4.7.2, "exactly as in KFAC-Pytorch"; deviation A11, docs/deviations.md); a one-time warning
names them.

The step, in one place (`BlockOptimizer.step`; an algorithm file supplies the hooks in
brackets)::

    validate every group's hyperparameters (schedulers may change them)
    [gradient pass]        loss and gradients; layer inputs / output gradients captured when
                           statistics are due
    non-finite loss or gradient              → skip (nothing changes; reported)
    [statistics]           this step's statistics per block
    non-finite statistics                    → skip
    [update statistics]    the blocks' moving averages
    [refresh due]          inverses / roots of the blocks that are due (one owner rank each)
    momentum               on the raw gradient, heavy ball ĝ ← βĝ + g (thesis ch.3/ch.4) or
                           EMA ĝ ← βĝ + (1−β)g (ch.2)
    precondition           every block's direction, formed before any is applied
    apply, all or nothing  W ← W − α (P(ĝ) + γ W), decoupled weight decay (thesis §3.7.2); a
                           non-finite direction withholds the whole update (reported)
    [after step]           K-FAC's printed-order statistics pass, K-BFGS's second pass
    step information       ``last_step_info``

Autocast, the sampler snapshot, the running-statistics restore and skipping are the
`curvlab.optim.guard.step_guard` of that step. State: everything lives in ``optimizer.state``
(a block's tensors under its first parameter, method-wide values in `global_state`, the label
sampler's random state saved by `state_dict`), so a resumed run continues bit-identically.
Data-parallel: `curvlab.optim.data_parallel.DataParallelBlocks`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.curvature.blocks import CurvatureBlock
from curvlab.curvature.cost import CostItem, LayerShape, StorageFormula
from curvlab.curvature.hooks import Recorder
from curvlab.curvature.layers import KroneckerLayer
from curvlab.curvature.recorded import RecordedBatch
from curvlab.distributed import BlockParallel
from curvlab.linalg import all_finite
from curvlab.losses import LossModel
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.data_parallel import DataParallelBlocks
from curvlab.optim.guard import SampledLabels, full_precision, step_guard, watch
from curvlab.optim.validation import LAYERWISE_RULES, Rule, check_hyperparameters

__all__ = ["BlockOptimizer", "MomentumStyle", "Refreshed"]

MomentumStyle = Literal["heavy_ball", "ema"]
Statistics = Mapping[str, Any]


@dataclass(frozen=True)
class Refreshed:
    """What a refresh did: whether one was due, and this rank's successes and failures."""

    due: bool = False
    succeeded: int = 0
    failed: int = 0


class BlockOptimizer(SampledLabels, DataParallelBlocks, Optimizer):
    """Block-diagonal preconditioning over curvature blocks (module docstring).

    Args:
        model: the network.
        defaults: the method's hyperparameters (must include ``lr``, ``momentum``,
            ``weight_decay``), checked by `rules`.
        params: optional parameter groups (like any `torch.optim` optimizer) over the model's
            parameters; by default one group with every trainable parameter. A block's
            parameters must share a group.
        momentum_style: ``"heavy_ball"`` or ``"ema"``.
        loss_fn: the loss the training loop uses (a module or function `curvlab.losses`
            recognises), for steps without a `curvlab.Objective`: its reduction scales the
            statistics, its likelihood gives the true Fisher's sampled labels.

    ``step`` takes a `curvlab.Objective`, a plain closure, or nothing after the user's own
    ``loss.backward()`` (`batch_of`); what a method can do with each is its own (the model-wide
    methods need an `Objective`).

    Subclasses set `hyperparameters` and `rules`, make their blocks (`make_blocks`) and
    override the hooks.
    """

    #: The hyperparameters read from every group at every step, and their checks.
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    rules: ClassVar[Mapping[str, Rule]] = LAYERWISE_RULES
    #: Whether the statistics of a step without an `Objective` come from the layers' records
    #: of the user's own pass (inputs and output gradients).
    records_layer_passes: bool = False

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        params: Iterable[Any] | None = None,
        momentum_style: MomentumStyle = "heavy_ball",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
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
        self.blocks: dict[str, CurvatureBlock]
        self._assign_blocks()
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
        self.new_sampler(self.param_groups[0]["params"][0].device)
        self.last_step_info: dict[str, Any] = {}
        self._parallel = BlockParallel.local()
        #: The loss the training loop uses (its likelihood and reduction), for the plain loop.
        self.loss_model = None if loss_fn is None else LossModel(loss_fn)
        self._start_recording()

    # ------------------------------------------------------- torch.optim contract
    def __getstate__(self) -> dict[str, Any]:
        """Every attribute but the hooks on the model, so that ``copy.deepcopy`` and ``pickle``
        give a working optimizer (over the copied model; torch.optim keeps only ``defaults``,
        ``state`` and ``param_groups``, which left a copy without its blocks)."""
        state = dict(self.__dict__)
        state.pop("_recorder", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A copy's parameters are new objects: the maps keyed by id() are made again.
        self._group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.blocks_changed()
        self._start_recording()

    def _start_recording(self) -> None:
        """Hooks on the model that record the user's own passes between steps (`batch_of`);
        they come off when the optimizer is garbage-collected (or `stop_recording`)."""
        self._recorder = Recorder(self.model, self.layers, layer_records=self.records_layer_passes)
        weakref.finalize(self, self._recorder.remove)

    def stop_recording(self) -> None:
        """No more records of the user's passes until the next step (e.g. a first stage that
        `curvlab.optim.switching.TwoStage` has switched away from)."""
        self._recorder.armed = False
        self._recorder.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the model's parameters (`torch.optim.Optimizer.add_param_group`); the
        layers (or tensors) it completes get their curvature blocks, the others the fallback
        update. Raises `ValueError` for a parameter outside the model, or after `distribute`
        (the owner plan covers the blocks it was made for)."""
        super().add_param_group(param_group)
        if "blocks" not in self.__dict__:
            return  # the groups given to the constructor: __init__ makes the blocks
        if self.parallel.is_distributed:
            raise ValueError("params: add parameter groups before distribute()")
        index = len(self.param_groups) - 1
        model_ids = {id(p) for p in self.model.parameters()}
        for p in self.param_groups[index]["params"]:
            if id(p) not in model_ids:
                self.param_groups.pop()
                raise ValueError("params: every parameter must belong to the model")
            self._group_of[id(p)] = index
        self._assign_blocks()
        self.blocks_changed()
        self._recorder.remove()
        self._start_recording()

    def _warn_untrained(self) -> None:
        """Once: the model has parameters with gradients in no group (e.g. frozen when the
        optimizer was built, unfrozen since); they are not trained until they are added."""
        if self.__dict__.get("_warned_untrained"):
            return
        names = [
            n for n, p in self.model.named_parameters()
            if p.grad is not None and id(p) not in self._group_of
        ]  # fmt: skip
        if names:
            self._warned_untrained = True
            warnings.warn(
                f"{type(self).__name__}: {len(names)} parameter(s) of the model have gradients "
                f"but are in no parameter group ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}), e.g. frozen when the optimizer was "
                "built: they are not trained; add them with "
                "opt.add_param_group({'params': [...]})",
                stacklevel=4,
            )

    def blocks_changed(self) -> None:
        """After `add_param_group` made new blocks: a method's caches over its blocks follow."""

    def _assign_blocks(self) -> None:
        """The blocks whose parameters are in one group (``self.blocks``, in the method's
        order) and the fallback parameters (in no block)."""
        blocks: dict[str, CurvatureBlock] = {}
        for block in self.make_blocks(self.model):
            old = self.__dict__.get("blocks", {}).get(block.name)
            groups = {self._group_of.get(id(p)) for p in block.params}
            if groups == {None}:
                continue
            if len(groups) != 1 or None in groups:
                raise ValueError(
                    f"params: the parameters of block '{block.name}' must be in one group"
                )
            blocks[block.name] = block if old is None else old
        if not blocks:
            raise ValueError(
                "model: no trainable nn.Linear or nn.Conv2d (groups=1) layer to precondition"
            )
        self.blocks = blocks
        covered = {id(p) for block in blocks.values() for p in block.params}
        self.fallback_params = [
            p for g in self.param_groups for p in g["params"] if id(p) not in covered
        ]

    def entry_points(self) -> frozenset[str]:
        """How ``step`` can get its mini-batch: ``"objective"`` (a `curvlab.Objective`),
        ``"closure"`` (a plain closure) and ``"backward"`` (nothing, after the user's own
        ``loss.backward()``); a method narrows this where its algorithm needs more."""
        return frozenset({"objective", "closure", "backward"})

    @classmethod
    def checked(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The method's `hyperparameters` taken from a constructor's ``arguments`` (its
        ``locals()``) and checked by its `rules` (`ValueError` names the first bad one)."""
        return check_hyperparameters({k: arguments[k] for k in cls.hyperparameters}, cls.rules)

    # ------------------------------------------------------------------- state
    @property
    def global_state(self) -> dict[str, Any]:
        """Method-wide state (step counter, counters, sampler state), in ``state_dict``."""
        state: dict[str, Any] = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("global_step", 0)
        state.setdefault("skipped_steps", 0)
        return state

    @property
    def layers(self) -> dict[str, KroneckerLayer]:
        """The layers of the layer blocks, by block name (K-FAC, TSO-ALRA, K-BFGS)."""
        return {n: b.layer for n, b in self.blocks.items() if b.layer is not None}

    def block_state(self, name: str) -> dict[str, Any]:
        """The state dict of one block (kept under its first parameter)."""
        state: dict[str, Any] = self.state[self.blocks[name].params[0]]
        return state

    #: The state dict of a layer block (kept under its weight).
    layer_state = block_state

    def block_of(self, p: Tensor) -> CurvatureBlock | None:
        """The block that covers parameter ``p`` (None: the fallback update)."""
        for block in self.blocks.values():
            if any(q is p for q in block.params):
                return block
        return None

    def group(self, name: str) -> dict[str, Any]:
        """The parameter group of one block (hyperparameters are read from it every step)."""
        return self.param_groups[self._group_of[id(self.blocks[name].params[0])]]

    def block_costs(self) -> dict[Any, float]:
        """The refresh cost of every block, in block order (for the owner assignment)."""
        return {name: block.refresh_cost() for name, block in self.blocks.items()}

    def count(self, key: str) -> int:
        """``Σ`` over the blocks of a counter in their state (e.g. ``"failed_refreshes"``)."""
        return sum(self.block_state(n).get(key, 0) for n in self.blocks)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iteration of the method on the closure's mini-batch (module docstring)."""
        with step_guard(self, closure, self.model) as guard, self._recording_after():
            for group in self.param_groups:
                check_hyperparameters({k: group[k] for k in self.hyperparameters}, self.rules)
            batch = self.batch_of(guard.closure)
            k = self.global_state["global_step"] + 1
            loss, record = self.gradient_pass(batch, k)
            self._warn_untrained()
            loss = self.synchronize_gradients(loss)  # data-parallel: mean over ranks
            if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                return guard.skip(loss, "non-finite loss")
            if not self.grads_finite():
                return guard.skip(loss, "non-finite gradient")
            statistics = self.statistics(batch, record, k)
            del record  # the captured activations are not needed any more
            if statistics is not None and not self.statistics_finite(statistics):
                return guard.skip(loss, "non-finite curvature statistics")
            self.update_statistics(statistics, k)
            refreshed = self.refresh(self.due_before_update(k, statistics))
            applied = self.apply_update()
            if not applied:  # a non-finite direction: the parameters keep their values
                self.withhold_update()
            info = self.after_step(batch, k, statistics)
            self.global_state["global_step"] = k
            self.last_step_info = {
                "skipped": False,
                "loss": None if loss is None else float(loss),
                **self.step_information(statistics, refreshed, info),
                "update_applied": applied,
                "skipped_steps": self.global_state["skipped_steps"],
            }
            watch(self, loss)
            return loss

    # --------------------------------------------------------------- the hooks
    def make_blocks(self, model: nn.Module) -> Iterable[CurvatureBlock]:
        """The method's blocks of ``model``, in order (called once, by ``__init__``; a block
        whose parameters are in no group is left out: those parameters are not trained)."""
        raise NotImplementedError

    def batch_of(self, closure: Any) -> Objective | RecordedBatch:
        """The step's mini-batch: a `curvlab.Objective` as given; otherwise the passes
        recorded since the last step — the user's own forward and backward (no closure) or
        those of a plain closure, run now (its loss is the step's)."""
        recorder = self._recorder
        if isinstance(closure, Objective):
            recorder.armed = False
            recorder.clear()
            return closure
        loss = None
        if closure is not None:
            recorder.clear()
            # A compiled model runs eagerly here, so that the recording hooks see its layers.
            with torch.enable_grad(), torch.compiler.set_stance("force_eager"):
                result = closure()
            loss = None if result is None else torch.as_tensor(result).detach()
        recorder.armed = False
        calls, cap = recorder.take()
        name = type(self).__name__
        return RecordedBatch(
            self.model, calls, cap, self.loss_model, name, closure=closure, loss=loss
        )

    @contextmanager
    def _recording_after(self) -> Iterator[None]:
        """The recorder is off during a step and on again after it (for the next user pass)."""
        try:
            yield
        finally:
            self._recorder.armed = True

    def gradient_pass(self, batch: Any, k: int) -> tuple[Tensor | None, Any]:
        """Loss and gradients of step ``k``, and what the statistics need (default: the
        `Objective` run as a closure; a recorded batch's loss, if a closure gave one)."""
        if isinstance(batch, Objective):
            with torch.enable_grad():
                return batch(), None
        return batch.loss, None

    def statistics(self, batch: Any, record: Any, k: int) -> Any:
        """This step's statistics (default: a mapping block name → statistics; None: none are
        due)."""
        return None

    def statistics_finite(self, statistics: Any) -> bool:
        """Whether this step's statistics are finite on every rank (the skip decision)."""
        return self.finite_everywhere([t for value in statistics.values() for t in _tensors(value)])

    def update_statistics(self, statistics: Any, k: int) -> None:
        """Fold this step's statistics into each block's moving averages."""
        for name, value in (statistics or {}).items():
            self.blocks[name].update(self.block_state(name), value, self.group(name)["ema_decay"])

    def due_before_update(self, k: int, statistics: Any) -> list[str]:
        """The blocks whose inverses / roots are refreshed before this step's update."""
        return []

    def after_step(self, batch: Any, k: int, statistics: Any) -> dict[str, Any]:
        """What the method does after the update (e.g. a statistics pass); step information."""
        return {}

    def step_information(
        self, statistics: Any, refreshed: Refreshed, info: dict[str, Any]
    ) -> dict[str, Any]:
        """The method's entries of ``last_step_info``."""
        return info

    # ----------------------------------------------------------------- refresh
    def refresh(self, names: Sequence[str]) -> Refreshed:
        """Refresh the blocks ``names`` that have statistics, each on its owner rank, then
        shared (`refresh_blocks`)."""
        due = [
            (n, self.blocks[n], self.block_state(n))
            for n in names
            if self.blocks[n].has_statistics(self.block_state(n))
        ]
        ok, failed = self.refresh_blocks(
            due, lambda n: self.blocks[n].refresh(self.block_state(n), self.damping(n))
        )
        return Refreshed(due=bool(names), succeeded=ok, failed=failed)

    def damping(self, name: str) -> float:
        """The damping a block's refresh uses (default: its group's ``damping``)."""
        return float(self.group(name)["damping"])

    def has_inverses(self) -> bool:
        """Whether every block that has statistics can precondition (the same on all ranks)."""
        return all(
            self.inverse_ready(n, block.is_ready(self.block_state(n)))
            for n, block in self.blocks.items()
            if block.has_statistics(self.block_state(n))
        )

    # ------------------------------------------------------------------ update
    def grads_finite(self) -> bool:
        """Whether every gradient is finite (one host sync)."""
        return all_finite(
            [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        )

    def momentum(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """ĝ ← βĝ + g (heavy ball: Alg 9 line 8, Alg 12 line 7) or ĝ ← βĝ + (1−β)g (EMA: Alg 4
        line 8), from ĝ = 0."""
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
    def apply(p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        """W ← W − α (p + γ W): decoupled weight decay after preconditioning (thesis §3.7.2;
        Alg 15 line 19, Alg 16 line 15)."""
        if group["weight_decay"] != 0:
            direction = direction.add(p, alpha=group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    def block_momenta(self) -> Iterable[tuple[str, list[Tensor]]]:
        """Each block's momentum gradients (a missing gradient counts as zero); blocks without
        a gradient in this step are left out."""
        for name, block in self.blocks.items():
            if block.params[0].grad is None:
                continue
            group = self.group(name)
            yield (
                name,
                [
                    self.momentum(p, p.grad if p.grad is not None else torch.zeros_like(p), group)
                    for p in block.params
                ],
            )

    def precondition(self, name: str, V: Tensor) -> Tensor:
        """The block's direction of ``V``; a block without inverses keeps its gradient."""
        state = self.block_state(name)
        if not self.blocks[name].is_ready(state):
            return V
        return self.blocks[name].precondition(state, V, self.damping(name))

    def apply_update(self) -> bool:
        """Momentum, `precondition` per block, then the update of every parameter, all or
        nothing (module docstring). Returns False, moving nothing, when a direction is not
        finite; the momentum and curvature state keep this step's batch."""
        matrices = (
            (name, self.blocks[name].gradient(momenta)) for name, momenta in self.block_momenta()
        )
        return self.apply_directions(matrices)

    def apply_directions(self, matrices: Iterable[tuple[str, Tensor]]) -> bool:
        """`precondition` each block's matrix, check every direction, then apply them and
        the fallback update (`precondition_blocks`: by owners in mode "preconditioned")."""

        def apply(name: str, direction: Tensor) -> None:
            block, group = self.blocks[name], self.group(name)
            for p, d in zip(block.params, block.split(direction), strict=True):
                self.apply(p, d, group)

        if not self.precondition_blocks(matrices, self.precondition, apply):
            return False
        self.apply_fallback()
        return True

    def fallback_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters of the fallback update (default: the group's)."""
        return group

    def apply_fallback(self) -> None:
        """The parameters no block covers: the momentum gradient as their direction, with the
        hyperparameters `fallback_group` of their group."""
        for p in self.fallback_params:
            if p.grad is None:
                continue
            group = self.fallback_group(self.param_groups[self._group_of[id(p)]])
            self.apply(p, self.momentum(p, p.grad, group), group)

    def withhold_update(self) -> int:
        """Count an update withheld because a direction was not finite; the running count."""
        state = self.global_state
        state["withheld_updates"] = state.get("withheld_updates", 0) + 1
        return int(state["withheld_updates"])

    # -------------------------------------------------------------- warm start
    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        batch_average: bool = False,
    ) -> int:
        """The initial statistics "over the whole dataset" (thesis Alg 12 line 2, Alg 15/16
        line 2): each block's statistics are set to their mean over ``batches`` (e.g. one
        epoch) at the current parameters, then refreshed. Batches whose statistics are not
        finite are skipped; BatchNorm buffers are left as they were. Returns the number of
        batches used."""
        sums: dict[str, list[Tensor]] = {}
        counts: dict[str, int] = {}
        used = 0
        with full_precision() as autocast:
            for inputs, targets in batches:
                objective = Objective(
                    self.model, loss_fn, inputs, targets, batch_average=batch_average,
                    autocast=autocast,
                )  # fmt: skip
                with preserved_buffers(self.model):
                    found = self.warm_start_statistics(objective)
                if found is None:
                    continue
                statistics, weight = found
                if not all_finite([t for value in statistics.values() for t in value]):
                    continue
                used += 1
                for name, value in statistics.items():
                    counts[name] = counts.get(name, 0) + 1
                    if name in sums:
                        for total, t in zip(sums[name], value, strict=True):
                            total.add_(t, alpha=weight)
                    else:
                        sums[name] = [t * weight for t in value]
            if used == 0:
                raise ValueError("batches: no batch gave finite statistics for the warm start")
            for name, totals in sums.items():
                state, block = self.block_state(name), self.blocks[name]
                block.drop_statistics(state)
                block.update(state, [t / counts[name] for t in totals], 0.0)
            self.refresh(list(self.blocks))
        return used

    def warm_start_statistics(
        self, objective: Objective
    ) -> tuple[Mapping[str, Sequence[Tensor]], float] | None:
        """One batch's statistics per block for `warm_start`, and the weight they are summed
        with (None: skip the batch)."""
        raise NotImplementedError(f"{type(self).__name__} has no warm start")

    # -------------------------------------------------------------- cost model
    def step_cost(self, shapes: Sequence[LayerShape]) -> list[CostItem]:
        """The operations of one step beyond an SGD-m step (`curvlab.curvature.cost`), on a
        model whose Kronecker layers had ``shapes`` in a forward pass: per layer the method's
        extra passes (`pass_cost`) and its block's cost, then the tensor blocks' costs, each
        block at the method's schedule (`cost_schedule`) and its refresh damping.

        A layer block whose layer is not in ``shapes`` did no work and costs nothing.
        """
        statistics, refresh = self.cost_schedule()
        out: list[CostItem] = []

        def block_cost(name: str, shape: LayerShape | None) -> list[CostItem]:
            return self.blocks[name].cost(
                shape, statistics=statistics, refresh=refresh, damping=self.damping(name)
            )

        for shape in shapes:
            out += self.pass_cost(shape)
            if shape.name in self.layers:
                out += block_cost(shape.name, shape)
        for name, block in self.blocks.items():
            if block.layer is None:
                out += block_cost(name, None)
        return out

    def pass_cost(self, shape: LayerShape) -> list[CostItem]:
        """The method's passes beyond the gradient pass at one layer (default: none)."""
        return []

    def cost_schedule(self) -> tuple[float, float]:
        """(statistics updates, refreshes) per step: 1/T1 and 1/T2, the first group's
        ``curvature_every`` and ``inverse_every`` (the step schedules every block by the first
        group); a method without them updates its statistics every step and never refreshes."""
        group = self.param_groups[0]
        every = int(group.get("curvature_every", 1))
        refresh = 1.0 / int(group["inverse_every"]) if "inverse_every" in group else 0.0
        return 1.0 / every, refresh

    def cost_period(self) -> int:
        """Steps of one full statistics / refresh cycle, in which every kind of step occurs in
        its proportion: lcm(T1, T2)."""
        group = self.param_groups[0]
        return math.lcm(int(group.get("curvature_every", 1)), int(group.get("inverse_every", 1)))

    def cost_warmup_steps(self) -> int:
        """Steps before a step costs what the steady state's do (default 0; a schedule that
        refreshes more often at first, or a buffer that fills, takes longer)."""
        return 0

    def cost_diagnostics(self) -> dict[str, Any]:
        """State that decides a step's cost: decompositions retried (float64 or more damping)
        and refreshes that failed so far."""
        info = self.last_step_info
        return {k: info[k] for k in ("retried_decompositions", "failed_refreshes") if k in info}

    def refresh_matrices(self) -> dict[str, Tensor]:
        """The matrices the blocks' refreshes decompose (`CurvatureBlock.refresh_matrices`),
        keyed by the ``source`` of the decompositions in `step_cost`."""
        out: dict[str, Tensor] = {}
        for name, block in self.blocks.items():
            out.update(block.refresh_matrices(self.block_state(name)))
        return out

    def storage_formula(self, shapes: Sequence[LayerShape]) -> StorageFormula:
        """The thesis's storage beyond SGD-m (Tables 3.1, 4.1): the sum of the blocks' terms
        (`CurvatureBlock.storage`), layer blocks whose layer is in ``shapes``."""
        names = {shape.name for shape in shapes}
        return StorageFormula.total(
            [b.storage() for n, b in self.blocks.items() if b.layer is None or n in names]
        )


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    return [t for item in value for t in _tensors(item)]
