"""`RunRecord`: everything one benchmark run measured, as a frozen dataclass ↔ JSON.

Files live at ``OUT/<problem>/<label>/seed<k>.json`` (``label`` is the optimizer name unless a
run was given another one), next to ``OUT/environment.json``. Reports and plots read only
these files, so re-plotting never reruns training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SCHEMA_VERSION",
    "EpochRecord",
    "RunRecord",
    "environment",
    "environment_line",
    "load_record",
    "load_records",
    "record_path",
    "to_jsonable",
    "write_json",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EpochRecord:
    """One evaluation: at the start, at every epoch end, and at the end of the budget.

    Attributes:
        epoch: epochs completed (fractional at the end of a step or time budget).
        step: optimizer steps completed.
        wall_time: seconds of training so far, evaluation and warm start excluded.
        train_loss: the loss over the whole training set at the current parameters (eval
            mode, no grad, batched), as the thesis measures it.
        test_metric: the problem's test metric (test loss, or test error in %).
    """

    epoch: float
    step: int
    wall_time: float
    train_loss: float
    test_metric: float


@dataclass(frozen=True)
class RunRecord:
    """The full record of one run (see the runner's docstring for how it is measured).

    Attributes:
        problem, optimizer, label, seed: what ran; ``label`` names the record's folder.
        config: budget, batch size, subset, device, threads, preset, warm start, metric name.
        hyperparameters: the optimizer's keyword arguments as used.
        environment: software and hardware (see `environment`).
        epochs: evaluations, in order.
        step_loss: minibatch loss of every step.
        step_time: wall seconds of every step (synchronised on CUDA).
        step_info: the optimizer's ``last_step_info`` after every step, if it has one.
        summary: final/best losses, median ms per step, wall time, memory, counters, status.
    """

    problem: str
    optimizer: str
    label: str
    seed: int
    config: dict[str, Any]
    hyperparameters: dict[str, Any]
    environment: dict[str, Any]
    epochs: list[EpochRecord]
    step_loss: list[float]
    step_time: list[float]
    step_info: list[dict[str, Any]] | None
    summary: dict[str, Any]
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become None)."""
        data: dict[str, Any] = to_jsonable(dataclasses.asdict(self))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """The inverse of `to_dict` (None losses read back as NaN)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["epochs"] = [
            EpochRecord(**{k: _nan_if_none(v) for k, v in e.items()}) for e in data["epochs"]
        ]
        kwargs["step_loss"] = [_nan_if_none(v) for v in data["step_loss"]]
        return cls(**kwargs)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/<problem>/<label>/seed<k>.json``; returns the path."""
        return write_json(record_path(out_dir, self.problem, self.label, self.seed), self.to_dict())


def _nan_if_none(value: Any) -> Any:
    return math.nan if value is None else value


def to_jsonable(value: Any) -> Any:
    """``value`` with tensors, tuples and numpy scalars made JSON-safe; NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return to_jsonable(value.item())
    return str(value)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data``, made JSON-safe by `to_jsonable`, to ``path`` (its folder created, one
    space of indent, a final newline); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n")
    return path


def record_path(out_dir: str | Path, problem: str, label: str, seed: int) -> Path:
    """Where a run's record is stored."""
    return Path(out_dir) / problem / label / f"seed{seed}.json"


def load_record(path: str | Path) -> RunRecord:
    """Read one record file."""
    return RunRecord.from_dict(json.loads(Path(path).read_text()))


def load_records(root: str | Path) -> list[RunRecord]:
    """Every ``seed*.json`` record below ``root``, sorted by path."""
    return [load_record(p) for p in sorted(Path(root).glob("**/seed*.json"))]


def _git_sha() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _curvlab_version() -> str | None:
    try:
        return metadata.version("curvlab")
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Software and hardware of this process: versions, threads, CPU/GPU, git SHA."""
    dev = torch.device(device)
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "curvlab": _curvlab_version(),
        "git_sha": _git_sha(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "device": str(dev),
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(dev) if cuda and dev.type == "cuda" else None,
    }


def environment_line(env: dict[str, Any]) -> str:
    """One line of an `environment` dict for a report: device, hardware, threads, torch."""
    hardware = env.get("gpu") or env.get("cpu")
    threads, torch_version = env.get("threads"), env.get("torch")
    return f"{env.get('device')} · {hardware} · {threads} threads · torch {torch_version}"
