r"""Shampoo as the thesis implements it (Gupta, Koren & Singer 2018; Anil et al. 2020;
thesis §4.7.2, Alg 16) — the baseline of chapter 4.

Every parameter tensor of order k is preconditioned by the Kronecker product of the inverse
2k-th roots of its damped mode statistics (contractions of the *empirical* mini-batch gradient):

Thesis Alg 16, with μ = ``momentum``, β = ``ema_decay``, ε = ``damping``, γ = ``weight_decay``,
T1 = ``curvature_every``, T2 = ``inverse_every``::

    1   μ = 0.9, β = 0.9
    2   Ĝ_l^{(i)} = E[G_l^{(i)}] over the whole dataset (`warm_start`);  ∇̂_l = 0
    3   for t = 1, 2, …
    4     sample a mini-batch M_t of size m
    5     forward–backward over M_t → mini-batch gradient ∇L
    6     for each tensor l:
    7       ∇̂_l = μ ∇̂_l + ∇_l L
    8       if t ≡ 0 (mod T1):
    9         Ĝ_l^{(i)} = β Ĝ_l^{(i)} + (1−β) Ḡ_l^{(i)}, i = 1..k_l,  where Ḡ_l = ∇_l L
    11      if t ≡ 0 (mod T2):
    12        recompute (Ĝ_l^{(i)} + εI)^{-1/(2k_l)} with the coupled Newton method
    14      p_l = ∇̂_l ×_1 (Ĝ_l^{(1)} + εI)^{-1/(2k_l)} ×_2 ⋯ ×_{k_l} (Ĝ_l^{(k_l)} + εI)^{-1/(2k_l)}
    15      p_l = p_l + γ W_l
    16      W_l = W_l − α_t p_l

(Line 2's printed "∇̄ = 0" is read as ∇̂ = 0 and line 14's "×_k" as ×_{k_l}: misprints.) The
statistics are contractions of the raw mini-batch gradient, not of the momentum buffer, and
there is no extra pass (Shampoo uses the empirical Fisher). Thesis §4.7.2: an
EMA (β) instead of the AdaGrad sum; coupled Newton (100 iterations, tolerance 1e-6; §4.7.2)
instead of an SVD; same tensor shapes as TNT (conv weights 3-way, root −1/6; matrices −1/4;
vectors −1/2). Not included, as in the thesis: ε scaled by λ_max, the diagonal variant,
blocking of large tensors, grafting.

Options:

* ``root_method="eigh"``: the same roots from an eigendecomposition (exact up to round-off).
  On CPU it is much cheaper than coupled Newton, whose every iteration costs about 4 d×d matrix
  products (``N^{2k}`` by repeated squaring plus two more) for each factor of size d.
* ``inverse_warmup`` and the statistics of the first mini-batch without `warm_start`: see
  `curvlab.optim.tensorwise` (deviation A9, docs/deviations.md).

``step`` accepts a plain closure (or `curvlab.Objective`), or ``None`` when the gradients are
already computed. Blocks and step: `curvlab.optim.tensorwise`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor, nn

from curvlab.objective import Objective
from curvlab.optim.tensorwise import TensorwiseOptimizer
from curvlab.optim.validation import check_choice

__all__ = ["Shampoo"]

RootMethodChoice = Literal["coupled_newton", "eigh"]


class Shampoo(TensorwiseOptimizer):
    """Shampoo as thesis Alg 16 (EMA statistics, coupled Newton roots, no grafting).

    Args:
        model: the network; every trainable parameter tensor is a block.
        lr: α (thesis autoencoders 3e-4, Table 4.3; CNNs 1e-3 … 1e-2, Table 4.4).
        damping: ε > 0, added to every statistic before its root.
        momentum: μ, heavy ball on the raw gradient (0.9).
        weight_decay: γ, decoupled, added after preconditioning.
        ema_decay: β of the statistics EMA (0.9).
        curvature_every: T1, statistics every T1 steps (autoencoders 1, CNNs 10).
        inverse_every: T2, roots every T2 steps (autoencoders 20, CNNs 100).
        root_method: ``"coupled_newton"`` (Alg 16 line 12) or ``"eigh"``.
        inverse_warmup: also refresh the roots at every statistics update while t < T2.
        params: optional parameter groups.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-4,
        damping: float = 3e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9,
        curvature_every: int = 1,
        inverse_every: int = 20,
        root_method: RootMethodChoice = "coupled_newton",
        inverse_warmup: bool = True,
        params: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        defaults = self.checked(locals())
        method = check_choice("root_method", root_method, ("coupled_newton", "eigh"))
        super().__init__(
            model,
            defaults,
            params=params,
            normalise=False,
            root_of_order=_root_of_order,  # Alg 16 line 12: -1/(2 k_l)
            method=method,  # type: ignore[arg-type]
            inverse_warmup=inverse_warmup,
            loss_fn=loss_fn,
        )

    def statistics_loss(self, objective: Objective, outputs: Tensor, loss: Tensor) -> Tensor:
        """The true-label loss: Ḡ_l is the empirical mini-batch gradient (Alg 16 line 9)."""
        return loss


def _root_of_order(order: int) -> int:
    """Shampoo's r in (Ĝ^{(i)} + εI)^{-1/r} for a tensor of order k: 2k (Alg 16 line 12)."""
    return 2 * order
