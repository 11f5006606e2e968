"""Cost of one curvature-vector product against one gradient: ``curvlab products``.

`measure_products` answers: on a model and a mini-batch, how many gradients does one Hessian-
vector product and one GGN-vector product of `curvlab.autodiff` cost? The project's
performance targets (`PRODUCT_TARGETS`), on the thesis autoencoder at batch 1000: HVP ≤ 2.5×,
GGN·v ≤ 2×.

Measurement:

* a *gradient* is the ordinary training closure ``objective()`` (zero_grad → forward → loss →
  backward into ``.grad``), BatchNorm buffers restored afterwards (outside the timed region);
* a *product* is one ``operator.matvec(v)`` on an operator built once per round (the build is
  timed separately: it is paid once per optimizer step, the products once per CG iteration);
  ``products_per_build`` products are timed per build, each on its own;
* the entries take turns, one round each, the order rotated from round to round so that machine
  drift hits every entry alike; one untimed warm-up round first; ``gc.collect()`` between
  entries, outside the timed regions;
* each time is reported as the minimum (the machine's best) and the median over all its
  samples; ratios divide by the gradient's minimum (resp. median) from the same run;
* next to the library's kinds (``hessian``, ``ggn``, ``hessian-fd``), the `torch.func`
  alternatives that `curvlab.autodiff.products` argues against are timed too
  (``jvp(grad(L))`` per HVP; ``jvp`` + a cached ``vjp_fn`` per GGN·v), so that the choice can
  be checked on the machine;
* FLOPs of one gradient, build and product are counted with `FlopCounterMode` (machine-
  independent; matrix products only).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import jvp, vjp
from torch.utils.flop_counter import FlopCounterMode

from curvlab.autodiff.functional import ParameterView
from curvlab.autodiff.output_curvature import output_curvature
from curvlab.autodiff.products import CurvatureOperator, curvature_operator
from curvlab.bench.problems import get_problem
from curvlab.bench.records import write_json
from curvlab.objective import Objective, preserved_buffers

__all__ = [
    "PRODUCT_TARGETS",
    "add_products_parser",
    "format_products",
    "measure_products",
    "run_products_command",
]

#: The project's targets for one product over one gradient (thesis autoencoder, batch 1000).
PRODUCT_TARGETS: dict[str, float] = {"hessian": 2.5, "ggn": 2.0}


@dataclass
class _Entry:
    """One timed method: an optional build, then products; its samples in seconds."""

    name: str
    kind: str
    implementation: str
    build: Callable[[], Any] | None
    product: Callable[[Any], object]
    build_s: list[float] = field(default_factory=list)
    product_s: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {"min": 1e3 * min(samples), "median": 1e3 * statistics.median(samples)}


def _count(entry: _Entry, model: nn.Module) -> tuple[int, int]:
    """FLOPs (matrix products) of one build and one product of ``entry``."""
    state: Any = None
    build_flops = 0
    with preserved_buffers(model):
        if entry.build is not None:
            with FlopCounterMode(display=False) as counter:
                state = entry.build()
            build_flops = int(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            entry.product(state)
        del state
    for p in model.parameters():
        p.grad = None
    return build_flops, int(counter.get_total_flops())


def measure_products(
    model: nn.Module,
    objective: Objective,
    repeats: int = 5,
    *,
    products_per_build: int = 3,
    alternatives: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time a gradient, an HVP and a GGN·v (and the alternatives) in turns; return ratios.

    Args:
        model: the network; ``objective.model`` must be this module. Its trainable parameters
            are the product's parameters.
        objective: the mini-batch (e.g. the thesis autoencoder at batch 1000).
        repeats: timed rounds (≥ 1), after one untimed warm-up round.
        products_per_build: products timed per operator build (≥ 1).
        alternatives: also time the `torch.func` forward-mode variants.
        seed: the direction v (a seeded unit vector).

    Returns:
        ``{"config", "gradient", "methods", "ratios"}``: ``gradient`` and each method's
        ``build_ms`` / ``product_ms`` hold ``{"min", "median"}`` in milliseconds; each method
        has ``ratio_min`` / ``ratio_median`` (product over gradient), ``build_ratio_min``,
        ``flop_ratio``, ``target`` and ``meets_target`` (on ``ratio_min``); ``ratios`` maps
        method names to ``ratio_min``.

    Raises:
        ValueError: ``objective.model`` is not ``model``, or ``repeats`` /
            ``products_per_build`` < 1.
    """
    if objective.model is not model:
        raise ValueError("objective: objective.model must be the model being measured")
    for name, value in (("repeats", repeats), ("products_per_build", products_per_build)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    view = ParameterView(objective, params)
    device = view.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(view.dim, generator=gen, dtype=view.dtype).to(device)
    v /= v.norm()

    def gradient(_: object) -> object:
        return objective()

    def builder(kind: str) -> Callable[[], CurvatureOperator]:
        return lambda: curvature_operator(objective, params, kind)

    def matvec(op: CurvatureOperator) -> object:
        return op.matvec(v)

    entries = [_Entry("gradient", "gradient", "objective(): forward + backward", None, gradient)]
    for kind, implementation in (
        ("hessian", "reverse-over-reverse on a kept gradient graph"),
        ("ggn", "double-vjp R-op + L-op on kept graphs, analytic H_L"),
        ("hessian-fd", "forward difference of two gradients"),
    ):
        entries.append(_Entry(kind, kind, implementation, builder(kind), matvec))
    if alternatives:
        theta = tuple(p.detach() for p in params)
        tangents = tuple(view.unflatten(v))

        def loss_of(*values: Tensor) -> Tensor:
            return view.loss(values)[1]

        def outputs_of(*values: Tensor) -> Tensor:
            return view.outputs(values)

        def alt_hvp(_: object) -> object:
            return jvp(func_grad(loss_of, argnums=tuple(range(len(theta)))), theta, tangents)[1]

        def alt_ggn_build() -> tuple[Any, Any]:
            outputs, vjp_fn = vjp(outputs_of, *theta)[:2]
            return vjp_fn, output_curvature(objective, outputs.detach(), "ggn")

        def alt_ggn(state: tuple[Any, Any]) -> object:
            vjp_fn, curvature = state
            r = jvp(outputs_of, theta, tangents)[1]
            return vjp_fn(curvature(r))

        entries.append(
            _Entry("hessian/torch.func", "hessian", "torch.func jvp(grad(L))", None, alt_hvp)
        )
        entries.append(
            _Entry(
                "ggn/torch.func",
                "ggn",
                "torch.func jvp + cached vjp_fn",
                alt_ggn_build,
                alt_ggn,
            )
        )

    def run(entry: _Entry, record: bool) -> None:
        with preserved_buffers(model):
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            state = entry.build() if entry.build is not None else None
            _sync(device)
            if record and entry.build is not None:
                entry.build_s.append(time.perf_counter() - t0)
            for _ in range(1 if entry.build is None else products_per_build):
                _sync(device)
                t0 = time.perf_counter()
                entry.product(state)
                _sync(device)
                if record:
                    entry.product_s.append(time.perf_counter() - t0)
            del state
        for p in model.parameters():
            p.grad = None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for entry in entries:  # warm-up round
            run(entry, record=False)
        for round_ in range(repeats):
            k = round_ % len(entries)
            for entry in entries[k:] + entries[:k]:
                run(entry, record=True)
        flops = {entry.name: _count(entry, model) for entry in entries}

    grad_entry = entries[0]
    g_min = min(grad_entry.product_s)
    g_med = statistics.median(grad_entry.product_s)
    g_flops = flops["gradient"][1]
    methods: list[dict[str, Any]] = []
    for entry in entries[1:]:
        p_min, p_med = min(entry.product_s), statistics.median(entry.product_s)
        target = PRODUCT_TARGETS.get(entry.kind)
        ratio_min = p_min / g_min
        methods.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "implementation": entry.implementation,
                "build_ms": _stats(entry.build_s),
                "product_ms": _stats(entry.product_s),
                "ratio_min": ratio_min,
                "ratio_median": p_med / g_med,
                "build_ratio_min": min(entry.build_s) / g_min if entry.build_s else None,
                "flop_ratio": flops[entry.name][1] / g_flops if g_flops else None,
                "build_flop_ratio": flops[entry.name][0] / g_flops if g_flops else None,
                "target": target,
                "meets_target": None if target is None else ratio_min <= target,
            }
        )
    return {
        "config": {
            "repeats": repeats,
            "products_per_build": products_per_build,
            "dim": view.dim,
            "batch_size": objective.batch_size,
            "dtype": str(view.dtype),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "loss": type(objective.loss_fn).__name__,
            "seed": seed,
        },
        "gradient": {"ms": _stats(grad_entry.product_s), "gflop": g_flops / 1e9},
        "methods": methods,
        "ratios": {m["name"]: m["ratio_min"] for m in methods},
    }


