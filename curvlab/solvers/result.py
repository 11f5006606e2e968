"""The common result type of the matrix-free solvers and the checks they share.

Every solver works on flat vectors (1-D float32 / float64 tensors) and sees the curvature only
through a :data:`Matvec` callable ``v ↦ A v``. It returns a :class:`SolverResult` whose ``status``
says how the iteration ended; indefinite or singular curvature is a status, never an exception or
a NaN, and a non-finite input (or a non-finite matrix-vector product) gives the status
``"non_finite"`` with a zero step so that the calling optimizer can skip the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BOUNDARY",
    "BREAKDOWN",
    "CONVERGED",
    "LINE_SEARCH_FAILED",
    "MAX_ITERATIONS",
    "NEGATIVE_CURVATURE",
    "NON_FINITE",
    "STATUSES",
    "STEP_SIZE_TOO_LARGE",
    "Matvec",
    "SolverResult",
]

#: A symmetric linear operator given by its action on a flat vector.
Matvec = Callable[[Tensor], Tensor]

#: The stopping test was met (or the Krylov space became invariant: the answer is exact).
CONVERGED = "converged"
#: The iteration budget ran out first.
MAX_ITERATIONS = "max_iterations"
#: A trust-region solver stopped on the boundary with positive curvature along its direction.
BOUNDARY = "boundary"
#: Non-positive curvature was met; trust-region solvers then stop on the boundary, plain CG
#: returns its last iterate.
NEGATIVE_CURVATURE = "negative_curvature"
#: The recurrence cannot continue: a singular system (MINRES on an inconsistent singular system
#: returns its least-squares iterate) or a preconditioner that is not positive definite.
BREAKDOWN = "breakdown"
#: The Armijo backtracking of the seed-003 solver found no acceptable step (round-off level).
LINE_SEARCH_FAILED = "line_search_failed"
#: The seed-003 solver ran with a step size its Assumption 1 (η < 1/‖H‖) rules out, as a
#: product with H showed (‖Hz‖ ≥ ‖z‖/η): its iterate is feasible, but Thm 3 no longer holds.
STEP_SIZE_TOO_LARGE = "step_size_too_large"
#: Non-finite input or matrix-vector product: the solution is a zero step.
NON_FINITE = "non_finite"

STATUSES = (
    CONVERGED,
    MAX_ITERATIONS,
    BOUNDARY,
    NEGATIVE_CURVATURE,
    BREAKDOWN,
    LINE_SEARCH_FAILED,
    STEP_SIZE_TOO_LARGE,
    NON_FINITE,
)


@dataclass(frozen=True)
class SolverResult:
    """Outcome of a matrix-free solve.

    Attributes:
        solution: The step / solution, a flat tensor in the dtype and device of the input.
        iterations: Iterations performed (for Krylov solvers: matrix-vector products with the
            operator, not counting an optional final product for the model value).
        residual_norm: Euclidean norm of the residual (``b − A x`` for linear systems, the model
            gradient ``∇m(s)`` for the subproblem solvers; see each solver).
        status: One of :data:`STATUSES`.
        hit_boundary: Whether the solution lies on the trust-region boundary.
        model_decrease: ``m(0) − m(s)`` of the solver's model where it has one, else ``None``.
        info: Solver-specific extras (e.g. ``"matvecs"``, the multiplier ``"lambda"``).
    """

    solution: Tensor
    iterations: int
    residual_norm: float
    status: str
    hit_boundary: bool = False
    model_decrease: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_vector(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a flat float32 / float64 tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be a flat (1-D) vector, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")


def check_like(x: Tensor, like: Tensor, name: str, like_name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a flat vector of the same shape/dtype as ``like``."""
    check_vector(x, name)
    if x.shape != like.shape or x.dtype != like.dtype:
        raise ValueError(
            f"{name} must match {like_name} (shape {tuple(like.shape)}, {like.dtype}), got "
            f"shape {tuple(x.shape)}, {x.dtype}"
        )


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float if it is finite and > 0 (>= 0 with ``allow_zero``), else ValueError."""
    v = float(value)
    ok = math.isfinite(v) and (v >= 0.0 if allow_zero else v > 0.0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return v


def check_iterations(value: int | None, name: str, default: int, *, minimum: int = 1) -> int:
    """An iteration budget: ``default`` for ``None``, else an int ``>= minimum``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def zero_step(
    x: Tensor, status: str, *, residual_norm: float, iterations: int = 0, **info: Any
) -> SolverResult:
    """A zero solution with the given status (non-finite input, zero right-hand side).

    A ``"non_finite"`` result has ``model_decrease=None``; any other has a zero model decrease.
    ``info`` gets ``matvecs=0`` unless given.
    """
    return SolverResult(
        solution=torch.zeros_like(x),
        iterations=iterations,
        residual_norm=residual_norm,
        status=status,
        model_decrease=None if status == NON_FINITE else 0.0,
        info={"matvecs": 0, **info},
    )


def non_finite_step(x: Tensor, *, iterations: int = 0, **info: Any) -> SolverResult:
    """The ``"non_finite"`` result: a zero step, an infinite residual, no model decrease."""
    return zero_step(x, NON_FINITE, residual_norm=math.inf, iterations=iterations, **info)


def check_norm_matrix_diag(diag: Tensor, like: Tensor) -> bool:
    """Validate a diagonal norm matrix ``M`` against ``like``; return whether it is finite.

    ``ValueError`` for a wrong shape / dtype or a non-positive finite entry (one host
    synchronisation).
    """
    check_like(diag, like, "norm_matrix_diag", "grad")
    smallest, total = fetch(diag.min(), diag.sum())
    if math.isfinite(smallest) and smallest <= 0.0:
        raise ValueError(f"norm_matrix_diag must be positive, got minimum {smallest}")
    return math.isfinite(smallest) and math.isfinite(total)


def fetch(*values: Tensor) -> list[float]:
    """The 0-dim tensors ``values`` as Python floats, with a single host synchronisation."""
    return [float(v) for v in torch.stack([v.to(torch.float64) for v in values]).tolist()]
