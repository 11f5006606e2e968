"""Per-step time of K-FAC against SGD with momentum, next to K-FAC's arithmetic floor.

``curvlab overhead`` answers one question of the project issue: how many times an SGD-m step
does a K-FAC step cost on a problem (by default the Fashion-MNIST autoencoder, batch 1000,
float32, 2 threads, inverses every 20 steps), and how far is that from what the extra
arithmetic alone must cost on this machine?

Measurement (`measure_overhead`):

* one model per method, all initialised from the same seed, and one fixed list of mini-batches
  drawn once (seeded shuffle) from the real training data, visited in the same order by all;
* each method is warmed up, then the methods take turns, ``A B C … A B C …``, ``steps`` timed
  steps per turn and ``repeats`` turns each, so that machine drift hits every method alike;
* a step is ``optimizer.step(Objective(model, loss_fn, x, y, batch_average=…))`` timed with
  ``time.perf_counter`` as `curvlab.bench.runner` times it (the objective is built outside);
* a turn's mean step time includes the amortised inverse refreshes and statistics steps (exactly
  so when ``steps`` is a multiple of every T1 and T2); a method's time is the minimum over its
  turns of the turn mean, and the median over all its timed steps is reported next to it;
* ratios are to sgd-m's time from the same run.

Floor (`floor_terms`): the time a K-FAC variant must spend beyond an SGD-m step, from FLOPs and
this machine's measured GEMM throughput at the same thread count, each term converted with the
throughput of the GEMM shape that really occurs (no single peak number):

* extra forward (``statistics="after_step"``): ``Σ_l 2·r·d_in·d_out`` with r = rows (m·|T|),
  timed as ``x @ Wᵀ``;
* statistics backward (sampled labels, or any after-step pass): only layer-output gradients,
  i.e. ``Σ_l 2·r·d_out·d_in`` over the layers whose input needs a gradient (not the first),
  timed as ``g @ W``; no weight gradients;
* factor products A and G: the FLOPs that `curvlab.curvature.factors` really executes, counted
  with `torch.utils.flop_counter.FlopCounterMode` (`curvlab.linalg.gram` computes only a block
  triangle for wide inputs), converted at the throughput of the full ``XᵀX`` GEMM of that shape;
* preconditioning ``G⁻¹ V A⁻¹``: two products per layer, ``2·d_out·d_a·(d_out + d_a)``;
* inversions: the *measured* time of `curvlab.linalg.damped_inverse` on each factor size,
  divided by T2 (not a FLOP estimate).

Statistics terms are divided by T1 (``curvature_every``). The floor ratio is
``(t_sgd + extra floor) / t_sgd`` with the measured t_sgd. As a cross-check, the FLOPs each
method executes per step are also counted with ``FlopCounterMode`` after the timing.

Conv layers are costed as their im2col GEMMs (an approximation); the floor is exact in form
for MLPs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from curvlab.bench.problems import Problem, get_problem
from curvlab.bench.records import environment, to_jsonable
from curvlab.bench.specs import get_optimizer, presets_for
from curvlab.curvature.factors import input_factor, output_factor
from curvlab.curvature.layers import find_layers
from curvlab.data import batches
from curvlab.linalg import damped_inverse
from curvlab.objective import Objective

__all__ = [
    "FLOOR_TERMS",
    "KFAC_TIMING_LR",
    "TARGET_PROBLEM",
    "FloorModel",
    "Gemm",
    "LayerGeometry",
    "Variant",
    "add_overhead_parser",
    "default_variants",
    "floor_terms",
    "format_overhead",
    "layer_geometry",
    "measure_floor_model",
    "measure_overhead",
    "run_overhead_command",
]

BASELINE = "sgd-m"
FLOOR_TERMS = (
    "extra_forward",
    "statistics_backward",
    "factor_A",
    "factor_G",
    "precondition",
    "inversion",
)
"""The components of a K-FAC variant's floor, in milliseconds per step beyond SGD-m."""

