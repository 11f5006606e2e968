"""The reproduction reports: ``OUT/NAME/report.md`` (claims with the paper's numbers, ours and a
verdict; the experiment's tables; PNG plots) and ``OUT/summary.md`` (one line per claim of every
experiment found under ``OUT``, for the README).

Only measured numbers are written: every "ours" cell comes from the stored records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvlab.bench.records import RunRecord, environment_line, write_json
from curvlab.bench.reproduce.framework import (
    Context,
    MissingResult,
    Section,
    evaluate_claims,
    plan_summary,
)
from curvlab.bench.reproduce.measures import Axis, curve

__all__ = [
    "Series",
    "markdown_table",
    "plot_heatmap",
    "plot_panels",
    "plot_records",
    "write_report",
    "write_summary",
]

_MARK = {"held": "✅ held", "not held": "❌ not held", "not testable": "➖ not testable"}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells converted with ``str``; pipes escaped)."""
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "---|" * len(headers),
    ]
    lines += ["| " + " | ".join(_cell(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
@dataclass(frozen=True)
class Series:
    """One line of a panel."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = ".-"


@dataclass(frozen=True)
class Panel:
    """One axes of a figure."""

    xlabel: str
    ylabel: str
    series: Sequence[Series]
    logy: bool | None = None  # None: log scale when the values span more than 5×
    logx: bool = False
    vlines: Sequence[float] = field(default_factory=tuple)
    title: str = ""
    #: a loss panel: clip the axis at 3× the largest starting value when a run blew up past
    #: it (one diverged run would otherwise squash every other curve; the tables have the
    #: numbers).
    clip_blowups: bool = False


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spans(values: Sequence[float]) -> bool:
    vals = [v for v in values if math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 5.0


def _clip_top(panel: Panel) -> float | None:
    """3× the largest first finite value of the panel's series, if some value exceeds it."""
    if not panel.clip_blowups:
        return None
    starts = [next((float(v) for v in s.y if math.isfinite(v)), math.nan) for s in panel.series]
    finite = [v for v in starts if math.isfinite(v) and v > 0]
    if not finite:
        return None
    top = 3.0 * max(finite)
    values = (float(v) for s in panel.series for v in s.y)
    return top if any(v > top for v in values) else None


def plot_panels(path: Path, title: str, panels: Sequence[Panel]) -> Path:
    """Panels side by side in one PNG; a label keeps its colour across panels."""
    plt = _pyplot()
    labels: list[str] = []
    for panel in panels:
        for s in panel.series:
            if s.label not in labels:
                labels.append(s.label)
    colors = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        seen: set[str] = set()
        ys: list[float] = []
        for s in panel.series:
            ax.plot(
                list(s.x),
                list(s.y),
                s.style,
                color=colors[s.label],
                label=None if s.label in seen else s.label,
                linewidth=1.3,
                markersize=3,
            )
            seen.add(s.label)
            ys.extend(float(v) for v in s.y)
        top = _clip_top(panel)
        if top is not None:
            ys = [v for v in ys if v <= top]
        if panel.logy or (panel.logy is None and _spans(ys)):
            ax.set_yscale("log")
        if top is not None:  # autoscaling saw the blown-up values: set both ends
            low = min((v for v in ys if math.isfinite(v)), default=0.0)
            log = ax.get_yscale() == "log"
            ax.set_ylim(bottom=low / 1.2 if log else low - 0.05 * (top - low), top=top)
        if panel.logx:
            ax.set_xscale("log", base=2)
        for v in panel.vlines:
            ax.axvline(v, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        title_text = panel.title
        if top is not None:
            note = "runs above the axis blew up (see the tables)"
            title_text = f"{title_text}\n{note}" if title_text else note
        if title_text:
            ax.set_title(title_text, fontsize="medium" if top is None else "small")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def record_series(
    records: Sequence[RunRecord],
    x: Axis,
    y: Callable[[Any], float] = lambda e: e.train_loss,
    label: Callable[[RunRecord], str] = lambda r: r.label,
) -> list[Series]:
    """One series per record (seeds share their label's colour)."""
    out = []
    for rec in records:
        xs, ys = curve(rec, x, y)
        out.append(Series(label(rec), xs, ys))
    return out


def plot_records(
    path: Path,
    title: str,
    records: Sequence[RunRecord],
    *,
    axes: Sequence[tuple[Axis, str]] = (("epoch", "epoch"), ("wall_time", "training time (s)")),
    test_panel: str | None = None,
) -> Path:
    """Training loss (full training set) against each of ``axes``; with ``test_panel`` (its
    y label) a last panel of the test metric against epochs."""
    panels = [
        Panel(xlabel, "training loss (full set)", record_series(records, x), clip_blowups=True)
        for x, xlabel in axes
    ]
    if test_panel:
        series = record_series(records, "epoch", lambda e: e.test_metric)
        panels.append(Panel("epoch", test_panel, series, clip_blowups="loss" in test_panel))
    return plot_panels(path, title, panels)


def plot_heatmap(
    path: Path,
    title: str,
    values: Sequence[Sequence[float]],
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    *,
    xlabel: str,
    ylabel: str,
    cbar: str,
) -> Path:
    """``values[i][j]`` at row ``ylabels[i]``, column ``xlabels[j]``, annotated."""
    plt = _pyplot()
    import numpy as np

    data = np.array([[v if math.isfinite(v) else np.nan for v in row] for row in values])
    fig, ax = plt.subplots(figsize=(1.3 * len(xlabels) + 2.5, 0.8 * len(ylabels) + 1.8))
    im = ax.imshow(data, cmap="viridis_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xlabels)), list(xlabels))
    ax.set_yticks(range(len(ylabels)), list(ylabels))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            finite = math.isfinite(v)  # a non-finite cell is blank: dark text on it
            text = f"{v:.3g}" if finite else "diverged"
            color = "w" if finite else "0.25"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- reports
def _environment(ctx: Context) -> str:
    envs: set[str] = set()
    for path in sorted(ctx.records.glob("**/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        env = (data.get("record") or {}).get("environment") if isinstance(data, dict) else None
        if isinstance(env, dict):
            envs.add(environment_line(env))
    return "; ".join(sorted(envs)) or "no runs recorded"


def write_report(ctx: Context) -> Path:
    """Write ``ctx.root/report.md`` and ``verdicts.json``, then refresh ``summary.md``."""
    exp = ctx.experiment
    tasks, remaining = plan_summary(ctx)
    done = sum(t.done(ctx) for t in tasks)
    skipped = {k: v for k, v in ctx.skipped.items()}
    verdicts = evaluate_claims(ctx)
    lines = [
        f"# {exp.title}",
        "",
        f"Paper: {exp.paper}. Reproduced with `curvlab reproduce {exp.name} --scale {ctx.scale}`.",
        "",
        f"Runs: {done} of {len(tasks)} planned finished"
        + (f", {len(skipped)} not run (method not implemented)" if skipped else "")
        + (f", {len(ctx.failed)} failed" if ctx.failed else "")
        + (
            f"; about {remaining / 60:.1f} min of runs still to do (rerun to resume)"
            if remaining > 0 and done + len(skipped) < len(tasks)
            else ""
        )
        + ".",
        "",
        "## Claims",
        "",
        markdown_table(
            ["claim", "paper", "ours", "verdict", "how decided"],
            [
                [f"**{c.id}**: {c.statement}", c.paper, v.ours, _MARK[v.status], v.detail]
                for c, v in verdicts
            ],
        ),
    ]
    notes = exp.notes(ctx)
    if notes:
        lines += ["## Substitutions and deviations", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    try:
        sections = exp.sections(ctx)
    except MissingResult as err:
        sections = [Section("Results", f"Not all results exist yet: {err}\n")]
    except (ArithmeticError, LookupError, ValueError, TypeError) as err:
        sections = [
            Section("Results", f"The tables could not be built: {type(err).__name__}: {err}\n")
        ]
    for section in sections:
        lines += [f"## {section.title}", "", section.body.rstrip(), ""]
        for plot in section.plots:
            rel = plot.relative_to(ctx.root) if plot.is_relative_to(ctx.root) else plot
            lines += [f"![{plot.stem}]({rel.as_posix()})", ""]
    if skipped or ctx.failed:
        lines += ["## Runs not done", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(skipped.items())]
        lines += [f"- `{k}`: failed: {v}" for k, v in sorted(ctx.failed.items())]
        lines.append("")
    lines += [
        "Losses are full-training-set losses (evaluation mode) at epoch ends and at the end of "
        "each budget; times count optimizer steps only (evaluations and warm starts excluded). "
        f"Environment: {_environment(ctx)}.",
        "",
    ]
    ctx.root.mkdir(parents=True, exist_ok=True)
    md = ctx.root / "report.md"
    md.write_text("\n".join(lines))
    payload = {
        "name": exp.name,
        "title": exp.title,
        "scale": ctx.scale,
        "claims": [
            {
                "id": c.id,
                "statement": c.statement,
                "paper": c.paper,
                "status": v.status,
                "ours": v.ours,
                "detail": v.detail,
            }
            for c, v in verdicts
        ],
    }
    write_json(ctx.root / "verdicts.json", payload)
    write_summary(Path(ctx.options.out))
    return md


def write_summary(out: Path) -> Path:
    """``out/summary.md``: one line per claim of every experiment with a ``verdicts.json``."""
    lines = [
        "# Reproduction results",
        "",
        "One line per claim; details, numbers and plots in each experiment's report.",
        "",
    ]
    for path in sorted(out.glob("*/verdicts.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        name = data.get("name", path.parent.name)
        lines += [
            f"## [{data.get('title', name)}]({name}/report.md) (scale {data.get('scale')})",
            "",
        ]
        for claim in data.get("claims", []):
            lines.append(
                f"- {_MARK.get(claim.get('status'), claim.get('status'))}: {claim.get('id')} "
                f"— {claim.get('statement')} (ours: {claim.get('ours')})"
            )
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    target = out / "summary.md"
    target.write_text("\n".join(lines))
    return target
