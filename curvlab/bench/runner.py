"""Run one (problem, optimizer, hyperparameters, seed, budget) and return a `RunRecord`.

Timing protocol (the thesis's autoencoder protocol, §2.8.1 and §3.7.2):

* The wall clock counts only ``optimizer.step(objective)`` calls: each is timed with
  ``time.perf_counter`` between ``torch.cuda.synchronize()`` calls on CUDA. Batch slicing,
  evaluations and the optional warm start are excluded (the warm start is timed separately,
  as the thesis excludes it too).
* A time budget compares this training wall clock with ``Budget.seconds`` after every step, so
  runs stop at equal training time, like the thesis's equal-CPU-time budgets.
* ``median_step_ms`` skips the first 5 steps (warm-up: allocator, first inverses, caches)
  when more than 10 steps ran.
* Evaluations happen before the first step, at every epoch end and when the budget ends: the
  loss over the whole training set at the current parameters (eval mode, no grad, batched),
  the thesis's "deterministic loss", and the problem's test metric.
* Peak memory: ``torch.cuda.max_memory_allocated`` after a reset on CUDA; the process's peak
  RSS (``resource.getrusage``) on CPU, which is a whole-process high-water mark.
* Determinism: the seed fixes the model initialisation, the shuffling generator and the global
  RNG (used by e.g. sampled-label Fisher estimates). Time budgets stop after a machine-dependent
  number of steps; step budgets are reproducible.

Data-parallel runs (``communicator`` with several ranks, e.g. ``curvlab bench --nproc N``):

* every rank builds the same model and data and draws the same global batches; rank r steps
  on its part of each batch (``tensor_split`` into N shards; a batch with fewer examples than
  ranks is skipped by all). With mean losses and equal shards one step equals the
  single-process step on the global batch (`curvlab.optim.data_parallel.DataParallelBlocks`);
* curvlab's layer-wise optimizers are `distribute`-d (``dist_mode``; plain per-rank models
  whose gradients the optimizer averages, or a DDP model with ``ddp=True``); optimizers from
  ``torch.optim`` get a DDP model; model-wide methods are `distribute`-d on plain per-rank
  models (they average the gradient, each curvature product and the trial loss themselves;
  SMW, whose Gram matrix couples examples across ranks, is refused with a message);
* after each step the ranks average (step time, loss) in one tiny all-reduce, so that they
  stop together (time budget, divergence); it is not part of the step's time or bytes.
  ``wall_s`` is the mean over ranks; ``step_time`` is this rank's;
* ``summary["comm"]``: payload bytes and calls per step by kind (gradients, statistics,
  inverses, preconditioned, loss; DDP's gradient all-reduce included) and per step;
* every rank evaluates the whole data sets (the same parameters on every rank); only rank 0
  draws the progress bar, and the caller saves rank 0's record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvlab.bench.metrics import (
    dataset_loss,
    evaluate_metric,
    median_step_time,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)
from curvlab.bench.problems import Problem, ProblemData, get_problem
from curvlab.bench.progress import ProgressBar
from curvlab.bench.records import EpochRecord, RunRecord, environment, to_jsonable
from curvlab.bench.specs import get_optimizer, get_preset
from curvlab.data import batches
from curvlab.distributed import MODES, CommStats, Communicator, is_ddp, wrap_ddp
from curvlab.objective import Objective

__all__ = ["RUNNER_KEYS", "Budget", "resolve_device", "run"]

RUNNER_KEYS = ("warm_start", "batch_size")
"""Hyperparameter keys the runner consumes itself; everything else goes to the optimizer."""

WARMUP_STEPS = 5

BLOW_UP_FACTOR = 1e6
"""A run has diverged when a step's loss is not finite, or when its magnitude exceeds
``BLOW_UP_FACTOR · (|first step's loss| + 1)``: such a run is dead even while its loss stays
finite (seen: 3e27 from 543), and reporting it "completed" would hide that."""


def _diverged(value: float, first: float) -> bool:
    """Whether a step's loss ``value`` marks the run as diverged (see `BLOW_UP_FACTOR`)."""
    if not math.isfinite(value):
        return True
    return math.isfinite(first) and abs(value) > BLOW_UP_FACTOR * (abs(first) + 1.0)


@dataclass(frozen=True)
class Budget:
    """When to stop: after ``steps`` steps, ``epochs`` epochs or ``seconds`` of training time.

    Whichever set limit is reached first ends the run. At least one must be set.
    """

    steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        limits = {"steps": self.steps, "epochs": self.epochs, "seconds": self.seconds}
        if all(v is None for v in limits.values()):
            raise ValueError("Budget: set steps, epochs or seconds")
        for name, value in limits.items():
            if value is not None and value <= 0:
                raise ValueError(f"Budget.{name}: must be positive, got {value}")

    def fraction(self, steps: int, epochs: float, seconds: float) -> float:
        """How much of the budget is used, in [0, 1] (the most-used limit)."""
        used = [
            done / limit
            for done, limit in ((steps, self.steps), (epochs, self.epochs), (seconds, self.seconds))
            if limit is not None
        ]
        return min(max(used), 1.0)

    def reached(self, steps: int, epochs: float, seconds: float) -> bool:
        """Whether any limit is reached."""
        return self.fraction(steps, epochs, seconds) >= 1.0

    def to_dict(self) -> dict[str, Any]:
        """The limits as a dict."""
        return asdict(self)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _epoch_batches(
    data: ProblemData, batch_size: int, *, shuffle: bool, generator: torch.Generator | None
) -> Iterator[tuple[Tensor, Tensor]]:
    it: Iterator[tuple[Tensor, Tensor]] = iter(
        batches(
            data.train_inputs,
            data.train_targets,
            batch_size,
            shuffle=shuffle,
            generator=generator,
        )
    )
    return it


def run(
    problem: Problem | str,
    optimizer_name: str,
    hparams: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    budget: Budget,
    device: str | torch.device = "cpu",
    progress: bool = False,
    subset: int | None = None,
    threads: int | None = None,
    preset: str | None = None,
    label: str | None = None,
    communicator: Communicator | None = None,
    dist_mode: str = "inverses",
    ddp: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> RunRecord:
    """Train ``problem``'s model with ``optimizer_name`` within ``budget``; see the module doc.

    Args:
        problem: a `Problem` or its registry name.
        optimizer_name: a key of `curvlab.bench.specs.OPTIMIZERS`.
        hparams: overrides, applied over the spec's defaults and the preset. The runner's own
            keys: ``warm_start`` (bool; call the optimizer's ``warm_start`` over one pass of the
            training data first) and ``batch_size`` (default: the problem's).
        seed: model initialisation, shuffling and global RNG seed.
        budget: when to stop.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``, or a `torch.device`.
        progress: draw a progress bar on stderr.
        subset: train on the first N training examples only.
        threads: ``torch.set_num_threads`` (process-wide) before running.
        preset: a preset name for (optimizer, problem), see `curvlab.bench.specs.PRESETS`.
        label: the record's name in reports and its folder (default: ``optimizer_name``).
        communicator: the ranks of a data-parallel run (module docstring); default: one
            process.
        dist_mode: ``"inverses"`` or ``"preconditioned"`` (`curvlab.distributed`).
        ddp: wrap the model in DistributedDataParallel also for curvlab's optimizers.
        checkpoint: a file to write at every epoch end (model, optimizer state, random
            states, counters, the record so far); single-process runs only.
        resume: continue from ``checkpoint`` (it must exist): the run goes on exactly as the
            uninterrupted one would from that epoch end (same batches, same random numbers).

    Raises:
        UnknownNameError: unknown problem, optimizer or preset.
        ValueError: ``warm_start`` for an optimizer without one, a bad batch size, or
            ``resume`` without a checkpoint file (or in a data-parallel run).
    """
    prob = get_problem(problem) if isinstance(problem, str) else problem
    spec = get_optimizer(optimizer_name)
    merged: dict[str, Any] = dict(spec.defaults)
    if preset is not None:
        merged.update(get_preset(spec.name, prob.name, preset).hparams)
    merged.update(hparams or {})
    warm = bool(merged.pop("warm_start", False))
    batch_size = int(merged.pop("batch_size", prob.batch_size))
    if warm and not spec.supports_warm_start:
        raise ValueError(f"warm_start: optimizer {spec.name!r} has no warm_start")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    if dist_mode not in MODES:
        raise ValueError(f"dist_mode: expected one of {MODES}, got {dist_mode!r}")
    comm = communicator if communicator is not None else Communicator.local()
    distributed = comm.is_distributed
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and distributed:
        raise ValueError("checkpoint: checkpoints are for single-process runs")
    if resume and (ckpt is None or not ckpt.is_file()):
        raise ValueError(f"resume: no checkpoint to resume from at {ckpt}")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    label = label or spec.name

    data = prob.data(subset).to(dev)
    torch.manual_seed(seed)
    model = prob.make_model(seed).to(dev)
    loss_fn = prob.make_loss()
    optimizer = spec.factory(model, dict(merged))
    net = model
    if distributed:
        net = _data_parallel(model, optimizer, spec.name, comm, dist_mode, ddp)
    shuffle_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(data.num_train / batch_size)

    def evaluate(epoch: float, step: int, wall: float) -> EpochRecord:
        was_training = model.training
        model.eval()
        try:
            train = dataset_loss(
                model,
                loss_fn,
                data.train_inputs,
                data.train_targets,
                batch_average=prob.batch_average,
                batch_size=prob.eval_batch_size,
            )
            test = evaluate_metric(
                prob.test_metric,
                model,
                loss_fn,
                data.test_inputs,
                data.test_targets,
                batch_average=prob.batch_average,
                batch_size=prob.eval_batch_size,
            )
        finally:
            model.train(was_training)
        return EpochRecord(epoch, step, wall, train, test)

    start_total = time.perf_counter()
    warm_s = 0.0
    if warm and not resume:
        synchronize(dev)
        t0 = time.perf_counter()
        optimizer.warm_start(  # type: ignore[attr-defined]
            _shards(_epoch_batches(data, batch_size, shuffle=False, generator=None), comm),
            loss_fn,
            batch_average=prob.batch_average,
        )
        synchronize(dev)
        warm_s = time.perf_counter() - t0

    step_loss: list[float] = []
    step_time: list[float] = []
    step_info: list[dict[str, Any]] = []
    step_comm: list[CommStats] = []
    skipped = 0
    status = "completed"
    step, epoch, wall = 0, 0, 0.0
    if resume:
        assert ckpt is not None
        saved = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle_gen.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        epochs = [EpochRecord(**e) for e in saved["epochs"]]
        step_loss, step_time, step_info = saved["step_loss"], saved["step_time"], saved["step_info"]
        step, epoch, wall = saved["step"], saved["epoch"], saved["wall"]
        skipped, warm_s, eval_s = saved["skipped"], saved["warm_s"], saved["eval_s"]
    else:
        t_eval = time.perf_counter()
        epochs = [evaluate(0.0, 0, 0.0)]
        eval_s = time.perf_counter() - t_eval
    bar = ProgressBar(f"{prob.name}/{label}", 1.0, enabled=progress and comm.rank == 0)
    reset_peak_memory(dev)
    model.train()

    stop = False
    while not stop:
        in_epoch = 0
        epoch_completed = False
        epoch_batches = _epoch_batches(data, batch_size, shuffle=True, generator=shuffle_gen)
        for xb, yb in _shards(epoch_batches, comm):
            objective = Objective(net, loss_fn, xb, yb, batch_average=prob.batch_average)
            before = comm.stats.copy()
            synchronize(dev)
            t0 = time.perf_counter()
            loss = optimizer.step(objective)  # type: ignore[arg-type]  # returns a Tensor
            synchronize(dev)
            dt = time.perf_counter() - t0
            step += 1
            in_epoch += 1
            returned = loss if loss is not None else objective.loss
            value = math.nan if returned is None else float(returned)
            if distributed:
                step_comm.append(comm.stats.since(before))
                dt_mean, value = _agree(comm, dt, value)  # every rank stops together
                wall += dt_mean
            else:
                wall += dt
            step_loss.append(value)
            step_time.append(dt)
            info = getattr(optimizer, "last_step_info", None)
            if isinstance(info, Mapping):
                step_info.append(to_jsonable(dict(info)))
                skipped += int(info.get("skipped") is True or info.get("accepted") is False)
            done = epoch + in_epoch / steps_per_epoch
            bar.update(
                budget.fraction(step, done, wall),
                f"step {step} epoch {done:.2f} loss {value:.4g} {wall:.1f}s",
            )
            if _diverged(value, step_loss[0]):
                status, stop = "diverged", True
            if stop or budget.reached(step, done, wall):
                stop = True
                break
        else:
            epoch += 1
            in_epoch = 0
            epoch_completed = True
            stop = budget.reached(step, float(epoch), wall) or step == 0
        t_eval = time.perf_counter()
        epochs.append(evaluate(epoch + in_epoch / steps_per_epoch, step, wall))
        eval_s += time.perf_counter() - t_eval
        if epoch_completed and not stop:
            _epoch_hooks(optimizer, epochs[-1])
            if ckpt is not None:
                _save_checkpoint(
                    ckpt,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    shuffle_rng=shuffle_gen.get_state(),
                    torch_rng=torch.get_rng_state(),
                    epochs=[asdict(e) for e in epochs],
                    step_loss=step_loss,
                    step_time=step_time,
                    step_info=step_info,
                    step=step,
                    epoch=epoch,
                    wall=wall,
                    skipped=skipped,
                    warm_s=warm_s,
                    eval_s=eval_s,
                )

    synchronize(dev)
    memory, memory_kind = peak_memory_mb(dev)
    final = epochs[-1]
    bar.close(f"step {step} train loss {final.train_loss:.4g} {wall:.1f}s {status}")
    median = median_step_time(step_time, WARMUP_STEPS)
    summary: dict[str, Any] = {
        "status": status,
        "steps": step,
        "epochs": final.epoch,
        "steps_per_epoch": steps_per_epoch,
        "final_train_loss": final.train_loss,
        "best_train_loss": _nanmin(e.train_loss for e in epochs),
        "final_test_metric": final.test_metric,
        "best_test_metric": _nanmin(e.test_metric for e in epochs),
        "median_step_ms": None if median is None else 1000.0 * median,
        "mean_step_ms": 1000.0 * wall / step if step else None,
        "wall_s": wall,
        "eval_s": eval_s,
        "warm_start_s": warm_s,
        "total_s": time.perf_counter() - start_total,
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "skipped_steps": skipped if step_info else None,
    }
    if distributed:
        summary["comm"] = _comm_summary(step_comm, comm, dist_mode, ddp)
    config: dict[str, Any] = {
        "budget": budget.to_dict(),
        "batch_size": batch_size,
        "subset": subset,
        "num_train": data.num_train,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "preset": preset,
        "warm_start": warm,
        "test_metric": prob.test_metric,
        "batch_average": prob.batch_average,
        "data_source": prob.data_source,
    }
    if distributed:
        config["distributed"] = {
            "world_size": comm.world_size,
            "mode": dist_mode,
            "ddp": is_ddp(net),
            "shard_size": math.ceil(batch_size / comm.world_size),
        }
    return RunRecord(
        problem=prob.name,
        optimizer=spec.name,
        label=label,
        seed=seed,
        config=config,
        hyperparameters=to_jsonable(merged),
        environment=environment(dev),
        epochs=epochs,
        step_loss=step_loss,
        step_time=step_time,
        step_info=step_info or None,
        summary=summary,
    )


def _save_checkpoint(path: Path, **content: Any) -> None:
    """Write atomically (a crash while saving leaves the previous checkpoint intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(content, tmp)
    tmp.replace(path)


def _shards(
    pairs: Iterable[tuple[Tensor, Tensor]], comm: Communicator
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's part of every global batch (all of it in one process)."""
    n, r = comm.world_size, comm.rank
    for xb, yb in pairs:
        if n == 1:
            yield xb, yb
        elif xb.shape[0] >= n:  # the same decision on every rank
            yield xb.tensor_split(n)[r], yb.tensor_split(n)[r]


def _data_parallel(
    model: torch.nn.Module,
    optimizer: Any,
    name: str,
    comm: Communicator,
    mode: str,
    ddp: bool,
) -> torch.nn.Module:
    """Make ``optimizer`` data-parallel; returns the model the objectives use."""
    kind = getattr(optimizer, "data_parallel", None)
    if kind == "layer-wise":
        net = wrap_ddp(model, comm) if ddp else model
        optimizer.distribute(comm, mode=mode, average_gradients=not ddp)
        return net
    if kind == "model-wide":
        if ddp:
            raise ValueError(
                f"--ddp: {name!r} averages gradients and curvature products itself; run it "
                "without --ddp"
            )
        if mode != "inverses":
            raise ValueError(f"--dist-mode: {name!r} is model-wide and keeps no inverses")
        optimizer.distribute(comm)  # raises for a method without a data-parallel form (SMW)
        return model
    if type(optimizer).__module__.startswith("torch.optim"):
        return wrap_ddp(model, comm)  # DDP averages the gradients; the update is local
    raise ValueError(
        f"optimizer: {name!r} does not support data-parallel runs (--nproc); the layer-wise "
        "and model-wide curvlab methods and torch.optim's optimizers do"
    )


def _agree(comm: Communicator, dt: float, loss: float) -> tuple[float, float]:
    """Mean (step time, loss) over ranks: the same stop decisions everywhere."""
    values = torch.tensor([dt, loss], dtype=torch.float64, device=comm.device)
    comm.all_reduce_mean([values], kind="control")
    mean_dt, mean_loss = values.tolist()
    return float(mean_dt), float(mean_loss)


def _comm_summary(
    steps: list[CommStats], comm: Communicator, mode: str, ddp: bool
) -> dict[str, Any]:
    """Payload bytes and collective calls per step, by kind and in total."""
    n = max(len(steps), 1)
    kinds = sorted({k for s in steps for k in s.calls})
    return {
        "world_size": comm.world_size,
        "mode": mode,
        "ddp": ddp,
        "payload": "bytes handed to collectives per rank (a ring all-reduce moves ~2(N-1)/N x)",
        "bytes_per_step": sum(s.total_bytes for s in steps) / n,
        "calls_per_step": sum(s.total_calls for s in steps) / n,
        "by_kind": {
            k: {
                "bytes_per_step": sum(s.bytes.get(k, 0) for s in steps) / n,
                "calls_per_step": sum(s.calls.get(k, 0) for s in steps) / n,
            }
            for k in kinds
        },
        "step_bytes": [s.total_bytes for s in steps],
    }


def _epoch_hooks(optimizer: Any, record: EpochRecord) -> None:
    """Tell a staged optimizer (e.g. `curvlab.optim.TwoStage`) that an epoch ended and what the
    held-out metric was: its switch rules may count epochs or watch a validation plateau. The
    test set serves as the validation set, as in the papers (seed 001 §V, thesis ch.3)."""
    if hasattr(optimizer, "end_epoch"):
        optimizer.end_epoch()
    if hasattr(optimizer, "report_validation") and math.isfinite(record.test_metric):
        optimizer.report_validation(record.test_metric)


def _nanmin(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan
