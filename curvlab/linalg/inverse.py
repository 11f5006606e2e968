r"""Damped inverses and solves of symmetric positive semi-definite matrices.

Both functions compute with the Cholesky factorisation :math:`M + \lambda I = L L^\top`
(``torch.linalg.cholesky_ex``), which exists and is backward stable for symmetric positive
definite matrices (Higham 2002, *Accuracy and Stability of Numerical Algorithms*, §10.1). Curvature
factors are PSD only up to round-off, so a factorisation can fail (``info > 0``) or yield
non-finite values; the retry policy then repeats it in float64 at the same damping (skipped for
float64 inputs, where it would repeat the same computation), and after that multiplies the
damping by ``growth`` per retry, never going below the floor
:math:`\lambda_0 = 10^{-8}\cdot\operatorname{mean}|\operatorname{diag} M|` (the start when the
damping is 0). When every attempt fails, :class:`~curvlab.linalg.errors.DecompositionError` is
raised; a non-finite input raises at once. Only the lower triangle of ``M`` is read.

All checks of one attempt are fused into a single host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.linalg.errors import DecompositionError

__all__ = ["DecompositionInfo", "damped_inverse", "damped_solve"]

#: Relative damping floor of the damping-increasing retries (times the mean |diagonal| of M).
_DAMPING_FLOOR = 1e-8


@dataclass(frozen=True)
class DecompositionInfo:
    """How a damped decomposition finally succeeded.

    Attributes:
        damping: The damping actually added to the diagonal in the successful attempt.
        attempts: Number of attempts made (1 means the first try succeeded).
        float64: Whether the successful attempt was computed in float64.
    """

    damping: float
    attempts: int
    float64: bool


#: An attempt maps (matrix in working dtype, damping) to (result, ok) where ``ok`` is a 0-dim
#: bool tensor (kept on device so that all checks cost a single host synchronisation), or to
#: ``None`` when the decomposition raised.
_Attempt = Callable[[Tensor, float], tuple[Tensor, Tensor] | None]


def _check_square(M: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``M`` is a (batch of) square matrices."""
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"{name} expects square matrices (..., d, d), got {tuple(M.shape)}")