_KFAC_DEFAULTS: dict[str, Any] = {
    "fisher": "true",
    "statistics": "after_step",
    "curvature_every": 1,
    "inverse_every": 20,
}
_RUNNER_KEYS = ("warm_start", "batch_size")


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One timed method: a registered optimizer, hyperparameter overrides, the issue's target.

    Attributes:
        name: the table label.
        optimizer: a key of `curvlab.bench.specs.OPTIMIZERS`.
        hparams: overrides over the spec's defaults and its ``thesis`` preset for the problem.
        target: the issue's bound on the ratio to sgd-m, if it sets one.
    """

    name: str
    optimizer: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    target: float | None = None

    @property
    def is_kfac(self) -> bool:
        """Whether the floor model of K-FAC applies."""
        return self.optimizer in ("kfac", "kfac-ef")

    def kfac_setting(self, key: str) -> Any:
        """A K-FAC option as this variant uses it (the KFAC default when not overridden)."""
        if key == "fisher" and self.optimizer == "kfac-ef" and key not in self.hparams:
            return "empirical"
        return self.hparams.get(key, _KFAC_DEFAULTS[key])


#: K-FAC's learning rate in the timing runs. The thesis preset (0.03 with momentum 0.9, tuned on
#: MNIST with a warm start) diverges within ~20 steps on the Fashion-MNIST autoencoder, and a
#: diverged K-FAC skips its steps, which would time the wrong thing; at 0.003 every variant stays
#: finite for hundreds of steps there. The learning rate does not change the cost of a step.
KFAC_TIMING_LR = 0.003


#: The problem the issue's targets were set for (batch 1000, float32, 2 threads).
TARGET_PROBLEM = "fmnist-autoencoder"


def default_variants(
    inverse_every: int = 20, kfac_lr: float = KFAC_TIMING_LR, *, targets: bool = True
) -> list[Variant]:
    """sgd-m, adam and the five K-FAC variants of the issue, with its targets.

    The issue's targets (for `TARGET_PROBLEM`; ``targets=False`` leaves them out): true Fisher
    with factors every step ≤ 2.8× (both statistics points), empirical Fisher ≤ 2.3×, true
    Fisher with factors every 10 steps ≤ 1.9×.
    """
    base = {"inverse_every": inverse_every, "lr": kfac_lr}
    before = {"statistics": "before_step"}

    def bound(value: float) -> float | None:
        return value if targets else None

    return [
        Variant(BASELINE, "sgd-m"),
        Variant("adam", "adam"),
        Variant("kfac", "kfac", {**base}, bound(2.8)),
        Variant("kfac/before", "kfac", {**base, **before}, bound(2.8)),
        Variant("kfac-ef/before", "kfac", {**base, **before, "fisher": "empirical"}, bound(2.3)),
        Variant("kfac/T1=10", "kfac", {**base, "curvature_every": 10}, bound(1.9)),
        Variant("kfac/T1=10/before", "kfac", {**base, **before, "curvature_every": 10}, bound(1.9)),
    ]


def _hyperparameters(variant: Variant, problem: Problem) -> dict[str, Any]:
    """Spec defaults, then the problem's ``thesis`` preset (no runner keys), then overrides."""
    spec = get_optimizer(variant.optimizer)
    merged: dict[str, Any] = dict(spec.defaults)
    preset = presets_for(spec.name, problem.name).get("thesis")
    if preset is not None:
        merged.update({k: v for k, v in preset.hparams.items() if k not in _RUNNER_KEYS})
    merged.update(variant.hparams)
    return merged


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class LayerGeometry:
    """The matrix-form sizes of one Kronecker layer in one forward pass.

    Attributes:
        name: module name.
        rows: r = m·|T|, rows of the layer's matrix form (m for a Linear layer).
        fan_in: d_in (without the bias coordinate).
        d_out: output width.
        bias: whether the layer has a trainable bias (d_a = d_in + 1).
        input_grad: whether backpropagation continues below this layer (its input needs a
            gradient); False for the first layer of a network.
        input_shape, output_shape: tensor shapes seen in the forward pass.
    """

    name: str
    rows: int
    fan_in: int
    d_out: int
    bias: bool
    input_grad: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def d_a(self) -> int:
        """Input-side factor size: fan-in plus the bias coordinate."""
        return self.fan_in + int(self.bias)


