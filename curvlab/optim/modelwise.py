"""`ModelwiseOptimizer`: one subproblem over all parameters, then step control.

The base owns the order of a model-wide step; a method supplies `propose` (curvature
operator + subproblem solve) and, if it uses a model of the loss, `control` (accept or
reject, adapt the radius / σ / LM damping from the reduction ratio ρ)::

    loss, g = evaluate(objective)              # loss and flat gradient on the mini-batch
    s, predicted = propose(objective, loss, g)  # e.g. Steihaug-CG, cubic, MINRES, SMW
    trial = objective.loss_at(θ + t)            # t = s, or the proposal's trial_step
    ρ = (loss − trial) / predicted              # predicted = m(0) − m(t); control.reduction_ratio
    if control(ρ, ...): θ ← θ + s               # a rejected step leaves θ exactly as it was

Non-finite losses, gradients or proposals skip the step (reported in ``last_step_info``), and
so does a `SkipStep` raised by a hook (e.g. a failed decomposition), with its reason.
`evaluate` runs the closure by default; a method that builds a curvature operator can override
it to take the loss and gradient from the operator's own pass, so one step costs one gradient
plus the products (then ``.grad`` is not filled). The operator's passes are functional: they
leave the global RNG where it was (every step would see the same masks), so such an override
keeps the closure for a model whose training pass draws random numbers (`has_random_forward`:
dropout; see below for the masks of the later passes); they move no BatchNorm
running statistics except in that build, which then stands for the training pass
(``update_buffers=True``: the running statistics move once per step, as with the closure).
A method whose ratio is measured at a point other than the step (thesis Alg 23: ρ at p_t, step
α p_t) gives that point as ``Proposal.trial_step``.

Random training passes (dropout, `has_random_forward`): L(θ) and L(θ + s) of ρ are two draws of
the random network unless both see the same masks, and then ρ is noise (measured, seed 002's
ellipsoidal TR with Δ = 1e-4 on a tiny MLP with ``Dropout(0.5)``: ρ = 184, −72, 691, 111, 93
where the same model without dropout gives 1 at every step). So the step snapshots the global
RNG (CPU and the parameters' CUDA device) right before `evaluate`, whose pass draws this step's
masks, and every later pass of the step at the same batch replays that snapshot
(`ModelwiseOptimizer.step_randomness`): the curvature operator's build (hence all its
products, which replay the build's state) and the trial loss of ρ, so that g, B and both losses
of ρ belong to one sampled network, and a tiny step gives ρ ≈ 1 as without dropout. The replays
leave the global RNG where the gradient pass left it (one set of masks drawn per step). A model
without random modules is not touched: no RNG state is read or set. A pass on another batch (a
curvature subset S2 ⊂ S1) replays the same state but draws masks of its own shape.

A non-finite trial loss counts as ρ = −∞: the step is rejected and `control` shrinks; so does a
predicted reduction ≤ −1e-15, a model that promises no decrease, where the papers divide
whatever the sign (a deviation: docs/deviations.md, "A model that predicts no decrease";
`curvlab.optim.control.reduction_ratio`). A |predicted| below 1e-15 (round-off) or None gives
ρ = 1 unless the loss went up.

Global state (radius, σ, λ, counters) lives in ``global_state`` so ``state_dict`` has it.

Data-parallel (`ModelwiseOptimizer.distribute`): each rank evaluates its shard of the global
mini-batch, and the three data-dependent quantities of a step are averaged over ranks where
they are formed — the loss and flat gradient after `evaluate` (one all-reduce), every
curvature product (one all-reduce per product, through the operator's ``reduce`` hook; so a
CG or MINRES iteration costs one gradient-sized all-reduce) and the trial loss of ρ (one
scalar). With mean-reduced losses and equal shards these are the global batch's values, and
everything after them (solver iterates, ρ, accept/reject, radius) is computed from identical
numbers on every rank: parameters stay identical without a broadcast.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.autodiff import CurvatureOperator, curvature_operator
from curvlab.autodiff.functional import RngState, capture_rng, replayed_rng
from curvlab.distributed import Communicator, is_ddp
from curvlab.objective import Objective
from curvlab.optim.control import reduction_ratio
from curvlab.optim.guard import SampledLabels, StepGuard, require_objective, step_guard, watch

__all__ = [
    "ModelwiseOptimizer",
    "Proposal",
    "SkipStep",
    "has_random_forward",
    "has_stateful_forward",
]

M = TypeVar("M", bound="ModelwiseOptimizer")


class SkipStep(Exception):
    """Raised by a hook (`evaluate`, `propose`) to skip this step: nothing changes, the reason is
    reported in ``last_step_info``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def has_random_forward(model: nn.Module) -> bool:
    """Whether a training forward pass of ``model`` draws random numbers: a module in training
    mode that is dropout with p > 0 or RReLU. A method that takes its loss and gradient from a
    functional curvature-operator pass keeps the closure for such a model (the operator's
    passes replay one RNG state of their own). Randomness inside a custom ``forward`` (e.g.
    ``F.dropout``) is not detected."""
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if isinstance(module, nn.RReLU):
            return True
    return False


