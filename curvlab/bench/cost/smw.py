"""Per-step cost of the chapter-5 methods (SMW-GN, SMW-NG, Hessian-free): ``curvlab smw-cost``.

Thesis §5.8 trains a 784-500-10 network with logistic hidden units on MNIST (here
Fashion-MNIST) with N1 = 60 examples per gradient and N2 = 30 for the curvature. Its claims
about cost: SMW-GN is cheaper than Hessian-free, and at fixed N2 the extra cost of the SMW
methods grows linearly with the number of parameters (the Gram matrices are N2 × N2 — for GN
(N2·c) × (N2·c) with c outputs — and every product with J is one pass over the weights).

Measurement: for each hidden width, one model per method, all initialised from the same seed,
one fixed list of mini-batches from the real training data; the methods take turns
(``steps`` timed steps per turn, ``repeats`` turns each, after ``warmup`` untimed steps) so that
machine drift hits every method alike; a method's time is the minimum over its turns of the
turn mean; ratios are to SGD's time at the same width in the same run. Hessian-free's cost
depends on its CG iterations, so their mean is reported with it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlab.bench.models import mlp
from curvlab.bench.problems import get_problem
from curvlab.bench.records import write_json
from curvlab.bench.specs import get_optimizer
from curvlab.data import batches
from curvlab.objective import Objective

__all__ = ["DEFAULT_METHODS", "format_smw_cost", "measure_smw_cost"]

DEFAULT_METHODS = ("sgd-m", "smw-gn", "smw-ng", "smw-ng-bd", "hessian-free")
BASELINE = "sgd-m"


def _model(width: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mlp([784, width, 10], activation=nn.Sigmoid)


def measure_smw_cost(
    widths: Sequence[int] = (250, 500, 1000),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    batch_size: int = 60,
    curvature_batch_size: int = 30,
    steps: int = 20,
    repeats: int = 3,
    warmup: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one step of each method at each hidden width (see the module docstring)."""
    for name, value in (("steps", steps), ("repeats", repeats), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}: must be at least 1, got {value}")
    if not 1 <= curvature_batch_size <= batch_size:
        raise ValueError(
            f"curvature_batch_size: must be in [1, batch_size={batch_size}], "
            f"got {curvature_batch_size}"
        )
    if BASELINE not in methods:
        methods = (BASELINE, *methods)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = get_problem("fmnist-mlp-logistic").data()
        gen = torch.Generator().manual_seed(seed)
        pool = list(
            batches(data.train_inputs, data.train_targets, batch_size, shuffle=True, generator=gen)
        )[: warmup + steps]
        loss_fn = nn.CrossEntropyLoss()
        rows = []
        for width in widths:
            rows.append(
                _measure_width(
                    width, methods, pool, loss_fn, curvature_batch_size, steps, repeats, warmup
                )
            )
    finally:
        torch.set_num_threads(previous)
    return {
        "config": {
            "problem": "fmnist-mlp-logistic (784-width-10, logistic hidden units, softmax CE)",
            "batch_size": batch_size,
            "curvature_batch_size": curvature_batch_size,
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "threads": threads,
            "seed": seed,
        },
        "widths": rows,
    }


def _measure_width(
    width: int,
    methods: Sequence[str],
    pool: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    n2: int,
    steps: int,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    contenders = []
    for name in methods:
        spec = get_optimizer(name)
        model = _model(width, 0)
        hp = dict(spec.defaults)
        if "curvature_batch_size" in hp:
            hp["curvature_batch_size"] = n2
        contenders.append((name, model, spec.factory(model, hp)))
    turns: dict[str, list[float]] = {name: [] for name in methods}
    iterations: dict[str, list[int]] = {name: [] for name in methods}
    for _name, model, opt in contenders:
        for x, y in pool[:warmup]:
            _step(opt, model, loss_fn, x, y)
    for _ in range(repeats):
        for name, model, opt in contenders:
            t0 = time.perf_counter()
            for x, y in pool[warmup : warmup + steps]:
                _step(opt, model, loss_fn, x, y)
                info = getattr(opt, "last_step_info", {}) or {}
                if "cg_iterations" in info:
                    iterations[name].append(int(info["cg_iterations"]))
            turns[name].append((time.perf_counter() - t0) / steps)
    base = min(turns[BASELINE])
    params = sum(p.numel() for p in contenders[0][1].parameters())
    return {
        "width": width,
        "parameters": params,
        "methods": {
            name: {
                "ms_per_step": 1e3 * min(turns[name]),
                "turn_means_ms": [1e3 * t for t in turns[name]],
                "ratio_to_sgd": min(turns[name]) / base,
                "extra_ms": 1e3 * (min(turns[name]) - base),
                "mean_cg_iterations": (
                    statistics.mean(iterations[name]) if iterations[name] else None
                ),
            }
            for name in methods
        },
    }


def _step(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    # Every optimizer takes the closure: torch.optim's call it (zero_grad, forward, backward)
    # before their update, curvlab's need the Objective itself.
    opt.step(Objective(model, loss_fn, x, y))  # type: ignore[arg-type]


def format_smw_cost(result: dict[str, Any]) -> str:
    """Markdown: ms/step and × SGD per method and width, extra ms per million parameters."""
    rows = result["widths"]
    names = list(rows[0]["methods"])
    head = "| width | parameters | " + " | ".join(names) + " |"
    lines = [head, "|" + "---:|" * (len(names) + 2)]
    for row in rows:
        cells = []
        for n in names:
            m = row["methods"][n]
            cell = f"{m['ms_per_step']:.1f} ms ({m['ratio_to_sgd']:.2f}×)"
            if m["mean_cg_iterations"] is not None:
                cell += f", {m['mean_cg_iterations']:.0f} CG it."
            cells.append(cell)
        lines.append(f"| {row['width']} | {row['parameters']:,} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Extra ms per step beyond SGD, per million parameters:")
    lines.append("")
    lines.append("| width | " + " | ".join(n for n in names if n != BASELINE) + " |")
    lines.append("|" + "---:|" * len(names))
    for row in rows:
        per = [
            f"{row['methods'][n]['extra_ms'] / (row['parameters'] / 1e6):.1f}"
            for n in names
            if n != BASELINE
        ]
        lines.append(f"| {row['width']} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def add_smw_cost_parser(sub: Any) -> None:
    """Register ``curvlab smw-cost``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "smw-cost", help="per-step cost of SMW-GN/NG/NG-BD and Hessian-free vs SGD (thesis ch.5)"
    )
    p.add_argument("--widths", default="250,500,1000", help="hidden widths (default 250,500,1000)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per turn (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="turns per method (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", metavar="OUT", help="write the measurements to this JSON file")


def run_smw_cost_command(args: argparse.Namespace) -> int:
    """``curvlab smw-cost``: measure, print the tables, optionally write the JSON."""
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        get_optimizer(name)
    result = measure_smw_cost(
        widths, methods, steps=args.steps, repeats=args.repeats, threads=args.threads
    )
    print(format_smw_cost(result))
    if args.json:
        print(write_json(args.json, result))
    return 0
