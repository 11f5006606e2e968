r"""The symmetric Lanczos process: an orthonormal Krylov basis and its tridiagonal matrix.

For a symmetric ``H`` and a start vector ``v0`` (Golub & Van Loan 2013, *Matrix Computations*,
Alg. 10.1.1; Conn, Gould & Toint 2000, *Trust-Region Methods*, Alg. 5.2.1)::

    1  q_1 = v0 / ‖v0‖ ;  β_0 = 0 ;  q_0 = 0
    2  for j = 1 .. k:
    3      w = H q_j − β_{j−1} q_{j−1}
    4      α_j = q_jᵀ H q_j ;  w = w − α_j q_j
    5      (optional) reorthogonalise w against q_1 .. q_j, twice (classical Gram–Schmidt)
    6      β_j = ‖w‖ ;  stop if β_j is at round-off level (the Krylov space is invariant)
    7      q_{j+1} = w / β_j

so that ``H Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ`` with ``T_m = tridiag(β, α, β)`` and ``Q_m`` having
orthonormal columns; ``Q_mᵀ H Q_m = T_m``. Line 6 uses the threshold ``β_j ≤ 100·ε·‖T‖`` (ε the
unit round-off of the dtype, ‖T‖ the running maximum of the column norms of ``T``). Full
reorthogonalisation (line 5, default on) keeps ``Q`` orthonormal to working precision at
``O(n·j)`` extra work per step; without it orthogonality is lost as Ritz values converge (Paige
1971) and ``T`` acquires spurious copies of them.

One host synchronisation per step fetches ``α_j`` and ``β_j`` (line 6 decides on ``β_j``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.solvers.result import Matvec, check_iterations, check_vector, fetch

__all__ = ["lanczos"]

#: Round-off threshold, in units of ε·‖T‖, below which β counts as zero (invariant subspace).
_ROUND_OFF = 100.0


class LanczosProcess:
    """The Lanczos recurrence, one step at a time (used by :func:`lanczos` and the cubic solver).

    ``v0`` must be finite and nonzero. The basis is kept row-wise in a buffer that doubles when
    full, so only ``O(m·n)`` memory is used for ``m`` steps whatever the budget.
    """

    def __init__(self, matvec: Matvec, v0: Tensor, v0_norm: float, *, reorthogonalize: bool):
        self.matvec = matvec
        self.reorthogonalize = reorthogonalize
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.invariant = False  # line 6 stopped the process
        self.non_finite = False
        self._t_norm = 0.0
        self._basis = v0.new_zeros(min(16, v0.numel()), v0.numel())
        self._basis[0] = v0 / v0_norm  # line 1
        self._next: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of completed steps ``m`` (basis vectors ``q_1 .. q_m``)."""
        return len(self.alphas)

    @property
    def basis(self) -> Tensor:
        """The ``(m, n)`` tensor whose rows are ``q_1 .. q_m`` (a view of the buffer)."""
        return self._basis[: self.size]

    def step(self) -> tuple[float, float]:
        """Perform step ``j = m + 1`` and return ``(α_j, β_j)``; may set ``invariant`` or
        ``non_finite``."""
        j = self.size
        if j == self._basis.shape[0]:
            grown = self._basis.new_zeros(min(2 * j, self._basis.shape[1]), self._basis.shape[1])
            grown[:j] = self._basis
            self._basis = grown
        if self._next is not None:
            self._basis[j] = self._next  # line 7 of the previous step
        q = self._basis[j]
        hq = self.matvec(q)
        alpha_t = q @ hq  # line 4
        w = hq - alpha_t * q
        if j > 0:
            w = w - self.betas[-1] * self._basis[j - 1]  # line 3
        if self.reorthogonalize:  # line 5
            previous = self._basis[: j + 1]
            for _ in range(2):
                w = w - previous.T @ (previous @ w)
        beta_t = torch.linalg.vector_norm(w)
        alpha, beta = fetch(alpha_t, beta_t)
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            self.non_finite = True
            return alpha, beta
        previous_beta = self.betas[-1] if self.betas else 0.0
        self._t_norm = max(self._t_norm, math.sqrt(previous_beta**2 + alpha**2 + beta**2))
        self.alphas.append(alpha)
        self.betas.append(beta)
        eps = torch.finfo(w.dtype).eps
        if beta <= _ROUND_OFF * eps * self._t_norm or j + 1 == self._basis.shape[1]:
            self.invariant = True  # line 6 (at j = n the space is the whole space)
            self._next = None
        else:
            self._next = w / beta  # line 7 (stored when the next step starts)
        return alpha, beta


def lanczos(
    matvec: Matvec, v0: Tensor, k: int, *, reorthogonalize: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``k`` steps of the Lanczos process on the symmetric operator ``matvec`` from ``v0``.

    Args:
        matvec: ``v ↦ H v`` with ``H`` symmetric.
        v0: Start vector, a flat float32 / float64 tensor.
        k: Number of steps (products with ``H``).
        reorthogonalize: Full reorthogonalisation (line 5), on by default.

    Returns:
        ``(alphas, betas, Q)`` with ``m ≤ k`` entries / columns, in the dtype and device of
        ``v0``: ``alphas`` (m,) is the diagonal of ``T``, ``betas`` (m,) holds the couplings
        ``β_1 .. β_m``, of which ``betas[:-1]`` is the off-diagonal of ``T`` and ``betas[-1]``
        the norm of the remainder ``H q_m − α_m q_m − β_{m−1} q_{m−1}``, and ``Q`` (n, m) has
        the orthonormal basis as columns, so that ``Qᵀ H Q = T``. ``m < k`` when the Krylov space
        becomes invariant (then ``betas[-1]`` is at round-off level) or when a product is
        non-finite (then the last, non-finite, step is dropped); ``m = 0`` for a zero or
        non-finite ``v0``.
    """
    check_vector(v0, "v0")
    k = check_iterations(k, "k", 1)
    v0_norm = float(torch.linalg.vector_norm(v0))
    if not math.isfinite(v0_norm) or v0_norm == 0.0:
        empty = v0.new_zeros(0)
        return empty, empty, v0.new_zeros(v0.numel(), 0)
    process = LanczosProcess(matvec, v0, v0_norm, reorthogonalize=reorthogonalize)
    while process.size < k:
        process.step()
        if process.invariant or process.non_finite:
            break
    alphas = torch.tensor(process.alphas, dtype=v0.dtype, device=v0.device)
    betas = torch.tensor(process.betas, dtype=v0.dtype, device=v0.device)
    return alphas, betas, process.basis.T
