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

Data-parallel training (`DataParallelMixin`, shared with
`curvlab.optim.tensorwise.TensorwiseOptimizer`): ``opt.distribute(communicator)`` makes the
same optimizer run on several ranks of torch.distributed. The algorithm files call four
hooks, each a no-op in one process — `synchronize_gradients` after the gradient pass,
`average_statistics` on statistics that must be global at once (K-BFGS's vectors; TNT's
sampled gradient), `finite_everywhere` for skip decisions on per-rank statistics,
`refresh_blocks` for the inverses or roots (the blocks' EMA'd statistics are averaged first,
then each block is refreshed on its owner rank) and `precondition_blocks` (inside
`LayerwiseOptimizer.precondition_and_apply`); the collectives themselves live in
`curvlab.distributed`.

Mixed precision (`GuardedStep`, a base of every curvlab optimizer base): ``step`` runs
the optimizer's own maths — statistics, inverses, roots, solves, updates — with autocast off
(cpu and cuda), also when it is called inside ``torch.autocast``. The forward passes keep
the user's precision: a `curvlab.Objective` re-enters the autocast state it was built under
(`curvlab.Objective.autocast`), and a plain closure is run under the state at the call of
``step``. Captured layer inputs and output gradients are upcast to the parameter dtype
(`curvlab.curvature.hooks`), so curvature state stays in the parameters' dtype (float32).

Skipped steps (`GuardedStep` too): the label sampler's random state is copied when ``step``
starts and put back by ``skip_step``, so a step skipped after its sampled-label pass (K-FAC
``statistics="before_step"``, TNT) leaves the sampler exactly as it was.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.curvature.layers import KroneckerLayer, find_layers
from curvlab.distributed import (
    MODES,
    BlockParallel,
    Communicator,
    Mode,
    SharedInverse,
    is_ddp,
    kronecker_cost,
)
from curvlab.linalg import all_finite
from curvlab.objective import (
    AutocastState,
    Objective,
    autocast_off,
    autocast_state,
    run_with_autocast,
)
from curvlab.optim.validation import check_choice

__all__ = [
    "DataParallelMixin",
    "GuardedStep",
    "LayerwiseOptimizer",
    "MomentumStyle",
    "full_precision",
    "require_objective",
    "sampler_snapshot",
]

MomentumStyle = Literal["heavy_ball", "ema"]
K = TypeVar("K", bound=Hashable)
D = TypeVar("D", bound="DataParallelMixin")


def require_objective(closure: Any, method: str) -> Objective:
    """The closure as an `Objective`, or a `TypeError` that says what to pass."""
    if isinstance(closure, Objective):
        return closure
    raise TypeError(
        f"{method}.step needs a curvlab.Objective(model, loss_fn, inputs, targets) as its "
        f"closure (it uses the model outputs and the loss's likelihood); got {type(closure)!r}"
    )


def _closure_with_autocast(closure: Callable[[], Any], state: AutocastState) -> Callable[[], Any]:
    """A plain closure that runs under the autocast ``state`` of the caller of ``step``."""

    @functools.wraps(closure)
    def run() -> Any:
        with run_with_autocast(state):
            return closure()

    return run


def full_precision(method: Callable[..., Any], *, closure: bool = False) -> Callable[..., Any]:
    """Wrap an optimizer method (``step``, ``warm_start``) so that its maths runs with
    autocast off.

    Outside ``torch.autocast`` this calls ``method`` unchanged. Inside, ``method`` runs with
    autocast disabled for cpu and cuda, and `GuardedStep.caller_autocast_state` gives the
    caller's state for the forward passes the method builds itself; a `curvlab.Objective`
    re-enters the state it recorded; with ``closure=True`` a plain closure (the first
    argument) is run under the caller's state. On exit the weight-cast cache is cleared (the
    method changed the parameters in place).
    """
    if getattr(method, "_full_precision", False):
        return method

    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = autocast_state()
        if not any(enabled for _, enabled, _ in state):
            return method(self, *args, **kwargs)
        if closure:
            if args and args[0] is not None and not isinstance(args[0], Objective):
                args = (_closure_with_autocast(args[0], state), *args[1:])
            given = kwargs.get("closure")
            if given is not None and not isinstance(given, Objective):
                kwargs["closure"] = _closure_with_autocast(given, state)
        previous = self.__dict__.get("_caller_autocast")
        self._caller_autocast = state
        try:
            with run_with_autocast(autocast_off(), clear_cache=False):
                return method(self, *args, **kwargs)
        finally:
            self._caller_autocast = previous
            torch.clear_autocast_cache()

    wrapped._full_precision = True  # type: ignore[attr-defined]
    return wrapped