def layer_geometry(model: nn.Module, inputs: Tensor) -> list[LayerGeometry]:
    """Sizes of ``model``'s Kronecker layers, from one forward pass on ``inputs``.

    A layer called several times is described by its first call.
    """
    layers = find_layers(model)
    seen: dict[str, tuple[Tensor, bool]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles: list[RemovableHandle] = []

    def pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, (args[0].detach(), bool(args[0].requires_grad)))

        return hook

    def post_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            shapes.setdefault(name, tuple(output.shape))

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.module.register_forward_pre_hook(pre_hook(name)))
            handles.append(layer.module.register_forward_hook(post_hook(name)))
        with torch.enable_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    out: list[LayerGeometry] = []
    for name, layer in layers.items():
        if name not in seen:
            continue
        x, needs_grad = seen[name]
        rows = layer.input_rows(x)
        out.append(
            LayerGeometry(
                name=name,
                rows=int(rows.shape[0]),
                fan_in=int(rows.shape[1]),
                d_out=layer.d_out,
                bias=layer.bias is not None,
                input_grad=needs_grad,
                input_shape=tuple(x.shape),
                output_shape=shapes[name],
            )
        )
    return out


# --------------------------------------------------------------------------- timing helpers
def _best_time(fn: Callable[[], object], repeats: int = 7, min_group_s: float = 2e-3) -> float:
    """Seconds per call of ``fn``: the minimum over ``repeats`` groups of calls.

    A group holds enough calls to last ``min_group_s`` so that tiny operations are not
    dominated by the clock's resolution. The minimum is the machine's best, a floor.
    """
    fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_group_s or number >= 1 << 14:
            break
        number *= 2 if elapsed <= 0 else max(2, math.ceil(min_group_s / elapsed))
    best = elapsed / number
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


@dataclass(frozen=True)
class Gemm:
    """A matrix product ``(rows × inner) @ (inner × cols)``.

    ``layout`` says how the operands are stored, as in the library's own calls: ``"nn"`` both
    contiguous (``g @ W``), ``"nt"`` the right one a transposed view (``x @ W.T``,
    ``P @ A.mT``), ``"tn"`` the left one a transposed view (``X.T @ X``).
    """

    rows: int
    inner: int
    cols: int
    layout: str

    @property
    def flops(self) -> int:
        """2·rows·inner·cols."""
        return 2 * self.rows * self.inner * self.cols

    @property
    def label(self) -> str:
        """E.g. ``(1000×785)@(785×1000) nt``."""
        return f"({self.rows}×{self.inner})@({self.inner}×{self.cols}) {self.layout}"

    def seconds(self, dtype: torch.dtype) -> float:
        """Best measured seconds of one product at the current thread count."""
        gen = torch.Generator().manual_seed(0)
        if self.layout == "tn":
            left = torch.randn(self.inner, self.rows, generator=gen, dtype=dtype).t()
        else:
            left = torch.randn(self.rows, self.inner, generator=gen, dtype=dtype)
        if self.layout == "nt":
            right = torch.randn(self.cols, self.inner, generator=gen, dtype=dtype).t()
        else:
            right = torch.randn(self.inner, self.cols, generator=gen, dtype=dtype)
        out = torch.empty(self.rows, self.cols, dtype=dtype)
        return _best_time(lambda: torch.mm(left, right, out=out))


