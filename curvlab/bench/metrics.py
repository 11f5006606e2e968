"""Measurements the runner takes: full-data-set evaluation, step-time statistics, memory."""

from __future__ import annotations

import resource
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.bench.problems import MetricName

__all__ = [
    "dataset_loss",
    "evaluate_metric",
    "median_step_time",
    "peak_memory_mb",
    "reset_peak_memory",
    "synchronize",
    "test_error",
]


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_average: bool,
    batch_size: int,
) -> float:
    """The loss over a whole data set, in the minibatch loss's convention.

    With ``batch_average`` the loss function sums over the batch (the objective divides by m),
    so batch losses are added up; otherwise each is a batch mean and is weighted by its size.
    Either way the result is the mean loss per example. The caller sets eval
    mode. Computed in float64 accumulation so the order of batches does not matter.
    """
    n = int(inputs.shape[0])
    total = 0.0
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        loss = loss_fn(model(x), y)
        m = int(x.shape[0])
        total += float(loss) if batch_average else float(loss) * m
    return total / n


@torch.no_grad()
def test_error(model: nn.Module, inputs: Tensor, labels: Tensor, *, batch_size: int) -> float:
    """Percentage of examples whose arg-max output differs from the label (eval mode by caller)."""
    n = int(inputs.shape[0])
    wrong = 0
    for start in range(0, n, batch_size):
        logits = model(inputs[start : start + batch_size])
        wrong += int((logits.argmax(dim=1) != labels[start : start + batch_size]).sum())
    return 100.0 * wrong / n


def evaluate_metric(
    metric: MetricName,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_average: bool,
    batch_size: int,
) -> float:
    """The problem's test metric on (``inputs``, ``targets``)."""
    if metric == "test_error":
        return test_error(model, inputs, targets, batch_size=batch_size)
    return dataset_loss(
        model, loss_fn, inputs, targets, batch_average=batch_average, batch_size=batch_size
    )


def median_step_time(step_times: list[float], warmup: int = 5) -> float | None:
    """Median seconds per step, skipping the first ``warmup`` steps when enough remain."""
    if not step_times:
        return None
    timed = step_times[warmup:] if len(step_times) > 2 * warmup else step_times
    return statistics.median(timed)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a host clock measures finished work (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (CUDA; on CPU the RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what it measures).

    CUDA: ``torch.cuda.max_memory_allocated`` since `reset_peak_memory`. CPU: the process's
    peak resident set size, which is a high-water mark over the whole process (data loading and
    earlier runs in the same process included).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return rss / scale, "process_peak_rss"