def running_statistics(model: Any) -> tuple[tuple[Tensor, Tensor], ...]:
    """``(buffer, copy)`` of every running statistic a training forward pass of ``model``
    moves (BatchNorm / InstanceNorm with ``track_running_stats`` in training mode)."""
    if not isinstance(model, nn.Module):
        return ()
    return tuple(
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and module.training
        and module.track_running_stats
        for buffer in module.buffers(recurse=False)
    )


def sampler_snapshot(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``step`` so that, at the start of the outermost call, the state of the optimizer's
    label sampler (``self._generator``, if it has one) and the model's running statistics
    (`running_statistics`: small BatchNorm buffers) are copied, for `GuardedStep.skip_step` to
    put back: a skipped step (a NaN batch) must not advance the sampler nor leave NaN running
    statistics that would break evaluation later. The copies are attributes, never in
    ``state_dict``."""
    if getattr(step, "_sampler_snapshot", False):
        return step

    @functools.wraps(step)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_in_step", False):
            return step(self, *args, **kwargs)  # a nested call (super().step)
        generator = self.__dict__.get("_generator")
        closure = args[0] if args else kwargs.get("closure")
        model = self.__dict__.get("model", getattr(closure, "model", None))
        self._in_step = True
        self._sampler_at_step = None if generator is None else generator.get_state()
        self._statistics_at_step = running_statistics(model)
        try:
            return step(self, *args, **kwargs)
        finally:
            self._in_step = False
            self._sampler_at_step = None
            self._statistics_at_step = ()

    wrapped._sampler_snapshot = True  # type: ignore[attr-defined]
    return wrapped


class GuardedStep:
    """Mixin of every curvlab optimizer base; in one place, so that no algorithm file has to
    think about either:

    * ``step`` and ``warm_start`` of every subclass are wrapped by `full_precision`
      (mixed precision: the optimizer's maths with autocast off);
    * the sampler of labels / subsets (`new_sampler`) is saved and restored with the state;
    * ``step`` snapshots the label sampler's random state and the model's BatchNorm running
      statistics (`sampler_snapshot`), and `skip_step` puts them back, so that a skipped step
      leaves the sampler exactly as it was even if labels were already sampled, and no NaN
      batch leaves NaN running statistics behind.
    """

    last_step_info: dict[str, Any]

    _caller_autocast: AutocastState | None = None
    _sampler_at_step: Tensor | None = None
    _statistics_at_step: tuple[tuple[Tensor, Tensor], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("step", "warm_start"):
            method = cls.__dict__.get(name)
            if callable(method):
                if name == "step":
                    method = sampler_snapshot(full_precision(method, closure=True))
                else:
                    method = full_precision(method)
                setattr(cls, name, method)

    # ---------------------------------------------------------------- sampler
    @staticmethod
    def new_sampler(device: torch.device) -> torch.Generator:
        """The random generator of a method's sampled labels or subsets, seeded from the
        global RNG (so ``torch.manual_seed`` makes a run reproducible)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        return generator

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim` state plus the sampler's random state (methods that have one)."""
        generator = self.__dict__.get("_generator")
        if generator is not None:
            self.global_state["sampler_state"] = generator.get_state()  # type: ignore[attr-defined]
        return super().state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything saved by `state_dict`, the sampler included."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        generator = self.__dict__.get("_generator")
        sampler = self.global_state.get("sampler_state")  # type: ignore[attr-defined]
        if generator is not None and sampler is not None:
            # torch.optim casts state tensors to the parameter dtype; bytes survive exactly.
            generator.set_state(sampler.to(device="cpu", dtype=torch.uint8))

    def caller_autocast_state(self) -> AutocastState:
        """The autocast state of the caller of the running ``step`` / ``warm_start`` (for
        forward passes an optimizer builds itself), else the current state."""
        return autocast_state() if self._caller_autocast is None else self._caller_autocast

    def batch_objective(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        batch_average: bool,
    ) -> Objective:
        """An `Objective` for a pass the optimizer makes itself (a warm start's batches), in
        the caller's precision."""
        return Objective(
            model,
            loss_fn,
            inputs,
            targets,
            batch_average=batch_average,
            autocast=self.caller_autocast_state(),
        )

    def withhold_update(self) -> int:
        """Count an update withheld because a preconditioned direction was not finite
        (`DataParallelMixin.precondition_blocks`); returns the running count."""
        state: dict[str, Any] = self.global_state  # type: ignore[attr-defined]
        state["withheld_updates"] = state.get("withheld_updates", 0) + 1
        return int(state["withheld_updates"])

    def skip_step(self, loss: Tensor | None, reason: str) -> None:
        """Record a skipped step; parameters and curvature state stay untouched, and the
        label sampler and the model's running statistics are put back to their state at the
        start of the step."""
        self.restore_sampler()
        with torch.no_grad():
            for buffer, saved in self._statistics_at_step:
                buffer.copy_(saved)
        state: dict[str, Any] = self.global_state  # type: ignore[attr-defined]
        state["skipped_steps"] += 1
        self.last_step_info = {
            "skipped": True,
            "reason": reason,
            "loss": None if loss is None else float(loss),
            "skipped_steps": state["skipped_steps"],
        }

    def restore_sampler(self) -> None:
        """Put the label sampler back to its state at the start of this step (a skipped step
        must not advance it); a no-op outside a step or without a sampler."""
        generator = self.__dict__.get("_generator")
        if generator is not None and self._sampler_at_step is not None:
            generator.set_state(self._sampler_at_step)


class DataParallelMixin:
    """Data-parallel training of a block-diagonal optimizer on torch.distributed.

    Contract (`distribute`):

    * Every rank builds the same model and optimizer (same seed) and steps on its own shard
      of each global mini-batch; all ranks call `step` the same number of times and use the
      same layers in every step (as DDP without ``find_unused_parameters``).
    * The loss is the mean over ranks of the per-rank losses: with mean-reduced losses and
      equal shards that is the loss of the global batch, and one step equals the
      single-process step on the concatenated batch (up to round-off and sampled labels).
      ``step`` returns that mean loss.
    * A `DistributedDataParallel` model has its gradients averaged by DDP; for a plain
      per-rank model the optimizer averages them (``average_gradients``; default: when the
      model it was given is not DDP). Curvature statistics are always averaged by the
      optimizer: EMA'd factors (K-FAC, TSO-ALRA, K-BFGS-20's A) are kept per rank for the
      rank's shard and averaged right before each refresh (their mean is the global EMA),
      everything else when it is formed (`curvlab.distributed.BlockParallel`).
    * Each block's inverse or root is refreshed by exactly one owner rank, then shared
      according to ``mode``.
    * Sampled labels (true Fisher) come from each rank's own copy of the sampler, seeded
      alike: ranks draw from the same random stream for their different examples.
    * ``state_dict`` differs between ranks (the per-rank EMAs between refreshes, the
      ``refreshes`` counters of the work done here, in mode ``"preconditioned"`` the
      inverses of the rank's own blocks): save and load one state dict per rank. In mode
      ``"preconditioned"`` a resumed run recomputes the inverses at its first step (a rank
      knows only its own blocks' inverses, so all refresh).

    Example, under ``torchrun --nproc-per-node 4 train.py``::

        comm, device = curvlab.distributed.from_environment("cuda")  # NCCL, cuda:LOCAL_RANK
        torch.manual_seed(0)
        model = make_model().to(device)                # the same model on every rank
        opt = curvlab.KFAC(model, lr=0.3).distribute(comm)
        for x, y in loader:                            # this rank's shard of each batch
            opt.step(curvlab.Objective(model, loss_fn, x.to(device), y.to(device)))
    """

    #: How `curvlab bench --nproc` makes an optimizer data-parallel: ``"layer-wise"``
    #: (`distribute` with ``mode`` and ``average_gradients``; a DDP model is fine) or
    #: ``"model-wide"`` (`curvlab.optim.ModelwiseOptimizer.distribute`).
    data_parallel = "layer-wise"

    model: nn.Module
    param_groups: list[dict[str, Any]]
    _parallel: BlockParallel

    def block_costs(self) -> dict[Hashable, float]:
        """The refresh cost of every block, in block order (for the owner assignment)."""
        raise NotImplementedError

    @property
    def parallel(self) -> BlockParallel:
        """The data-parallel plan (a single-process plan until `distribute`)."""
        return self._parallel

    def distribute(
        self: D,
        communicator: Communicator | None = None,
        *,
        mode: Mode = "inverses",
        average_gradients: bool | None = None,
    ) -> D:
        """Train data-parallel over ``communicator``'s ranks; returns the optimizer.

        Args:
            communicator: a `curvlab.distributed.Communicator`; default: torch.distributed's
                default group (one process when none is initialised: nothing changes).
            mode: ``"inverses"`` (owners broadcast refreshed inverses; every rank keeps all
                of them: more memory, least communication) or ``"preconditioned"`` (inverses
                stay on their owners, which broadcast preconditioned gradients every step:
                least memory).
            average_gradients: whether the optimizer all-reduces the gradients; default: True
                unless the model given to the optimizer is a `DistributedDataParallel`.
        """
        comm = Communicator() if communicator is None else communicator
        check_choice("mode", mode, MODES)
        if average_gradients is None:
            average_gradients = not is_ddp(self.model)
        self._parallel = BlockParallel(
            comm, self.block_costs(), mode=mode, average_gradients=average_gradients
        )
        return self

    def owns(self, key: Hashable) -> bool:
        """Whether this rank refreshes block ``key`` (always in one process)."""
        return self._parallel.owns(key)

    def keeps_inverse(self, key: Hashable) -> bool:
        """Whether this rank holds block ``key``'s inverse (always in one process)."""
        return self._parallel.keeps_inverse(key)

    def inverse_ready(self, key: Hashable, here: bool) -> bool:
        """Whether block ``key`` has an inverse somewhere, the same answer on every rank;
        ``here``: whether this rank's state has one (the answer in one process)."""
        return self._parallel.inverse_ready(key, here)

    @overload
    def synchronize_gradients(self, loss: Tensor) -> Tensor: ...
    @overload
    def synchronize_gradients(self, loss: None) -> None: ...
    def synchronize_gradients(self, loss: Tensor | None) -> Tensor | None:
        """Right after the gradient pass: the mean loss over ranks, gradients averaged too
        for plain per-rank models (one bucketed all-reduce). One process: ``loss``."""
        grads = (p.grad for g in self.param_groups for p in g["params"] if p.grad is not None)
        return self._parallel.synchronize_gradients(loss, grads)

    def average_statistics(self, tensors: Sequence[Tensor]) -> None:
        """Mean over ranks of curvature statistics, in place (one bucketed call)."""
        self._parallel.average_statistics(tensors)

    def finite_everywhere(self, tensors: Sequence[Tensor]) -> bool:
        """`curvlab.linalg.all_finite` of this rank's ``tensors``, agreed by all ranks (a
        skip decision on statistics that each rank holds for its own shard)."""
        return self._parallel.finite_everywhere(tensors)

    def refresh_blocks(
        self,
        blocks: Sequence[tuple[K, SharedInverse, dict[str, Any]]],
        refresh: Callable[[K], bool],
    ) -> tuple[int, int]:
        """``refresh(key)`` on the owner of each block, shared as ``mode`` says; returns this
        rank's (successful, failed) refreshes. ``blocks`` must be the same on every rank."""
        return self._parallel.refresh(blocks, refresh)

    def precondition_blocks(
        self,
        entries: Iterable[tuple[K, Tensor]],
        precondition: Callable[[K, Tensor], Tensor],
        apply: Callable[[K, Tensor], None],
    ) -> bool:
        """``apply(key, precondition(key, V))`` per block (by its owner in mode
        ``"preconditioned"``, which broadcasts the result), once every direction is formed.

        Returns False and applies nothing when a direction is not finite — a finite gradient
        whose preconditioned direction overflows (e.g. entries ~1e37 under a 1/ε-scaled
        preconditioner) — so the parameters keep their values. Every rank holds the same
        directions, so every rank takes the same decision.
        """
        pending: list[tuple[K, Tensor]] = []
        self._parallel.precondition(entries, precondition, lambda k, d: pending.append((k, d)))
        if not all_finite([d for _, d in pending]):
            return False
        for key, direction in pending:
            apply(key, direction)
        return True


class LayerwiseOptimizer(GuardedStep, DataParallelMixin, Optimizer):
    """Block-diagonal preconditioning over the model's Linear/Conv2d layers.

    Args:
        model: the network; its supported layers are found by module type.
        defaults: hyperparameters (must include ``lr``, ``momentum``, ``weight_decay``).
        params: optional parameter groups (like any `torch.optim` optimizer) over the model's
            parameters; by default one group with every trainable parameter. A layer's weight
            and bias must share a group; parameters in no group are not trained.
        momentum_style: ``"heavy_ball"`` (thesis ch.3/ch.4) or ``"ema"`` (thesis ch.2).

    Data-parallel: `distribute` (see `DataParallelMixin`); block keys are layer names.
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
        self._generator = self.new_sampler(device)
        self.last_step_info: dict[str, Any] = {}
        self._parallel = BlockParallel.local()

    def block_costs(self) -> dict[Hashable, float]:
        """``d_a³ + d_out³`` per layer: one refresh of its two Kronecker factors."""
        return {n: kronecker_cost((la.d_a, la.d_out)) for n, la in self.layers.items()}

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

    # ------------------------------------------------------------------ guards
    def grads_finite(self) -> bool:
        """Whether every gradient is finite (one host sync)."""
        return all_finite(
            [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        )

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

    def precondition_and_apply(
        self,
        precondition: Callable[[str, Tensor], Tensor],
        fallback_group: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> bool:
        """Momentum on raw gradients, ``precondition(name, V)`` per layer, then the update.

        ``V`` is the layer's (momentum) gradient matrix (d_out, d_a) with the bias as last
        column. Layers without a gradient in this step are left alone; a missing bias gradient
        counts as zero. Fallback parameters take the momentum gradient as their direction,
        with the hyperparameters ``fallback_group(group)`` (default: the group's).
        In one process (and mode ``"inverses"``) layer by layer; in mode ``"preconditioned"``
        each layer's owner preconditions it (`precondition_blocks`).

        Returns whether the update was applied: False when a preconditioned direction is not
        finite, and then no parameter moves (the momentum and curvature state keep this
        step's batch; the caller reports the withheld update).
        """

        def momentum_matrices() -> Iterable[tuple[str, Tensor]]:
            for name, layer in self.layers.items():
                if layer.weight.grad is None:
                    continue
                group = self.group(name)
                bufs = [
                    self._momentum(p, p.grad if p.grad is not None else torch.zeros_like(p), group)
                    for p in layer.params
                ]
                yield name, layer.grad_matrix(bufs[0], bufs[1] if len(bufs) > 1 else None)

        return self.apply_preconditioned(momentum_matrices(), precondition, fallback_group)

    def apply_preconditioned(
        self,
        matrices: Iterable[tuple[str, Tensor]],
        precondition: Callable[[str, Tensor], Tensor],
        fallback_group: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> bool:
        """``precondition(name, V)`` for each layer's (momentum) gradient matrix ``V`` of
        ``matrices``, every direction checked before any is applied (`precondition_blocks`),
        then the fallback parameters (`apply_fallback`). Returns False, moving nothing, when a
        direction is not finite."""

        def apply(name: str, direction: Tensor) -> None:
            layer, group = self.layers[name], self.group(name)
            for p, d in zip(layer.params, layer.split(direction), strict=True):
                self._apply(p, d, group)

        if not self.precondition_blocks(matrices, precondition, apply):
            return False  # a non-finite direction: no parameter moves (`precondition_blocks`)
        self.apply_fallback(fallback_group)
        return True

    def apply_fallback(
        self, fallback_group: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        """The parameters outside supported layers (e.g. BatchNorm): the momentum gradient as
        their direction, with the hyperparameters ``fallback_group(group)`` (default: the
        group's)."""
        for p in self.fallback_params:
            if p.grad is None:
                continue
            group = self.param_groups[self._group_of[id(p)]]
            if fallback_group is not None:
                group = fallback_group(group)
            self._apply(p, self._momentum(p, p.grad, group), group)
