r"""K-FAC as the thesis implements it: Alg 7 (MLP, ch.2) and Alg 12 (conv + FC, ch.3/ch.4).

Thesis Alg 12 (spec §6.2), with T1 = ``curvature_every``, T2 = ``inverse_every``,
β = ``ema_decay``, μ = ``momentum``, γ = ``weight_decay``, λ = ``damping``::

    2   init (optional warm start over the data): Ω_l = E_n[Σ_t a_t a_tᵀ],
            Γ_l = E_n[(1/|T|) Σ_t Dh_t Dh_tᵀ] with y sampled;  D̂W_l = 0
    5   forward + backward → D̃W_l
    7   D̂W_l = μ D̂W_l + D̃W_l                                         (heavy ball)
    8   p_l = H_Γ D̂W_l H_Ω ;  W_l = W_l − α (p_l + γ W_l)
    11  if k ≡ 0 (mod T1):
    12      another pass over M_k with y sampled → a_t, Dh_t
    14      Ω_l = β Ω_l + (1−β) E_n Σ_t a_t a_tᵀ ;  Γ_l = β Γ_l + (1−β) E_n (1/|T|) Σ_t Dh_t Dh_tᵀ
    17  if k ≡ 0 (mod T2):
    19      π_l = sqrt((tr Ω_l / dim Ω_l) / (tr Γ_l / dim Γ_l))
            H_Ω = (Ω_l + π_l √λ I)^{-1} ;  H_Γ = (Γ_l + √λ / π_l I)^{-1}

Alg 7 (ch.2) is the same with π_l = 1 (``pi_damping=False``), the (1−β) gradient EMA
(``momentum_style="ema"``) and inverses refreshed at every k ≤ T as well
(``inverse_warmup=T``).

Options where the thesis, its code and practice differ (spec §10):

* ``statistics="after_step"`` (default, the printed Alg 7/12 order) runs the sampled-label
  pass at the updated parameters on the same mini-batch: one extra forward pass and one
  backward pass that computes layer-output gradients only. ``"before_step"`` is what the
  authors' ch.2 code does (A7): the statistics come from the current mini-batch before the
  step, sharing the gradient pass's forward pass (cheaper: no extra forward).
* ``fisher="empirical"``: Γ from the true-label gradients (thesis "KFAC-EF"); no sampling.
* Deviation (A8): without `warm_start`, the factors are initialised from the first
  mini-batch before the first step and the inverses computed at once, because Alg 12 needs
  inverses at k = 1 and only defines them through the warm start.
* Deviation: Dh are per-example gradients of the per-example loss; we scale them so that the
  factors describe the curvature of the loss as reduced (see `curvlab.curvature.factors`).
  For a batch-mean loss this is exactly the thesis's convention (A1).
* Data-parallel (``opt.distribute(...)``, `curvlab.optim.base.DataParallelMixin`): Ω, Γ are
  EMAs of per-rank means, averaged over ranks before each line-17 refresh; each layer's
  inverses are computed on one owner rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks import KroneckerBlock
from curvlab.curvature.factors import FactorBuffers, layer_factors
from curvlab.curvature.hooks import Capture, capture, captured_gradient_pass
from curvlab.linalg import all_finite
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import LayerwiseOptimizer, MomentumStyle, require_objective
from curvlab.optim.validation import check_choice, check_hyperparameters

__all__ = ["KFAC"]

Fisher = Literal["true", "empirical"]
StatisticsPoint = Literal["after_step", "before_step"]
Factors = dict[str, tuple[Tensor, Tensor]]


class KFAC(LayerwiseOptimizer):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for conv layers,
    Grosse & Martens 2016) as in thesis Alg 12 (and Alg 7 with the options noted there).

    Args:
        model: the network (Linear and Conv2d layers get Kronecker blocks).
        lr: α.
        damping: λ > 0, split between the factors by π (Alg 12 line 19).
        momentum: μ, heavy-ball on the raw gradient (thesis ch.3/ch.4: 0.9).
        weight_decay: γ, decoupled, added after preconditioning.
        ema_decay: β of the factor EMAs (0.9).
        curvature_every: T1, statistics every T1 steps (MLP 1; CNN 10).
        inverse_every: T2, inverses every T2 steps (MLP 20; CNN 100).
        inverse_warmup: also refresh the inverses at every step k ≤ this (Alg 7: T).
        fisher: ``"true"`` (labels sampled from the model) or ``"empirical"``.
        statistics: ``"after_step"`` (Alg 12 as printed) or ``"before_step"`` (authors' code).
        pi_damping: Alg 12's π split (True) or Alg 7's π = 1 (False).
        momentum_style: ``"heavy_ball"`` (Alg 12) or ``"ema"`` (ch.2 code, A13).
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` reports the loss, whether the
    statistics and inverses were updated, and skipped steps.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9,
        curvature_every: int = 1,
        inverse_every: int = 20,
        inverse_warmup: int = 0,
        fisher: Fisher = "true",
        statistics: StatisticsPoint = "after_step",
        pi_damping: bool = True,
        momentum_style: MomentumStyle = "heavy_ball",
        params: Iterable[Any] | None = None,
    ) -> None:
        defaults = _validated(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            curvature_every=curvature_every,
            inverse_every=inverse_every,
            inverse_warmup=inverse_warmup,
        )
        self.fisher = check_choice("fisher", fisher, ("true", "empirical"))
        self.statistics = check_choice("statistics", statistics, ("after_step", "before_step"))
        self.pi_damping = bool(pi_damping)
        check_choice("momentum_style", momentum_style, ("heavy_ball", "ema"))
        super().__init__(model, defaults, params=params, momentum_style=momentum_style)
        self.blocks = {name: KroneckerBlock(layer) for name, layer in self.layers.items()}
        # Reused output buffers of the factor products (a cache, not state: every use
        # overwrites them before they are read; see curvlab.curvature.factors).
        self._factor_buffers = FactorBuffers(self.layers)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One K-FAC iteration (thesis Alg 12) on the closure's mini-batch."""
        objective = require_objective(closure, "KFAC")
        for group in self.param_groups:
            _validated(**{k: group[k] for k in _HYPERPARAMETERS})
        k = self.global_state["global_step"] + 1
        stats_due = self._due(k, "curvature_every")
        before = self.statistics == "before_step"
        # Alg 12 line 5 (and, "before_step", the sampled pass on the same forward graph).
        loss, factors = self._gradient_pass(objective, with_statistics=before and stats_due)
        if not torch.isfinite(loss):
            self.skip_step(loss, "non-finite loss")
            return loss
        if not self.grads_finite():
            self.skip_step(loss, "non-finite gradient")
            return loss
        if factors is None and not self._initialised():
            factors = self._statistics_pass(objective)  # Deviation (A8): first mini-batch
        if factors is not None and not self.finite_everywhere(_flat(factors)):  # all ranks
            self.skip_step(loss, "non-finite curvature statistics")
            return loss
        refreshed = False
        if factors is not None:
            self._update_factors(factors)
        if before or not self._has_inverses():
            refreshed = self._refresh_if_due(k, force=not self._has_inverses())
        # Alg 12 lines 7–8: heavy-ball momentum on the raw gradient, then H_Γ D̂W H_Ω.
        applied = self.precondition_and_apply(self._precondition)
        if not applied:  # a non-finite direction: the parameters keep their values
            self.withhold_update()
        updated = factors is not None
        if not before:  # Alg 12 lines 11–19, at the new parameters.
            if stats_due:
                after = self._statistics_pass(objective)
                if _factors_finite(after):
                    self._update_factors(after)
                    updated = True
                else:
                    self.global_state["skipped_statistics"] = (
                        self.global_state.get("skipped_statistics", 0) + 1
                    )
            refreshed = self._refresh_if_due(k) or refreshed
        self.global_state["global_step"] = k
        self.last_step_info = {
            "skipped": False,
            "loss": float(loss),
            "statistics_updated": updated,
            "inverses_refreshed": refreshed,
            "update_applied": applied,
            "skipped_steps": self.global_state["skipped_steps"],
            "failed_refreshes": sum(
                self.layer_state(n).get("failed_refreshes", 0) for n in self.layers
            ),
            "retried_decompositions": sum(
                self.layer_state(n).get("retried_decompositions", 0) for n in self.layers
            ),
        }
        return loss

    # -------------------------------------------------------------- schedule
    def _due(self, k: int, key: str) -> bool:
        return k % self.param_groups[0][key] == 0

    def _initialised(self) -> bool:
        """Whether any statistics exist (layers never in a forward pass have none)."""
        return any(KroneckerBlock.has_statistics(self.layer_state(n)) for n in self.layers)

    def _has_inverses(self) -> bool:
        """Whether every layer that has statistics also has inverses."""
        return all(
            self.inverse_ready(n, KroneckerBlock.has_inverses(state))  # the same on all ranks
            for n, state in ((n, self.layer_state(n)) for n in self.layers)
            if KroneckerBlock.has_statistics(state)
        )

    def _precondition(self, name: str, V: Tensor) -> Tensor:
        """H_Γ V H_Ω; a layer that has never been in a forward pass yet keeps its gradient."""
        state = self.layer_state(name)
        if not KroneckerBlock.has_inverses(state):
            return V
        return self.blocks[name].precondition(state, V)

    def _refresh_if_due(self, k: int, force: bool = False) -> bool:
        """Alg 12 line 17 (k ≡ 0 mod T2), Alg 7's k ≤ T, or the first inverses."""
        group = self.param_groups[0]
        if not (force or self._due(k, "inverse_every") or k <= group["inverse_warmup"]):
            return False
        # Data-parallel: each block on its owner rank, then shared (`refresh_blocks`).
        states = {n: self.layer_state(n) for n in self.blocks}
        self.refresh_blocks(
            [(n, b, states[n]) for n, b in self.blocks.items() if b.has_statistics(states[n])],
            lambda n: self.blocks[n].refresh(states[n], self.group(n)["damping"], self.pi_damping),
        )
        return True

    # ------------------------------------------------------------ statistics
    def _gradient_pass(
        self, objective: Objective, with_statistics: bool
    ) -> tuple[Tensor, Factors | None]:
        """The closure; when asked, also the statistics from the same forward pass."""
        if not with_statistics:
            with torch.enable_grad():
                loss = objective()
            return self.synchronize_gradients(loss), None  # data-parallel: mean over ranks
        sampler = self._generator if self.fisher == "true" else None
        loss, cap = captured_gradient_pass(self.layers, objective, sampler)
        loss = self.synchronize_gradients(loss)  # data-parallel: mean over ranks
        if not torch.isfinite(loss):
            return loss, None
        assert objective.outputs is not None
        return loss, self._factors(cap, objective, objective.outputs)

    def _statistics_pass(self, objective: Objective) -> Factors:
        """Alg 12 line 12: another pass over the mini-batch (labels sampled for the true
        Fisher); only layer-output gradients are computed, BatchNorm buffers are restored."""
        with preserved_buffers(self.model), capture(self.layers) as cap:
            if self.fisher == "true":
                cap.phase = "sampled"
                outputs = objective.model_outputs()
                loss = objective.sampled_loss(outputs, self._generator)
            else:
                outputs, loss = objective.forward()
            cap.backward_to_outputs(loss, retain_graph=False)
        return self._factors(cap, objective, outputs.detach())

    def _factors(self, cap: Capture, objective: Objective, outputs: Tensor) -> Factors:
        phase = "sampled" if self.fisher == "true" else "loss"
        m, scale = objective.batch_size, objective.loss_scale(outputs)
        return layer_factors(self.layers, cap, phase, m, scale, self._factor_buffers)

    def _update_factors(self, factors: Factors) -> None:
        """Alg 12 line 14: Ω ← βΩ + (1−β)Ω_new, Γ ← βΓ + (1−β)Γ_new."""
        for name, (A, G) in factors.items():
            self.blocks[name].update(self.layer_state(name), A, G, self.group(name)["ema_decay"])

    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        batch_average: bool = False,
    ) -> int:
        """Alg 12 line 2: set Ω, Γ to their averages over ``batches`` (e.g. one epoch) at the
        current parameters, then compute the inverses. Returns the number of batches used."""
        sums: dict[str, list[Tensor]] = {}
        count = 0
        for inputs, targets in batches:
            objective = self.batch_objective(self.model, loss_fn, inputs, targets, batch_average)
            factors = self._statistics_pass(objective)
            if not _factors_finite(factors):
                continue
            count += 1
            for name, (A, G) in factors.items():
                if name in sums:
                    sums[name][0].add_(A)
                    sums[name][1].add_(G)
                else:
                    sums[name] = [A.clone(), G.clone()]
        if count == 0:
            raise ValueError("batches: no batch gave finite statistics for the warm start")
        for name, (A, G) in sums.items():
            state = self.layer_state(name)
            state.pop("A", None)
            state.pop("G", None)
            self.blocks[name].update(state, A / count, G / count, 0.0)
        self._refresh_if_due(0, force=True)
        return count


_HYPERPARAMETERS = (
    "lr",
    "damping",
    "momentum",
    "weight_decay",
    "ema_decay",
    "curvature_every",
    "inverse_every",
    "inverse_warmup",
)


def _validated(**values: Any) -> dict[str, Any]:
    return check_hyperparameters(values)


def _flat(factors: Factors) -> list[Tensor]:
    return [t for pair in factors.values() for t in pair]


def _factors_finite(factors: Factors) -> bool:
    return all_finite(_flat(factors))
