"""What ``curvlab list`` prints: the registered optimizers, problems and presets."""

from __future__ import annotations

from typing import Any

from curvlab.bench.problems import PROBLEMS
from curvlab.bench.records import to_jsonable
from curvlab.bench.specs import OPTIMIZERS, PRESETS

__all__ = ["catalog", "format_catalog"]


def catalog() -> dict[str, list[dict[str, Any]]]:
    """The registries as JSON-ready dicts."""
    optimizers = [
        {
            "name": s.name,
            "description": s.description,
            "paper": s.paper,
            "algorithm": s.algorithm,
            "file": s.file,
            "defaults": s.defaults,
            "curvature": s.curvature,
            "supports_warm_start": s.supports_warm_start,
        }
        for s in OPTIMIZERS.values()
    ]
    problems = [
        {
            "name": p.name,
            "description": p.description,
            "data_source": p.data_source,
            "batch_size": p.batch_size,
            "test_metric": p.test_metric,
            "batch_average": p.batch_average,
        }
        for p in PROBLEMS.values()
    ]
    presets = [
        {
            "optimizer": p.optimizer,
            "problem": p.problem,
            "name": p.name,
            "hparams": p.hparams,
            "source": p.source,
        }
        for p in PRESETS.values()
    ]
    data: dict[str, list[dict[str, Any]]] = to_jsonable(
        {"optimizers": optimizers, "problems": problems, "presets": presets}
    )
    return data


def _kv(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "(none)"


def format_catalog() -> str:
    """The registries as indented plain text."""
    data = catalog()
    lines = ["Optimizers:"]
    for o in data["optimizers"]:
        kind = "curvature" if o["curvature"] else "first-order"
        lines.append(f"  {o['name']:<12} {o['description']} ({kind})")
        lines.append(f"  {'':<12} paper: {o['paper']}; {o['algorithm']}; {o['file']}")
        lines.append(f"  {'':<12} defaults: {_kv(o['defaults'])}")
    lines.append("Problems:")
    for p in data["problems"]:
        lines.append(f"  {p['name']:<20} {p['description']}")
        lines.append(
            f"  {'':<20} batch {p['batch_size']}, metric {p['test_metric']}; "
            f"data: {p['data_source']}"
        )
    lines.append("Presets (--preset NAME, per optimizer and problem):")
    for s in data["presets"]:
        lines.append(
            f"  {s['name']:<8} {s['optimizer']} on {s['problem']}: {_kv(s['hparams'])}"
            f"  [{s['source']}]"
        )
    return "\n".join(lines)