def has_stateful_forward(model: nn.Module) -> bool:
    """Whether a training forward pass of ``model`` changes state besides computing outputs.

    True when a module in training mode owns buffers (BatchNorm / InstanceNorm running
    statistics, moved by a training pass) or draws random numbers (dropout with p > 0, RReLU).
    A functional curvature-operator pass does neither by default; buffers it can move once
    (``update_buffers``), randomness it cannot share (`has_random_forward`). Randomness inside
    a custom ``forward`` (e.g. ``F.dropout``) is not detected.
    """
    if has_random_forward(model):
        return True
    return any(
        module.training and next(module.buffers(recurse=False), None) is not None
        for module in model.modules()
    )


@dataclass(frozen=True)
class Proposal:
    """A candidate step: the flat direction s and the model's predicted reduction.

    ``trial_step``: where the trial loss of ρ is taken, if not at ``step`` (then
    ``predicted_reduction`` is the model's reduction at that point).
    """

    step: Tensor
    predicted_reduction: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    trial_step: Tensor | None = None


class ModelwiseOptimizer(SampledLabels, Optimizer, ABC):
    """Base of the model-wide methods (one parameter group: the step is one flat vector).

    ``params`` is a model (its trainable parameters) or an iterable of parameters / one group.
    Data-parallel: `distribute` (module docstring).
    """

    #: `curvlab bench --nproc`: `distribute(comm)` only (no DDP model, no inverse modes);
    #: see `curvlab.optim.base.DataParallelMixin.data_parallel`.
    data_parallel = "model-wide"

    def __init__(self, params: Iterable[Any] | nn.Module, defaults: dict[str, Any]) -> None:
        if isinstance(params, nn.Module):  # a model stands for its trainable parameters
            params = [p for p in params.parameters() if p.requires_grad]
            if not params:
                raise ValueError("model: it has no trainable parameters")
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                f"params: {type(self).__name__} solves one subproblem over all parameters and "
                "supports exactly one parameter group"
            )
        self.last_step_info: dict[str, Any] = {}
        self._comm = Communicator.local()
        self._step_rng: RngState | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Every attribute, so that ``copy.deepcopy`` and ``pickle`` give a working optimizer
        (torch.optim keeps only ``defaults``, ``state`` and ``param_groups``)."""
        return dict(self.__dict__)

    def entry_points(self) -> frozenset[str]:
        """Only a `curvlab.Objective`: curvature products and trial losses on the step's batch."""
        return frozenset({"objective"})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only at construction: the step is one subproblem over one group's parameters."""
        if self.param_groups:
            raise ValueError(
                f"params: {type(self).__name__} solves one subproblem over the parameters of "
                "one parameter group; build it again over the new set of parameters instead"
            )
        super().add_param_group(param_group)

    @property
    def params(self) -> list[Tensor]:
        return list(self.param_groups[0]["params"])

    @property
    def global_state(self) -> dict[str, Any]:
        """Method-wide state (radius, σ, λ, counters), kept in ``state_dict``."""
        state: dict[str, Any] = self.state[self.params[0]]
        state.setdefault("global_step", 0)
        state.setdefault("skipped_steps", 0)
        state.setdefault("rejected_steps", 0)
        return state

    # ----------------------------------------------------------------- vectors
    def flat_grad(self) -> Tensor:
        """The gradient of every parameter as one vector (zeros where grad is None)."""
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params
            ]
        )

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into tensors shaped like the parameters."""
        out, offset = [], 0
        for p in self.params:
            out.append(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def trial_parameters(self, objective: Objective, step: Tensor) -> dict[str, Tensor]:
        """The model's named parameters with ``step`` added to the optimized ones."""
        moved = {id(p): p + d for p, d in zip(self.params, self.unflatten(step), strict=True)}
        return {n: moved.get(id(p), p) for n, p in objective.model.named_parameters()}

    # ---------------------------------------------------------- data-parallel
    @property
    def communicator(self) -> Communicator:
        """The ranks this optimizer averages over (one process until `distribute`)."""
        return self._comm

    def distribute(self: M, communicator: Communicator | None = None) -> M:
        """Train data-parallel over ``communicator``'s ranks; returns the optimizer.

        Every rank builds the same model (same seed; a plain per-rank model, not a
        `DistributedDataParallel` one: the optimizer averages the gradient itself) and the
        same optimizer, and steps on its own shard of each global mini-batch. The loss,
        gradient, curvature products and trial losses are averaged over ranks (module
        docstring), so one step equals the single-process step on the concatenated batch
        for mean-reduced losses and equal shards (up to round-off; sampled labels and
        sampled curvature subsets come from each rank's own copy of the sampler).
        ``last_step_info`` and the returned loss are the averaged values.

        Args:
            communicator: a `curvlab.distributed.Communicator`; default: torch.distributed's
                default group (one process when none is initialised: nothing changes).

        Raises:
            ValueError: the method or its configuration has no data-parallel form
                (`check_data_parallel`).
        """
        self.check_data_parallel()
        self._comm = Communicator() if communicator is None else communicator
        return self

    def check_data_parallel(self) -> None:
        """Raise ``ValueError`` if this configuration cannot be averaged over ranks (a method
        whose subproblem couples the examples of different ranks). Default: it can."""

    def step_randomness(self) -> AbstractContextManager[None]:
        """Run the body with the random numbers of this step's gradient pass (module
        docstring): for a model with a random training pass (dropout), the global RNG state
        taken right before `evaluate` is replayed, and the global RNG is left as it was; for
        any other model (or outside a step) nothing is done."""
        return nullcontext() if self._step_rng is None else replayed_rng(self._step_rng)

    def curvature_operator(
        self, objective: Objective, kind: str, **kwargs: Any
    ) -> CurvatureOperator:
        """`curvlab.autodiff.curvature_operator` over this optimizer's parameters; in a
        data-parallel run each of its products is averaged over ranks. Built under
        `step_randomness`, so with dropout its passes use the masks of the step's gradient."""
        with self.step_randomness():
            operator = curvature_operator(objective, self.params, kind, **kwargs)
        if self._comm.is_distributed:
            operator.reduce = self._mean_product
        return operator

    def _mean_product(self, product: Tensor) -> None:
        self._comm.all_reduce_mean([product], kind="products")

    def synchronize_gradients(self, loss: Tensor | None) -> Tensor | None:
        """The mean loss over ranks, and every ``.grad`` averaged in place (one bucketed
        all-reduce); for a first-order stage that follows this one (`HybridTRSGD`)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return self._comm.mean_loss(loss, grads, "gradients")

    def _mean_loss_and_gradient(self, loss: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, g) averaged over ranks in one all-reduce (one process: unchanged)."""
        if not self._comm.is_distributed:
            return loss, grad
        packed = torch.cat([grad.reshape(-1), loss.detach().reshape(1).to(grad.dtype)])
        self._comm.all_reduce_mean([packed], kind="gradients")
        return packed[-1].to(loss.dtype), packed[:-1]

    def _mean_trial_loss(self, trial: Tensor) -> float:
        """The trial loss of ρ, averaged over ranks."""
        if self._comm.is_distributed:
            trial = trial.detach().reshape(1).to(torch.float64, copy=True)
            self._comm.all_reduce_mean([trial], kind="loss")
        return float(trial)

    # -------------------------------------------------------------------- hooks
    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Loss and flat gradient at the current parameters. Default: the closure (fills
        ``.grad``); override to take them from a pass the method makes anyway."""
        with torch.enable_grad():
            loss = objective()
        return loss, self.flat_grad()

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Validate ``group`` on every step (hyperparameters may be changed by schedulers)."""

    @abstractmethod
    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Build and solve the subproblem at the current parameters."""

    def control(self, rho: float, proposal: Proposal) -> bool:
        """Accept (True) or reject the proposal; adapt the step control. Default: accept."""
        return True

    @property
    def uses_trial_loss(self) -> bool:
        """Whether `step` evaluates the trial loss (methods with a model of the loss do)."""
        return False

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One model-wide step on the objective's mini-batch (see the module docstring)."""
        with step_guard(self, closure) as guard:
            try:
                return self._step(require_objective(closure, type(self).__name__), guard)
            finally:
                self._step_rng = None
                self.end_step()

    def end_step(self) -> None:
        """Drop what one step keeps (e.g. an operator: no autograd graph outlives the step)."""

    def _step(self, objective: Objective, guard: StepGuard) -> Tensor:
        self.check_hyperparameters(self.param_groups[0])
        state = self.global_state
        if self._comm.is_distributed and is_ddp(objective.model):
            raise ValueError(
                f"model: {type(self).__name__} averages gradients and curvature products over "
                "ranks itself; give it the plain per-rank model, not a DistributedDataParallel"
            )
        # The masks of this step (module docstring): the state `evaluate`'s pass draws from.
        if has_random_forward(objective.model):
            self._step_rng = capture_rng(self.params[0].device)
        loss, grad = self._mean_loss_and_gradient(*self.evaluate(objective))
        if not torch.isfinite(loss) or not bool(torch.isfinite(grad).all()):
            return self._skip(guard, loss, "non-finite loss or gradient")
        try:
            proposal = self.propose(objective, loss, grad)
        except SkipStep as skip:
            return self._skip(guard, loss, skip.reason)
        if not bool(torch.isfinite(proposal.step).all()):
            return self._skip(guard, loss, "non-finite proposal")
        rho = math.nan
        trial = None
        if self.uses_trial_loss:
            point = proposal.step if proposal.trial_step is None else proposal.trial_step
            with self.step_randomness():  # L(θ + s) with the masks of L(θ)
                trial_loss = objective.loss_at(self.trial_parameters(objective, point))
            trial = self._mean_trial_loss(trial_loss)
            # ρ with the guards of `control.reduction_ratio`: round-off, and a model that
            # predicts no decrease (a deviation: docs/deviations.md)
            rho = reduction_ratio(float(loss) - trial, proposal.predicted_reduction)
        accepted = self.control(rho, proposal)
        if accepted:
            for p, d in zip(self.params, self.unflatten(proposal.step), strict=True):
                p.add_(d)
        else:
            state["rejected_steps"] += 1
        state["global_step"] += 1
        self.last_step_info = {
            "skipped": False,
            "loss": float(loss),
            "trial_loss": trial,
            "rho": rho,
            "accepted": accepted,
            "step_norm": float(proposal.step.norm()),
            **proposal.info,
        }
        watch(self, loss)
        return loss

    def _skip(self, guard: StepGuard, loss: Tensor, reason: str) -> Tensor:
        guard.skip(loss, reason)  # restores a method's own sampler (SMW, HF subsets)
        return loss
