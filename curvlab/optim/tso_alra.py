r"""TSO-ALRA (Ida & Fujiwara, [P1]): block-diagonal Kronecker-factored F^{-1/2}, then SGD.

[P1] Algorithm 1, with η = ``lr``, γ = 1 − ``ema_decay``, T_int = ``inverse_every``,
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

`TSOALRAFirstStage` is lines 1–8 (usable alone); `TSOALRA` is the whole algorithm: the first
stage inside a `curvlab.optim.switching.TwoStage` whose second stage is plain SGD with the
same η (eq. 1). The switch ("stopping criterion ... defined by the user", §III-C) is a tuned
epoch in the paper's experiments (``switch_at_epoch``, §V-A) or the real-time rule of §III-B
(``patience``: the minimum validation loss has not improved for that many evaluations).

Conventions and choices where [P1] is silent (spec §3.1, §3.5):

* PyTorch layout: ``weight`` is (d_out, d_in), so eq. 15's vec((B)^{-1/2} g (A)^{-1/2}) is
  ``B^{-1/2} @ [∇W, ∇b] @ A^{-1/2}``, i.e. (B ⊗ A)^{-1/2} on the row-major vec (B acts on the
  output side, A on the input side with the homogeneous bias coordinate of K-FAC).
* Eq. 14 estimates the Fisher from ∇L(z_t) of the *data* labels: the empirical Fisher
  (``fisher="empirical"``, default). ``fisher="true"`` samples labels from the model
  (Definition 2's expectation over p_θ) on the same forward pass; an option, not [P1].
* Scale: A = E_n[ā āᵀ], B = E_n[β βᵀ] with β the per-example gradient ∂l_n/∂s of the
  per-example loss (what eqs. 14, 17 write), recovered from the batch loss as in
  `curvlab.curvature.factors`; for a sum-reduced loss the factors describe the loss as reduced
  (B is m times larger). F^{-1/2} is not scale-free, so η = 1e-2 of §V-A belongs to this
  convention (the authors' is unknown).
* Conv layers ([P1] derives only FC layers but trains AlexNet/VGG): the KFC factors of
  `curvlab.curvature.factors` (A sums patch outer products over locations, B averages).
* ε is added to the eigenvalues of each factor (Λ + εI, §III-A), i.e. the preconditioner is
  ((B + εI) ⊗ (A + εI))^{-1/2}; no π split.
* Deviation (spec [R]): [P1] does not say how A, B are initialised. ``init="identity"``
  (default) starts from A = I, B = I, so until t = T_int line 8 uses (1+ε)^{-1} g, an SGD step;
  ``init="first_batch"`` starts from the first mini-batch's statistics and computes their roots
  at once (as K-FAC's A8 bootstrap), so the preconditioner acts from the first step.
* Data-parallel (``opt.distribute(...)``): as K-FAC (per-rank EMAs of A, B averaged before
  each root refresh, each block's roots on one owner rank); the SGD stage averages gradients.
* [P1] has no momentum and no weight decay; ``momentum`` (heavy ball on the raw gradient) and
  ``weight_decay`` (decoupled, after preconditioning) are extensions, 0 by default. Parameters
  outside Linear/Conv2d layers get the base's fallback update (plain gradient, same lr).

Paper settings ([P1] §V-A; γ and T_int are not reported, 0.95 / 20 are K-FAC-style
placeholders, spec §3.2): η grid {1e-1, 1e-2, 1e-3}, chosen 1e-2 everywhere; switch-epoch
grid {5, 10, …, 75}, chosen 70 (Fashion-MNIST/AlexNet), 25 (Fashion-MNIST/VGG), 20 (SVHN),
15 (CIFAR-10/AlexNet), 10 (CIFAR-10/VGG, CIFAR-100/VGG), 5 (CIFAR-100/AlexNet); batch 128,
164 epochs, lr ÷ 10 at epochs 81 and 122 for both stages; ε = 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks import KroneckerBlock
from curvlab.curvature.factors import FactorBuffers, layer_factors
from curvlab.curvature.hooks import Capture, captured_gradient_pass
from curvlab.distributed import Communicator, Mode
from curvlab.objective import Objective
from curvlab.optim.base import LayerwiseOptimizer, require_objective
from curvlab.optim.switching import DataParallelSGD, TwoStage
from curvlab.optim.validation import (
    LAYERWISE_RULES,
    check_choice,
    check_hyperparameters,
    check_range,
)

__all__ = ["TSOALRA", "TSOALRAFirstStage"]

Fisher = Literal["empirical", "true"]
Init = Literal["identity", "first_batch"]
Factors = dict[str, tuple[Tensor, Tensor]]


class _EpsDampedBlock(KroneckerBlock):
    """Kronecker block with ε on each factor's eigenvalues: (G + εI)^{-1/2} V (A + εI)^{-1/2}."""

    def dampings(self, state: dict[str, Any], damping: float, pi: bool) -> tuple[float, float]:
        # [P1] §III-A: U (Λ + εI)^{-1/2} Uᵀ for B and for A alike (no π split).
        return damping, damping


