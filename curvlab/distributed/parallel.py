"""`BlockParallel`: the data-parallel plan of a block-diagonal optimizer.

A block-diagonal method (K-FAC, K-BFGS, TNT, Shampoo, TSO-ALRA) trained data-parallel does,
per step (the optimizer bases in `curvlab.optim` call these in this order):

1. average the loss and, for plain per-rank models, the gradients over ranks
   (with a `DistributedDataParallel` model DDP has averaged the gradients already);
2. curvature statistics: an exponential moving average of per-batch statistics that are
   means over examples (K-FAC's and TSO-ALRA's factors) is *linear* in the data, so every
   rank keeps the EMA of its own shard's statistics, and the mean over ranks of these local
   EMAs is the EMA of the global batch's. They are averaged — one bucketed all-reduce, every
   rank's copy replaced by the mean — only right before a refresh (every T steps), not at
   every update, so curvature traffic does not compete with the gradient all-reduce.
   Statistics that are not linear in the data are formed from averaged vectors instead
   (TNT's and Shampoo's contractions of the averaged gradient; K-BFGS's ā, D̄h and A s);
3. refresh each block's inverse / root on exactly one *owner* rank (`assign_owners`, on the
   blocks' ``Σ d_i³`` costs), then, depending on ``mode``:

   * ``"inverses"`` (memory-hungry, least communication): the owners broadcast the new
     inverses, every rank keeps every inverse and preconditions every block itself; the
     inverses travel only when they are refreshed (every T steps);
   * ``"preconditioned"`` (least memory): each inverse stays on its owner, which
     preconditions its blocks' gradients at every step and broadcasts the directions
     (gradient-sized traffic every step).

Both modes give the same parameters. Every decision that controls a collective or the
update (skip the step, refresh now, which blocks) is taken from values that are identical on
all ranks (the averaged loss and gradients, `finite_everywhere`), so ranks never disagree
about what to send and their parameters stay bit-identical.

Blocks exchange their inverses through three methods (`SharedInverse`), implemented by
the blocks of `curvlab.curvature.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import Tensor

from curvlab.distributed.assignment import assign_owners
from curvlab.distributed.comm import Communicator
from curvlab.linalg.checks import all_finite

__all__ = ["MODES", "BlockParallel", "Mode", "SharedInverse"]

Mode = Literal["inverses", "preconditioned"]
MODES: tuple[str, ...] = ("inverses", "preconditioned")
State = dict[str, Any]
K = TypeVar("K", bound=Hashable)


class SharedInverse(Protocol):
    """What a curvature block offers to have its statistics averaged before a refresh and
    its inverse sent from its owner to the others."""

    def local_statistics(self, state: State) -> list[Tensor]:
        """Statistics this rank accumulates from its shard alone (averaged before refresh)."""

    def inverse_tensors(self, state: State) -> list[Tensor] | None:
        """The inverse / root tensors in ``state``, or None when there are none yet."""

    def inverse_templates(self, state: State) -> list[Tensor]:
        """Tensors with the inverse tensors' shapes, dtypes and devices (the statistics)."""

    def load_inverse_tensors(self, state: State, tensors: list[Tensor]) -> None:
        """Store received inverse tensors in ``state``."""


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


