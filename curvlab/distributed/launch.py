"""Start data-parallel runs: N local processes on the loopback interface, or torchrun.

`spawn` runs ``fn(communicator, *args)`` in ``nprocs`` fresh processes joined by a gloo
process group on 127.0.0.1 (a free port), and returns every rank's result. It never hangs:

* the collectives have a timeout (``comm_timeout_s``), so a rank waiting for a rank that
  stopped fails with a `DistributedError`;
* when a rank raises, the others get a short grace period to report, are terminated, and
  `spawn` raises a `DistributedError` whose message leads with the failing rank's own error
  (its type, message and traceback), then the other ranks' errors;
* the whole run has a deadline (``timeout_s``).

`torchrun_command` is the command line that runs a module under torchrun on one node
(``--standalone``); for several nodes run torchrun yourself (see the README).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from curvlab.distributed.comm import DistributedError
from curvlab.distributed.group import destroy_process_group, free_port, init_process_group

__all__ = ["spawn", "torchrun_command"]

#: How long the other ranks may still report after the first error.
_GRACE_S = 1.5


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    comm_timeout_s: float,
    threads: int | None,
    results: Any,
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        comm = init_process_group(
            rank,
            world_size,
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            timeout_s=comm_timeout_s,
        )
        value = fn(comm, *args)
        comm.barrier()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put(("ok", rank, buffer.getvalue(), False))
    except BaseException as err:
        message = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        results.put(("error", rank, message, isinstance(err, DistributedError)))
    finally:
        # The group may be broken after a failure; the process ends anyway.
        with contextlib.suppress(Exception):
            destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    comm_timeout_s: float = 30.0,
    threads: int | None = 1,
) -> list[Any]:
    """Run ``fn(communicator, *args)`` on ``nprocs`` local gloo ranks; results by rank.

    Args:
        fn: a module-level function (it is pickled by name into fresh processes); its
            result is sent back with `torch.save`.
        nprocs: the number of ranks.
        args: further arguments of ``fn`` (picklable).
        timeout_s: deadline of the whole run.
        comm_timeout_s: timeout of each collective.
        threads: ``torch.set_num_threads`` in every rank (None: torch's default).

    Raises:
        DistributedError: a rank raised (the message leads with its error), or the deadline
            passed.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs: must be at least 1, got {nprocs}")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, nprocs, port, tuple(args), comm_timeout_s, threads, results),
            daemon=True,
        )
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, tuple[str, bool]] = {}
    deadline = time.monotonic() + timeout_s
    first_error_at: float | None = None
    try:
        while len(done) + len(errors) < nprocs:
            now = time.monotonic()
            if first_error_at is not None and now > first_error_at + _GRACE_S:
                break
            if now > deadline:
                missing = sorted(set(range(nprocs)) - set(done) - set(errors))
                errors.setdefault(
                    missing[0] if missing else 0,
                    (
                        f"the run passed its deadline of {timeout_s:g} s; ranks {missing} did "
                        "not finish",
                        False,
                    ),
                )
                break
            try:
                status, rank, payload, comm_error = results.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in done and rank not in errors and p.exitcode not in (None, 0):
                        errors[rank] = (f"the process exited with code {p.exitcode}", False)
                if errors and first_error_at is None:
                    first_error_at = time.monotonic()
                continue
            if status == "ok":
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = (payload, comm_error)
                if first_error_at is None:
                    first_error_at = time.monotonic()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    if errors:
        # The root cause first: errors that are not collectives failing because of it.
        order = sorted(errors, key=lambda r: (errors[r][1], r))
        parts = [f"rank {r}: {errors[r][0]}" for r in order]
        raise DistributedError(
            f"{len(errors)} of {nprocs} ranks failed; first: " + "\n\n".join(parts)
        )
    return [done[r] for r in range(nprocs)]


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m module args``."""
    if nproc < 1:
        raise ValueError(f"nproc: must be at least 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]