class TSOALRAFirstStage(LayerwiseOptimizer):
    """The first stage of TSO-ALRA ([P1] Alg 1, lines 1–8): Kronecker-factored F^{-1/2}.

    Args:
        model: the network (Linear and Conv2d layers get Kronecker blocks).
        lr: η ([P1] §V-A: 1e-2).
        ema_decay: 1 − γ of eqs. 17–18 (γ ∈ [0, 1) is the weight of the new statistics;
            not reported in [P1], 0.95 is a placeholder).
        inverse_every: T_int, the eigendecompositions every T_int steps (not reported; 20).
        eps: ε added to the factors' eigenvalues (§III-A: 1e-6).
        fisher: ``"empirical"`` (eq. 14, data labels) or ``"true"`` (sampled labels).
        init: ``"identity"`` or ``"first_batch"`` initial factors (see the module docstring).
        momentum: heavy-ball momentum on the raw gradient (not in [P1]; 0).
        weight_decay: decoupled weight decay (not in [P1]; 0).
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` reports the loss, whether the
    roots were refreshed, s (``root_refreshes``) and skipped steps.
    """

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
    ) -> None:
        defaults = _validated(
            lr=lr,
            ema_decay=ema_decay,
            inverse_every=inverse_every,
            eps=eps,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self.fisher = check_choice("fisher", fisher, ("empirical", "true"))
        self.init = check_choice("init", init, ("identity", "first_batch"))
        super().__init__(model, defaults, params=params, momentum_style="heavy_ball")
        self.blocks = {name: _EpsDampedBlock(layer, root=2) for name, layer in self.layers.items()}
        self._factor_buffers = FactorBuffers(self.layers)  # a cache, not state (as K-FAC's)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One first-stage iteration ([P1] Alg 1, lines 2–8) on the closure's mini-batch."""
        objective = require_objective(closure, "TSOALRAFirstStage")
        for group in self.param_groups:
            _validated(**{k: group[k] for k in _HYPERPARAMETERS})
        t = self.global_state["global_step"] + 1  # line 2
        loss, factors = self._gradient_pass(objective)
        if not torch.isfinite(loss):
            self.skip_step(loss, "non-finite loss")
            return loss
        if not self.grads_finite():
            self.skip_step(loss, "non-finite gradient")
            return loss
        if not self.finite_everywhere([f for pair in factors.values() for f in pair]):
            self.skip_step(loss, "non-finite curvature statistics")
            return loss
        bootstrap = False
        fresh = [n for n in factors if not KroneckerBlock.has_statistics(self.layer_state(n))]
        if fresh and self.init == "identity":
            # Deviation (spec [R]): A⁰ = I, B⁰ = I and their roots are line 8's s = 0.
            for name in fresh:
                state, (A, B) = self.layer_state(name), factors[name]
                state["A"] = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                state["G"] = torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
            self._refresh(fresh, count=False)
        elif fresh:  # Deviation (option, K-FAC's A8): the first batch's factors, roots now
            bootstrap = True
        for name, (A, B) in factors.items():  # line 3: eqs. 17–18 (B is the block's "G")
            self.blocks[name].update(self.layer_state(name), A, B, self.group(name)["ema_decay"])
        refreshed = False
        if t % self.param_groups[0]["inverse_every"] == 0 or bootstrap:  # lines 4–7
            refreshed = self._refresh()
        applied = self.precondition_and_apply(self._precondition)  # line 8: eq. 16
        if not applied:  # a non-finite direction: the parameters keep their values
            self.withhold_update()
        self.global_state["global_step"] = t
        self.last_step_info = {
            "skipped": False,
            "loss": float(loss),
            "roots_refreshed": refreshed,
            "update_applied": applied,
            "root_refreshes": self.global_state.get("root_refreshes", 0),
            "skipped_steps": self.global_state["skipped_steps"],
            "failed_refreshes": sum(
                self.layer_state(n).get("failed_refreshes", 0) for n in self.layers
            ),
            "retried_decompositions": sum(
                self.layer_state(n).get("retried_decompositions", 0) for n in self.layers
            ),
        }
        return loss

    def _refresh(self, names: Iterable[str] | None = None, count: bool = True) -> bool:
        """Lines 5–6: eigendecompositions of every factor; s ← s + 1. A failed decomposition
        keeps the layer's previous roots (`KroneckerBlock.refresh`). Data-parallel: each
        block on its owner rank, then shared (`refresh_blocks`)."""
        names = self.blocks if names is None else names
        self.refresh_blocks(
            [
                (n, self.blocks[n], self.layer_state(n))
                for n in names
                if KroneckerBlock.has_statistics(self.layer_state(n))
            ],
            lambda n: self.blocks[n].refresh(self.layer_state(n), self.group(n)["eps"], False),
        )
        if count:
            self.global_state["root_refreshes"] = self.global_state.get("root_refreshes", 0) + 1
        return True

    def _precondition(self, name: str, V: Tensor) -> Tensor:
        """(B + εI)^{-1/2} V (A + εI)^{-1/2}; a layer without roots yet keeps its gradient."""
        state = self.layer_state(name)
        if not KroneckerBlock.has_inverses(state):
            return V
        return self.blocks[name].precondition(state, V)

    # ------------------------------------------------------------ statistics
    def _gradient_pass(self, objective: Objective) -> tuple[Tensor, Factors]:
        """The closure, recording α (forward) and β (backward) of every layer (§III-C)."""
        # The same capture as K-FAC's "before_step" gradient pass (`captured_gradient_pass`).
        sampler = self._generator if self.fisher == "true" else None
        loss, cap = captured_gradient_pass(self.layers, objective, sampler)
        loss = self.synchronize_gradients(loss)  # data-parallel: mean over ranks
        if not torch.isfinite(loss):
            return loss, {}
        assert objective.outputs is not None
        return loss, self._factors(cap, objective, objective.outputs)

    def _factors(self, cap: Capture, objective: Objective, outputs: Tensor) -> Factors:
        """E_n[ā āᵀ] and E_n[β βᵀ] of this batch per layer (the bracketed terms of eq. 14)."""
        phase = "sampled" if self.fisher == "true" else "loss"
        m, scale = objective.batch_size, objective.loss_scale(outputs)
        return layer_factors(self.layers, cap, phase, m, scale, self._factor_buffers)


def _plain_sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """[P1] eq. 1, θ ← θ − η ∇L(θ), over the first stage's groups (η and decay carried)."""
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)


