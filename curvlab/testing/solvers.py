"""Dense float64 references for the curvlab.solvers tests (and the model-wide methods').

The references solve the subproblems through a full eigendecomposition and a bracketed scalar
root (``scipy.optimize.brentq``), independently of the solvers' own secular-equation code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "cubic_model",
    "dense_cubic_solution",
    "dense_tr_solution",
    "matvec_of",
    "quadratic_model",
    "random_orthogonal",
    "symmetric_with_spectrum",
]

F64 = torch.float64


def random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with sign fix)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


def symmetric_with_spectrum(eigenvalues: Tensor, gen: torch.Generator) -> Tensor:
    """``U diag(eigenvalues) Uᵀ`` with a Haar-random orthogonal ``U`` (exactly symmetric)."""
    U = random_orthogonal(eigenvalues.numel(), gen)
    A = (U * eigenvalues) @ U.T
    return 0.5 * (A + A.T)


def matvec_of(A: Tensor) -> Callable[[Tensor], Tensor]:
    """``v ↦ A v`` in the dtype of ``v``."""

    def matvec(v: Tensor) -> Tensor:
        return (A.to(v.dtype) @ v).to(v.dtype)

    return matvec


def quadratic_model(H: Tensor, g: Tensor, s: Tensor) -> float:
    """``gᵀs + ½ sᵀHs`` in float64."""
    s = s.to(F64)
    return float(g.to(F64) @ s + 0.5 * s @ H.to(F64) @ s)


def cubic_model(H: Tensor, g: Tensor, sigma: float, s: Tensor, M: Tensor | None = None) -> float:
    """``gᵀs + ½ sᵀHs + σ/3 ‖s‖_M³`` in float64."""
    s = s.to(F64)
    weights = torch.ones_like(s) if M is None else M.to(F64)
    norm = math.sqrt(float((weights * s * s).sum()))
    return quadratic_model(H, g, s) + sigma / 3.0 * norm**3


def _brentq(f: Callable[[float], float], lower: float, upper: float) -> float:
    """The root of ``f`` in [lower, upper] by `scipy.optimize.brentq` (scipy: a test extra)."""
    from scipy.optimize import brentq

    return float(brentq(f, lower, upper, xtol=1e-15, rtol=1e-15))


def _scaled(H: Tensor, g: Tensor, M: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(D⁻¹HD⁻¹, D⁻¹g, D⁻¹)`` for ``D = diag(√M)`` (identity when ``M`` is ``None``)."""
    d_inv = torch.ones_like(g, dtype=F64) if M is None else M.to(F64).rsqrt()
    return d_inv[:, None] * H.to(F64) * d_inv[None, :], d_inv * g.to(F64), d_inv


def dense_tr_solution(H: Tensor, g: Tensor, radius: float, M: Tensor | None = None) -> Tensor:
    """Global minimiser of ``gᵀs + ½ sᵀHs`` over ``‖s‖_M ≤ radius`` (easy case only).

    Moré–Sorensen characterisation: ``(H + λM) s = −g``, ``H + λM ⪰ 0``, ``λ(‖s‖_M − Δ) = 0``.
    """
    Hs, gs, d_inv = _scaled(H, g, M)
    theta, V = torch.linalg.eigh(Hs)
    c = V.T @ gs
    if theta[0] > 0:
        newton = -V @ (c / theta)
        if float(newton.norm()) <= radius:
            return d_inv * newton
    lower = max(0.0, -float(theta[0]))

    def excess(lam: float) -> float:
        return float((c / (theta + lam)).norm()) - radius

    upper = lower + float(gs.norm()) / radius + 1.0
    lam = _brentq(excess, lower + 1e-13 * max(1.0, lower), upper)
    return d_inv * (-V @ (c / (theta + lam)))


def dense_cubic_solution(
    H: Tensor, g: Tensor, sigma: float, M: Tensor | None = None
) -> tuple[Tensor, float]:
    """Global minimiser of ``gᵀs + ½ sᵀHs + σ/3 ‖s‖_M³`` and its multiplier (easy case only).

    Cartis–Gould–Toint Thm 3.1: ``(H + λM) s = −g``, ``H + λM ⪰ 0``, ``λ = σ‖s‖_M``.
    """
    Hs, gs, d_inv = _scaled(H, g, M)
    theta, V = torch.linalg.eigh(Hs)
    c = V.T @ gs
    lower = max(0.0, -float(theta[0]))

    def excess(lam: float) -> float:
        return float((c / (theta + lam)).norm()) - lam / sigma

    upper = lower + math.sqrt(sigma * float(gs.norm())) + abs(float(theta[0])) + 1.0
    lam = _brentq(excess, lower + 1e-13 * max(1.0, lower), upper)
    return d_inv * (-V @ (c / (theta + lam))), lam
