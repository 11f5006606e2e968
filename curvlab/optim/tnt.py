r"""TNT — Tensor Normal Training (Ren & Goldfarb 2021; thesis ch.4, Alg 15).

The block Fisher of a parameter tensor W is the covariance of its *sampling-based* gradient
G = DW (labels y drawn from the model), assumed tensor-normal:
``vec(G) ~ N(0, U_1 ⊗ ⋯ ⊗ U_k)``, so ``E[G^{(i)}] = U_i ∏_{j≠i} tr(U_j)`` (eq. 4.2). The factors
are identified with c = 1 and equal average eigenvalues (eq. 4.10) and damped with the same ε
each; the direction is ``∇̂ ×_1 (Ũ_1+εI)^{-1} ×_2 ⋯ ×_k (Ũ_k+εI)^{-1}`` (eq. 4.8, Prop. 1).

Thesis Alg 15, with μ = ``momentum``, β = ``ema_decay``, ε = ``damping``, γ = ``weight_decay``,
T1 = ``curvature_every``, T2 = ``inverse_every``::

    1   μ = 0.9, β = 0.9
    2   Ĝ_l^{(i)} = E[G_l^{(i)}] over the whole dataset (`warm_start`);  ∇̂_l = 0
    3   for t = 1, 2, …
    4     sample a mini-batch M_t of size m
    5     forward–backward over M_t → mini-batch gradient ∇̄L
    6     if t ≡ 0 (mod T1):
    7       another backward pass over M_t with y sampled from the predictive distribution
            → Ḡ_l = DW_l averaged across M_t
    9     for each tensor l:
    10      ∇̂_l = μ ∇̂_l + ∇̄_l
    11      if t ≡ 0 (mod T1):
    12        Ĝ_l^{(i)} = β Ĝ_l^{(i)} + (1−β) Ḡ_l^{(i)},  i = 1..k_l
    14      if t ≡ 0 (mod T2):
    15        Ũ_1^{(l)}, …, Ũ_{k_l}^{(l)} from Ĝ_l^{(1..k_l)} by (4.10)
    16        recompute (Ũ_i^{(l)} + εI)^{-1}
    18      p_l = ∇̂_l ×_1 (Ũ_1^{(l)}+εI)^{-1} ×_2 ⋯ ×_{k_l} (Ũ_{k_l}^{(l)}+εI)^{-1}
    19      p_l = p_l + γ W_l
    20      W_l = W_l − α_t p_l

Line 7 is one extra backward pass through the forward graph of line 5 (no extra forward; it
runs first, then the true-label backward). The statistic is the contraction of the
*mini-batch-mean* sampled gradient, which estimates Fisher/m (thesis §4.5; deviation A10,
docs/deviations.md); the thesis's
ε and learning rates (Tables 4.3–4.7) are on that scale. Tensor shapes as thesis §4.3.4 (ii):
a conv weight is the 3-way ``(I, J, kh·kw)``, every bias and BatchNorm parameter a 1-way tensor
with a full d×d factor (`curvlab.linalg.modes.tensor_shape`). The step is
`curvlab.optim.base.BlockOptimizer.step` with the hooks of `curvlab.optim.tensorwise`.

Options and deviations:

* ``fisher="empirical"``: TNT-EF (thesis §4.7.3): no extra backward; Ḡ is the true-label
  mini-batch gradient.
* ``inverse_method``: ``"cholesky"`` (default: an exact inverse, thesis A16), ``"eigh"``, or
  ``"coupled_newton"`` with p = 1 (the authors' code option).
* ``inverse_warmup`` and the statistics of the first mini-batch without `warm_start`: see
  `curvlab.optim.tensorwise` (deviation A9).
* Deviation (losses that are not batch means): Ḡ is the sampled gradient of the batch loss
  L = c·Σ_n l_n (`curvlab.Objective.loss_scale`) divided by √(c·m), so that its covariance is
  F(L)/m whatever the reduction; for a batch-mean loss (c = 1/m, every thesis experiment) the
  factor is 1 and Ḡ is exactly line 7's average of the per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor, nn

from curvlab.objective import Objective
from curvlab.optim.tensorwise import TensorwiseOptimizer
from curvlab.optim.validation import check_choice

__all__ = ["TNT"]

Fisher = Literal["true", "empirical"]
InverseMethod = Literal["cholesky", "eigh", "coupled_newton"]


class TNT(TensorwiseOptimizer):
    """Tensor Normal Training (thesis Alg 15).

    Args:
        model: the network; every trainable parameter tensor is a block.
        lr: α (thesis autoencoders 1e-6 … 1e-4, CNNs 1e-4; Tables 4.3, 4.4).
        damping: ε > 0, added to every trace-normalised factor.
        momentum: μ, heavy ball on the raw gradient (0.9).
        weight_decay: γ, decoupled, added after preconditioning.
        ema_decay: β of the statistics EMA (0.9).
        curvature_every: T1, statistics every T1 steps (autoencoders 1, CNNs 10).
        inverse_every: T2, inverses every T2 steps (autoencoders 20, CNNs 100).
        fisher: ``"true"`` (sampled labels, Alg 15) or ``"empirical"`` (TNT-EF).
        inverse_method: ``"cholesky"``, ``"eigh"`` or ``"coupled_newton"``.
        inverse_warmup: also refresh the inverses at every statistics update while t < T2.
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` reports the loss, whether the
    statistics and inverses were updated, and skipped steps / failed refreshes.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        damping: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9,
        curvature_every: int = 1,
        inverse_every: int = 20,
        fisher: Fisher = "true",
        inverse_method: InverseMethod = "cholesky",
        inverse_warmup: bool = True,
        params: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        defaults = self.checked(locals())
        self.fisher = check_choice("fisher", fisher, ("true", "empirical"))
        method = check_choice(
            "inverse_method", inverse_method, ("cholesky", "eigh", "coupled_newton")
        )
        self.extra_backward = self.fisher == "true"
        super().__init__(
            model,
            defaults,
            params=params,
            normalise=True,  # Alg 15 line 15: eq. (4.10)
            root_of_order=_inverse,  # Alg 15 line 16: inverses
            method=method,  # type: ignore[arg-type]
            inverse_warmup=inverse_warmup,
            loss_fn=loss_fn,
        )

    def statistics_loss(self, objective: Objective, outputs: Tensor, loss: Tensor) -> Tensor:
        """Alg 15 line 7: the loss at labels sampled from the model (TNT-EF: the true loss)."""
        if self.fisher == "true":
            return objective.sampled_loss(outputs, self._generator)
        return loss

    def statistics_scale(self, closure: Any, outputs: Tensor | None) -> float:
        """1/(c·m) on the contractions, i.e. Ḡ = ∇L/√(c·m) (module docstring); 1 for a mean."""
        if outputs is None:
            return 1.0
        if self.fisher == "empirical" and closure.likelihood is None:
            return 1.0  # TNT-EF with a loss of unknown reduction: use its gradient as it is
        return 1.0 / (closure.loss_scale(outputs) * closure.batch_size)


def _inverse(order: int) -> int:
    """TNT's r in (Ũ_i + εI)^{-1/r}: inverses whatever the tensor's order (Alg 15 line 16)."""
    return 1