class TSOALRA(TwoStage):
    """TSO-ALRA ([P1] Alg 1): `TSOALRAFirstStage` until the switch, then plain SGD (eq. 1).

    Args:
        model, lr, ema_decay, inverse_every, eps, fisher, init, momentum, weight_decay,
            params: the first stage's, see `TSOALRAFirstStage`.
        switch_at_epoch: switch at this call of ``end_epoch()`` (the paper's tuned epoch).
        switch_at_step: switch after this many steps.
        patience: switch after this many ``report_validation(loss)`` calls without a new
            minimum (§III-B's real-time rule).
        min_delta: a new minimum must be lower by more than this.

    At least one criterion is required. The SGD stage is built at the switch over the same
    parameter groups with their current ``lr`` (one η for both stages, Alg 1; a scheduler's
    ``initial_lr`` too) and ``weight_decay`` (0 in [P1]; for momentum-free SGD torch's
    coupled decay is the first stage's decoupled one); it has no momentum (eq. 1).
    ``first`` is the first-stage optimizer, ``second`` the SGD once switched.
    """

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
    ) -> None:
        if switch_at_epoch is None and switch_at_step is None and patience is None:
            raise ValueError(
                "switch_at_epoch: TSO-ALRA needs a switch criterion (switch_at_epoch, "
                "switch_at_step or patience); use TSOALRAFirstStage for the first stage alone"
            )
        first = TSOALRAFirstStage(
            model,
            lr=lr,
            ema_decay=ema_decay,
            inverse_every=inverse_every,
            eps=eps,
            fisher=fisher,
            init=init,
            momentum=momentum,
            weight_decay=weight_decay,
            params=params,
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

    #: `curvlab bench --nproc`: as the layer-wise methods (its first stage is one).
    data_parallel = "layer-wise"

    def distribute(
        self,
        communicator: Communicator | None = None,
        *,
        mode: Mode = "inverses",
        average_gradients: bool | None = None,
    ) -> TSOALRA:
        """Data-parallel training (`curvlab.optim.base.DataParallelMixin.distribute`): the
        first stage as every layer-wise method; the SGD stage averages the gradients over
        ranks as the first stage does (nothing to do with a DDP model). Call it before the
        switch."""
        if self.second is not None:
            raise ValueError("distribute: call it before the switch to the SGD stage")
        self.first.distribute(communicator, mode=mode, average_gradients=average_gradients)
        self._factory = partial(DataParallelSGD, synchronize=self.first.synchronize_gradients)
        return self


_HYPERPARAMETERS = ("lr", "ema_decay", "inverse_every", "eps", "momentum", "weight_decay")


#: The shared layer-wise rules, with [P1]'s ranges for γ = 1 − ema_decay ∈ [0, 1) (eqs.
#: 17–18: ema_decay ∈ (0, 1]) and ε > 0.
_RULES = {
    **LAYERWISE_RULES,
    "ema_decay": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True),
    "eps": lambda n, v: check_range(n, v, 0.0, low_open=True),
}


def _validated(**values: Any) -> dict[str, Any]:
    return check_hyperparameters(values, _RULES)
