"""`Communicator`: the collective operations of a data-parallel run, counted and guarded.

Every method is a no-op in one process (no process group, or a group of one rank), so an
optimizer calls them unconditionally and a single-process run does exactly what it did
before. In a distributed run:

* lists of tensors are *bucketed*: tensors of one dtype and device are copied into one flat
  buffer of at most ``bucket_bytes`` (default 25 MiB, as DDP), so a call with the statistics
  of every layer is one collective, not one per tensor (`plan_buckets`);
* every collective is counted in `CommStats` by *kind* (``"gradients"``, ``"statistics"``,
  ``"inverses"``, ``"preconditioned"``, ...) with its payload bytes: the size of the buffer a
  rank hands to the collective. A ring all-reduce moves about 2(N−1)/N times that per rank,
  a broadcast about once;
* a failing collective (another rank raised and its process ended, or did not reach the
  collective within the process group's timeout) raises `DistributedError` naming this rank,
  the operation, what it carried and the timeout, instead of an opaque backend error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "CommStats",
    "Communicator",
    "DistributedError",
    "plan_buckets",
]

#: Largest flat buffer of one collective call (DDP's default bucket size).
DEFAULT_BUCKET_BYTES = 25 * 2**20

_CPU = torch.device("cpu")

#: The timeout given to `curvlab.distributed.init_process_group` (for error messages).
_timeouts: dict[int, float] = {}


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped (raised, crashed) or timed out."""


