"""`DataParallelBlocks`: data-parallel training of a block-diagonal optimizer.

`curvlab.optim.base.BlockOptimizer` inherits it. ``opt.distribute(communicator)`` makes the
same optimizer run on several ranks of torch.distributed; the step calls these hooks, each a
no-op in one process: `synchronize_gradients` after the gradient pass, `average_statistics`
on statistics that must be global at once (K-BFGS's vectors; TNT's sampled gradient),
`finite_everywhere` for skip decisions on per-rank statistics, `refresh_blocks` for the
inverses or roots (the blocks' EMA'd statistics are averaged first, then each block is
refreshed on its owner rank) and `precondition_blocks`. The collectives themselves live in
`curvlab.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar, overload

from torch import Tensor, nn

from curvlab.distributed import MODES, BlockParallel, Communicator, Mode, SharedInverse, is_ddp
from curvlab.linalg import all_finite
from curvlab.optim.validation import check_choice

__all__ = ["DataParallelBlocks"]

K = TypeVar("K", bound=Hashable)
D = TypeVar("D", bound="DataParallelBlocks")


class DataParallelBlocks:
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
