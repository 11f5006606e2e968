"""The one registry of curvlab's optimizers: each method once, each named configuration once.

A `Method` is one optimizer class: the valid range of each of its numeric hyperparameters,
exactly as its constructor validates them (`Real`, `Int`: `curvlab.optim.validation`'s rules);
its choices and flags are read from the constructor's annotations (``Literal[...]``, ``bool``),
so they need no entry. From these domains come the invalid values the conformance suite passes
(`Method.invalid_values`: just outside each range, NaN, an unknown choice) and, with ``fuzz``,
the values the fuzzer draws (tests/test_fuzz.py).

A `Config` is one named configuration of a method: the keyword arguments that define it
(``kwargs``), the hyperparameters it is conformance-tested with on the suite's tiny problem
(``test``; ``None`` leaves it out of the suite) and, for a configuration the bench runs,
what ``curvlab list`` prints about it (``bench``; `curvlab.bench.specs` builds its
`OptimizerSpec` from it).

Three places read this module: the conformance suite (tests/optim/test_conformance.py with
`curvlab.testing.conformance`), the fuzzer (tests/test_fuzz.py) and the bench
(`curvlab.bench.specs`). Adding a method is its file and exports, one `Method` and its
`Config` lines here, its own test file and its README row; the suite, the fuzzer and the bench
pick it up, and meta-tests fail while an exported optimizer has no `Method` or a numeric
hyperparameter no range.

Example, the configuration ``kbfgs-l`` (K-BFGS(L) with p = 100 pairs in the bench; p = 5 on the
suite's eight-unit problem, so that its ring of pairs wraps)::

    Config(
        "kbfgs-l",
        _KBFGS,
        kwargs={"memory": 100},
        test={"lr": 0.1, "damping": 0.1, "memory": 5},
        bench=Bench({"lr": 0.03, "damping": 0.3}, paper=..., algorithm=..., description=...),
    )
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import torch
from torch import nn

from curvlab.optim.arc import ARC
from curvlab.optim.edf import EDF
from curvlab.optim.efficient_tr import EfficientTR, HybridTRSGD
from curvlab.optim.hessian_free import HessianFree
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.smw import SMWGN, SMWNG, SMWNGBD
from curvlab.optim.tnt import TNT
from curvlab.optim.trust_region import EllipsoidalTR
from curvlab.optim.tso_alra import TSOALRA, TSOALRAFirstStage

__all__ = [
    "CONFIGS",
    "METHODS",
    "Bench",
    "Choice",
    "Config",
    "Domain",
    "Every",
    "Flag",
    "Int",
    "IntRange",
    "LogUniform",
    "Method",
    "OneOf",
    "Real",
    "Sample",
    "bench_configs",
    "conformance_configs",
]

#: A value no choice of any method has: the invalid value of every `Choice`.
NOT_A_CHOICE = "not-a-choice"


# ------------------------------------------------------------------------------ domains
def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _outside(bound: float, direction: float) -> float:
    """A value just outside a closed bound: 10% of its magnitude (0.1 at zero) beyond it, so
    that a bound set by another hyperparameter (η₂ ≥ η₁) is tested as itself."""
    return bound + direction * (0.1 * abs(bound) if bound else 0.1)


@dataclass(frozen=True)
class Real:
    """A finite real in [low, high]; an open end excludes its bound (`check_range`'s rule).
    ``optional``: ``None`` is valid too (read from the annotation)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if not _is_real(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def invalid(self) -> tuple[Any, ...]:
        """Just below the range, just above it (finite ends only), and NaN."""
        out: list[Any] = []
        if math.isfinite(self.low):
            out.append(self.low if self.low_open else _outside(self.low, -1.0))
        if math.isfinite(self.high):
            out.append(self.high if self.high_open else _outside(self.high, 1.0))
        return (*out, math.nan)


@dataclass(frozen=True)
class Int:
    """An integer ≥ low (`check_int`'s rule)."""

    low: int = 1
    optional: bool = False

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return isinstance(value, int) and not isinstance(value, bool) and value >= self.low

    def invalid(self) -> tuple[Any, ...]:
        """One below the range, and a non-integer inside it."""
        return (self.low - 1, self.low + 0.5)


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (a ``Literal`` annotation; `check_choice`'s rule)."""

    options: tuple[Any, ...]
    optional: bool = False

    def contains(self, value: Any) -> bool:
        return (value is None and self.optional) or value in self.options

    def invalid(self) -> tuple[Any, ...]:
        return (NOT_A_CHOICE,)


@dataclass(frozen=True)
class Flag:
    """A bool (a ``bool`` annotation)."""

    optional: bool = False

    def contains(self, value: Any) -> bool:
        return (value is None and self.optional) or isinstance(value, bool)

    def invalid(self) -> tuple[Any, ...]:
        return ("yes",)


Domain = Real | Int | Choice | Flag


# ------------------------------------------------------------------------------ fuzzing
@dataclass(frozen=True)
class LogUniform:
    """Log-uniform floats in [low, high]."""

    low: float
    high: float

    def values_within(self, domain: Domain) -> bool:
        return domain.contains(self.low) and domain.contains(self.high)


@dataclass(frozen=True)
class IntRange:
    """Integers in [low, high]."""

    low: int
    high: int

    def values_within(self, domain: Domain) -> bool:
        return all(domain.contains(v) for v in range(self.low, self.high + 1))


@dataclass(frozen=True)
class OneOf:
    """One of the given values."""

    values: tuple[Any, ...]

    def values_within(self, domain: Domain) -> bool:
        return all(domain.contains(v) for v in self.values)


@dataclass(frozen=True)
class Every:
    """Every option of a `Choice`, or both values of a `Flag`."""

    def values_within(self, domain: Domain) -> bool:
        return isinstance(domain, (Choice, Flag))


Sample = LogUniform | IntRange | OneOf | Every
EVERY = Every()


# ------------------------------------------------------------------------------ methods
_NOT_HYPERPARAMETERS = {"self", "model", "params", "loss_fn", "return"}


def _domain_of(name: str, hint: Any, declared: Real | Int | None) -> Domain:
    """The domain of hyperparameter ``name`` from its annotation (and its declared range)."""
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        optional = True
        (hint,) = (a for a in args if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return Choice(typing.get_args(hint), optional)
    if hint is bool:
        return Flag(optional)
    kind = {float: Real, int: Int}.get(hint)
    if kind is None or declared is None or not isinstance(declared, kind):
        raise TypeError(
            f"{name}: annotated {hint!r}; a numeric hyperparameter needs its range declared "
            f"in curvlab.optim.registry (Real for float, Int for int), got {declared!r}"
        )
    return replace(declared, optional=optional)


@dataclass(frozen=True)
class Method:
    """One optimizer class and its hyperparameters.

    Attributes:
        cls: the optimizer class (built as ``cls(model, **hyperparameters)``).
        ranges: the valid range of every numeric hyperparameter, as the constructor checks it
            (for a bound set by another hyperparameter, the bound at that one's default).
        fuzz: what the fuzzer draws for the hyperparameters it varies (within ``ranges``).
        invalid: further invalid values a range cannot state (e.g. a combination).
        unchecked: hyperparameters the constructor accepts as given (no invalid value).
        forwards_to: the class whose keyword arguments ``cls`` passes on (``**options``).
        needs_layers: every trainable parameter must be in an ``nn.Linear``/``nn.Conv2d``
            (models with others raise ``ValueError("model: ...")``).
    """

    cls: type[torch.optim.Optimizer]
    ranges: Mapping[str, Real | Int]
    fuzz: Mapping[str, Sample] = field(default_factory=dict)
    invalid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    unchecked: frozenset[str] = frozenset()
    forwards_to: type | None = None
    needs_layers: bool = False

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(self, model: nn.Module | Any, **hyperparameters: Any) -> torch.optim.Optimizer:
        """``cls(model, **hyperparameters)``."""
        factory: Callable[..., torch.optim.Optimizer] = self.cls
        return factory(model, **hyperparameters)

    def hints(self) -> dict[str, Any]:
        """The constructor's annotated hyperparameters, in signature order."""
        hints: dict[str, Any] = {}
        for cls in (self.cls, self.forwards_to):
            if cls is None:
                continue
            for name, hint in typing.get_type_hints(cls.__init__).items():  # type: ignore[misc]
                if name not in _NOT_HYPERPARAMETERS and hint is not Any:
                    hints.setdefault(name, hint)
        return hints

    def domains(self) -> dict[str, Domain]:
        """Every hyperparameter's domain (`TypeError` for a numeric one without a range)."""
        return {n: _domain_of(n, h, self.ranges.get(n)) for n, h in self.hints().items()}

    def invalid_values(self) -> dict[str, tuple[Any, ...]]:
        """What the constructor must refuse, naming the hyperparameter, per hyperparameter."""
        return {
            name: domain.invalid() + tuple(self.invalid.get(name, ()))
            for name, domain in self.domains().items()
            if name not in self.unchecked
        }


@dataclass(frozen=True)
class Bench:
    """What the bench needs beyond the `Config`: its defaults and what ``curvlab list`` says.

    Attributes:
        defaults: hyperparameters used when neither a preset nor ``--set`` gives them.
        paper: the paper (and chapter) that defines the method.
        algorithm: the algorithm number in that paper, or the implementation it follows.
        description: one line for ``curvlab list``.
    """

    defaults: Mapping[str, Any]
    paper: str
    algorithm: str
    description: str


@dataclass(frozen=True)
class Config:
    """One named configuration of a method.

    Attributes:
        name: the configuration's name: the conformance test id and, with ``bench``, the name
            on the ``curvlab`` command line.
        method: the `Method`.
        kwargs: the keyword arguments that make this configuration (the bench's factory
            passes them under its ``defaults``, a preset and ``--set``).
        test: the hyperparameters of the conformance suite's runs, over ``kwargs`` (tuned to
            its tiny problem); ``None``: not in the suite.
        bench: the bench's defaults and description; ``None``: not a bench optimizer.
    """

    name: str
    method: Method
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    test: Mapping[str, Any] | None = None
    bench: Bench | None = None

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return self.method.cls

    @property
    def test_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the suite's runs (``kwargs`` updated by ``test``)."""
        return {**self.kwargs, **(self.test or {})}

    def build(self, model: nn.Module | Any, **extra: Any) -> torch.optim.Optimizer:
        """The optimizer as the suite runs it (``extra`` over ``test_kwargs``)."""
        return self.method.build(model, **{**self.test_kwargs, **extra})

    @property
    def file(self) -> str:
        """Where the class lives, e.g. ``curvlab/optim/kfac.py``."""
        return self.method.cls.__module__.replace(".", "/") + ".py"

    @property
    def supports_warm_start(self) -> bool:
        """The class has ``warm_start(batches, loss_fn, *, batch_average)``."""
        return callable(getattr(self.method.cls, "warm_start", None))


# ------------------------------------------------------------------------ shared ranges
def _pick(ranges: Mapping[str, Real | Int], *names: str) -> dict[str, Real | Int]:
    return {n: ranges[n] for n in names}


NONNEGATIVE = Real(0.0)
POSITIVE = Real(0.0, low_open=True)
UNIT = Real(0.0, 1.0, high_open=True)  # [0, 1)
OPEN_UNIT = Real(0.0, 1.0, low_open=True, high_open=True)  # (0, 1)

#: `curvlab.optim.validation.LAYERWISE_RULES`: the layer-wise methods' shared hyperparameters.
LAYERWISE: dict[str, Real | Int] = {
    "lr": NONNEGATIVE,
    "damping": POSITIVE,
    "momentum": UNIT,
    "weight_decay": NONNEGATIVE,
    "ema_decay": UNIT,
    "curvature_every": Int(1),
    "inverse_every": Int(1),
    "inverse_warmup": Int(0),
}
_TENSORWISE = _pick(
    LAYERWISE, "lr", "damping", "momentum", "weight_decay", "ema_decay", "curvature_every",
    "inverse_every",
)  # fmt: skip
_SWITCH: dict[str, Real | Int] = {  # `curvlab.optim.switching.TwoStage`'s criteria
    "switch_at_step": Int(1),
    "switch_at_epoch": Int(1),
    "patience": Int(1),
    "min_delta": NONNEGATIVE,
}
_TSO: dict[str, Real | Int] = {
    **_pick(LAYERWISE, "lr", "momentum", "weight_decay", "inverse_every"),
    "ema_decay": Real(0.0, 1.0, low_open=True),  # (0, 1]
    "eps": POSITIVE,
}
_LEVENBERG_MARQUARDT: dict[str, Real | Int] = {  # SMW and Hessian-free (thesis §5.2.3)
    "lr": NONNEGATIVE,
    "damping": POSITIVE,  # λ_LM(0) = 0 would stay 0 (the rule only multiplies it)
    "tau": POSITIVE,
    "boost": Real(1.0, low_open=True),
    "drop": OPEN_UNIT,
    "epsilon": Real(0.0, 0.5, low_open=True, high_open=True),
    "curvature_batch_size": Int(1),
    "accept_threshold": Real(0.0, 0.25, low_open=True, high_open=True),  # (0, ε), ε = 0.25
}
_EFFICIENT_TR: dict[str, Real | Int] = {
    "radius": POSITIVE,
    "lr": NONNEGATIVE,
    "step_size": POSITIVE,
    "n1": Int(0),
    "n2": Int(0),
    "fd_epsilon": POSITIVE,
    "max_radius": POSITIVE,
    "very_successful": POSITIVE,
    "successful": Real(0.0, 0.9),  # [0, very_successful], very_successful = 0.9
    "expand": Real(1.0),
    "shrink": OPEN_UNIT,
    "grad_radius_factor": NONNEGATIVE,
    "init_scale": OPEN_UNIT,
    "armijo_sigma": OPEN_UNIT,
    "armijo_shrink": OPEN_UNIT,
    "armijo_max_backtracks": Int(0),
}
_ADAPTIVE_NORM: dict[str, Real | Int] = {  # seed 002's trust region and ARC
    "lr": NONNEGATIVE,
    "beta": UNIT,
    "eps": POSITIVE,
    "krylov_tol": NONNEGATIVE,
    "max_krylov_dim": Int(1),
    "eta1": UNIT,
    "increase": Real(1.0),
}

# ------------------------------------------------------------------------------ fuzzing
_LAYERWISE_FUZZ: dict[str, Sample] = {
    "lr": LogUniform(1e-4, 1.0),
    "damping": LogUniform(1e-3, 10.0),
    "curvature_every": IntRange(1, 3),
}
_TENSORWISE_FUZZ: dict[str, Sample] = {
    "lr": LogUniform(1e-5, 0.1),
    "damping": LogUniform(1e-3, 1.0),
    "curvature_every": IntRange(1, 3),
    "inverse_every": IntRange(1, 5),
}
_TSO_FUZZ: dict[str, Sample] = {
    "lr": LogUniform(1e-4, 1.0),
    "eps": LogUniform(1e-6, 1.0),
    "inverse_every": IntRange(1, 5),
    "fisher": EVERY,
    "init": EVERY,
}
_EFFICIENT_TR_FUZZ: dict[str, Sample] = {
    "radius": LogUniform(1e-3, 10.0),
    "variant": EVERY,
    "n1": IntRange(1, 3),
    "n2": IntRange(1, 3),
}
_ADAPTIVE_NORM_FUZZ: dict[str, Sample] = {
    "norm": EVERY,
    "curvature": EVERY,
    "max_krylov_dim": IntRange(1, 10),
}
_SMW_FUZZ: dict[str, Sample] = {"lr": LogUniform(1e-3, 1.0), "damping": LogUniform(1e-3, 10.0)}

# ------------------------------------------------------------------------------ methods
_KFAC = Method(
    KFAC,
    LAYERWISE,
    fuzz={
        **_LAYERWISE_FUZZ,
        "momentum": OneOf((0.0, 0.9)),
        "weight_decay": OneOf((0.0, 1e-3)),
        "inverse_every": IntRange(1, 5),
        "fisher": EVERY,
        "statistics": EVERY,
        "pi_damping": EVERY,
    },
    unchecked=frozenset({"pi_damping"}),  # any truth value: bool(pi_damping)
)
_KBFGS = Method(
    KBFGS,
    {
        **_pick(LAYERWISE, "lr", "damping", "momentum", "weight_decay", "ema_decay"),
        "curvature_every": Int(1),
        "mu1": OPEN_UNIT,
        "memory": Int(1),
    },
    fuzz={
        **_LAYERWISE_FUZZ,
        "variant": EVERY,
        "memory": OneOf((None, 1, 3)),
    },
)
_TNT = Method(
    TNT,
    _TENSORWISE,
    fuzz={**_TENSORWISE_FUZZ, "fisher": EVERY},
)
_SHAMPOO = Method(
    Shampoo,
    _TENSORWISE,
    fuzz={**_TENSORWISE_FUZZ, "root_method": EVERY},
)
_TSO_ALRA_FIRST_STAGE = Method(TSOALRAFirstStage, _TSO, fuzz=_TSO_FUZZ)
_TSO_ALRA = Method(
    TSOALRA,
    {**_TSO, **_SWITCH},
    fuzz={**_TSO_FUZZ, "switch_at_step": IntRange(1, 3)},
)
_SMW_GN, _SMW_NG, _SMW_NG_BD = (
    Method(cls, _LEVENBERG_MARQUARDT, fuzz=_SMW_FUZZ, needs_layers=True)
    for cls in (SMWGN, SMWNG, SMWNGBD)
)
_EFFICIENT_TR_METHOD = Method(EfficientTR, _EFFICIENT_TR, fuzz=_EFFICIENT_TR_FUZZ)
_HYBRID_TR_SGD = Method(
    HybridTRSGD,
    {**_EFFICIENT_TR, **_SWITCH, "sgd_lr": NONNEGATIVE},
    fuzz={**_EFFICIENT_TR_FUZZ, "switch_at_step": IntRange(1, 3)},
    forwards_to=EfficientTR,
)
_EDF = Method(
    EDF,
    {
        "lr": NONNEGATIVE,
        "order": Int(1),
        "damping_scale": NONNEGATIVE,
        "damping_power": NONNEGATIVE,
        "alpha": UNIT,  # W1's [0, 1) (the default acceleration); W2's (0, ∞)
    },
    fuzz={
        "lr": LogUniform(1e-3, 1.0),
        "order": IntRange(1, 4),
        "damping_scale": LogUniform(1e-3, 10.0),
        "kind": EVERY,
        "acceleration": EVERY,
    },
)
_HESSIAN_FREE = Method(
    HessianFree,
    {
        **_LEVENBERG_MARQUARDT,
        "cg_max_iters": Int(1),
        "cg_tol": NONNEGATIVE,
        "warm_start_decay": Real(0.0, 1.0),
    },
    fuzz={
        "lr": LogUniform(1e-3, 1.0),
        "damping": LogUniform(1e-3, 10.0),
        "cg_max_iters": IntRange(1, 10),
    },
)
_ELLIPSOIDAL_TR = Method(
    EllipsoidalTR,
    {
        **_ADAPTIVE_NORM,
        "eta2": Real(0.01, 1.0, high_open=True),  # [η₁, 1), η₁ = 0.01
        "radius": POSITIVE,
        "max_radius": POSITIVE,
        "decrease": Real(1.0, low_open=True),
    },
    fuzz={**_ADAPTIVE_NORM_FUZZ, "radius": LogUniform(1e-4, 10.0)},
)
_ARC = Method(
    ARC,
    {
        **_ADAPTIVE_NORM,
        "eta2": Real(0.1, 1.0, high_open=True),  # [η₁, 1), η₁ = 0.1
        "sigma": POSITIVE,
        "min_sigma": POSITIVE,
        "decrease": Real(1.0),
    },
    fuzz={**_ADAPTIVE_NORM_FUZZ, "sigma": LogUniform(1e-3, 100.0)},
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _KFAC,
        _KBFGS,
        _TNT,
        _SHAMPOO,
        _TSO_ALRA_FIRST_STAGE,
        _TSO_ALRA,
        _SMW_GN,
        _SMW_NG,
        _SMW_NG_BD,
        _EFFICIENT_TR_METHOD,
        _HYBRID_TR_SGD,
        _EDF,
        _HESSIAN_FREE,
        _ELLIPSOIDAL_TR,
        _ARC,
    )
}


# ------------------------------------------------------------------------ configurations
_SEED_002 = "Adaptive norms for deep learning with regularized Newton methods (seed 002)"
_SEED_002_ALG = "Alg. 1 + App. F.2 (preconditioned Steihaug-Toint CG, eq. 52), Table 1"
_ARC_PAPER = "seed 002 (ARC twin; Cartis-Gould-Toint ARC, SCR defaults: a reconstruction)"


def _tr_bench(norm: str) -> Bench:
    return Bench(
        defaults={},
        paper=_SEED_002,
        algorithm=_SEED_002_ALG,
        description=f"stochastic trust region, {norm} norm, exact Hessian-vector products",
    )


def _arc_bench(norm: str) -> Bench:
    return Bench(
        defaults={},
        paper=_ARC_PAPER,
        algorithm=f"cubic model in the {norm} norm, Lanczos subproblem solver",
        description=f"adaptive cubic regularisation, {norm} norm",
    )


_LIST: list[Config] = [
    # ----------------------------------------------------------------------- K-FAC
    Config(
        "kfac",
        _KFAC,
        test={"lr": 0.1, "damping": 0.1},
        bench=Bench(
            defaults={"lr": 0.03, "damping": 1.0},
            paper="Martens & Grosse 2015; Grosse & Martens 2016 (KFC); thesis ch.3/ch.4 baseline",
            algorithm="thesis Alg 12 (true Fisher, statistics after the step as printed)",
            description="K-FAC, sampled-label (true) Fisher, π-damping, heavy-ball momentum",
        ),
    ),
    Config(
        "kfac-before-step",
        _KFAC,
        kwargs={"statistics": "before_step"},
        test={"lr": 0.1, "damping": 0.1},
    ),
    Config(
        "kfac-ef-ema-alg7",
        _KFAC,
        kwargs={"fisher": "empirical", "pi_damping": False, "momentum_style": "ema"},
        test={
            "lr": 0.1,
            "damping": 0.1,
            "inverse_every": 3,
            "inverse_warmup": 3,
            "weight_decay": 1e-3,
        },
    ),
    Config(
        "kfac-alg7",
        _KFAC,
        bench=Bench(
            defaults={
                "lr": 0.3,
                "damping": 0.3,
                "pi_damping": False,
                "momentum_style": "ema",
                "inverse_warmup": 20,
            },
            paper="Martens & Grosse 2015; thesis ch.2 baseline (Goldfarb, Ren & Bahamou 2020)",
            algorithm="thesis Alg 7 (MLP; π = 1, (1−β) gradient EMA, inverses at every k ≤ T)",
            description="K-FAC as thesis ch.2 ran it: π = 1, EMA momentum, inverse warm-up T = 20",
        ),
    ),
    Config(
        "kfac-ef",
        _KFAC,
        kwargs={"fisher": "empirical"},
        bench=Bench(
            defaults={"lr": 0.03, "damping": 1.0},
            paper="Martens & Grosse 2015; thesis §6.2 (KFAC-EF)",
            algorithm="thesis Alg 12 with the empirical Fisher (true labels, no extra pass)",
            description="K-FAC with the empirical Fisher",
        ),
    ),
    # ----------------------------------------------------------------------- K-BFGS
    Config(
        "kbfgs",
        _KBFGS,
        test={"lr": 0.1, "damping": 0.1},
        bench=Bench(
            defaults={"lr": 0.03, "damping": 0.3},
            paper="Ren, Bahamou & Goldfarb 2021; thesis ch.3",
            algorithm="thesis Alg 9 (D_P D_LM damping Alg 8, minibatched Hessian-action)",
            description="K-BFGS: BFGS for the output-gradient factor, Hessian-action for A",
        ),
    ),
    Config(
        "kbfgs-l",
        _KBFGS,
        kwargs={"memory": 100},
        test={"lr": 0.1, "damping": 0.1, "memory": 5},
        bench=Bench(
            defaults={"lr": 0.03, "damping": 0.3},
            paper="Ren, Bahamou & Goldfarb 2021; thesis ch.3",
            algorithm="thesis Alg 9 with non-loop L-BFGS (p = 100 pairs) for H_G",
            description="K-BFGS(L): limited-memory BFGS for the output-gradient factor",
        ),
    ),
    Config(
        "kbfgs-t20",
        _KBFGS,
        kwargs={"curvature_every": 20},
        bench=Bench(
            defaults={"lr": 0.3, "damping": 30.0},
            paper="thesis ch.3 (K-BFGS†)",
            algorithm="thesis Alg 9, curvature every T = 20 steps (Table 3.3)",
            description="K-BFGS† with its curvature updated every 20 steps",
        ),
    ),
    Config(
        "kbfgs-T3-wd",
        _KBFGS,
        test={"lr": 0.1, "damping": 0.1, "curvature_every": 3, "weight_decay": 1e-3},
    ),
    Config(
        "kbfgs-20",
        _KBFGS,
        kwargs={"variant": "ch2"},
        test={"lr": 0.3, "damping": 0.1},
        bench=Bench(
            defaults={"lr": 0.3, "damping": 0.3},
            paper="Goldfarb, Ren & Bahamou 2020; thesis ch.2",
            algorithm="thesis Alg 4 (double damping Alg 3; MLPs)",
            description="K-BFGS-20 as in ch.2: DD damping, EMA of A, (1−β) gradient average",
        ),
    ),
    Config(
        "kbfgs-l-20",
        _KBFGS,
        kwargs={"variant": "ch2", "memory": 100},
        test={"lr": 0.3, "damping": 0.1, "memory": 5},
        bench=Bench(
            defaults={"lr": 0.3, "damping": 0.3},
            paper="Goldfarb, Ren & Bahamou 2020; thesis ch.2",
            algorithm="thesis Alg 4 with non-loop L-BFGS (p = 100) for H_g",
            description="K-BFGS(L)-20 as in ch.2",
        ),
    ),
    # ----------------------------------------------------------------------- TNT
    Config(
        "tnt",
        _TNT,
        test={"lr": 0.01, "damping": 0.1},
        bench=Bench(
            defaults={"lr": 1e-4, "damping": 0.01},
            paper="Ren & Goldfarb 2021 (Tensor Normal Training); thesis ch.4",
            algorithm="thesis Alg 15 (sampled-label statistics, trace-normalised factors eq. 4.10)",
            description="TNT: per-tensor Kronecker factors of the sampled-gradient covariance",
        ),
    ),
    Config(
        "tnt-ef",
        _TNT,
        kwargs={"fisher": "empirical"},
        bench=Bench(
            defaults={"lr": 1e-4, "damping": 0.01},
            paper="thesis §4.7.3 (TNT-EF)",
            algorithm="thesis Alg 15 with true-label gradients (empirical Fisher)",
            description="TNT with the empirical Fisher",
        ),
    ),
    Config(
        "tnt-ef-schedule",
        _TNT,
        kwargs={"fisher": "empirical", "inverse_method": "coupled_newton"},
        test={
            "lr": 0.01,
            "damping": 0.1,
            "curvature_every": 2,
            "inverse_every": 3,
            "weight_decay": 1e-3,
        },
    ),
    Config(  # inverses stale between refreshes at the save point; lr = 0 with weight decay
        "tnt-T2-3-wd",
        _TNT,
        test={"lr": 0.01, "damping": 0.1, "inverse_every": 3, "weight_decay": 0.1},
    ),
    # ----------------------------------------------------------------------- Shampoo
    Config(
        "shampoo",
        _SHAMPOO,
        test={"lr": 0.01, "damping": 1e-3},
        bench=Bench(
            defaults={"lr": 3e-4, "damping": 3e-4, "root_method": "eigh"},
            paper="Gupta, Koren & Singer 2018; Anil et al. 2020; thesis ch.4 baseline",
            algorithm="thesis Alg 16 (EMA statistics, inverse 1/(2k)-th roots); roots by eigh here",
            description="Shampoo as in the thesis (no grafting), eigh roots",
        ),
    ),
    Config(
        "shampoo-eigh",
        _SHAMPOO,
        kwargs={"root_method": "eigh"},
        test={
            "lr": 0.01,
            "damping": 1e-3,
            "curvature_every": 2,
            "inverse_every": 3,
            "weight_decay": 1e-3,
        },
    ),
    Config(  # roots stale between refreshes at the save point; lr = 0 with weight decay
        "shampoo-T2-3-wd",
        _SHAMPOO,
        test={"lr": 0.01, "damping": 1e-3, "inverse_every": 3, "weight_decay": 0.1},
    ),
    # ----------------------------------------------------------------------- SMW
    Config(
        "smw-gn",
        _SMW_GN,
        test={"lr": 1.0},
        bench=Bench(
            defaults={"lr": 0.1, "curvature_batch_size": 30},
            paper="Ren & Goldfarb 2019 (subsampled GN/NG with SMW); thesis ch.5",
            algorithm="thesis Alg 23 with (5.6), (5.7) for softmax CE; Gram by Algs 19–22",
            description="subsampled Gauss-Newton, Woodbury solve, LM damping (N2 = 30 of N1)",
        ),
    ),
    Config(
        "smw-gn-subsampled",
        _SMW_GN,
        kwargs={"ratio_point": "step"},
        test={"lr": 0.5, "curvature_batch_size": 8},
    ),
    Config(
        "smw-ng",
        _SMW_NG,
        test={"lr": 1.0},
        bench=Bench(
            defaults={"lr": 0.1, "curvature_batch_size": 30},
            paper="Ren & Goldfarb 2019; thesis ch.5",
            algorithm="thesis Alg 23 with the empirical Fisher (5.3); Gram of §5.3.3",
            description=(
                "subsampled natural gradient (empirical Fisher), Woodbury solve, LM damping"
            ),
        ),
    ),
    Config(
        "smw-ng-theorem6",
        _SMW_NG,
        test={"lr": 1.0, "curvature_batch_size": 8, "accept_threshold": 0.1},
    ),
    Config("smw-ng-subsampled", _SMW_NG, test={"lr": 1.0, "curvature_batch_size": 8}),
    Config(
        "smw-ng-bd",
        _SMW_NG_BD,
        test={"lr": 1.0},
        bench=Bench(
            defaults={"lr": 0.1, "curvature_batch_size": 30},
            paper="Ren & Goldfarb 2019; thesis §5.8",
            algorithm="thesis §5.8: SMW-NG with one Woodbury solve per layer (block diagonal)",
            description="block-diagonal SMW-NG",
        ),
    ),
    Config(
        "smw-ng-bd-theorem6",
        _SMW_NG_BD,
        test={"lr": 0.5, "curvature_batch_size": 8, "accept_threshold": 0.1},
    ),
    # ----------------------------------------------------------------------- seed 003
    Config(
        "efficient-tr",
        _EFFICIENT_TR_METHOD,
        test={},
        bench=Bench(
            defaults={"radius": 1.0, "step_size": 0.1, "n1": 1, "n2": 1},
            paper="Liu, Lee & Hsieh 2018 (seed 003), efficient trust region",
            algorithm=(
                "Alg 1 (stochastic radius rule) + Alg 2 (GD / Riemannian-GD subproblem solver)"
            ),
            description=(
                "trust region with the GD subproblem solver and exact Hessian-vector products"
            ),
        ),
    ),
    Config(
        "efficient-tr-deterministic",
        _EFFICIENT_TR_METHOD,
        kwargs={"radius_rule": "deterministic"},
        test={},
    ),
    Config("efficient-tr-fd", _EFFICIENT_TR_METHOD, kwargs={"hvp": "hessian-fd"}, test={}),
    Config(
        "efficient-tr-code",
        _EFFICIENT_TR_METHOD,
        kwargs={"variant": "code"},
        test={"radius": 0.3},
        bench=Bench(
            defaults={"radius": 1.0},
            paper="Liu, Lee & Hsieh 2018 (seed 003), the authors' released code",
            algorithm="released iter_TR: fixed radius, finite-difference Hessian-vector products",
            description="seed 003's trust region as its released code runs it",
        ),
    ),
    Config(
        "hybrid-tr-sgd",
        _HYBRID_TR_SGD,
        test={"switch_at_step": 20},
        bench=Bench(
            # mode="min": the runner reports a test error or loss, not an accuracy
            defaults={"patience": 1, "sgd_lr": 0.1, "mode": "min"},
            paper="Liu, Lee & Hsieh 2018 (seed 003) §4, Hybrid",
            algorithm="trust region until the held-out metric stops improving, then SGD",
            description="seed 003's hybrid: efficient TR, then plain SGD (TwoStage switch)",
        ),
    ),
    Config("hybrid-tr-sgd-switched-early", _HYBRID_TR_SGD, test={"switch_at_step": 3}),
    # ----------------------------------------------------------------------- EDF
    Config(
        "edf",
        _EDF,
        test={},
        bench=Bench(
            defaults={"lr": 0.5, "order": 2},
            paper="Exponentially Decaying Flows (seed 000), EDF-G",
            algorithm=(
                "App. A Alg 1 (MINRES of order k), λ = a‖g‖^b (eq. 24), W1 momentum (eq. 25)"
            ),
            description="EDF-G: k MINRES steps on the damped GGN system, W1 acceleration",
        ),
    ),
    Config(
        "edf-k1",
        _EDF,
        kwargs={"order": 1},
        test={},
        bench=Bench(
            defaults={"lr": 0.5},
            paper="Exponentially Decaying Flows (seed 000)",
            algorithm="App. A Alg 2 (the k = 1 closed form, eq. 23)",
            description="EDF-G with k = 1 (closed form)",
        ),
    ),
    Config(
        "edf-w2",
        _EDF,
        kwargs={"acceleration": "w2"},
        test={"lr": 0.2},
        bench=Bench(
            defaults={"lr": 0.5, "order": 2},
            paper="Exponentially Decaying Flows (seed 000)",
            algorithm="Alg 1 with W2 (κ = α/t, Nesterov-like; eq. 25)",
            description="EDF-G with W2 acceleration",
        ),
    ),
    Config(
        "edf-h",
        _EDF,
        kwargs={"kind": "hessian"},
        test={},
        bench=Bench(
            defaults={"lr": 0.5, "order": 2},
            paper="Exponentially Decaying Flows (seed 000), EDF-H",
            algorithm="App. A Alg 1 on the damped Hessian system",
            description="EDF-H: k MINRES steps on the damped Hessian system",
        ),
    ),
    Config("edf-output-space", _EDF, kwargs={"space": "output"}, test={}),
    Config("edf-no-acceleration", _EDF, kwargs={"acceleration": "none"}, test={}),
    # ----------------------------------------------------------------------- Hessian-free
    Config(
        "hessian-free",
        _HESSIAN_FREE,
        test={},
        bench=Bench(
            defaults={"lr": 0.1, "curvature_batch_size": 30},
            paper="Martens 2010 as the thesis's ch.5 baseline",
            algorithm="thesis Alg 23 loop with a CG direction on the GGN, LM rule §5.2.3",
            description="Hessian-free: Gauss-Newton + CG, LM damping, CG warm start",
        ),
    ),
    Config(
        "hessian-free-subset-martens",
        _HESSIAN_FREE,
        test={
            "lr": 1.0,
            "curvature_batch_size": 8,
            "boost": 1.5,
            "drop": 2 / 3,
            "cg_max_iters": 10,
        },
    ),
    Config("hessian-free-lr1", _HESSIAN_FREE, test={"lr": 1.0}),
    Config("hessian-free-subset", _HESSIAN_FREE, test={"lr": 1.0, "curvature_batch_size": 8}),
    Config(
        "hessian-free-martens-lm",
        _HESSIAN_FREE,
        test={"lr": 1.0, "boost": 1.5, "drop": 2 / 3, "cg_max_iters": 10},
    ),
    # ----------------------------------------------------------------------- seed 002
    Config(
        "tr-uniform",
        _ELLIPSOIDAL_TR,
        kwargs={"norm": "uniform"},
        test={},
        bench=_tr_bench("uniform"),
    ),
    Config(
        "tr-adagrad",
        _ELLIPSOIDAL_TR,
        kwargs={"norm": "adagrad"},
        test={},
        bench=_tr_bench("adagrad"),
    ),
    Config(
        "tr-rmsprop",
        _ELLIPSOIDAL_TR,
        kwargs={"norm": "rmsprop"},
        test={"radius": 0.05},
        bench=_tr_bench("rmsprop"),
    ),
    Config(
        "tr-rmsprop-code",
        _ELLIPSOIDAL_TR,
        kwargs={"stopping": "model_decrease", "eps_mode": "code"},
        test={"radius": 0.05},
    ),
    Config(
        "tr-uniform-ggn", _ELLIPSOIDAL_TR, kwargs={"norm": "uniform", "curvature": "ggn"}, test={}
    ),
    Config(
        "tr-uniform-ggn-model-decrease",
        _ELLIPSOIDAL_TR,
        kwargs={"norm": "uniform", "stopping": "model_decrease", "curvature": "ggn"},
        test={},
    ),
    Config(
        "tr-rmsprop-code-eps",
        _ELLIPSOIDAL_TR,
        kwargs={"norm": "rmsprop", "eps_mode": "code"},
        test={"radius": 0.05},
    ),
    Config("arc-uniform", _ARC, kwargs={"norm": "uniform"}, test={}, bench=_arc_bench("uniform")),
    Config("arc-rmsprop", _ARC, kwargs={"norm": "rmsprop"}, test={}, bench=_arc_bench("rmsprop")),
    Config("arc-rmsprop-ggn", _ARC, kwargs={"curvature": "ggn"}, test={}),
    Config("arc-adagrad", _ARC, kwargs={"norm": "adagrad"}, test={}),
    Config(
        "arc-rmsprop-ggn-code-eps",
        _ARC,
        kwargs={"norm": "rmsprop", "curvature": "ggn", "eps_mode": "code"},
        test={},
    ),
    # ----------------------------------------------------------------------- TSO-ALRA
    Config(
        "tso-alra",
        _TSO_ALRA,
        test={"lr": 0.1, "inverse_every": 5, "switch_at_step": 20},
        bench=Bench(
            defaults={
                "lr": 0.01,
                "ema_decay": 0.95,
                "inverse_every": 20,
                "eps": 1e-6,
                "patience": 3,
            },
            paper="Ida & Fujiwara (seed 001), TSO-ALRA",
            algorithm=(
                "Alg 1 (eqs. 14–18): K-factored F^-1/2, then SGD (switch: validation plateau)"
            ),
            description=(
                "Kronecker-factored F^-1/2 preconditioning, then plain SGD after the switch"
            ),
        ),
    ),
    Config(
        "tso-alra-switched-early",
        _TSO_ALRA,
        test={"lr": 0.1, "inverse_every": 5, "switch_at_step": 3},
    ),
    Config(
        "tso-alra-stage1",
        _TSO_ALRA_FIRST_STAGE,
        test={"lr": 0.1},
        bench=Bench(
            defaults={"lr": 0.01, "ema_decay": 0.95, "inverse_every": 20, "eps": 1e-6},
            paper="Ida & Fujiwara (seed 001), TSO-ALRA first stage",
            algorithm="Alg 1, lines 1–8 only (no switch)",
            description="TSO-ALRA's first stage alone: Kronecker-factored F^-1/2",
        ),
    ),
    Config(  # the roots refreshed at every step, the skipped one included
        "tso-alra-stage1-T2-1",
        _TSO_ALRA_FIRST_STAGE,
        test={"lr": 0.1, "inverse_every": 1},
    ),
    Config(
        "tso-alra-stage1-first-batch",
        _TSO_ALRA_FIRST_STAGE,
        kwargs={"init": "first_batch"},
        test={"lr": 0.1, "inverse_every": 5},
    ),
]


def _index(configs: Iterable[Config]) -> dict[str, Config]:
    out: dict[str, Config] = {}
    for config in configs:
        if config.name in out:
            raise ValueError(f"registry: configuration {config.name!r} listed twice")
        out[config.name] = config
    return out


#: Every named configuration, by name (the bench's in ``curvlab list`` order).
CONFIGS: dict[str, Config] = _index(_LIST)


def conformance_configs() -> dict[str, Config]:
    """The configurations the conformance suite runs, by name."""
    return {n: c for n, c in CONFIGS.items() if c.test is not None}


def bench_configs() -> dict[str, Config]:
    """The configurations the bench runs, by name (in ``curvlab list`` order)."""
    return {n: c for n, c in CONFIGS.items() if c.bench is not None}