def _counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn`` executes in matrix products (`FlopCounterMode`)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _spd(d: int, dtype: torch.dtype) -> Tensor:
    """A symmetric positive definite test matrix like a curvature factor (Gram / rows)."""
    gen = torch.Generator().manual_seed(d)
    X = torch.randn(max(2 * d, 8), d, generator=gen, dtype=dtype)
    return (X.t() @ X) / X.shape[0]


# --------------------------------------------------------------------------- floor
@dataclass
class _LayerCosts:
    """Per-layer unit costs in seconds (per occurrence) and FLOPs."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    factor_a_s: float = 0.0
    factor_g_s: float = 0.0
    precondition_s: float = 0.0
    inversion_s: float = 0.0
    weight_grad_s: float = 0.0
    forward_flops: int = 0
    backward_flops: int = 0
    factor_a_flops: int = 0
    factor_g_flops: int = 0
    precondition_flops: int = 0
    weight_grad_flops: int = 0
    factor_a_measured_s: float = 0.0
    factor_g_measured_s: float = 0.0


@dataclass
class FloorModel:
    """Measured unit costs of every layer, plus the GEMM and inversion timings behind them."""

    layers: list[LayerGeometry]
    costs: dict[str, _LayerCosts]
    gemms: dict[str, dict[str, float]]
    inversions_ms: dict[int, float]

    def total(self, attr: str) -> float:
        """Sum over layers of one `_LayerCosts` field."""
        return float(sum(getattr(c, attr) for c in self.costs.values()))


def measure_floor_model(
    model: nn.Module,
    inputs: Tensor,
    *,
    loss_scale: float,
    damping: float = 1.0,
    progress: bool = False,
) -> FloorModel:
    """Time every GEMM shape and factor inversion of K-FAC on ``model`` at the current threads.

    Args:
        model: the network (its layer sizes are read from a forward pass on ``inputs``).
        inputs: one mini-batch.
        loss_scale: c of the loss ``L = c·Σ_n l_n`` (only scales G; its FLOPs are unaffected).
        damping: damping of the timed inversions (does not change their cost).
        progress: report on stderr.
    """
    dtype = inputs.dtype
    geometry = layer_geometry(model, inputs)
    layers = find_layers(model)
    m = int(inputs.shape[0])
    gemm_seconds: dict[Gemm, float] = {}

    def timed(g: Gemm) -> float:
        if g not in gemm_seconds:
            gemm_seconds[g] = g.seconds(dtype)
        return gemm_seconds[g]

    inversion_s: dict[int, float] = {}

    def inverse_time(d: int) -> float:
        if d not in inversion_s:
            M = _spd(d, dtype)
            inversion_s[d] = _best_time(lambda: damped_inverse(M, damping), repeats=5)
        return inversion_s[d]

    gen = torch.Generator().manual_seed(1)
    costs: dict[str, _LayerCosts] = {}
    for geo in geometry:
        if progress:
            print(f"floor: timing {geo.name} ({geo.fan_in}→{geo.d_out})", file=sys.stderr)
        layer = layers[geo.name]
        c = _LayerCosts()
        fwd = Gemm(geo.rows, geo.fan_in, geo.d_out, "nt")
        c.forward_s, c.forward_flops = timed(fwd), fwd.flops
        if geo.input_grad:
            bwd = Gemm(geo.rows, geo.d_out, geo.fan_in, "nn")
            c.backward_s, c.backward_flops = timed(bwd), bwd.flops
        wgrad = Gemm(geo.d_out, geo.rows, geo.fan_in, "tn")
        c.weight_grad_s, c.weight_grad_flops = timed(wgrad), wgrad.flops
        x = torch.rand(geo.input_shape, generator=gen, dtype=dtype)
        g = torch.randn(geo.output_shape, generator=gen, dtype=dtype)
        a_factor = functools.partial(input_factor, layer, [x], m)
        g_factor = functools.partial(output_factor, layer, [g], m, loss_scale)
        c.factor_a_flops = _counted_flops(a_factor)
        c.factor_g_flops = _counted_flops(g_factor)
        full_a = Gemm(geo.fan_in, geo.rows, geo.fan_in, "tn")
        full_g = Gemm(geo.d_out, geo.rows, geo.d_out, "tn")
        c.factor_a_s = timed(full_a) * c.factor_a_flops / full_a.flops
        c.factor_g_s = timed(full_g) * c.factor_g_flops / full_g.flops
        c.factor_a_measured_s = _best_time(a_factor, repeats=5)
        c.factor_g_measured_s = _best_time(g_factor, repeats=5)
        left = Gemm(geo.d_out, geo.d_out, geo.d_a, "nn")
        right = Gemm(geo.d_out, geo.d_a, geo.d_a, "nt")
        c.precondition_s = timed(left) + timed(right)
        c.precondition_flops = left.flops + right.flops
        c.inversion_s = inverse_time(geo.d_a) + inverse_time(geo.d_out)
        costs[geo.name] = c
    gemms = {
        g.label: {"ms": 1e3 * s, "gflop_per_s": g.flops / s / 1e9, "flops": float(g.flops)}
        for g, s in gemm_seconds.items()
    }
    return FloorModel(geometry, costs, gemms, {d: 1e3 * s for d, s in sorted(inversion_s.items())})


def floor_terms(variant: Variant, floor: FloorModel) -> dict[str, float]:
    """Milliseconds per step that ``variant`` must spend beyond an SGD-m step (`FLOOR_TERMS`).

    Empty for methods that are not K-FAC.
    """
    if not variant.is_kfac:
        return {}
    every = int(variant.kfac_setting("curvature_every"))
    t2 = int(variant.kfac_setting("inverse_every"))
    after = variant.kfac_setting("statistics") == "after_step"
    sampled = variant.kfac_setting("fisher") == "true"
    per_stats = 1e3 / every
    return {
        "extra_forward": floor.total("forward_s") * per_stats if after else 0.0,
        "statistics_backward": (
            floor.total("backward_s") * per_stats if (after or sampled) else 0.0
        ),
        "factor_A": floor.total("factor_a_s") * per_stats,
        "factor_G": floor.total("factor_g_s") * per_stats,
        "precondition": floor.total("precondition_s") * 1e3,
        "inversion": floor.total("inversion_s") * 1e3 / t2,
    }


def _floor_flops(variant: Variant, floor: FloorModel) -> float:
    """Matrix-product FLOPs per step beyond SGD-m in the floor model (inversions excluded)."""
    if not variant.is_kfac:
        return 0.0
    every = int(variant.kfac_setting("curvature_every"))
    after = variant.kfac_setting("statistics") == "after_step"
    sampled = variant.kfac_setting("fisher") == "true"
    stats = floor.total("factor_a_flops") + floor.total("factor_g_flops")
    if after:
        stats += floor.total("forward_flops")
    if after or sampled:
        stats += floor.total("backward_flops")
    return stats / every + floor.total("precondition_flops")


# --------------------------------------------------------------------------- measurement
@dataclass
class _Contender:
    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    hparams: dict[str, Any]
    position: int = 0
    turns: list[list[float]] = field(default_factory=list)
    skipped: int = 0


def _fixed_batches(
    problem: Problem, batch_size: int, count: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``count`` distinct mini-batches (fewer if the training set is smaller), drawn once."""
    data = problem.data()
    if data.num_train < batch_size:
        raise ValueError(f"batch: {batch_size} exceeds the {data.num_train} training examples")
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[Tensor, Tensor]] = []
    for x, y in batches(
        data.train_inputs,
        data.train_targets,
        batch_size,
        shuffle=True,
        generator=gen,
        drop_last=True,
    ):
        out.append((x.contiguous(), y.contiguous()))
        if len(out) == count:
            break
    return out


