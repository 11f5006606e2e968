r"""TSO-ALRA (Ida & Fujiwara, seed 001): block-diagonal Kronecker-factored F^{-1/2}, then SGD.

Seed 001, Algorithm 1, with η = ``lr``, γ = 1 − ``ema_decay``, T_int = ``inverse_every``,
ε = ``eps``::

    Require: T_int, γ ∈ [0, 1), η;  t ← 0, s ← 0, initialise {B^l}, {A^l}
    1   while stopping criterion not met do                       (first stage)
    2       t ← t + 1
    3       B^l ← (1−γ) B^l + γ β βᵀ ;  A^l ← (1−γ) A^l + γ α αᵀ     (eqs. 17, 18)
    4       if t ≡ 0 (mod T_int) then
    5           (B^l)^{-1/2} = U (Λ + εI)^{-1/2} Uᵀ, likewise (A^l)^{-1/2}   (§III-A)
    6           s ← s + 1
    8       θ ← θ − η vec((B^l_{s·T_int})^{-1/2} ∇W_l (A^l_{s·T_int})^{-1/2})  (eqs. 15, 16)
    10  while stopping criterion not met do                       (second stage)
    11      t ← t + 1
    12      θ ← θ − η ∇L(θ)                                        (eq. 1)

`TSOALRAFirstStage` is lines 1–8 on `curvlab.optim.base.BlockOptimizer` (a `KroneckerBlock`
per layer, r = 2, ε added to each factor's eigenvalues, no π split); `TSOALRA` is the whole
algorithm: the first stage inside a `curvlab.optim.switching.TwoStage` whose second stage is
plain SGD with the same η. The switch ("defined by the user", §III-C) is a tuned epoch
(``switch_at_epoch``, §V-A) or §III-B's real-time rule (``patience``).

Choices where the paper is silent (docs/deviations.md, [P1] and [R]):

* B acts on the output side, A on the input side with K-FAC's homogeneous bias coordinate;
  conv layers (the paper derives FC layers only but trains AlexNet/VGG) use the KFC factors.
* Eq. 14 uses the data labels: the empirical Fisher (``fisher="empirical"``, default);
  ``fisher="true"`` samples labels from the model on the same forward pass (an option).
* Scale: A = E_n[ā āᵀ], B = E_n[β βᵀ] with β the per-example gradient of the per-example
  loss (`curvlab.curvature.factors`); F^{-1/2} is not scale-free, so §V-A's η = 1e-2 belongs
  to this convention.
* Deviation [R]: the initial A, B are not given. ``init="identity"`` (default) starts from
  A = B = I, so until t = T_int line 8 is an SGD step with (1+ε)^{-1} g; ``init=
  "first_batch"`` starts from the first mini-batch and computes its roots at once (as
  K-FAC's deviation A8).
* ``momentum`` and ``weight_decay`` are extensions (0 by default); parameters outside
  Linear/Conv2d layers get the base's fallback update.
* Paper settings (§V-A): η = 1e-2, ε = 1e-6, batch 128; γ and T_int are not reported
  (0.95 and 20 are K-FAC-style placeholders).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks import KroneckerBlock
from curvlab.curvature.cost import CostItem, LayerShape, cost_items, output_gradient_product
from curvlab.curvature.factors import FactorBuffers, batch_factors, statistics_pass
from curvlab.curvature.hooks import Capture, captured_gradient_pass
from curvlab.curvature.layers import find_layers
from curvlab.distributed import Communicator, Mode
from curvlab.objective import Objective
from curvlab.optim.base import BlockOptimizer, Refreshed
from curvlab.optim.switching import DataParallelSGD, TwoStage
from curvlab.optim.validation import (
    LAYERWISE_RULES,
    Rule,
    check_choice,
    check_range,
)

__all__ = ["TSOALRA", "TSOALRAFirstStage"]

Fisher = Literal["empirical", "true"]
Init = Literal["identity", "first_batch"]


class TSOALRAFirstStage(BlockOptimizer):
    """The first stage of TSO-ALRA (Alg 1, lines 1–8): Kronecker-factored F^{-1/2}.

    Args:
        model: the network (Linear and Conv2d layers get Kronecker blocks).
        lr: η (§V-A: 1e-2).
        ema_decay: 1 − γ of eqs. 17–18 (not reported; 0.95 is a placeholder).
        inverse_every: T_int, the eigendecompositions every T_int steps (not reported; 20).
        eps: ε added to the factors' eigenvalues (§III-A: 1e-6).
        fisher: ``"empirical"`` (eq. 14, data labels) or ``"true"`` (sampled labels).
        init: ``"identity"`` or ``"first_batch"`` initial factors (module docstring).
        momentum: heavy-ball momentum on the raw gradient (not in the paper; 0).
        weight_decay: decoupled weight decay (not in the paper; 0).
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` reports the loss, whether the
    roots were refreshed, s (``root_refreshes``) and skipped steps.
    """

    hyperparameters = ("lr", "ema_decay", "inverse_every", "eps", "momentum", "weight_decay")
    #: γ = 1 − ema_decay ∈ [0, 1) (eqs. 17–18: ema_decay ∈ (0, 1]) and ε > 0.
    rules: ClassVar[Mapping[str, Rule]] = {
        **LAYERWISE_RULES,
        "ema_decay": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True),
        "eps": lambda n, v: check_range(n, v, 0.0, low_open=True),
    }

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        ema_decay: float = 0.95,
        inverse_every: int = 20,
        eps: float = 1e-6,
        fisher: Fisher = "empirical",
        init: Init = "identity",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        params: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        defaults = self.checked(locals())
        self.fisher = check_choice("fisher", fisher, ("empirical", "true"))
        self.init = check_choice("init", init, ("identity", "first_batch"))
        super().__init__(model, defaults, params=params, loss_fn=loss_fn)
        self._factor_buffers = FactorBuffers(self.layers)  # a cache, not state (as K-FAC's)

    def blocks_changed(self) -> None:
        self._factor_buffers = FactorBuffers(self.layers)

    def make_blocks(self, model: nn.Module) -> list[KroneckerBlock]:
        """A `KroneckerBlock` per layer: ``(B + εI)^{-1/2} V (A + εI)^{-1/2}`` (§III-A)."""
        return [KroneckerBlock(la, root=2, split="each") for la in find_layers(model).values()]

    def damping(self, name: str) -> float:
        return float(self.group(name)["eps"])

    @property
    def records_layer_passes(self) -> bool:  # type: ignore[override]
        """The empirical statistics of a step without an `Objective`: the user's own pass."""
        return self.fisher == "empirical"

    def gradient_pass(self, batch: Any, k: int) -> tuple[Tensor | None, Capture | None]:
        """The closure, recording α (forward) and β (backward) of every layer (§III-C); or
        the records of the user's own pass (the true Fisher: see `statistics`)."""
        sampler = self._generator if self.fisher == "true" else None
        if not isinstance(batch, Objective):
            return batch.loss, batch.capture if sampler is None else None
        return captured_gradient_pass(self.layers, batch, sampler)

    def statistics(self, batch: Any, record: Capture | None, k: int) -> dict[str, Any]:
        """E_n[ā āᵀ] and E_n[β βᵀ] of this batch per layer (the bracketed terms of eq. 14).
        The true Fisher without an `Objective`: one more pass over the recorded batch."""
        buffers = self._factor_buffers
        if record is None:
            return statistics_pass(self.model, self.layers, batch, self._generator, buffers)
        assert batch.outputs is not None
        sampled = self.fisher == "true"
        return batch_factors(self.layers, record, batch, batch.outputs, sampled, buffers)

    def update_statistics(self, statistics: dict[str, Any], k: int) -> None:
        """Line 3 (eqs. 17–18); with ``init="identity"`` a new block starts from A = B = I and
        their roots (line 8's s = 0)."""
        fresh = [n for n in statistics if not self.blocks[n].has_statistics(self.block_state(n))]
        if fresh and self.init == "identity":
            for name in fresh:
                state, (A, B) = self.block_state(name), statistics[name]
                state["A"] = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                state["G"] = torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
            super().refresh(fresh)
        super().update_statistics(statistics, k)

    def due_before_update(self, k: int, statistics: dict[str, Any]) -> list[str]:
        """Lines 4–7 every T_int steps; ``init="first_batch"``: at once for new blocks."""
        new = any(self.block_state(n)["statistics_updates"] == 1 for n in statistics)
        if k % self.param_groups[0]["inverse_every"] == 0 or (self.init == "first_batch" and new):
            return list(self.blocks)
        return []

    def refresh(self, names: list[str]) -> Refreshed:  # type: ignore[override]
        """Lines 5–6: the roots, then s ← s + 1."""
        refreshed = super().refresh(names)
        if refreshed.due:
            self.global_state["root_refreshes"] = self.global_state.get("root_refreshes", 0) + 1
        return refreshed

    def step_information(
        self, statistics: Any, refreshed: Refreshed, info: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "roots_refreshed": refreshed.due,
            "root_refreshes": self.global_state.get("root_refreshes", 0),
            "failed_refreshes": self.count("failed_refreshes"),
            "retried_decompositions": self.count("retried_decompositions"),
        }

    # -------------------------------------------------------------- cost model
    def pass_cost(self, shape: LayerShape) -> list[CostItem]:
        """``fisher="true"``: the sampled-label backward pass to the layer outputs through
        the gradient pass's forward graph, every step, ``g W`` (r×d_out)(d_out×n) where the
        input needs a gradient; the empirical Fisher's statistics come from the gradient pass
        itself. The statistics, roots and preconditioning: `KroneckerBlock.cost` (eqs.
        17–18, line 5, eqs. 15–16)."""
        if self.fisher != "true" or shape.name not in self.layers or not shape.input_grad:
            return []
        what = "g W (output gradients only)"
        return cost_items(
            "statistics_backward", [output_gradient_product(shape)], 1.0, shape.name, what
        )


def _plain_sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Eq. 1, θ ← θ − η ∇L(θ), over the first stage's groups (η and decay carried)."""
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)


class TSOALRA(TwoStage):
    """TSO-ALRA (Alg 1): `TSOALRAFirstStage` until the switch, then plain SGD (eq. 1).

    Args:
        model, lr, ema_decay, inverse_every, eps, fisher, init, momentum, weight_decay,
            params: the first stage's, see `TSOALRAFirstStage`.
        switch_at_epoch: switch at this call of ``end_epoch()`` (the paper's tuned epoch).
        switch_at_step: switch after this many steps.
        patience: switch after this many ``report_validation(loss)`` calls without a new
            minimum (§III-B's real-time rule).
        min_delta: a new minimum must be lower by more than this.

    At least one criterion is required. The SGD stage is built at the switch over the same
    parameter groups with their current ``lr`` (one η for both stages; a scheduler's
    ``initial_lr`` too) and ``weight_decay``; it has no momentum (eq. 1). ``first`` is the
    first-stage optimizer, ``second`` the SGD once switched.
    """

    #: `curvlab bench --nproc`: as the block methods (its first stage is one).
    data_parallel = "layer-wise"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        ema_decay: float = 0.95,
        inverse_every: int = 20,
        eps: float = 1e-6,
        fisher: Fisher = "empirical",
        init: Init = "identity",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        switch_at_epoch: int | None = None,
        switch_at_step: int | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        params: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if switch_at_epoch is None and switch_at_step is None and patience is None:
            raise ValueError(
                "switch_at_epoch: TSO-ALRA needs a switch criterion (switch_at_epoch, "
                "switch_at_step or patience); use TSOALRAFirstStage for the first stage alone"
            )
        first = TSOALRAFirstStage(
            model,
            lr,
            ema_decay,
            inverse_every,
            eps,
            fisher,
            init,
            momentum,
            weight_decay,
            params,
            loss_fn,
        )
        self.first: TSOALRAFirstStage
        super().__init__(
            first,
            _plain_sgd,
            switch_at_step=switch_at_step,
            switch_at_epoch=switch_at_epoch,
            patience=patience,
            min_delta=min_delta,
            mode="min",
            carry=("lr", "initial_lr", "weight_decay"),
        )
        self.model = model

    def distribute(
        self,
        communicator: Communicator | None = None,
        *,
        mode: Mode = "inverses",
        average_gradients: bool | None = None,
    ) -> TSOALRA:
        """Data-parallel training (`curvlab.optim.data_parallel.DataParallelBlocks`): the
        first stage as every block method; the SGD stage averages the gradients over ranks as
        the first stage does. Call it before the switch."""
        if self.second is not None:
            raise ValueError("distribute: call it before the switch to the SGD stage")
        self.first.distribute(communicator, mode=mode, average_gradients=average_gradients)
        self._factory = partial(DataParallelSGD, synchronize=self.first.synchronize_gradients)
        return self
