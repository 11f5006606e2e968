"""Tables and plots from a directory of `RunRecord` files (never reruns training).

`write_report(root)` writes ``root/report.md`` (a Markdown table, runs averaged over seeds)
and one PNG per problem under ``root/plots/``: training loss against epochs and against
training wall time, and the test metric against epochs, every optimizer in one figure.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from curvlab.bench.records import RunRecord, environment_line, load_records

__all__ = ["Row", "markdown_table", "plot_problem", "summarize", "time_to_target", "write_report"]

BASELINE = "sgd-m"
_METRIC_UNITS = {"test_loss": "loss", "test_error": "% err"}


@dataclass(frozen=True)
class Row:
    """One (problem, optimizer label) line of the table, averaged over seeds."""

    problem: str
    label: str
    seeds: int
    final_train_loss: float
    best_train_loss: float
    test_metric: float
    metric_name: str
    median_step_ms: float
    ratio_to_baseline: float | None
    epochs: float
    wall_s: float
    time_to_target_s: float | None
    diverged: int


def _mean(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def time_to_target(record: RunRecord, target: float) -> float | None:
    """Training seconds until the full-training-set loss first reached ``target`` (else None).

    Resolution is one evaluation (epoch end), as in the thesis's plots.
    """
    for e in record.epochs:
        if e.train_loss <= target:
            return e.wall_time
    return None


def summarize(records: Sequence[RunRecord], target: float | None = None) -> list[Row]:
    """Table rows, sorted by problem then final training loss."""
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.problem, r.label)].append(r)
    ms = {key: _mean(r.summary.get("median_step_ms") for r in rs) for key, rs in groups.items()}
    rows = []
    for (problem, label), rs in groups.items():
        base = ms.get((problem, BASELINE))
        ratio = ms[(problem, label)] / base if base and not math.isnan(base) else None
        times = [time_to_target(r, target) for r in rs] if target is not None else []
        reached = [t for t in times if t is not None]
        rows.append(
            Row(
                problem=problem,
                label=label,
                seeds=len(rs),
                final_train_loss=_mean(r.summary.get("final_train_loss") for r in rs),
                best_train_loss=_mean(r.summary.get("best_train_loss") for r in rs),
                test_metric=_mean(r.summary.get("final_test_metric") for r in rs),
                metric_name=str(rs[0].config.get("test_metric", "test_loss")),
                median_step_ms=ms[(problem, label)],
                ratio_to_baseline=ratio,
                epochs=_mean(r.summary.get("epochs") for r in rs),
                wall_s=_mean(r.summary.get("wall_s") for r in rs),
                time_to_target_s=_mean(reached) if len(reached) == len(rs) and rs else None,
                diverged=sum(r.summary.get("status") == "diverged" for r in rs),
            )
        )
    return sorted(rows, key=lambda w: (w.problem, _sort_key(w.final_train_loss), w.label))


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or math.isnan(value):
        return "—"
    return format(value, spec)


def markdown_table(rows: Sequence[Row], target: float | None = None) -> str:
    """The rows as a Markdown table (means over seeds)."""
    head = [
        "problem",
        "optimizer",
        "seeds",
        "final train loss",
        "best train loss",
        "test metric",
        "median ms/step",
        f"× {BASELINE}",
        "epochs",
        "wall s",
    ]
    if target is not None:
        head.append(f"s to loss ≤ {target:g}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in rows:
        name = w.label + (f" ({w.diverged} diverged)" if w.diverged else "")
        unit = _METRIC_UNITS.get(w.metric_name, w.metric_name)
        cells = [
            w.problem,
            name,
            str(w.seeds),
            _fmt(w.final_train_loss),
            _fmt(w.best_train_loss),
            f"{_fmt(w.test_metric)} {unit}",
            _fmt(w.median_step_ms, ".1f"),
            _fmt(w.ratio_to_baseline, ".2f"),
            _fmt(w.epochs, ".2f"),
            _fmt(w.wall_s, ".1f"),
        ]
        if target is not None:
            cells.append(_fmt(w.time_to_target_s, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log_helps(values: Sequence[float]) -> bool:
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 5.0


def _upper_limit(records: Sequence[RunRecord], key: str) -> float | None:
    """3× the largest value at the first evaluation (the common starting point)."""
    starts = [getattr(r.epochs[0], key) for r in records if r.epochs]
    finite = [v for v in starts if math.isfinite(v) and v > 0]
    return 3.0 * max(finite) if finite else None


def plot_problem(problem: str, records: Sequence[RunRecord], path: str | Path) -> Path:
    """One PNG for ``problem``: loss vs epoch, loss vs wall time, test metric vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r.label for r in records})
    # Up to 10 methods: tab10; more: tab20 and alternating line styles, so no two look alike.
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    styles = {lab: "-" if i % 2 == 0 or len(labels) <= 10 else "--" for i, lab in enumerate(labels)}
    metric = str(records[0].config.get("test_metric", "test_loss"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [
        (axes[0], "epoch", "training loss (full set)", "epoch", "train_loss"),
        (
            axes[1],
            "wall time (s, training only)",
            "training loss (full set)",
            "wall_time",
            "train_loss",
        ),
        (axes[2], "epoch", metric.replace("_", " "), "epoch", "test_metric"),
    ]
    for ax, xlabel, ylabel, xkey, ykey in panels:
        seen: set[str] = set()
        ys: list[float] = []
        for r in sorted(records, key=lambda r: (r.label, r.seed)):
            x = [getattr(e, xkey) for e in r.epochs]
            y = [getattr(e, ykey) for e in r.epochs]
            ys.extend(y)
            ax.plot(
                x,
                y,
                marker=".",
                color=colors[r.label],
                linestyle=styles[r.label],
                label=None if r.label in seen else r.label,
                linewidth=1.4,
            )
            seen.add(r.label)
        if _log_helps(ys):
            ax.set_yscale("log")
        top = _upper_limit(records, ykey)
        if top is not None and max((v for v in ys if math.isfinite(v)), default=top) > top:
            # A run that blew up would squash every other curve: clip the axis at 3× the
            # worst starting value and say so (the table has the numbers).
            ax.set_ylim(top=top)
            ax.set_title("runs above the axis blew up (see the table)", fontsize="small")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small", ncol=2 if len(labels) > 8 else 1)
    fig.suptitle(problem)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _environment_note(records: Sequence[RunRecord]) -> str:
    envs = sorted({environment_line(r.environment) for r in records})
    note = "Environment: " + "; ".join(envs) + "."
    if len(envs) > 1:
        note += " Runs come from different environments: time ratios are not comparable."
    return note


def write_report(root: str | Path, target: float | None = None) -> list[Path]:
    """Write ``root/report.md`` and ``root/plots/<problem>.png``; returns their paths.

    Raises:
        FileNotFoundError: no records below ``root``.
    """
    root = Path(root)
    records = load_records(root)
    if not records:
        raise FileNotFoundError(f"no records (seed*.json) below {root}")
    by_problem: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_problem[r.problem].append(r)
    plots = [
        plot_problem(p, rs, root / "plots" / f"{p}.png") for p, rs in sorted(by_problem.items())
    ]
    table = markdown_table(summarize(records, target), target)
    lines = [
        "# curvlab benchmark report",
        "",
        table,
        "Losses are full-training-set losses at epoch ends and at the end of the budget; "
        "test metric and losses are means over seeds; wall s counts training steps only "
        f"(evaluation and warm start excluded); × {BASELINE} is the ratio of median ms/step.",
        "",
        _environment_note(records),
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots],
        "",
    ]
    md = root / "report.md"
    md.write_text("\n".join(lines))
    return [md, *plots]