def _step(
    c: _Contender,
    data: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_average: bool,
) -> float:
    """One timed optimizer step on the contender's next batch; returns seconds."""
    x, y = data[c.position % len(data)]
    c.position += 1
    objective = Objective(c.model, loss_fn, x, y, batch_average=batch_average)
    t0 = time.perf_counter()
    c.optimizer.step(objective)  # type: ignore[arg-type]  # an Objective is a closure
    elapsed = time.perf_counter() - t0
    info = getattr(c.optimizer, "last_step_info", None)
    if isinstance(info, Mapping) and info.get("skipped") is True:
        c.skipped += 1
    return elapsed


def _validate(steps: int, repeats: int, warmup: int, threads: int | None) -> None:
    if steps < 1:
        raise ValueError(f"steps: need at least 1, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats: need at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: must be ≥ 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads: need at least 1, got {threads}")


def measure_overhead(
    problem: Problem | str = "fmnist-autoencoder",
    *,
    batch_size: int | None = None,
    threads: int | None = 2,
    steps: int = 60,
    repeats: int = 3,
    warmup: int = 5,
    seed: int = 0,
    variants: Sequence[Variant] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Time the variants in turns, model K-FAC's floor, and return everything as a JSON-ready dict.

    Args:
        problem: a `Problem` or its registry name.
        batch_size: m (default: the problem's).
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards);
            None keeps the current setting.
        steps: timed steps per turn (a multiple of every T1 and T2 amortises exactly).
        repeats: turns per method; the minimum turn mean is reported.
        warmup: untimed steps per method before the first turn.
        seed: model initialisation, batch selection and the global RNG.
        variants: the methods (default `default_variants`); must include ``sgd-m``.
        progress: report progress on stderr.

    Returns:
        ``{"config", "environment", "methods", "floor", "layers", "gemms", "inversions_ms"}``;
        see `format_overhead` for the table made from it.
    """
    _validate(steps, repeats, warmup, threads)
    prob = get_problem(problem) if isinstance(problem, str) else problem
    chosen = list(variants) if variants is not None else default_variants()
    names = [v.name for v in chosen]
    if BASELINE not in names:
        raise ValueError(f"variants: the baseline {BASELINE!r} must be one of them")
    if len(set(names)) != len(names):
        raise ValueError(f"variants: duplicate names in {names}")
    for v in chosen:
        get_optimizer(v.optimizer)
    m = int(batch_size if batch_size is not None else prob.batch_size)
    if m < 1:
        raise ValueError(f"batch: must be positive, got {m}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(prob, chosen, m, steps, repeats, warmup, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(
    prob: Problem,
    variants: list[Variant],
    m: int,
    steps: int,
    repeats: int,
    warmup: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    data = _fixed_batches(prob, m, steps + warmup, seed)
    loss_fn = prob.make_loss()
    torch.manual_seed(seed)
    contenders: list[_Contender] = []
    for v in variants:
        model = prob.make_model(seed)
        model.train()
        hparams = _hyperparameters(v, prob)
        optimizer = get_optimizer(v.optimizer).factory(model, dict(hparams))
        contenders.append(_Contender(v, model, optimizer, hparams))

    for c in contenders:
        say(f"warm-up: {c.variant.name} ({warmup} steps)")
        for _ in range(warmup):
            _step(c, data, loss_fn, prob.batch_average)
    for turn in range(repeats):
        for c in contenders:
            gc.collect()
            times = [_step(c, data, loss_fn, prob.batch_average) for _ in range(steps)]
            c.turns.append(times)
            say(
                f"turn {turn + 1}/{repeats} {c.variant.name}: "
                f"{1e3 * statistics.fmean(times):.2f} ms/step"
            )

    counted: dict[str, float] = {}
    for c in contenders:
        # One statistics period, so that every kind of step is counted in its proportion.
        n = int(c.variant.kfac_setting("curvature_every")) if c.variant.is_kfac else 1

        def period(c: _Contender = c, n: int = n) -> None:
            for _ in range(n):
                _step(c, data, loss_fn, prob.batch_average)

        counted[c.variant.name] = _counted_flops(period) / n

    say("floor: timing GEMM shapes and inversions")
    x0 = data[0][0]
    objective = Objective(
        contenders[0].model, loss_fn, x0, data[0][1], batch_average=prob.batch_average
    )
    with torch.no_grad():
        outputs = contenders[0].model(x0)
    try:
        loss_scale = objective.loss_scale(outputs)
    except ValueError:  # a loss without a likelihood: the scale does not change the cost
        loss_scale = 1.0
    floor = measure_floor_model(contenders[0].model, x0, loss_scale=loss_scale, progress=progress)

    base = next(c for c in contenders if c.variant.name == BASELINE)
    t_base = min(statistics.fmean(t) for t in base.turns)
    methods: list[dict[str, Any]] = []
    for c in contenders:
        turn_means = [statistics.fmean(t) for t in c.turns]
        mean_s = min(turn_means)
        terms = floor_terms(c.variant, floor)
        extra_ms = sum(terms.values())
        floor_ratio = (1e3 * t_base + extra_ms) / (1e3 * t_base) if c.variant.is_kfac else None
        if c.variant.name == BASELINE:
            floor_ratio = 1.0
        ratio = mean_s / t_base
        methods.append(
            {
                "name": c.variant.name,
                "optimizer": c.variant.optimizer,
                "hyperparameters": c.hparams,
                "target": c.variant.target,
                "mean_ms": 1e3 * mean_s,
                "median_ms": 1e3 * statistics.median([s for t in c.turns for s in t]),
                "turn_means_ms": [1e3 * s for s in turn_means],
                "ratio": ratio,
                "floor_ratio": floor_ratio,
                "measured_over_floor": None if floor_ratio is None else ratio / floor_ratio,
                "floor_extra_ms": extra_ms if c.variant.is_kfac else None,
                "floor_terms_ms": terms,
                "floor_extra_gflop": _floor_flops(c.variant, floor) / 1e9,
                "counted_gflop_per_step": counted[c.variant.name] / 1e9,
                "counted_extra_gflop": (counted[c.variant.name] - counted[BASELINE]) / 1e9,
                "measured_extra_ms": 1e3 * (mean_s - t_base),
                "meets_target": None if c.variant.target is None else ratio <= c.variant.target,
                "skipped_steps": c.skipped,
            }
        )
    periods = [
        int(c.variant.kfac_setting(k))
        for c in contenders
        if c.variant.is_kfac
        for k in ("curvature_every", "inverse_every")
    ]
    sgd_gemm_ms = 1e3 * (
        floor.total("forward_s") + floor.total("backward_s") + floor.total("weight_grad_s")
    )
    result: dict[str, Any] = {
        "config": {
            "problem": prob.name,
            "batch_size": m,
            "threads": torch.get_num_threads(),
            "dtype": str(x0.dtype),
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "distinct_batches": len(data),
            "amortisation_exact": all(steps % p == 0 for p in periods),
            "order": [c.variant.name for c in contenders],
        },
        "environment": environment("cpu"),
        "methods": methods,
        "floor": {
            "sgd_measured_ms": 1e3 * t_base,
            "sgd_gemm_floor_ms": sgd_gemm_ms,
            "per_layer": {
                name: {k: v * 1e3 if k.endswith("_s") else v for k, v in vars(c).items()}
                for name, c in floor.costs.items()
            },
        },
        "layers": [vars(g) for g in floor.layers],
        "gemms": floor.gemms,
        "inversions_ms": floor.inversions_ms,
    }
    jsonable: dict[str, Any] = to_jsonable(result)
    return jsonable


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def format_overhead(result: Mapping[str, Any]) -> str:
    """Markdown: the timing table (ratio next to floor and target), then the floor terms."""
    cfg = result["config"]
    lines = [
        f"{cfg['problem']}, batch {cfg['batch_size']}, {cfg['dtype']}, {cfg['threads']} "
        f"threads; {cfg['repeats']} turns × {cfg['steps']} steps, min over turns of the mean "
        f"(amortisation exact: {'yes' if cfg['amortisation_exact'] else 'no'})",
        "",
        "| variant | ms/step (mean) | ms/step (median) | × sgd-m | floor × | measured / floor "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["methods"]:
        target = row["target"]
        verdict = "" if row["meets_target"] is None else (" ✓" if row["meets_target"] else " ✗")
        if row["skipped_steps"]:
            verdict += f" ({row['skipped_steps']} skipped steps: invalid)"
        lines.append(
            f"| {row['name']} | {_fmt(row['mean_ms'], '.2f')} | {_fmt(row['median_ms'], '.2f')} "
            f"| {_fmt(row['ratio'], '.2f')} | {_fmt(row['floor_ratio'], '.2f')} "
            f"| {_fmt(row['measured_over_floor'], '.2f')} "
            f"| {'—' if target is None else f'≤ {target:g}{verdict}'} |"
        )
    lines += [
        "",
        "Floor terms, ms per step beyond sgd-m (GEMM-shape throughput; inversions measured):",
        "",
        "| variant | " + " | ".join(FLOOR_TERMS) + " | floor extra | measured extra |",
        "|---|" + "---:|" * (len(FLOOR_TERMS) + 2),
    ]
    for row in result["methods"]:
        if row["floor_extra_ms"] is None:
            continue
        terms = row["floor_terms_ms"]
        lines.append(
            f"| {row['name']} | "
            + " | ".join(_fmt(terms[k], ".2f") for k in FLOOR_TERMS)
            + f" | {_fmt(row['floor_extra_ms'], '.2f')} | "
            f"{_fmt(row['measured_extra_ms'], '.2f')} |"
        )
    fl = result["floor"]
    lines += [
        "",
        f"sgd-m measured {_fmt(fl['sgd_measured_ms'], '.2f')} ms/step; its own GEMMs at the "
        f"same throughput: {_fmt(fl['sgd_gemm_floor_ms'], '.2f')} ms.",
    ]
    skipped = [r["name"] for r in result["methods"] if r["skipped_steps"]]
    if skipped:
        lines.append(f"Warning: skipped (non-finite) steps in {', '.join(skipped)}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def add_overhead_parser(sub: Any) -> None:
    """Register ``curvlab overhead`` on the CLI's subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "overhead", help="K-FAC's per-step time over sgd-m, next to its arithmetic floor"
    )
    p.add_argument("--problem", default="fmnist-autoencoder", help="default fmnist-autoencoder")
    p.add_argument("--batch", type=int, help="batch size m (default: the problem's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per turn (default 60)")
    p.add_argument("--repeats", type=int, default=3, help="turns per method (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per method (default 5)")
    p.add_argument("--inverse-every", type=int, default=20, help="K-FAC's T2 (default 20)")
    p.add_argument(
        "--kfac-lr",
        type=float,
        default=KFAC_TIMING_LR,
        help=f"K-FAC's learning rate (default {KFAC_TIMING_LR:g}: finite on every variant)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--json", metavar="OUT", help="write every measurement to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run_overhead_command(args: argparse.Namespace) -> int:
    """``curvlab overhead``: measure, print the Markdown table, optionally write the JSON."""
    problem = get_problem(args.problem)
    result = measure_overhead(
        problem,
        batch_size=args.batch,
        threads=args.threads,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        variants=default_variants(
            args.inverse_every, args.kfac_lr, targets=problem.name == TARGET_PROBLEM
        ),
        progress=not args.no_progress,
    )
    print(format_overhead(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        print(path)
    return 0
