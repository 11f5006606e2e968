"""Tests for curvlab.linalg.bfgs: BFGS / L-BFGS updates, Powell dampings, DD, D_P D_LM,
Hessian-action BFGS (thesis ch.2 §2.3–2.4, ch.3 §3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg.bfgs import (
    bfgs_correction,
    bfgs_update,
    double_damping,
    dp_dlm_damping,
    dpi_dlm_damping,
    gram_matvec,
    hessian_action_pair,
    lbfgs_multiply,
    lbfgs_push_,
    lbfgs_two_loop,
    powell_damping_h,
    powell_damping_identity,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(d: int, seed: int, cond: float = 1e3) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with eigenvalues log-spaced in [1/cond, 1]."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    eigs = torch.logspace(0.0, -math.log10(cond), d, dtype=F64)
    return (Q * eigs) @ Q.T


def printed_bfgs(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, eq. (2.6) exactly as printed."""
    rho = 1.0 / (s @ y)
    E = torch.eye(H.shape[0], dtype=H.dtype) - rho * torch.outer(s, y)
    return E @ H @ E.T + rho * torch.outer(s, s)


def pair(d: int, seed: int, curvature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random pair; ``curvature`` < 0 mixes in negative curvature (indefinite Hessians)."""
    g = _gen(seed + 1)
    s = torch.randn(d, generator=g, dtype=F64)
    B = spd(d, seed + 2) + (curvature - 1.0) * torch.eye(d, dtype=F64)
    return s, B @ s + 0.1 * torch.randn(d, generator=g, dtype=F64)


def _pd(M: torch.Tensor) -> bool:
    return bool(torch.linalg.eigvalsh((M + M.T) / 2).min() > 0)


# ----------------------------------------------------------------------------- BFGS
@SETTINGS
@given(d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_bfgs_update_satisfies_secant_equation_and_matches_printed_form(d: int, seed: int) -> None:
    H = spd(d, seed)
    s, y = pair(d, seed)
    if s @ y <= 0:
        y = -y
    Hp = bfgs_update(H, s, y)
    torch.testing.assert_close(Hp @ y, s, rtol=1e-9, atol=1e-9)  # H⁺ y = s
    torch.testing.assert_close(Hp, printed_bfgs(H, s, y), rtol=1e-9, atol=1e-9)
    assert _pd(Hp)
    # Given Hy and in place: the same matrix.
    H2 = H.clone()
    out = bfgs_update(H2, s, y, Hy=H @ y, inplace=True)
    assert out is H2
    torch.testing.assert_close(H2, Hp, rtol=1e-12, atol=1e-12)
    # Given the correction u (e.g. already checked for finiteness): the same matrix.
    u = bfgs_correction(s, y, H @ y)
    torch.testing.assert_close(bfgs_update(H, s, y, u=u), Hp, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- Powell
@SETTINGS
@given(d=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), mu=st.floats(0.05, 0.95))
def test_powell_dampings_meet_their_bounds(d: int, seed: int, mu: float) -> None:
    H = spd(d, seed)
    s, y = pair(d, seed, curvature=-0.5)
    Hy = H @ y
    s_t = powell_damping_h(s, y, Hy, mu)
    assert float(s_t @ y) >= mu * float(y @ Hy) * (1 - 1e-9) - 1e-12  # s̃ᵀy ≥ μ yᵀHy
    if float(s @ y) >= mu * float(y @ Hy):
        assert torch.equal(s_t, s)  # θ = 1: untouched
    y_t = powell_damping_identity(s, y, mu)
    assert float(s @ y_t) >= mu * float(s @ s) * (1 - 1e-9) - 1e-12  # sᵀỹ ≥ μ sᵀs
    if float(s @ y) >= mu * float(s @ s):
        assert torch.equal(y_t, y)


@SETTINGS
@given(
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    mu1=st.floats(0.05, 0.95),
    mu2=st.floats(0.01, 1.0),
    curvature=st.sampled_from([1.0, 0.0, -1.0]),
)
def test_double_damping_keeps_H_positive_definite_and_meets_both_bounds(
    d: int, seed: int, mu1: float, mu2: float, curvature: float
) -> None:
    """Alg 3: s̃ᵀy ≥ μ1 yᵀHy (Powell on H) and s̃ᵀỹ ≥ μ2 s̃ᵀs̃ (Powell with B = I); hence
    s̃ᵀỹ > 0 and H⁺ ≻ 0. When also ỹᵀHỹ/s̃ᵀỹ ≤ 1/μ1 holds, the norm bounds (2.8), (2.10) hold.
    """
    H = spd(d, seed, cond=1e2)
    s, y = pair(d, seed, curvature)
    Hy = H @ y
    s_t, y_t = double_damping(s, y, Hy, mu1, mu2)
    tol = 1e-9
    assert float(s_t @ y) >= mu1 * float(y @ Hy) * (1 - tol) - 1e-12
    sy = float(s_t @ y_t)
    assert sy >= mu2 * float(s_t @ s_t) * (1 - tol)
    assert sy > 0
    Hp = bfgs_update(H, s_t, y_t)
    assert _pd(Hp)
    if float(y_t @ H @ y_t) / sy <= 1 / mu1:
        norm_B = torch.linalg.matrix_norm(torch.linalg.inv(H), 2)
        norm_Bp = torch.linalg.matrix_norm(torch.linalg.inv(Hp), 2)
        assert norm_Bp <= norm_B * (1 + 1 / mu1) * (1 + 1e-8)  # (2.8)
        root = math.sqrt(float(torch.linalg.matrix_norm(H, 2)))
        bound = (root + 1 / math.sqrt(mu1 * mu2)) ** 2 + 1 / mu2  # (2.10)
        assert float(torch.linalg.matrix_norm(Hp, 2)) <= bound * (1 + 1e-8)


@SETTINGS
@given(
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    mu1=st.floats(0.05, 0.95),
    mu2=st.floats(1e-3, 1e3),
    curvature=st.sampled_from([1.0, -1.0]),
)
def test_dp_dlm_gives_lm_lower_bound_for_any_mu2(
    d: int, seed: int, mu1: float, mu2: float, curvature: float
) -> None:
    """Alg 8: s̃ᵀy ≥ μ1 yᵀHy ≥ 0, so s̃ᵀỹ ≥ μ2 ‖s̃‖² for any μ2 > 0 (thesis §3.3.2)."""
    H = spd(d, seed, cond=1e2)
    s, y = pair(d, seed, curvature)
    Hy = H @ y
    s_t, y_t = dp_dlm_damping(s, y, Hy, mu1, mu2)
    assert float(s_t @ y) >= mu1 * float(y @ Hy) * (1 - 1e-9) - 1e-12
    assert float(s_t @ y_t) >= mu2 * float(s_t @ s_t) * (1 - 1e-9)
    torch.testing.assert_close(y_t, y + mu2 * s_t)
    assert _pd(bfgs_update(H, s_t, y_t))


@SETTINGS
@given(
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    mu1=st.floats(0.05, 0.95),
    mu2=st.floats(1e-2, 1e2),
)
def test_dpi_dlm_meets_lemma_4(d: int, seed: int, mu1: float, mu2: float) -> None:
    """Alg 11 / Lemma 4: s̃ᵀs̃/s̃ᵀỹ ≤ 1/μ2 and ỹᵀỹ/s̃ᵀỹ ≤ 1/μ3, μ3 = μ1/(μ2(1+2μ1))."""
    s, y = pair(d, seed, curvature=-1.0)
    s_t, y_t = dpi_dlm_damping(s, y, mu1, mu2)
    sy = float(s_t @ y_t)
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    assert float(s_t @ s_t) / sy <= (1 / mu2) * (1 + 1e-9)
    assert float(y_t @ y_t) / sy <= (1 / mu3) * (1 + 1e-9)


def test_dampings_repair_degenerate_pairs() -> None:
    """y = 0 (no curvature seen): DD and D_P D_LM still give s̃ᵀỹ = μ2 ‖s‖² > 0."""
    s = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    y = torch.zeros(3, dtype=F64)
    H = spd(3, 0)
    for damp in (double_damping, dp_dlm_damping):
        s_t, y_t = damp(s, y, H @ y, 0.2, 0.3)
        torch.testing.assert_close(s_t, s)
        torch.testing.assert_close(s_t @ y_t, 0.3 * (s @ s))


# --------------------------------------------------------------------------- L-BFGS
def _pairs(k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = spd(d, seed)
    S = torch.randn(k, d, generator=_gen(seed + 7), dtype=F64)
    return S, S @ B  # rows y_i = B s_i: every s_iᵀ y_i > 0


@SETTINGS
@given(
    k=st.integers(0, 8),
    d=st.integers(1, 9),
    n=st.integers(1, 5),
    gamma=st.sampled_from([1.0, 0.3, 7.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_nonloop_lbfgs_equals_two_loop_recursion_and_dense_bfgs(
    k: int, d: int, n: int, gamma: float, seed: int
) -> None:
    S, Y = _pairs(k, d, seed)
    V = torch.randn(d, n, generator=_gen(seed + 3), dtype=F64)
    HV = lbfgs_multiply(S, Y, V, gamma)
    two_loop = torch.stack([lbfgs_two_loop(S, Y, V[:, j], gamma) for j in range(n)], dim=1)
    torch.testing.assert_close(HV, two_loop, rtol=1e-8, atol=1e-10)
    dense = gamma * torch.eye(d, dtype=F64)
    for i in range(k):  # oldest first
        dense = printed_bfgs(dense, S[i], Y[i])
    torch.testing.assert_close(HV, dense @ V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lbfgs_multiply(S, Y, V[:, 0], gamma), HV[:, 0])  # vector form


def _ring(p: int, d: int, pushes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A ring buffer of capacity p after ``pushes`` pairs, by `lbfgs_push_` (the products
    computed inside or passed in, alternately), and the pairs kept, oldest first."""
    S, Y = _pairs(pushes, d, seed)
    buf_S, buf_Y = torch.zeros(p, d, dtype=F64), torch.zeros(p, d, dtype=F64)
    StY, YtY = torch.zeros(p, p, dtype=F64), torch.zeros(p, p, dtype=F64)
    count, start = 0, 0
    for i in range(pushes):
        s, y = S[i], Y[i]
        known = {}
        if i % 2:
            known = dict(Sy=buf_S[:count] @ y, Ys=buf_Y[:count] @ s, Yy=buf_Y[:count] @ y)
        count, start = lbfgs_push_(buf_S, buf_Y, StY, YtY, count, start, s, y, **known)
    kept = min(pushes, p)
    return buf_S, buf_Y, StY, YtY, torch.tensor([count, start]), S[-kept:], Y[-kept:]


@SETTINGS
@given(
    p=st.integers(1, 6),
    d=st.integers(1, 7),
    pushes=st.integers(0, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_lbfgs_push_keeps_the_gram_matrices_of_recomputation_through_wrap_around(
    p: int, d: int, pushes: int, seed: int
) -> None:
    """After many pushes (the ring wrapping around several times) the incremental SᵀY, YᵀY
    equal S Yᵀ, Y Yᵀ of the last p pairs in chronological order, and the ring holds them."""
    buf_S, buf_Y, StY, YtY, (count, start), S, Y = _ring(p, d, pushes, seed)
    k = min(pushes, p)
    assert int(count) == k
    assert int(start) == (0 if pushes <= p else pushes % p)
    order = [(int(start) + i) % max(k, 1) for i in range(k)]
    torch.testing.assert_close(buf_S[order], S)
    torch.testing.assert_close(buf_Y[order], Y)
    torch.testing.assert_close(StY[:k, :k], S @ Y.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(YtY[:k, :k], Y @ Y.T, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    p=st.integers(1, 6),
    d=st.integers(1, 7),
    n=st.integers(1, 4),
    pushes=st.integers(1, 20),
    gamma=st.sampled_from([1.0, 0.3, 7.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lbfgs_multiply_on_a_ring_with_kept_grams_equals_the_chronological_product(
    p: int, d: int, n: int, pushes: int, gamma: float, seed: int
) -> None:
    """H V from the ring buffer (rows rotated, Gram matrices, products and the stacked
    [S; Y] given, in place) equals H V of the pairs oldest first with nothing given."""
    buf_S, buf_Y, StY, YtY, (count, start), S, Y = _ring(p, d, pushes, seed)
    k, start_ = int(count), int(start)
    Sr, Yr = buf_S[:k], buf_Y[:k]
    V = torch.randn(d, n, generator=_gen(seed + 5), dtype=F64)
    expected = lbfgs_multiply(S, Y, V, gamma)
    grams = dict(StY=StY[:k, :k], YtY=YtY[:k, :k], start=start_)
    torch.testing.assert_close(lbfgs_multiply(Sr, Yr, V, gamma, **grams), expected)
    torch.testing.assert_close(lbfgs_multiply(Sr, Yr, V, gamma, start=start_), expected)
    SY = torch.cat([Sr, Yr])
    torch.testing.assert_close(lbfgs_multiply(Sr, Yr, V, gamma, SY=SY, **grams), expected)
    v = V[:, 0]
    known = dict(SV=Sr @ v, YV=Yr @ v)
    torch.testing.assert_close(lbfgs_multiply(Sr, Yr, v, gamma, **grams, **known), expected[:, 0])
    W = V.clone()
    result = lbfgs_multiply(Sr, Yr, W, gamma, **grams, out=W)
    assert result.data_ptr() == W.data_ptr()
    torch.testing.assert_close(W, expected)
    out = torch.empty(d, n, dtype=F64)
    lbfgs_multiply(Sr, Yr, V, gamma, **grams, out=out)
    torch.testing.assert_close(out, expected)


def test_lbfgs_push_rejects_a_rotated_buffer_that_is_not_full() -> None:
    S, Y = torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    StY, YtY = torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)
    s = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="^start"):
        lbfgs_push_(S, Y, StY, YtY, 1, 1, s, s)


def test_lbfgs_multiply_without_pairs_is_the_base_matrix() -> None:
    V = torch.randn(4, 3, generator=_gen(0), dtype=F64)
    empty = torch.zeros(0, 4, dtype=F64)
    torch.testing.assert_close(lbfgs_multiply(empty, empty, V, 0.5), 0.5 * V)
    W = V.clone()
    lbfgs_multiply(empty, empty, W, 0.5, out=W)
    torch.testing.assert_close(W, 0.5 * V)


def test_lbfgs_secant_equation_for_the_newest_pair() -> None:
    S, Y = _pairs(5, 6, 11)
    torch.testing.assert_close(lbfgs_multiply(S, Y, Y[-1], 0.5), S[-1], rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------- Hessian action
@SETTINGS
@given(d=st.integers(1, 8), c=st.floats(1e-3, 1e2), seed=st.integers(0, 2**31 - 1))
def test_hessian_action_bfgs_is_sherman_morrison(d: int, c: float, seed: int) -> None:
    """Thesis Theorem 1: H = A⁻¹, s = H a, y = A⁺ s with A⁺ = A + c aaᵀ ⇒ H⁺ = (A⁺)⁻¹."""
    A = spd(d, seed, cond=1e2)
    a = torch.randn(d, generator=_gen(seed + 5), dtype=F64)
    A_plus = A + c * torch.outer(a, a)
    H = torch.linalg.inv(A)
    s, y = hessian_action_pair(H, a, lambda v: A_plus @ v, 0.0)
    Hp = bfgs_update(H, s, y)
    Ha = H @ a
    sherman_morrison = H - torch.outer(Ha, Ha) / (1.0 / c + a @ Ha)
    torch.testing.assert_close(Hp, sherman_morrison, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(Hp @ A_plus, torch.eye(d, dtype=F64), rtol=1e-7, atol=1e-7)


def test_hessian_action_pair_adds_lm_damping() -> None:
    A = spd(4, 3)
    H = spd(4, 4)
    a = torch.randn(4, generator=_gen(1), dtype=F64)
    s, y = hessian_action_pair(H, a, lambda v: A @ v, 0.7)
    torch.testing.assert_close(s, H @ a)
    torch.testing.assert_close(y, (A + 0.7 * torch.eye(4, dtype=F64)) @ s)


def test_gram_matvec_equals_dense_product_with_homogeneous_column() -> None:
    X = torch.randn(9, 4, generator=_gen(2), dtype=F64)
    v = torch.randn(5, generator=_gen(3), dtype=F64)
    Xb = torch.cat([X, torch.ones(9, 1, dtype=F64)], dim=1)
    torch.testing.assert_close(gram_matvec(X, v, 0.25, homogeneous=True), 0.25 * Xb.T @ (Xb @ v))
    torch.testing.assert_close(gram_matvec(X, v[:4], 0.5), 0.5 * X.T @ (X @ v[:4]))