def format_products(result: dict[str, Any]) -> str:
    """Markdown: one row per method, product time over one gradient next to the target."""
    cfg = result["config"]
    grad_ms = result["gradient"]["ms"]
    lines = [
        f"batch {cfg['batch_size']}, {cfg['dtype']}, {cfg['device']}, {cfg['threads']} threads, "
        f"dim {cfg['dim']}; {cfg['repeats']} rounds × {cfg['products_per_build']} products; "
        f"gradient {grad_ms['min']:.2f} ms (min), {grad_ms['median']:.2f} ms (median)",
        "",
        "| method | implementation | build × grad | product ms (min) | × grad (min) "
        "| × grad (median) | FLOPs × grad | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["methods"]:
        build = "—" if m["build_ratio_min"] is None else f"{m['build_ratio_min']:.2f}"
        flop = "—" if m["flop_ratio"] is None else f"{m['flop_ratio']:.2f}"
        if m["target"] is None:
            target = "—"
        else:
            target = f"≤ {m['target']:g} {'✓' if m['meets_target'] else '✗'}"
        lines.append(
            f"| {m['name']} | {m['implementation']} | {build} | {m['product_ms']['min']:.2f} "
            f"| {m['ratio_min']:.2f} | {m['ratio_median']:.2f} | {flop} | {target} |"
        )
    return "\n".join(lines)


def add_products_parser(sub: Any) -> None:
    """Register ``curvlab products`` on the CLI's subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "products", help="one Hessian- and GGN-vector product against one gradient"
    )
    p.add_argument("--problem", default="fmnist-autoencoder", help="default fmnist-autoencoder")
    p.add_argument("--batch", type=int, help="batch size m (default: the problem's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    p.add_argument("--seed", type=int, default=0, help="model and direction seed (default 0)")
    p.add_argument("--json", metavar="OUT", help="write the measurements to this JSON file")


def run_products_command(args: argparse.Namespace) -> int:
    """``curvlab products``: the problem's model on its first ``batch`` training examples."""
    problem = get_problem(args.problem)
    torch.set_num_threads(args.threads)
    data = problem.data()
    m = args.batch or problem.batch_size
    model = problem.make_model(args.seed).train()
    objective = Objective(
        model,
        problem.make_loss(),
        data.train_inputs[:m],
        data.train_targets[:m],
        batch_average=problem.batch_average,
    )
    result = measure_products(model, objective, args.repeats, seed=args.seed)
    result["config"].update(problem=problem.name, batch=m, threads=args.threads)
    print(format_products(result))
    if args.json:
        print(write_json(args.json, result))
    return 0