def _check_policy(damping: float, retries: int, growth: float) -> None:
    """Validate the damping / retry arguments shared by the damped decompositions."""
    if not (math.isfinite(damping) and damping >= 0.0):
        raise ValueError(f"damping must be a finite non-negative number, got {damping}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not (math.isfinite(growth) and growth > 1.0):
        raise ValueError(f"growth must be a finite number > 1, got {growth}")


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the first attempt: the input's, with half precisions promoted to float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _damping_floor(M: Tensor) -> float:
    """Smallest damping of a damping-increasing retry: ``1e-8 · mean|diag M|`` (or ``1e-8``).

    Used as the start when the requested damping is 0, and as a floor when ``damping · growth``
    is still negligible against the scale of ``M`` (retrying with a damping below round-off of
    ``M``'s entries would be wasted).
    """
    mean_diag = float(torch.diagonal(M, dim1=-2, dim2=-1).abs().mean(dtype=torch.float64))
    scale = mean_diag if math.isfinite(mean_diag) and mean_diag > 0.0 else 1.0
    return _DAMPING_FLOOR * scale


def _run_with_retries(
    M: Tensor,
    damping: float,
    retries: int,
    growth: float,
    attempt: _Attempt,
    what: str,
    out_dtype: torch.dtype,
) -> tuple[Tensor, DecompositionInfo]:
    """Run ``attempt`` under the float64 / growing-damping retry policy.

    Args:
        M: The input matrix (batch); its finiteness is checked together with the first attempt.
        damping: Damping of the first attempt.
        retries: Number of retries after the first attempt.
        growth: Factor by which the damping grows on each retry that is already in float64 (at
            least up to the floor ``1e-8 · mean|diag M|``).
        attempt: The decomposition; see :data:`_Attempt`.
        what: Name used in error messages.
        out_dtype: Dtype of the returned result; it is cast before the finiteness check, so an
            overflow in the cast (e.g. float64 → float32) counts as a failure too.

    Returns:
        The successful attempt's result (in ``out_dtype``) and a :class:`DecompositionInfo`.

    Raises:
        DecompositionError: If ``M`` is not finite, or if all ``1 + retries`` attempts fail.
    """
    dtype = _working_dtype(M.dtype)
    current = damping
    floor: float | None = None  # computed on first need: it costs a host synchronisation
    for k in range(retries + 1):
        if k > 0:
            if dtype != torch.float64:
                dtype = torch.float64
            else:
                if floor is None:
                    floor = _damping_floor(M)
                current = max(current * growth, floor)
        outcome = attempt(M.to(dtype), current)
        finite_input = torch.isfinite(M).all() if k == 0 else None
        if outcome is not None:
            result, ok = outcome
            result = result.to(out_dtype)
            ok = ok & torch.isfinite(result).all()
            if finite_input is not None:
                ok = ok & finite_input
            if bool(ok):
                info = DecompositionInfo(
                    damping=current, attempts=k + 1, float64=dtype == torch.float64
                )
                return result, info
        if finite_input is not None and not bool(finite_input):
            raise DecompositionError(
                f"{what}: input matrix of shape {tuple(M.shape)} is not finite"
            )
    raise DecompositionError(
        f"{what}: failed after {retries + 1} attempts on a matrix of shape {tuple(M.shape)} "
        f"(last damping {current:g}, float64={dtype == torch.float64})"
    )


def _symmetrise(X: Tensor) -> Tensor:
    r""":math:`(X + X^\top)/2`, exactly symmetric bitwise (IEEE addition commutes)."""
    return torch.add(X, X.mT).mul_(0.5)


def _damped(M: Tensor, damping: float) -> Tensor:
    r""":math:`M + \text{damping}\cdot I` (out of place), skipping the copy when damping is 0."""
    if damping == 0.0:
        return M
    out = M.clone()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(damping)
    return out


def damped_inverse(
    M: Tensor, damping: float, *, retries: int = 3, growth: float = 10.0
) -> tuple[Tensor, DecompositionInfo]:
    r"""Inverse :math:`(M + \lambda I)^{-1}` of a symmetric PSD matrix via Cholesky.

    Computes :math:`M + \lambda I = L L^\top` and :math:`(L L^\top)^{-1} = L^{-\top} L^{-1}`
    (``torch.cholesky_inverse``, LAPACK ``potri``), then symmetrises the result. On failure the
    retry policy of the module docstring applies.

    Args:
        M: Symmetric PSD matrix ``(d, d)`` or batch ``(..., d, d)``; only the lower triangle is
            read. Half precisions are computed in float32.
        damping: :math:`\lambda \ge 0` added to the diagonal.
        retries: Number of retries after the first attempt.
        growth: Damping growth factor per float64 retry (> 1).

    Returns:
        ``(inverse, info)``: the exactly symmetric inverse in ``M``'s dtype, and how it was
        obtained (``info.damping`` is the damping actually used).

    Raises:
        DecompositionError: If ``M`` is not finite or all attempts fail.
    """
    _check_square(M, "damped_inverse")
    _check_policy(damping, retries, growth)

    def attempt(Mw: Tensor, lam: float) -> tuple[Tensor, Tensor] | None:
        L, info = torch.linalg.cholesky_ex(_damped(Mw, lam))
        try:
            inverse = torch.cholesky_inverse(L)
        except RuntimeError:  # a zero pivot left in a failed factor (CPU checks, CUDA does not)
            return None
        return _symmetrise(inverse), (info == 0).all()

    return _run_with_retries(M, damping, retries, growth, attempt, "damped_inverse", M.dtype)


def damped_solve(
    M: Tensor, B: Tensor, damping: float, *, retries: int = 3, growth: float = 10.0
) -> tuple[Tensor, DecompositionInfo]:
    r"""Solve :math:`(M + \lambda I) X = B` for symmetric PSD ``M`` via Cholesky.

    Factorises :math:`M + \lambda I = L L^\top` and solves the two triangular systems
    (``torch.cholesky_solve``). On failure the retry policy of the module docstring applies.

    Args:
        M: Symmetric PSD matrix ``(d, d)`` or batch ``(..., d, d)``; only the lower triangle is
            read.
        B: Right-hand side: a vector ``(d,)`` or matrix / batch ``(..., d, k)`` broadcastable
            against ``M``.
        damping: :math:`\lambda \ge 0` added to the diagonal.
        retries: Number of retries after the first attempt.
        growth: Damping growth factor per float64 retry (> 1).

    Returns:
        ``(X, info)`` with ``X`` shaped like ``B`` (with broadcast batch dimensions) in the
        promoted dtype of ``M`` and ``B``.

    Raises:
        DecompositionError: If ``M`` is not finite or all attempts fail.
    """
    _check_square(M, "damped_solve")
    _check_policy(damping, retries, growth)
    vector = B.dim() == 1
    rhs = B.unsqueeze(-1) if vector else B
    if rhs.shape[-2] != M.shape[-1]:
        raise ValueError(f"damped_solve: B {tuple(B.shape)} does not match M {tuple(M.shape)}")

    def attempt(Mw: Tensor, lam: float) -> tuple[Tensor, Tensor] | None:
        L, info = torch.linalg.cholesky_ex(_damped(Mw, lam))
        try:
            X = torch.cholesky_solve(rhs.to(Mw.dtype), L)
        except RuntimeError:  # defensive: a failed factor is also caught through ``info``
            return None
        return X, (info == 0).all()

    out_dtype = torch.promote_types(M.dtype, B.dtype)
    result, info = _run_with_retries(
        M.to(out_dtype), damping, retries, growth, attempt, "damped_solve", out_dtype
    )
    return (result.squeeze(-1) if vector else result), info
