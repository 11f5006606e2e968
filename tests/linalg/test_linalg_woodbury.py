"""Tests for curvlab.linalg.woodbury: thesis (5.6) / (5.7) equal the dense damped solve."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import DecompositionError
from curvlab.linalg.woodbury import woodbury_coefficients, woodbury_solve

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(J: torch.Tensor, H: torch.Tensor | None, lam: float, s: float) -> torch.Tensor:
    """λI + s JᵀHJ with H = blkdiag(H_i) (identity when None)."""
    Hd = torch.eye(J.shape[0], dtype=F64) if H is None else torch.block_diag(*H)
    return lam * torch.eye(J.shape[1], dtype=F64) + s * J.T @ Hd @ J


def _spd_blocks(b: int, k: int, seed: int) -> torch.Tensor:
    X = torch.randn(b, k, k, generator=_gen(seed), dtype=F64)
    return X @ X.mT + 0.1 * torch.eye(k, dtype=F64)


def _softmax_blocks(b: int, k: int, seed: int) -> torch.Tensor:
    """diag(p) − ppᵀ: the singular loss Hessian of softmax + cross-entropy."""
    p = torch.softmax(torch.randn(b, k, generator=_gen(seed), dtype=F64), dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


@SETTINGS
@given(
    b=st.integers(1, 5),
    k=st.integers(1, 3),
    n=st.integers(1, 20),
    lam=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    hessian=st.sampled_from(["identity", "spd", "softmax"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_woodbury_solve_equals_dense_damped_solve(
    b: int, k: int, n: int, lam: float, hessian: str, seed: int
) -> None:
    J = torch.randn(b * k, n, generator=_gen(seed), dtype=F64)
    v = torch.randn(n, generator=_gen(seed + 1), dtype=F64)
    s = 1.0 / b
    H = {
        "identity": None,
        "spd": _spd_blocks(b, k, seed),
        "softmax": _softmax_blocks(b, k, seed),
    }[hessian]
    expected = torch.linalg.solve(_dense(J, H, lam, s), v)
    forms = ["general"] if hessian == "softmax" else ["symmetric", "general"]
    for form in forms:
        x, info = woodbury_solve(J, v, lam, scale=s, loss_hessian=H, form=form)  # type: ignore[arg-type]
        assert info.attempts == 1
        torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)


def test_coefficients_reproduce_the_inverse_from_the_gram_matrix_only() -> None:
    J = torch.randn(6, 9, generator=_gen(0), dtype=F64)
    v = torch.randn(9, generator=_gen(1), dtype=F64)
    H = _softmax_blocks(2, 3, 2)
    w, _ = woodbury_coefficients(J @ J.T, J @ v, 0.5, scale=0.5, loss_hessian=H, form="general")
    x = (v - 0.5 * J.T @ w) / 0.5
    torch.testing.assert_close(_dense(J, H, 0.5, 0.5) @ x, v, rtol=1e-10, atol=1e-10)


def test_batched_systems_are_independent_blocks() -> None:
    Js = [torch.randn(4, 5, generator=_gen(s), dtype=F64) for s in range(3)]
    vs = [torch.randn(5, generator=_gen(10 + s), dtype=F64) for s in range(3)]
    K = torch.stack([J @ J.T for J in Js])
    a = torch.stack([J @ v for J, v in zip(Js, vs, strict=True)])
    w, _ = woodbury_coefficients(K, a, 0.3, scale=0.25)
    for i, (J, v) in enumerate(zip(Js, vs, strict=True)):
        x = (v - 0.25 * J.T @ w[i]) / 0.3
        torch.testing.assert_close(x, torch.linalg.solve(_dense(J, None, 0.3, 0.25), v))


def test_float32_stays_float32_and_is_accurate() -> None:
    J = torch.randn(8, 30, generator=_gen(3), dtype=F64)
    v = torch.randn(30, generator=_gen(4), dtype=F64)
    H = _spd_blocks(4, 2, 5)
    for form in ("symmetric", "general"):
        x, info = woodbury_solve(
            J.float(), v.float(), 0.1, scale=0.25, loss_hessian=H.float(), form=form
        )
        assert x.dtype == torch.float32 and not info.float64
        expected = torch.linalg.solve(_dense(J, H, 0.1, 0.25), v)
        torch.testing.assert_close(x.double(), expected, rtol=1e-4, atol=1e-4)


def test_slightly_indefinite_system_is_retried_with_more_damping() -> None:
    # λI + sK with one eigenvalue −1e-12 (mean diagonal 1): Cholesky fails in float64, the
    # retry adds the floor damping 1e-8 · mean|diag D| and succeeds.
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(6), dtype=F64))
    eigs = torch.tensor([2.0, 1.0, 1.0, -1e-12], dtype=F64)
    D = (Q * eigs) @ Q.T
    lam = 0.5
    K = D - lam * torch.eye(4, dtype=F64)  # scale 1: D = λI + K
    rhs = torch.randn(4, generator=_gen(7), dtype=F64)
    w, info = woodbury_coefficients(K, rhs, lam)
    assert info.attempts == 2 and info.float64
    floor = 1e-8 * float(D.diagonal().abs().mean())
    assert info.damping == pytest.approx(floor)
    torch.testing.assert_close((D + info.damping * torch.eye(4, dtype=F64)) @ w, rhs)


@pytest.mark.parametrize("form", ["symmetric", "general"])
def test_failures_raise_decomposition_error(form: str) -> None:
    H = _spd_blocks(2, 2, 8)
    K = -1e6 * torch.eye(4, dtype=F64)  # far from positive definite: no retry helps (5.6)
    rhs = torch.ones(4, dtype=F64)
    if form == "symmetric":
        with pytest.raises(DecompositionError):
            woodbury_coefficients(K, rhs, 1.0, loss_hessian=H, form="symmetric")
    bad = torch.eye(4, dtype=F64)
    bad[0, 1] = float("nan")
    with pytest.raises(DecompositionError, match="not finite"):
        woodbury_coefficients(bad, rhs, 1.0, loss_hessian=H, form=form)  # type: ignore[arg-type]


def test_singular_general_system_is_retried_with_more_damping() -> None:
    # D = λI + sKH is exactly singular when sKH has eigenvalue −λ (an invalid, indefinite K):
    # LU fails, the float64 retry adds the floor damping 1e-8 (D's diagonal is 0).
    K = -torch.eye(2, dtype=F64)
    H = torch.eye(2, dtype=F64)[None]
    rhs = torch.ones(2, dtype=F64)
    w, info = woodbury_coefficients(K, rhs, 1.0, loss_hessian=H, form="general")
    assert info.attempts == 2 and info.damping == pytest.approx(1e-8)
    torch.testing.assert_close(w, rhs / 1e-8)


def test_bad_arguments_raise_value_errors() -> None:
    K, a = torch.eye(4, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="^damping"):
        woodbury_coefficients(K, a, 0.0)
    with pytest.raises(ValueError, match="^scale"):
        woodbury_coefficients(K, a, 1.0, scale=-1.0)
    with pytest.raises(ValueError, match="^form"):
        woodbury_coefficients(K, a, 1.0, form="lu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^gram"):
        woodbury_coefficients(K, torch.ones(3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="^loss_hessian"):
        woodbury_coefficients(K, a, 1.0, loss_hessian=torch.ones(3, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match="^gram"):
        woodbury_coefficients(
            K.expand(2, 4, 4), a.expand(2, 4), 1.0, loss_hessian=torch.ones(2, 2, 2, dtype=F64)
        )
    with pytest.raises(ValueError, match="^J"):
        woodbury_solve(torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64), 1.0)