@dataclass
class CommStats:
    """Collective calls and payload bytes per kind, since creation or the last `reset`."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        """Count one collective of ``nbytes`` payload bytes."""
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def copy(self) -> CommStats:
        return CommStats(dict(self.calls), dict(self.bytes))

    def since(self, earlier: CommStats) -> CommStats:
        """What was counted after the snapshot ``earlier`` (a `copy`)."""
        kinds = [k for k in sorted(self.calls) if self.calls[k] != earlier.calls.get(k, 0)]
        return CommStats(
            {k: self.calls[k] - earlier.calls.get(k, 0) for k in kinds},
            {k: self.bytes.get(k, 0) - earlier.bytes.get(k, 0) for k in kinds},
        )

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes.get(k, 0)} for k in self.calls}


def plan_buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets: one dtype and device per bucket, at most
    ``bucket_bytes`` each (a larger tensor gets a bucket of its own), in first-seen order."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be positive, got {bucket_bytes}")
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for index, t in enumerate(tensors):
        key = (t.dtype, t.device)
        size = t.numel() * t.element_size()
        members, used = open_buckets.get(key, ([], 0))
        if members and used + size > bucket_bytes:
            done.append(members)
            members, used = [], 0
        open_buckets[key] = ([*members, index], used + size)
    done.extend(members for members, _ in open_buckets.values() if members)
    return sorted(done, key=lambda b: b[0])


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class Communicator:
    """Bucketed, counted collectives over a process group; no-ops in one process.

    Args:
        group: a `torch.distributed` process group; ``None`` is the default group when one is
            initialised, and a single process otherwise.
        bucket_bytes: largest flat buffer per collective call.

    Attributes:
        rank, world_size: this process's rank in ``group`` and the group's size (0 and 1 in
            one process).
        device: where the backend wants small control tensors (this rank's GPU for NCCL).
        stats: `CommStats` of every collective made through this communicator.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if group is not None and not initialised:
            raise ValueError("group: torch.distributed is not initialised")
        plan_buckets([], bucket_bytes)  # validates bucket_bytes
        self.group = group
        self.bucket_bytes = int(bucket_bytes)
        self.rank = dist.get_rank(group) if initialised else 0
        self.world_size = dist.get_world_size(group) if initialised else 1
        nccl = initialised and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else _CPU
        self.stats = CommStats()

    @classmethod
    def local(cls) -> Communicator:
        """A communicator of one process, whatever torch.distributed's state."""
        comm = cls.__new__(cls)
        comm.group = None
        comm.bucket_bytes = DEFAULT_BUCKET_BYTES
        comm.rank, comm.world_size = 0, 1
        comm.device = _CPU
        comm.stats = CommStats()
        return comm

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one rank (otherwise every collective is a no-op)."""
        return self.world_size > 1

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of ``group_rank`` in this communicator's group."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    # ------------------------------------------------------------- collectives
    def all_reduce_mean(self, tensors: Sequence[Tensor], kind: str) -> None:
        """Replace every tensor by its mean over ranks, in place, in as few calls as the
        buckets allow. The list must name tensors of the same shapes in the same order on
        every rank."""
        if not self.is_distributed or not tensors:
            return
        for bucket in plan_buckets(tensors, self.bucket_bytes):
            members = [tensors[i] for i in bucket]
            flat = _flatten(members)
            self._run("all_reduce", kind, flat)
            flat.div_(self.world_size)
            _unflatten_into(flat, members)

    def mean_loss(self, loss: Tensor | None, tensors: Sequence[Tensor], kind: str) -> Tensor | None:
        """The mean of ``loss`` over ranks, with ``tensors`` averaged in place in the same
        bucketed all-reduce; returns the mean loss (``loss`` itself in one process)."""
        if not self.is_distributed:
            return loss
        mean = None if loss is None else torch.as_tensor(loss).detach().reshape(1).clone()
        self.all_reduce_mean([*([] if mean is None else [mean]), *tensors], kind)
        return None if mean is None else mean.reshape(())

    def all_reduce_sum(self, tensors: Sequence[Tensor], kind: str) -> None:
        """Replace every tensor by its sum over ranks, in place (bucketed as the mean)."""
        if not self.is_distributed or not tensors:
            return
        for bucket in plan_buckets(tensors, self.bucket_bytes):
            members = [tensors[i] for i in bucket]
            flat = _flatten(members)
            self._run("all_reduce", kind, flat)
            _unflatten_into(flat, members)

    def broadcast_from_owners(self, tensors_by_rank: Sequence[Sequence[Tensor]], kind: str) -> None:
        """Rank r's tensors ``tensors_by_rank[r]`` reach every rank, in place: on rank r they
        are the data, on the others buffers of the same shapes and dtypes that get filled.
        One bucketed broadcast per rank that has something to send."""
        if not self.is_distributed:
            return
        if len(tensors_by_rank) != self.world_size:
            raise ValueError(
                f"tensors_by_rank: expected {self.world_size} lists (one per rank), "
                f"got {len(tensors_by_rank)}"
            )
        for src, tensors in enumerate(tensors_by_rank):
            if not tensors:
                continue
            root = self.global_rank(src)
            for bucket in plan_buckets(tensors, self.bucket_bytes):
                members = [tensors[i] for i in bucket]
                if src == self.rank:
                    flat = _flatten(members)
                else:
                    numel = sum(t.numel() for t in members)
                    flat = members[0].new_empty(numel)
                self._run("broadcast", kind, flat, root)
                if src != self.rank:
                    _unflatten_into(flat, members)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.is_distributed:
            self._run("barrier", "control", None)

    # ---------------------------------------------------------------- guard
    def _run(self, op: str, kind: str, buffer: Tensor | None, root: int = 0) -> None:
        nbytes = 0 if buffer is None else buffer.numel() * buffer.element_size()
        try:
            if buffer is None:
                dist.barrier(group=self.group)
            elif op == "broadcast":
                dist.broadcast(buffer, root, group=self.group)
            else:
                dist.all_reduce(buffer, group=self.group)
        except Exception as err:  # backend errors: RuntimeError, DistBackendError, ...
            timeout = _timeouts.get(id(self.group) if self.group is not None else 0)
            waited = f" within the timeout of {timeout:g} s" if timeout is not None else ""
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {op} of {kind} ({nbytes} bytes) "
                f"failed: another rank has stopped (raised an exception or crashed; see its "
                f"error) or did not reach this collective{waited}. Backend error: {err}"
            ) from err
        self.stats.record(kind, nbytes)