class BlockParallel:
    """Owners, mode and collectives of one optimizer's data-parallel run.

    Args:
        communicator: the collectives (`Communicator`; one process: everything is local).
        costs: the cost of refreshing each block, in the optimizer's block order (the same
            on every rank).
        mode: ``"inverses"`` or ``"preconditioned"`` (module docstring).
        average_gradients: whether the optimizer averages the gradients itself (plain
            per-rank models); False when DDP has done it.
    """

    def __init__(
        self,
        communicator: Communicator,
        costs: Mapping[Hashable, float],
        *,
        mode: Mode = "inverses",
        average_gradients: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.communicator = communicator
        self.mode: Mode = mode
        self.average_gradients = bool(average_gradients)
        keys = list(costs)
        owners = assign_owners([costs[k] for k in keys], communicator.world_size)
        self.owners: dict[Hashable, int] = dict(zip(keys, owners, strict=True))
        #: Mode "preconditioned": the blocks whose owner holds an inverse (known to all).
        self.ready: set[Hashable] = set()

    @classmethod
    def local(cls) -> BlockParallel:
        """The plan of a single-process run: every block is local, nothing is sent."""
        return cls(Communicator.local(), {})

    # -------------------------------------------------------------- queries
    @property
    def is_distributed(self) -> bool:
        return self.communicator.is_distributed

    @property
    def shares_directions(self) -> bool:
        """Whether owners broadcast preconditioned gradients (mode ``"preconditioned"``)."""
        return self.is_distributed and self.mode == "preconditioned"

    def owner(self, key: Hashable) -> int:
        """The rank that refreshes block ``key`` (one process: this one)."""
        if key in self.owners:
            return self.owners[key]
        if not self.is_distributed:
            return self.communicator.rank
        raise KeyError(f"block {key!r} is not in the data-parallel plan (made by distribute())")

    def owns(self, key: Hashable) -> bool:
        """Whether this rank refreshes block ``key``."""
        return self.owner(key) == self.communicator.rank

    def keeps_inverse(self, key: Hashable) -> bool:
        """Whether this rank holds block ``key``'s inverse (all blocks in mode ``inverses``)."""
        return not self.shares_directions or self.owns(key)

    def inverse_ready(self, key: Hashable, here: bool) -> bool:
        """Whether block ``key`` has an inverse to precondition with, the same answer on every
        rank: ``here`` (this rank's state) unless inverses stay on their owners, where it is
        what the owner reported at its last refresh (a resumed run starts from none)."""
        return key in self.ready if self.shares_directions else here

    def owned(self) -> list[Hashable]:
        """The blocks this rank owns."""
        return [k for k, r in self.owners.items() if r == self.communicator.rank]

    # ------------------------------------------------------------ collectives
    def synchronize_gradients(self, loss: Tensor | None, grads: Iterable[Tensor]) -> Tensor | None:
        """Average the loss (always) and ``grads`` (when ``average_gradients``) over ranks in
        one bucketed all-reduce; returns the mean loss. One process: returns ``loss``."""
        if not self.is_distributed:
            return loss
        if self.average_gradients:
            return self.communicator.mean_loss(loss, list(grads), "gradients")
        return self.communicator.mean_loss(loss, [], "loss")

    def average_statistics(self, tensors: Sequence[Tensor]) -> None:
        """Mean over ranks of curvature statistics, in place, in one bucketed all-reduce."""
        self.communicator.all_reduce_mean(tensors, kind="statistics")

    def finite_everywhere(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` are finite on every rank (one host sync; distributed: one
        tiny all-reduce), so that all ranks take the same skip decision."""
        ok = all_finite(list(tensors))
        if not self.is_distributed:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.communicator.device)
        self.communicator.all_reduce_sum([flag], kind="control")
        return float(flag) == 0.0

    def refresh(
        self,
        blocks: Sequence[tuple[K, SharedInverse, State]],
        refresh: Callable[[K], bool],
    ) -> tuple[int, int]:
        """Average the blocks' local statistics over ranks (one bucketed all-reduce), then
        ``refresh(key)`` for the blocks this rank owns; in mode ``"inverses"`` the owners then
        broadcast the results. Returns this rank's (successful, failed) refreshes.

        ``blocks`` must list the same keys in the same order on every rank (decide them
        with `inverse_ready`, not with this rank's state). A block whose owner has no inverse
        (its first refresh failed) is left without one everywhere.
        """
        if self.is_distributed and blocks:
            # The local EMAs' mean over ranks is the global EMA: every rank takes it.
            local = [t for _, block, state in blocks for t in block.local_statistics(state)]
            self.average_statistics(local)
        ok = failed = 0
        for key, _, _ in blocks:
            if self.owns(key):
                if refresh(key):
                    ok += 1
                else:
                    failed += 1
        if self.is_distributed and blocks:
            if self.mode == "inverses":
                self._share_inverses(blocks)
            else:
                self._share_readiness(blocks)
        return ok, failed

    def _share_readiness(self, blocks: Sequence[tuple[Hashable, SharedInverse, State]]) -> None:
        """Mode "preconditioned": which of ``blocks`` have an inverse on their owner (one tiny
        all-reduce), so that every rank takes the same decisions that depend on it."""
        rank = self.communicator.rank
        flags = torch.tensor(
            [
                1.0 if self.owner(key) == rank and block.inverse_tensors(state) is not None else 0.0
                for key, block, state in blocks
            ],
            device=self.communicator.device,
        )
        self.communicator.all_reduce_sum([flags], kind="control")
        for (key, _, _), present in zip(blocks, flags.tolist(), strict=True):
            if present > 0:
                self.ready.add(key)

    def _share_inverses(self, blocks: Sequence[tuple[Hashable, SharedInverse, State]]) -> None:
        rank = self.communicator.rank
        by_rank: list[list[Tensor]] = [[] for _ in range(self.communicator.world_size)]
        received: list[tuple[SharedInverse, State, Tensor, list[Tensor]]] = []
        for key, block, state in blocks:
            src = self.owner(key)
            templates = block.inverse_templates(state)
            ref = templates[0]
            if src == rank:
                inverse = block.inverse_tensors(state)
                flag = ref.new_full((1,), 0.0 if inverse is None else 1.0)
                if inverse is not None:
                    # Every rank preconditions with the same memory layout (a matrix product
                    # can round differently for another layout): contiguous everywhere.
                    inverse = [t.contiguous() for t in inverse]
                    block.load_inverse_tensors(state, inverse)
                tensors = inverse or [_contiguous_like(t) for t in templates]
            else:
                flag = ref.new_empty(1)
                tensors = [_contiguous_like(t) for t in templates]
                received.append((block, state, flag, tensors))
            by_rank[src].extend([flag, *tensors])
        self.communicator.broadcast_from_owners(by_rank, kind="inverses")
        if not received:
            return
        flags = torch.cat([flag for _, _, flag, _ in received]).tolist()  # one host sync
        for (block, state, _, tensors), present in zip(received, flags, strict=True):
            if present > 0:
                block.load_inverse_tensors(state, tensors)

    def precondition(
        self,
        entries: Iterable[tuple[K, Tensor]],
        precondition: Callable[[K, Tensor], Tensor],
        apply: Callable[[K, Tensor], None],
    ) -> None:
        """``apply(key, precondition(key, V))`` for every ``(key, V)``.

        One process and mode ``"inverses"``: block by block, as the entries come. Mode
        ``"preconditioned"``: the owner of each block preconditions it and broadcasts the
        direction (one bucketed broadcast per rank), then every rank applies every block.
        """
        if not self.shares_directions:
            for key, V in entries:
                apply(key, precondition(key, V))
            return
        items = list(entries)
        rank = self.communicator.rank
        by_rank: list[list[Tensor]] = [[] for _ in range(self.communicator.world_size)]
        directions: list[Tensor] = []
        for key, V in items:
            src = self.owner(key)
            direction = precondition(key, V) if src == rank else torch.empty_like(V)
            by_rank[src].append(direction)
            directions.append(direction)
        self.communicator.broadcast_from_owners(by_rank, kind="preconditioned")
        for (key, _), direction in zip(items, directions, strict=True):
            apply(key, direction)
