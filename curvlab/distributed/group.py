"""Process-group helpers: start and stop torch.distributed with timeouts, DDP glue.

* `init_process_group`: gloo for CPU, NCCL for CUDA, always with a timeout (default 300 s),
  so that a rank waiting for a rank that died fails instead of hanging;
* `from_environment`: the same from torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
  ``MASTER_ADDR`` / ``MASTER_PORT`` environment;
* `free_port`: a free TCP port on the loopback interface (local multi-process runs, tests);
* `is_ddp`, `wrap_ddp`: recognise a `DistributedDataParallel` model; wrap one with a
  gradient all-reduce hook that counts its bytes in a `Communicator` (DDP's own averaging,
  unchanged, just counted).
"""

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from curvlab.distributed.comm import Communicator, _timeouts

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "default_backend",
    "destroy_process_group",
    "free_port",
    "from_environment",
    "in_torchrun",
    "init_process_group",
    "is_ddp",
    "wrap_ddp",
]

#: Collective timeout of the process groups started here, in seconds.
DEFAULT_TIMEOUT_S = 300.0


def default_backend(device: str | torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_process_group(
    rank: int,
    world_size: int,
    *,
    backend: str = "gloo",
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | None = None,
) -> Communicator:
    """Start the default process group and return its `Communicator`.

    Args:
        rank, world_size: this process's rank and the number of processes.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
        init_method: e.g. ``"tcp://127.0.0.1:29500"``; default ``"env://"`` (MASTER_ADDR,
            MASTER_PORT).
        timeout_s: how long a collective (and the rendezvous) waits for the other ranks
            before failing with an error (no hang).
        device: NCCL: this rank's GPU (set as the current device).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: must be positive, got {timeout_s}")
    if backend == "nccl" and device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _timeouts[0] = float(timeout_s)
    return Communicator()


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def from_environment(
    device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[Communicator, torch.device]:
    """Join the run torchrun started (``env://``) and return its communicator and this rank's
    device: ``cuda:LOCAL_RANK`` with NCCL when ``device`` is CUDA, the CPU with gloo
    otherwise."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    wanted = torch.device(device)
    dev = torch.device("cuda", local) if wanted.type == "cuda" else wanted
    backend = default_backend(dev)
    comm = init_process_group(
        rank, world, backend=backend, timeout_s=timeout_s, device=dev if backend == "nccl" else None
    )
    return comm, dev


def destroy_process_group() -> None:
    """Stop the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _timeouts.pop(0, None)


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in `DistributedDataParallel` (which averages gradients)."""
    return isinstance(model, DistributedDataParallel)


def _counting_allreduce(
    comm: Communicator, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DDP's default mean all-reduce, with its bytes counted.
    (This module does not postpone annotations: DDP checks these two.)"""
    buffer: Tensor = bucket.buffer()
    comm.stats.record("gradients", buffer.numel() * buffer.element_size())
    buffer.div_(comm.world_size)
    work = dist.all_reduce(buffer, group=comm.group, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model: nn.Module, comm: Communicator, **kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **kwargs)`` whose gradient all-reduce is counted in
    ``comm.stats`` under ``"gradients"``."""
    ddp = DistributedDataParallel(model, process_group=comm.group, **kwargs)
    ddp.register_comm_hook(comm, _counting_allreduce)
    return ddp
