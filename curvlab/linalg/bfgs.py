r"""BFGS and L-BFGS for inverse Kronecker factors (thesis §2.3–2.4, §3.3; Algs 3, 8, 11).

Pure functions on tensors, no host synchronisation: every scalar (``sᵀy``, Powell's θ, ...)
stays a 0-dim tensor and every branch of the printed algorithms is a ``torch.where``, so an
optimizer can damp and update all its layers and check the results with one sync.

* :func:`bfgs_update` — the BFGS update of an inverse approximation H (eq. 2.6 / 3.11)::

      H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ
         = H + (ρ² yᵀHy + ρ) s sᵀ − ρ (s (Hy)ᵀ + (Hy) sᵀ),     ρ = 1 / sᵀy,

  which satisfies the secant equation ``H⁺ y = s`` and stays positive definite iff sᵀy > 0.
* Powell's dampings (thesis §2.3.1): :func:`powell_damping_h` (on H: replaces s) and
  :func:`powell_damping_identity` (with B = I: replaces y).
* The double-damping procedures: :func:`double_damping` (DD, thesis Alg 3, §2.3.1, ch.2),
  :func:`dp_dlm_damping` (D_P D_LM, Alg 8, ch.3) and :func:`dpi_dlm_damping` (D_P(I) D_LM,
  Alg 11, the convergence-theory variant).
* L-BFGS in the compact ("non-loop") form of Byrd, Nocedal & Schnabel (1994) [thesis ref 20]:
  :func:`lbfgs_multiply` applies H to a whole matrix with matrix–matrix products over the
  pairs, given the k × k Gram matrices SᵀY and YᵀY that :func:`lbfgs_push_` keeps up to date
  as pairs enter a ring buffer (three matrix–vector products per pair instead of 2k²d per
  product), and
  :func:`lbfgs_two_loop` is the classical two-loop recursion, kept as a test reference.
* "Hessian-action" BFGS for the activation factor (thesis §2.4, Theorem 1; §3.3.2):
  :func:`hessian_action_pair` gives ``s = H a``, ``y = A s + λ s``; :func:`gram_matvec` is the
  matrix-free ``A s = (1/m) Pᵀ(P s)`` of eq. (3.15) with an optional homogeneous column.

Pairs for L-BFGS are stored as rows: ``S, Y`` of shape (k, d), oldest first, or a ring buffer
whose oldest row is ``start`` (a full buffer overwrites its oldest pair; nothing is shifted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "bfgs_update",
    "double_damping",
    "dp_dlm_damping",
    "dpi_dlm_damping",
    "gram_matvec",
    "hessian_action_pair",
    "lbfgs_multiply",
    "lbfgs_push_",
    "lbfgs_two_loop",
    "powell_damping_h",
    "powell_damping_identity",
]


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """uᵀv of two vectors as a 0-dim tensor."""
    if u.dim() == 1 and v.dim() == 1:
        return torch.dot(u, v)
    return torch.dot(u.reshape(-1), v.reshape(-1))


def bfgs_update(
    H: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    Hy: Tensor | None = None,
    u: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    r"""BFGS update of an inverse approximation (thesis eq. 2.6 / 3.11).

    Computes :math:`H^+ = H + s u^\top + u s^\top` with
    :math:`u = \tfrac12(\rho^2 y^\top H y + \rho)\,s - \rho\,Hy`, which expands to the
    printed :math:`(I-\rho sy^\top)H(I-\rho ys^\top)+\rho ss^\top` for symmetric H. One rank-2
    ``addmm``: O(d²).

    Args:
        H: symmetric (d, d) approximation of an inverse Hessian.
        s, y: the pair, vectors of length d; the caller ensures :math:`s^\top y > 0` (the
            result is then positive definite when H is).
        Hy: ``H @ y`` if already known (saves one matrix–vector product).
        u: `bfgs_correction` ``(s, y, Hy)`` if already known (e.g. checked for finiteness).
        inplace: update ``H`` in place and return it.

    Returns:
        :math:`H^+`, satisfying :math:`H^+ y = s`.
    """
    if u is None:
        u = bfgs_correction(s, y, H @ y if Hy is None else Hy)
    left = torch.stack([s, u], dim=1)
    right = torch.stack([u, s], dim=0)
    if inplace:
        return H.addmm_(left, right)
    return torch.addmm(H, left, right)


def bfgs_correction(s: Tensor, y: Tensor, Hy: Tensor) -> Tensor:
    r"""The vector :math:`u = \tfrac12(\rho^2 y^\top H y + \rho)\,s - \rho\,Hy` of
    `bfgs_update` (:math:`H^+ = H + s u^\top + u s^\top`, :math:`\rho = 1/s^\top y`).

    A caller can check it for finiteness before committing an update: a pair with a tiny
    positive :math:`s^\top y` passes the curvature condition yet overflows :math:`\rho^2`.
    """
    rho = 1.0 / _dot(s, y)
    coeff = rho * rho * _dot(y, Hy) + rho
    return (0.5 * coeff) * s - rho * Hy


def powell_damping_h(s: Tensor, y: Tensor, Hy: Tensor, mu: float) -> Tensor:
    r"""Powell's damping on H (thesis §2.3.1): :math:`\tilde s = \theta s + (1-\theta) Hy`.

    :math:`\theta = \frac{(1-\mu)\,y^\top Hy}{y^\top Hy - s^\top y}` if
    :math:`s^\top y < \mu\,y^\top Hy`, else 1. Guarantees
    :math:`\tilde s^\top y \ge \mu\,y^\top H y` (with equality when damped).
    """
    sy = _dot(s, y)
    yHy = _dot(y, Hy)
    damped = sy < mu * yHy
    # The unselected branch may divide by zero; torch.where never propagates it.
    theta = torch.where(damped, (1.0 - mu) * yHy / (yHy - sy), torch.ones_like(sy))
    return theta * s + (1.0 - theta) * Hy


def powell_damping_identity(s: Tensor, y: Tensor, mu: float) -> Tensor:
    r"""Powell's damping with B = I (thesis §2.3.1): :math:`\tilde y = \theta y + (1-\theta) s`.

    :math:`\theta = \frac{(1-\mu)\,s^\top s}{s^\top s - s^\top y}` if
    :math:`s^\top y < \mu\,s^\top s`, else 1. Guarantees :math:`s^\top\tilde y \ge \mu\,s^\top s`
    (an LM damping :math:`B \succeq \mu I`); for μ > 1 it extrapolates but the bound holds.
    """
    sy = _dot(s, y)
    ss = _dot(s, s)
    damped = sy < mu * ss
    theta = torch.where(damped, (1.0 - mu) * ss / (ss - sy), torch.ones_like(sy))
    return theta * y + (1.0 - theta) * s


def double_damping(
    s: Tensor, y: Tensor, Hy: Tensor, mu1: float, mu2: float
) -> tuple[Tensor, Tensor]:
    r"""DD, thesis Alg 3 (ch.2): Powell on H with μ1, then Powell with B = I with μ2.

    Lines 2–3 give :math:`\tilde s^\top y \ge \mu_1 y^\top H y` (so
    :math:`y^\top Hy / \tilde s^\top y \le 1/\mu_1` for the *undamped* y); lines 4–5 give
    :math:`\tilde s^\top \tilde y \ge \mu_2 \tilde s^\top \tilde s`. After line 5 the first ratio
    is no longer guaranteed for :math:`\tilde y` (thesis §2.3: the implementation never skips).

    Args:
        s, y: the pair (after the moving average; thesis Alg 4 line 16).
        Hy: the current H applied to y (for L-BFGS: the current compact operator).
        mu1: μ1 ∈ (0, 1) (0.2).
        mu2: μ2 = λ_G (thesis: meant to lie in (0, 1]).

    Returns:
        :math:`(\tilde s, \tilde y)`.
    """
    s_t = powell_damping_h(s, y, Hy, mu1)  # Alg 3, lines 2–3
    y_t = powell_damping_identity(s_t, y, mu2)  # Alg 3, lines 4–5
    return s_t, y_t


def dp_dlm_damping(
    s: Tensor, y: Tensor, Hy: Tensor, mu1: float, mu2: float
) -> tuple[Tensor, Tensor]:
    r"""D_P D_LM, thesis Alg 8 (ch.3 "Improvement #1"): Powell on H, then :math:`\tilde y = y +
    \mu_2\tilde s`.

    Gives :math:`\tilde s^\top y \ge \mu_1 y^\top H y \ge 0` and hence
    :math:`\tilde s^\top\tilde y \ge \mu_2\|\tilde s\|^2`, for any μ2 > 0 (μ2 = λ_G).
    """
    s_t = powell_damping_h(s, y, Hy, mu1)  # Alg 8, lines 1–2
    return s_t, y + mu2 * s_t  # Alg 8, line 3


def dpi_dlm_damping(s: Tensor, y: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    r"""D_P(I) D_LM, thesis Alg 11 (convergence theory of ch.3): Alg 8 with H = μ2⁻¹ I.

    Lemma 4: :math:`\tilde s^\top\tilde s/\tilde s^\top\tilde y \le 1/\mu_2` and
    :math:`\tilde y^\top\tilde y/\tilde s^\top\tilde y \le 1/\mu_3`,
    :math:`\mu_3 = \mu_1/(\mu_2(1+2\mu_1))`.
    """
    return dp_dlm_damping(s, y, y / mu2, mu1, mu2)


# --------------------------------------------------------------------------- L-BFGS
def lbfgs_multiply(
    S: Tensor,
    Y: Tensor,
    V: Tensor,
    gamma: float,
    *,
    SY: Tensor | None = None,
    StY: Tensor | None = None,
    YtY: Tensor | None = None,
    start: int = 0,
    SV: Tensor | None = None,
    YV: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    r"""H V for the L-BFGS matrix of the pairs (S, Y) with base :math:`H_0 = \gamma I`.

    Compact representation (Byrd, Nocedal & Schnabel 1994, eq. 3.1; thesis §2.3 "non-loop"
    implementation, §3.4.3) with :math:`R_{ij} = s_i^\top y_j` (i ≤ j),
    :math:`D = \mathrm{diag}(s_i^\top y_i)`, pairs in chronological order:

    .. math::
        H = \gamma I + [S\ \gamma Y]
            \begin{bmatrix} R^{-\top}(D + \gamma Y^\top Y)R^{-1} & -R^{-\top} \\ -R^{-1} & 0
            \end{bmatrix} [S\ \gamma Y]^\top .

    Evaluated as :math:`q_S = S^\top V`, :math:`q_Y = Y^\top V`, :math:`r = R^{-1} q_S`,
    :math:`HV = \gamma V + S\,R^{-\top}((D + \gamma Y^\top Y) r - \gamma q_Y) - \gamma Y r`:
    a (2k × d)·(d × n) and a (d × 2k)·(2k × n) product (each two when S and Y are not one
    matrix ``SY``) and O(k²(k + n)) — the thesis's
    reason for preferring it over 4k matrix–vector products of the two-loop recursion when V is
    a matrix. With ``StY`` and ``YtY`` given (kept up to date by `lbfgs_push_`) nothing of
    size k²d is recomputed.

    Args:
        S, Y: pairs as rows, shape (k, d), every :math:`s_i^\top y_i > 0`; a ring buffer whose
            oldest pair is row ``start`` (the i-th oldest is row ``(start + i) % k``).
        V: (d,) or (d, n).
        gamma: γ of the base matrix (thesis ch.2: 1; ch.3: 1/λ_G).
        SY: S and Y stacked as one (2k, d) matrix (a view of one buffer), if there is one:
            then the products with :math:`[S\ Y]^\top` and :math:`[S\ Y]` are one each.
        StY, YtY: the (k, k) Gram matrices :math:`(s_i^\top y_j)_{ij}` and
            :math:`(y_i^\top y_j)_{ij}` with i, j in chronological order (oldest first), if
            known.
        start: the row of the oldest pair.
        SV, YV: :math:`(s_i^\top V)_i` and :math:`(y_i^\top V)_i` in row order, shaped (k,)
            or (k, n) like V, if known.
        out: where to write the result (shaped like V; may be V itself).

    Returns:
        H V, shaped like V.
    """
    vector = V.dim() == 1
    Vm = V.unsqueeze(1) if vector else V
    outm = None if out is None else (out.unsqueeze(1) if vector else out)
    k = S.shape[0]
    if k == 0:
        result = gamma * Vm if outm is None else torch.mul(Vm, gamma, out=outm)
        return result.squeeze(1) if vector else result
    start %= k
    if SY is not None and SV is None and YV is None:
        q = SY @ Vm  # (2k, n): [SᵀV; YᵀV], row order
        if start:  # ring buffer → chronological order for the triangular solves
            q = q.view(2, k, -1).roll(-start, 1).view(2 * k, -1)
        q_s, q_y = q[:k], q[k:]
    else:
        q_s = S @ Vm if SV is None else SV.reshape(k, -1)  # (k, n): (s_iᵀ V)_i, row order
        q_y = Y @ Vm if YV is None else YV.reshape(k, -1)
        if start:
            q_s, q_y = q_s.roll(-start, 0), q_y.roll(-start, 0)
    if StY is None or YtY is None:
        S_c, Y_c = (S, Y) if start == 0 else (S.roll(-start, 0), Y.roll(-start, 0))
        StY = S_c @ Y_c.T if StY is None else StY  # (SᵀY)_ij = s_iᵀ y_j
        YtY = Y_c @ Y_c.T if YtY is None else YtY
    R = torch.triu(StY)
    r = torch.linalg.solve_triangular(R, q_s, upper=True)  # R⁻¹ Sᵀ V
    inner = torch.addmm(q_y, YtY, r, beta=-gamma, alpha=gamma)  # γ (YᵀY r − q_Y)
    inner.addcmul_(torch.diagonal(StY).unsqueeze(1), r)  # + D r
    top = torch.linalg.solve_triangular(R.mT, inner, upper=False)  # R⁻ᵀ(...)
    if SY is not None:  # γ V + [S Y] [top; −γ r]: one product
        C = torch.cat([top, r.mul_(-gamma)])
        if start:  # back to row order
            C = C.view(2, k, -1).roll(start, 1).view(2 * k, -1)
        result = torch.addmm(Vm, SY.T, C, beta=gamma, out=outm)
    else:
        if start:
            top, r = top.roll(start, 0), r.roll(start, 0)
        result = torch.addmm(Vm, S.T, top, beta=gamma, out=outm)
        result.addmm_(Y.T, r, alpha=-gamma)
    return result.squeeze(1) if vector else result


def lbfgs_push_(
    S: Tensor,
    Y: Tensor,
    StY: Tensor,
    YtY: Tensor,
    count: int,
    start: int,
    s: Tensor,
    y: Tensor,
    *,
    Sy: Tensor | None = None,
    Ys: Tensor | None = None,
    Yy: Tensor | None = None,
) -> tuple[int, int]:
    r"""Store the pair (s, y) in the ring buffer of `lbfgs_multiply` and update its Gram
    matrices, in place; a full buffer overwrites (drops) its oldest pair.

    The Gram matrices gain a last row and column, three (k × d) matrix–vector products
    instead of the 2k²d of recomputing them; dropping the oldest pair shifts them by one
    (O(p²)). Nothing of size p × d is moved.

    The buffer fills rows 0, 1, … in order (``start`` stays 0 until it is full); a full
    buffer's oldest pair is in row ``start``.

    Args:
        S, Y: the (p, d) buffers; rows ``0 … count − 1`` in use.
        StY, YtY: (p, p) buffers whose leading (count × count) blocks are
            :math:`(s_i^\top y_j)` and :math:`(y_i^\top y_j)` in chronological order.
        count, start: the ring's state before the push.
        s, y: the new pair.
        Sy, Ys, Yy: :math:`(s_i^\top y)_i`, :math:`(y_i^\top s)_i`, :math:`(y_i^\top y)_i` over
            the ``count`` rows in use (row order), if known.

    Returns:
        ``(count, start)`` after the push.
    """
    p = S.shape[0]
    k = count
    if k < p and start != 0:
        raise ValueError("start: a buffer that is not full has its oldest pair in row 0")
    if Sy is None:
        Sy = S[:k] @ y
    if Ys is None:
        Ys = Y[:k] @ s
    if Yy is None:
        Yy = Y[:k] @ y
    products = torch.stack([Sy, Ys, Yy])  # (3, k), row order
    if start:
        products = products.roll(-start, 1)  # chronological
    if k == p:  # full: drop the oldest pair, whose row receives the new one
        products = products[:, 1:]
        StY[: p - 1, : p - 1] = StY[1:, 1:].clone()
        YtY[: p - 1, : p - 1] = YtY[1:, 1:].clone()
        slot, j, after = start, p - 1, (p, (start + 1) % p)
    else:
        slot, j, after = k, k, (k + 1, 0)
    S[slot] = s
    Y[slot] = y
    StY[:j, j] = products[0]  # s_iᵀ y_new
    StY[j, :j] = products[1]  # s_newᵀ y_i
    YtY[:j, j] = products[2]
    YtY[j, :j] = products[2]
    StY[j, j] = _dot(s, y)
    YtY[j, j] = _dot(y, y)
    return after


def lbfgs_two_loop(S: Tensor, Y: Tensor, v: Tensor, gamma: float) -> Tensor:
    """H v by the two-loop recursion (Nocedal & Wright, Algorithm 7.4); a test reference.

    Same conventions as `lbfgs_multiply` (rows of S, Y oldest first; base ``gamma · I``).
    """
    q = v.clone()
    k = S.shape[0]
    rhos = [1.0 / _dot(S[i], Y[i]) for i in range(k)]
    alphas: list[Tensor] = [torch.zeros((), dtype=v.dtype)] * k
    for i in reversed(range(k)):
        alphas[i] = rhos[i] * _dot(S[i], q)
        q = q - alphas[i] * Y[i]
    r = gamma * q
    for i in range(k):
        beta = rhos[i] * _dot(Y[i], r)
        r = r + (alphas[i] - beta) * S[i]
    return r


# ------------------------------------------------------------------ Hessian action
def hessian_action_pair(
    H: Tensor, a: Tensor, matvec: Callable[[Tensor], Tensor], damping: float
) -> tuple[Tensor, Tensor]:
    r"""The "Hessian-action" pair :math:`s = H a`, :math:`y = A s + \lambda s` (thesis §2.4,
    Alg 4 lines 21–22; eq. 3.14, Alg 9 line 16).

    With :math:`H = A^{-1}`, λ = 0 and ``matvec`` the product with
    :math:`A^+ = A + c\,aa^\top`, the BFGS update with this pair is exactly
    :math:`(A^+)^{-1}` (thesis Theorem 1, the Sherman–Morrison formula). The LM term λ keeps
    :math:`s^\top y \ge \lambda\|s\|^2 > 0` for PSD A, so no Powell damping is needed.

    Args:
        H: current inverse approximation (d, d).
        a: the averaged input :math:`\bar a` (with the homogeneous 1 when there is a bias).
        matvec: ``s ↦ A s`` (dense EMA A in ch.2, :func:`gram_matvec` in ch.3).
        damping: λ_A.
    """
    s = H @ a
    return s, matvec(s) + damping * s


def gram_matvec(X: Tensor, v: Tensor, scale: float, *, homogeneous: bool = False) -> Tensor:
    r""":math:`\text{scale}\cdot\bar X^\top(\bar X v)` without forming the Gram matrix (eq. 3.15).

    Args:
        X: rows (n, d), e.g. a layer's inputs (conv: unfolded patches, all examples and
            locations).
        v: vector of length d, or d + 1 when ``homogeneous``.
        scale: e.g. 1/m: the thesis's :math:`A = E_n[\sum_t a_t a_t^\top]` sums over
            locations and averages over examples.
        homogeneous: :math:`\bar X = [X\ \mathbf 1]` (the bias column of thesis §2.2, §3.2.2), never
            materialised.

    Returns:
        The product, of the same length as ``v``. Cost O(n d).
    """
    if not homogeneous:
        return (X.T @ (X @ v)) * scale
    w = torch.addmv(v[-1:].expand(X.shape[0]), X, v[:-1])  # X v_w + v_b
    return torch.cat([X.T @ w, w.sum().reshape(1)]) * scale
