r"""K-FAC as the thesis implements it: Alg 7 (MLP, ch.2) and Alg 12 (conv + FC, ch.3/ch.4).

Thesis Alg 12, with T1 = ``curvature_every``, T2 = ``inverse_every``, β = ``ema_decay``,
μ = ``momentum``, γ = ``weight_decay``, λ = ``damping``::

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
(``inverse_warmup=T``). The step is `curvlab.optim.base.BlockOptimizer.step`; this file gives
its gradient pass (line 5), statistics (lines 12–14), refresh schedule (lines 17–19) and the
after-step pass (lines 11–19 at the new parameters). Blocks: `KroneckerBlock` per layer.

Options where the thesis, its code and practice differ (docs/deviations.md):

* ``statistics="after_step"`` (default, the printed Alg 7/12 order) runs the sampled-label
  pass at the updated parameters on the same mini-batch: one extra forward pass and one
  backward pass that computes layer-output gradients only. ``"before_step"`` is what the
  authors' ch.2 code does (deviation A7): the statistics come from the current mini-batch
  before the step, sharing the gradient pass's forward pass (no extra forward).
* ``fisher="empirical"``: Γ from the true-label gradients (thesis "KFAC-EF"); no sampling.
* Deviation A8: without `warm_start`, the factors are initialised from the first mini-batch
  before the first step and the inverses computed at once, because Alg 12 needs inverses at
  k = 1 and only defines them through the warm start.
* Deviation A1: Dh are per-example gradients of the per-example loss, scaled so that the
  factors describe the curvature of the loss as reduced (`curvlab.curvature.factors`); for a
  batch-mean loss this is exactly the thesis's convention.
* Data-parallel: Ω, Γ are EMAs of per-rank means, averaged over ranks before each line-17
  refresh; each layer's inverses are computed on one owner rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks import DampingSplit, KroneckerBlock
from curvlab.curvature.cost import (
    CostItem,
    LayerShape,
    cost_items,
    forward_product,
    output_gradient_product,
)
from curvlab.curvature.factors import FactorBuffers, batch_factors, statistics_pass
from curvlab.curvature.hooks import Capture, captured_gradient_pass
from curvlab.curvature.layers import find_layers
from curvlab.linalg import all_finite
from curvlab.objective import Objective
from curvlab.optim.base import BlockOptimizer, MomentumStyle, Refreshed
from curvlab.optim.validation import check_choice

__all__ = ["KFAC"]

Fisher = Literal["true", "empirical"]
StatisticsPoint = Literal["after_step", "before_step"]
Factors = dict[str, tuple[Tensor, Tensor]]


class KFAC(BlockOptimizer):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for conv layers,
    Grosse & Martens 2016) as in thesis Alg 12 (§3.7.2, reused in §4.7.2; Alg 7 with the options
    noted there).

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
        momentum_style: ``"heavy_ball"`` (Alg 12) or ``"ema"`` (ch.2 code, deviation A13).
        params: optional parameter groups.
        loss_fn: the loss of a training loop that steps without an `Objective` (``opt.step()``
            after ``loss.backward()``, or a plain closure): its reduction scales the factors,
            its likelihood gives the sampled labels.

    ``step`` takes a `curvlab.Objective`; or, with ``loss_fn``, a plain closure or nothing
    after the user's own ``loss.backward()``: the true Fisher's sampled-label pass then runs
    over the recorded batch (``"after_step"``: the same extra pass as with an `Objective`;
    ``"before_step"``: one extra forward pass), the empirical ``"before_step"`` statistics come
    from the user's backward pass, and the empirical ``"after_step"`` pass needs the targets
    (a closure, run again). ``last_step_info`` reports the loss, whether the
    statistics and inverses were updated, and skipped steps.
    """

    hyperparameters = ("lr", "damping", "momentum", "weight_decay", "ema_decay",
                       "curvature_every", "inverse_every", "inverse_warmup")  # fmt: skip

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
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        defaults = self.checked(locals())
        self.fisher = check_choice("fisher", fisher, ("true", "empirical"))
        self.statistics_point = check_choice(
            "statistics", statistics, ("after_step", "before_step")
        )
        self.pi_damping = bool(pi_damping)
        check_choice("momentum_style", momentum_style, ("heavy_ball", "ema"))
        super().__init__(
            model, defaults, params=params, momentum_style=momentum_style, loss_fn=loss_fn
        )
        # Reused outputs of the factor products (a cache, not state: every use overwrites
        # them before they are read; see curvlab.curvature.factors).
        self._factor_buffers = FactorBuffers(self.layers)

    def blocks_changed(self) -> None:
        self._factor_buffers = FactorBuffers(self.layers)

    def make_blocks(self, model: nn.Module) -> list[KroneckerBlock]:
        """A `KroneckerBlock` per layer, damping split by π (Alg 12) or √λ each (Alg 7)."""
        split: DampingSplit = "pi" if self.pi_damping else "sqrt"
        return [KroneckerBlock(layer, split=split) for layer in find_layers(model).values()]

    @property
    def before(self) -> bool:
        return self.statistics_point == "before_step"

    def _due(self, k: int, key: str) -> bool:
        return k % self.param_groups[0][key] == 0

    def _refresh_due(self, k: int) -> bool:
        """Alg 12 line 17 (k ≡ 0 mod T2), or Alg 7's k ≤ T."""
        return self._due(k, "inverse_every") or k <= self.param_groups[0]["inverse_warmup"]

    def entry_points(self) -> frozenset[str]:
        """The empirical ``"after_step"`` pass needs the targets: an `Objective` or a closure."""
        if self.fisher == "empirical" and not self.before:
            return frozenset({"objective", "closure"})
        return super().entry_points()

    @property
    def records_layer_passes(self) -> bool:  # type: ignore[override]
        """``"before_step"`` empirical statistics come from the user's own backward pass."""
        return self.before and self.fisher == "empirical"

    # ------------------------------------------------------------ the hooks
    def gradient_pass(self, batch: Any, k: int) -> tuple[Tensor | None, Capture | None]:
        """Line 5; ``"before_step"``: the statistics' pass on the same forward graph (an
        `Objective`), or the records of the user's own backward pass (empirical Fisher)."""
        due = self.before and self._due(k, "curvature_every")
        if not isinstance(batch, Objective):
            return batch.loss, batch.capture if due and self.fisher == "empirical" else None
        if not due:
            with torch.enable_grad():
                return batch(), None
        return captured_gradient_pass(self.layers, batch, self._sampler())

    def statistics(self, batch: Any, record: Capture | None, k: int) -> Factors | None:
        """Lines 12–14's factors of this batch (``"before_step"``), or of the first mini-batch
        when there are none yet (deviation A8). Without an `Objective`, the true Fisher's
        sampled-label pass is one more pass over the recorded batch."""
        if record is not None:
            assert batch.outputs is not None
            return batch_factors(
                self.layers, record, batch, batch.outputs, self._sampled(), self._factor_buffers
            )
        due = self.before and self._due(k, "curvature_every")
        if due or not any(b.has_statistics(self.block_state(n)) for n, b in self.blocks.items()):
            return self._statistics_pass(batch)
        return None

    def due_before_update(self, k: int, statistics: Any) -> list[str]:
        """``"before_step"``: line 17's schedule; either way the first inverses (A8)."""
        if not self.has_inverses() or (self.before and self._refresh_due(k)):
            return list(self.blocks)
        return []

    def after_step(self, batch: Any, k: int, statistics: Any) -> dict[str, Any]:
        """Lines 11–19 at the new parameters (``"after_step"``, the printed order)."""
        if self.before:
            return {}
        updated = False
        if self._due(k, "curvature_every"):
            after = self._statistics_pass(batch)
            if all_finite([t for pair in after.values() for t in pair]):
                self.update_statistics(after, k)
                updated = True
            else:
                glob = self.global_state
                glob["skipped_statistics"] = glob.get("skipped_statistics", 0) + 1
        refreshed = self.refresh(list(self.blocks) if self._refresh_due(k) else [])
        return {"statistics_after": updated, "refreshed_after": refreshed.due}

    def step_information(
        self, statistics: Any, refreshed: Refreshed, info: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "statistics_updated": statistics is not None or info.get("statistics_after", False),
            "inverses_refreshed": refreshed.due or info.get("refreshed_after", False),
            "failed_refreshes": self.count("failed_refreshes"),
            "retried_decompositions": self.count("retried_decompositions"),
        }

    # ------------------------------------------------------------ statistics
    def _sampled(self) -> bool:
        return self.fisher == "true"

    def _sampler(self) -> torch.Generator | None:
        return self._generator if self._sampled() else None

    def _statistics_pass(self, batch: Any) -> Factors:
        """Line 12: another pass over the mini-batch (labels sampled for the true Fisher)."""
        return statistics_pass(
            self.model, self.layers, batch, self._sampler(), self._factor_buffers
        )

    def warm_start_statistics(self, objective: Objective) -> tuple[Factors, float]:
        """Line 2: one batch's Ω, Γ for `warm_start` (the statistics pass of line 12)."""
        return self._statistics_pass(objective), 1.0

    # -------------------------------------------------------------- cost model
    def pass_cost(self, shape: LayerShape) -> list[CostItem]:
        """Alg 12 line 12's pass, per layer, once per T1 steps: ``"after_step"`` runs it as an extra
        forward pass, ``x Wᵀ`` (r×n)(n×d_out), and a backward pass to the layer outputs,
        ``g W`` (r×d_out)(d_out×n) for the layers whose input needs a gradient (no weight
        gradients); ``"before_step"`` with sampled labels only that backward pass, through the
        gradient pass's forward graph; K-FAC-EF before the step none. The block's statistics,
        preconditioning and inverses: `KroneckerBlock.cost`."""
        if shape.name not in self.layers:
            return []
        stats = self.cost_schedule()[0]
        out = []
        if not self.before:
            out += cost_items("extra_forward", [forward_product(shape)], stats, shape.name, "x Wᵀ")
        if (not self.before or self.fisher == "true") and shape.input_grad:
            backward = [output_gradient_product(shape)]
            out += cost_items(
                "statistics_backward", backward, stats, shape.name, "g W (output gradients only)"
            )
        return out

    def cost_warmup_steps(self) -> int:
        """Alg 7's refreshes at every k ≤ ``inverse_warmup`` (Alg 12 refreshes every T2 steps
        from the start: 0)."""
        return int(self.param_groups[0]["inverse_warmup"])
