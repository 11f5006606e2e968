r"""K-BFGS / K-BFGS(L) (thesis ch.3, Alg 9; MLPs and CNNs) and their chapter-2 predecessors
K-BFGS-20 / K-BFGS(L)-20 (thesis ch.2, Alg 4; Goldfarb, Ren & Bahamou 2020; MLPs).

Each Linear/Conv2d layer's Hessian block is approximated by ``A ⊗ G`` (thesis eq. 2.3, 3.9:
A sums ā_t ā_tᵀ over locations and averages over examples; G averages ∂²f/∂h_t² over both) and
its inverse by ``H_A ⊗ H_G``, both kept by BFGS updates; the step is ``W ← W − α H_G D̂W H_A``
(eq. 2.4 / 3.10). The (L) variants keep H_G as p = ``memory`` L-BFGS pairs, applied in the
compact "non-loop" form. Thesis Alg 9 (``variant="ch3"``), with β = ``ema_decay`` =
``momentum``, μ1 = ``mu1``, T = ``curvature_every``::

    1  μ1 = 0.2, β = 0.9
    2  λ_A = sqrt(|T_l| λ),  λ_G = sqrt(λ / |T_l|)          (FC layers: |T| = 1, both √λ)
    3  D̂W = 0;  A = E_n Σ_t a_t a_tᵀ (warm start);  H_A = (A + λ_A I)^{-1};  H_G = λ_G^{-1} I;
       s_G = y_G = 0                                       (L-BFGS: no pairs, base λ_G^{-1} I)
    5  sample M_k;  6  forward + backward → D̃W
    8  D̂W = β D̂W + D̃W                                    (heavy ball on the raw gradient)
    9  p = H_G D̂W H_A;   10  W = W − α (p + γ W)
    12 if k ≡ 0 (mod T):
    13   another forward + backward on M_k at the new W → h̄⁺, D̄h⁺ (mean over n and t)
    16   s_A = H_A ā;  y_A = Ã s_A + λ_A s_A        (Ã of M_k only, matrix-free, eq. 3.15)
    17   BFGS update of H_A with (s_A, y_A)
    19   s_G = β s_G + (1−β)(h̄⁺ − h̄);  y_G = β y_G + (1−β)(D̄h⁺ − D̄h)
    20   (s̃, ỹ) = D_P D_LM(s_G, y_G; H = H_G, μ1, μ2 = λ_G)              (Alg 8)
    21   BFGS update of H_G with (s̃, ỹ)   |   (L): push (s̃, ỹ), drop the oldest beyond p

Thesis Alg 4 (``variant="ch2"``, K-BFGS-20) differs in: line 8 is the EMA
``∇̂f = β ∇̂f + (1−β) ∇̄f``; λ_A = λ_G = √λ; H_G = I (L-BFGS base I); the pair damping is DD
(Alg 3, μ2 = λ_G); H_A's pair uses an EMA ``A = β A + (1−β) mean_i ā āᵀ`` (line 20) and
``y_A = (A + λ_A I) s_A`` (lines 21–22); H_G is updated before H_A; T = 1.

Each difference is also an option (for the ablations of thesis Table 3.8, where "#1 off"
is ``pair_damping="dd"`` and "#2 off" is ``a_update="ema"``): ``pair_damping``, ``a_update``,
``damping_split``, ``g_init``, ``momentum_style``. Other options:

* ``curvature_every`` = T (thesis Table 3.3's K-BFGS† uses T = 20; CNNs use T = 20).
* ``a_init="identity"``: H_A starts at I (thesis §2.8.2's sentence) instead of the printed
  ``(A + λ_A I)^{-1}`` (Alg 4/9 line 3, spec A2).
* ``pair_damping="dpi_dlm"``: Alg 11 (H replaced by λ_G^{-1} I; the convergence-theory variant).
* ``fallback_lr``: parameters outside Linear/Conv2d (BatchNorm) take the momentum gradient with
  learning rate α/λ in ch.3 (thesis §3.4.3, "the effective learning rate of K-BFGS"), α in ch.2.
* `warm_start`: A over a pass of the data (thesis line 3), forward passes only.

Implementation notes:

* The first pass records the layer inputs and ∂L/∂h with `curvlab.curvature.hooks.capture`
  (only on curvature steps); the second pass is a forward pass plus a backward pass to the
  layer outputs only (`Capture.backward_to_outputs`: no weight gradients), with BatchNorm
  buffers restored (thesis A18).
* h̄ is not recorded: by linearity ``mean_{n,t} h_t = W · mean_{n,t} ā_t``, computed with the
  weights of that pass (one matrix–vector product); for conv layers the mean patch is the
  unfold of the batch-summed input.
* ``D̄h``: autograd gives ĝ = ∂L/∂h of the loss as reduced. We use ``(1/|T|) Σ_{n,t} ĝ_t(n)``
  (= m · mean ĝ), which for a batch-mean loss is the thesis's mean of per-example gradients
  (spec A1, "len(X_mb) * a_l.grad" in the authors' code); for other reductions it makes
  ``H_A ⊗ H_G`` approximate the inverse Hessian of the loss as reduced, the convention of
  `curvlab.curvature.factors` (A = (1/m) Σ ā āᵀ either way).
* Everything of line 16 (ch.2: lines 20–22) depends only on the first pass and on H_A before its
  update, so it is computed before the step and the first pass's tensors are freed before the
  second pass (lower peak memory, same result). ch.2's EMA of A is committed after the step.
* Damping and the BFGS updates run without host synchronisation; all layers' pairs are checked
  with one synchronisation per curvature step.
* Deviation (spec A27, the authors' code has stronger skips): a pair whose ``s̃ᵀỹ ≤ 0`` or that
  is not finite after damping is skipped and counted (``last_step_info``, layer state
  ``skipped_g_pairs`` / ``skipped_a_pairs``) instead of corrupting H, because the thesis's
  "never skip" assumes exact arithmetic (after damping s̃ᵀỹ > 0 unless s̃ = 0). A non-finite
  (s_G, y_G) average is not stored.
* Deviation (A8-like): without `warm_start`, A and H_A are initialised from the first
  mini-batch before the first step, because Alg 4/9 define them only through the warm start.
* Deviation: ``variant="ch2"`` accepts conv layers (thesis ch.2 is MLP-only) with ch.3's conv
  statistics (eq. 3.9); λ_A = λ_G = √λ unless ``damping_split="locations"``.
* Deviation (A18): dropout draws new masks in the second pass (the thesis asks for identical
  ones); BatchNorm uses the batch's statistics in both passes.
* Data-parallel (``opt.distribute(...)``, `curvlab.optim.base.DataParallelMixin`): ā, D̄h,
  ā⁺, D̄h⁺ and y_A = A s_A + λ_A s_A are averaged over ranks (vectors; ch.2's A stays a
  per-rank EMA, linear in the data), so every rank makes the same BFGS updates with the same
  (s, y) pairs; H_A and H_G are kept on every rank (their updates cost O(d²), like a
  broadcast). In mode ``"preconditioned"`` each layer's owner computes H_G D̂W H_A.
* Not implemented: ch.2's "double-grad" variant (§2.8.3, preliminary, "does not help much") and
  the authors' code's homogeneous coordinate ``mean(mean_h)`` (spec §12, a quirk; the thesis's 1
  is used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from curvlab.curvature.factors import input_factor
from curvlab.curvature.hooks import Capture, capture
from curvlab.curvature.layers import KroneckerLayer, find_layers
from curvlab.linalg import DecompositionError, damped_inverse
from curvlab.linalg.bfgs import (
    bfgs_correction,
    bfgs_update,
    double_damping,
    dp_dlm_damping,
    dpi_dlm_damping,
    gram_matvec,
    hessian_action_pair,
    lbfgs_multiply,
)
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import LayerwiseOptimizer, MomentumStyle, require_objective
from curvlab.optim.validation import check_choice, check_int, check_range

__all__ = ["KBFGS"]

Variant = Literal["ch3", "ch2"]
PairDamping = Literal["dp_dlm", "dd", "dpi_dlm"]
AUpdate = Literal["minibatch", "ema"]
AInit = Literal["inverse", "identity"]
DampingSplit = Literal["locations", "sqrt"]
GInit = Literal["inverse_damping", "identity"]
FallbackLR = Literal["lr_over_damping", "lr"]

#: What each chapter's algorithm fixes (thesis Alg 9 vs Alg 4; spec §0, §3 "what is new").
_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ch3": {
        "lr": 0.03,
        "pair_damping": "dp_dlm",
        "a_update": "minibatch",
        "damping_split": "locations",
        "g_init": "inverse_damping",
        "momentum_style": "heavy_ball",
        "fallback_lr": "lr_over_damping",
    },
    "ch2": {
        "lr": 0.3,
        "pair_damping": "dd",
        "a_update": "ema",
        "damping_split": "sqrt",
        "g_init": "identity",
        "momentum_style": "ema",
        "fallback_lr": "lr",
    },
}

_HYPERPARAMETERS = (
    "lr",
    "damping",
    "momentum",
    "weight_decay",
    "ema_decay",
    "curvature_every",
    "mu1",
)


@dataclass
class _FirstPass:
    """One layer's statistics from the gradient pass (pre-step weights) of a curvature step."""

    h: Tensor  # h̄ = W ā
    g: Tensor  # D̄h
    s_a: Tensor  # s_A = H_A ā
    y_a: Tensor  # y_A = A s_A + λ_A s_A
    A: Tensor | None  # ch.2: the new EMA of A (committed after the step)


class KBFGS(LayerwiseOptimizer):
    """Kronecker-factored BFGS / L-BFGS (thesis Alg 9, ``variant="ch3"``; Alg 4, ``"ch2"``).

    ``display_name`` is "K-BFGS", "K-BFGS(L)" (``memory=p``), "K-BFGS-20" or "K-BFGS(L)-20".

    Args:
        model: the network; its Linear and Conv2d (groups = 1) layers are preconditioned.
        lr: α (default 0.03 for ch.3, 0.3 for ch.2: thesis Tables 3.5 / 2.5 on MNIST).
        damping: λ > 0, split into λ_A, λ_G with λ_A λ_G = λ (thesis Alg 9 line 2).
        momentum: β of the gradient momentum (0.9).
        weight_decay: γ, decoupled, added after preconditioning (ch.3 CNNs).
        ema_decay: β of the (s_G, y_G) moving average and of ch.2's A (0.9).
        curvature_every: T, curvature updates (second pass) every T steps (1; CNNs 20).
        mu1: μ1 ∈ (0, 1) of Powell's damping on H (0.2; "leave at default").
        variant: ``"ch3"`` (K-BFGS, Alg 9) or ``"ch2"`` (K-BFGS-20, Alg 4).
        memory: ``None`` for full BFGS on H_G, or p (thesis: 100) pairs for L-BFGS.
        pair_damping: ``"dp_dlm"`` (Alg 8), ``"dd"`` (Alg 3) or ``"dpi_dlm"`` (Alg 11);
            default by variant.
        a_update: ``"minibatch"`` (ch.3 Hessian action with the current batch's A) or
            ``"ema"`` (ch.2 Hessian action with the EMA of A); default by variant.
        a_init: ``"inverse"`` (H_A = (A + λ_A I)^{-1}, printed line 3) or ``"identity"``.
        damping_split: ``"locations"`` (ch.3: λ_A = √(|T|λ), λ_G = √(λ/|T|)) or ``"sqrt"``
            (ch.2: √λ each); default by variant.
        g_init: ``"inverse_damping"`` (ch.3: H_G and the L-BFGS base are λ_G^{-1} I) or
            ``"identity"`` (ch.2); default by variant.
        momentum_style: ``"heavy_ball"`` (ch.3) or ``"ema"`` (ch.2); default by variant.
        fallback_lr: learning rate of parameters outside Linear/Conv2d: ``"lr_over_damping"``
            (ch.3, α/λ) or ``"lr"`` (α); default by variant.
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective` (the second pass re-uses its mini-batch).
    ``last_step_info`` reports the loss, whether the curvature was updated, the pairs skipped
    in this step and in total, and per layer the ratio ỹᵀHỹ / s̃ᵀỹ of thesis Fig 2.1.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9,
        curvature_every: int = 1,
        mu1: float = 0.2,
        variant: Variant = "ch3",
        memory: int | None = None,
        pair_damping: PairDamping | None = None,
        a_update: AUpdate | None = None,
        a_init: AInit = "inverse",
        damping_split: DampingSplit | None = None,
        g_init: GInit | None = None,
        momentum_style: MomentumStyle | None = None,
        fallback_lr: FallbackLR | None = None,
        params: Iterable[Any] | None = None,
    ) -> None:
        self.variant = check_choice("variant", variant, tuple(_VARIANT_DEFAULTS))
        preset = _VARIANT_DEFAULTS[self.variant]
        defaults = _validated(
            lr=preset["lr"] if lr is None else lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            ema_decay=ema_decay,
            curvature_every=curvature_every,
            mu1=mu1,
        )
        self.memory = None if memory is None else check_int("memory", memory, 1)

        def choose(name: str, value: Any, choices: tuple[str, ...]) -> str:
            return check_choice(name, preset[name] if value is None else value, choices)

        self.pair_damping = choose("pair_damping", pair_damping, ("dp_dlm", "dd", "dpi_dlm"))
        self.a_update = choose("a_update", a_update, ("minibatch", "ema"))
        self.a_init = check_choice("a_init", a_init, ("inverse", "identity"))
        self.damping_split = choose("damping_split", damping_split, ("locations", "sqrt"))
        self.g_init = choose("g_init", g_init, ("inverse_damping", "identity"))
        style = choose("momentum_style", momentum_style, ("heavy_ball", "ema"))
        self.fallback_lr = choose("fallback_lr", fallback_lr, ("lr_over_damping", "lr"))
        if isinstance(model, nn.Module) and not find_layers(model):
            raise ValueError(
                f"model: {self.display_name} preconditions nn.Linear and nn.Conv2d (groups=1) "
                f"layers, and {type(model).__name__} has no trainable one"
            )
        super().__init__(model, defaults, params=params, momentum_style=cast(MomentumStyle, style))

    @property
    def display_name(self) -> str:
        """The thesis's name of this configuration (K-BFGS, K-BFGS(L), K-BFGS-20, ...)."""
        name = "K-BFGS" if self.memory is None else "K-BFGS(L)"
        return name + ("-20" if self.variant == "ch2" else "")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One iteration of thesis Alg 9 (or Alg 4) on the closure's mini-batch."""
        objective = require_objective(closure, "KBFGS")
        for group in self.param_groups:
            _validated(**{k: group[k] for k in _HYPERPARAMETERS})
        k = self.global_state["global_step"] + 1
        curvature = k % self.param_groups[0]["curvature_every"] == 0  # Alg 9 line 12
        bootstrap = not self.global_state.get("initialised", False)
        # Alg 9 lines 5–6 (Alg 4 line 6); inputs and ∂L/∂h recorded only when needed.
        loss, cap = self._gradient_pass(objective, record=curvature or bootstrap)
        if not torch.isfinite(loss):
            self.skip_step(loss, "non-finite loss")
            return loss
        if not self.grads_finite():
            self.skip_step(loss, "non-finite gradient")
            return loss
        first: dict[str, _FirstPass] = {}
        if cap is not None:
            self._initialise_missing(cap, objective.batch_size)
            if curvature:
                first = self._first_pass(cap, objective.batch_size)
            del cap  # the first pass's activations are not needed any more
        self._apply_step()  # Alg 9 lines 7–11 (Alg 4 lines 7–12)
        skipped = {"g": 0, "a": 0}
        ratios: dict[str, float | None] = {}
        if curvature:
            skipped, ratios = self._update_curvature(objective, first)
        self.global_state["global_step"] = k
        self.last_step_info = {
            "skipped": False,
            "loss": float(loss),
            "curvature_updated": curvature,
            "skipped_g_pairs": skipped["g"],
            "skipped_a_pairs": skipped["a"],
            "skipped_g_pairs_total": self.global_state.get("skipped_g_pairs_total", 0),
            "skipped_a_pairs_total": self.global_state.get("skipped_a_pairs_total", 0),
            "yHy_over_sy": ratios,
            "skipped_steps": self.global_state["skipped_steps"],
        }
        return loss

    # ------------------------------------------------------------ passes
    def _gradient_pass(self, objective: Objective, record: bool) -> tuple[Tensor, Capture | None]:
        """The closure (zero_grad, forward, backward), recording inputs and ∂L/∂h if asked."""
        if not record:
            with torch.enable_grad():
                loss = objective()
            return self.synchronize_gradients(loss), None  # data-parallel: mean over ranks
        with capture(self.layers) as cap:
            loss = objective()
        return self.synchronize_gradients(loss), cap

    def _records(
        self, cap: Capture
    ) -> Iterable[tuple[str, KroneckerLayer, list[Tensor], list[Tensor]]]:
        """(name, layer, inputs, output gradients) of the layers used in the recorded pass."""
        for name, layer in self.layers.items():
            record = cap[name]
            grads = record.output_grads("loss")
            if record.inputs and len(grads) == len(record.inputs):
                yield name, layer, record.inputs, grads

    def _first_pass(self, cap: Capture, m: int) -> dict[str, _FirstPass]:
        """h̄, D̄h (Alg 9 line 6) and the H_A pair (line 16; Alg 4 lines 20–22) per layer."""
        records = list(self._records(cap))
        means: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for name, layer, inputs, grads in records:
            a_bar, locations = _mean_input(layer, inputs, m)
            self.layer_state(name)["locations"] = locations
            g = _sum_outputs(layer, grads) / locations
            A_batch = input_factor(layer, inputs, m) if self.a_update == "ema" else None
            means.append((a_bar, g, A_batch))
        # Data-parallel: ā and D̄h are means over examples: mean over ranks. (ch.2's A is an
        # EMA kept per rank for its shard; only A s_A below needs the mean.)
        self.average_statistics([t for a_bar, g, _ in means for t in (a_bar, g)])
        out: dict[str, _FirstPass] = {}
        actions: list[Tensor] = []
        for (name, layer, inputs, _), (a_bar, g, A_batch) in zip(records, means, strict=True):
            state = self.layer_state(name)
            h = _weight_matrix(layer) @ a_bar  # h̄ = W ā at the pre-step weights
            lam_a, _ = self._dampings(name)
            A_new: Tensor | None = None
            matvec: Callable[[Tensor], Tensor]
            if A_batch is None:
                # Alg 9 line 16 / eq. 3.15: Ã s = (1/m) Σ_{n,t} (ā_tᵀ s) ā_t, A never formed.
                parts = [layer.input_rows(x) for x in inputs]
                rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy for Linear
                matvec = partial(
                    gram_matvec, rows, scale=1.0 / m, homogeneous=layer.bias is not None
                )
            else:
                # Alg 4 line 20: A = β A + (1−β) mean_i ā āᵀ (mean of outer products).
                beta = self.group(name)["ema_decay"]
                A_new = torch.lerp(state["A"], A_batch, 1.0 - beta)
                matvec = A_new.mv  # Alg 4 lines 21–22: y_A = A s_A + λ_A s_A
            s_a, y_a = hessian_action_pair(state["H_a"], a_bar, matvec, lam_a)
            out[name] = _FirstPass(h=h, g=g, s_a=s_a, y_a=y_a, A=A_new)
            actions.append(y_a)
        # Data-parallel: this shard's (Ã or A) s_A + λ_A s_A; their mean over ranks is the
        # whole batch's (A: the mean of the ranks' EMAs is the EMA of the whole batches).
        self.average_statistics(actions)
        return out

    def _second_pass(self, objective: Objective) -> dict[str, tuple[Tensor, Tensor]]:
        """Alg 9 line 13 (Alg 4 line 13): h̄⁺, D̄h⁺ on the same mini-batch at the new weights.

        A forward pass and a backward pass to the layer outputs only (no weight gradients);
        BatchNorm running statistics are restored afterwards (thesis A18).
        """
        m = objective.batch_size
        with preserved_buffers(self.model), capture(self.layers) as cap:
            _, loss = objective.forward()
            cap.backward_to_outputs(loss, retain_graph=False)
        means: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer, inputs, grads in self._records(cap):
            a_bar, locations = _mean_input(layer, inputs, m)
            means[name] = (a_bar, _sum_outputs(layer, grads) / locations)
        # Data-parallel: ā⁺ and D̄h⁺ are means over examples: mean over ranks.
        self.average_statistics([t for pair in means.values() for t in pair])
        return {n: (_weight_matrix(self.layers[n]) @ a, g) for n, (a, g) in means.items()}

    # ------------------------------------------------------------ updates
    def _apply_step(self) -> None:
        """Momentum on the raw gradient, p = H_G D̂W H_A, W ← W − α(p + γW) (Alg 9 lines 8–10).

        `LayerwiseOptimizer.precondition_and_apply`, with fallback parameters (BatchNorm) at
        the learning rate α/λ when ``fallback_lr="lr_over_damping"`` (thesis §3.4.3).
        """

        def fallback(group: dict[str, Any]) -> dict[str, Any]:
            if self.fallback_lr == "lr_over_damping":
                return {**group, "lr": group["lr"] / group["damping"]}
            return group

        self.precondition_and_apply(self._precondition, fallback_group=fallback)

    def _precondition(self, name: str, V: Tensor) -> Tensor:
        """H_G (V H_A); compact L-BFGS for H_G in the (L) variants (Alg 9 line 9)."""
        state = self.layer_state(name)
        if "H_a" not in state:  # never seen in a recorded pass: plain gradient
            return V
        VH = V @ state["H_a"]
        if self.memory is None:
            return state["H_g"] @ VH
        return lbfgs_multiply(state["S"], state["Y"], VH, self._gamma(name))

    def _H_g_times(self, name: str, v: Tensor) -> Tensor:
        """The current H_G (BFGS matrix or L-BFGS operator) applied to a vector (spec A26)."""
        state = self.layer_state(name)
        if self.memory is None:
            return state["H_g"] @ v
        return lbfgs_multiply(state["S"], state["Y"], v, self._gamma(name))

    def _damp_pair(self, name: str, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Alg 9 line 20 (D_P D_LM) or Alg 4 line 17 (DD), μ2 = λ_G."""
        group = self.group(name)
        _, lam_g = self._dampings(name)
        if self.pair_damping == "dpi_dlm":
            return dpi_dlm_damping(s, y, group["mu1"], lam_g)
        Hy = self._H_g_times(name, y)
        damp = dp_dlm_damping if self.pair_damping == "dp_dlm" else double_damping
        return damp(s, y, Hy, group["mu1"], lam_g)

    def _update_curvature(
        self, objective: Objective, first: dict[str, _FirstPass]
    ) -> tuple[dict[str, int], dict[str, float | None]]:
        """Alg 9 lines 13–21 (Alg 4 lines 13–23); one host synchronisation for all layers."""
        second = self._second_pass(objective)
        pending: list[tuple[str, Tensor, Tensor, Tensor, Tensor, Tensor]] = []
        checks: list[Tensor] = []
        for name, f in first.items():
            if name not in second:
                continue
            state = self.layer_state(name)
            beta = self.group(name)["ema_decay"]
            h_plus, g_plus = second[name]
            # Alg 9 line 19 (Alg 4 line 16): moving averages before damping.
            s = torch.lerp(h_plus - f.h, state["s_g"], beta)
            y = torch.lerp(g_plus - f.g, state["y_g"], beta)
            s_t, y_t = self._damp_pair(name, s, y)
            Hy_t = self._H_g_times(name, y_t)
            sy = torch.dot(s_t, y_t)
            average_ok = torch.isfinite(s).all() & torch.isfinite(y).all()
            # Deviation: a pair whose BFGS correction overflows (sᵀy > 0 but tiny) is skipped
            # like one with sᵀy ≤ 0, so that H never holds an Inf or NaN.
            u_g = bfgs_correction(s_t, y_t, Hy_t)
            pair_ok = average_ok & (sy > 0) & torch.isfinite(torch.cat([s_t, y_t, Hy_t, u_g])).all()
            sy_a = torch.dot(f.s_a, f.y_a)
            u_a = bfgs_correction(f.s_a, f.y_a, state["H_a"] @ f.y_a)
            a_ok = (sy_a > 0) & torch.isfinite(torch.cat([f.s_a, f.y_a, u_a])).all()
            a_stat_ok = torch.isfinite(f.A).all() if f.A is not None else torch.ones_like(a_ok)
            checks.append(
                torch.stack(
                    [
                        average_ok.to(sy.dtype),
                        pair_ok.to(sy.dtype),
                        (a_ok & a_stat_ok).to(sy.dtype),
                        a_stat_ok.to(sy.dtype),
                        torch.dot(y_t, Hy_t) / sy,  # thesis Fig 2.1's ratio
                    ]
                )
            )
            pending.append((name, s, y, s_t, y_t, Hy_t))
        skipped = {"g": 0, "a": 0}
        ratios: dict[str, float | None] = {}
        if not pending:
            return skipped, ratios
        flags = torch.stack(checks).tolist()  # the one synchronisation
        for (name, s, y, s_t, y_t, Hy_t), (avg_ok, g_ok, a_ok, a_stat_ok, ratio) in zip(
            pending, flags, strict=True
        ):
            state = self.layer_state(name)
            f = first[name]
            if f.A is not None and a_stat_ok:
                state["A"] = f.A  # Alg 4 line 20
            if a_ok:  # Alg 9 line 17 (Alg 4 line 23)
                bfgs_update(state["H_a"], f.s_a, f.y_a, inplace=True)
            else:
                state["skipped_a_pairs"] = state.get("skipped_a_pairs", 0) + 1
                skipped["a"] += 1
            if avg_ok:
                state["s_g"], state["y_g"] = s, y
            if g_ok:  # Alg 9 line 21 (Alg 4 line 18)
                ratios[name] = ratio
                if self.memory is None:
                    bfgs_update(state["H_g"], s_t, y_t, Hy=Hy_t, inplace=True)
                else:
                    keep = self.memory - 1
                    S, Y = state["S"], state["Y"]
                    state["S"] = torch.cat([S[-keep:] if keep else S[:0], s_t[None]])
                    state["Y"] = torch.cat([Y[-keep:] if keep else Y[:0], y_t[None]])
            else:
                ratios[name] = None
                state["skipped_g_pairs"] = state.get("skipped_g_pairs", 0) + 1
                skipped["g"] += 1
            state["curvature_updates"] = state.get("curvature_updates", 0) + 1
        # global_state shares its dict with the first layer's state: distinct key names.
        glob = self.global_state
        glob["skipped_g_pairs_total"] = glob.get("skipped_g_pairs_total", 0) + skipped["g"]
        glob["skipped_a_pairs_total"] = glob.get("skipped_a_pairs_total", 0) + skipped["a"]
        return skipped, ratios

    # ----------------------------------------------------------- damping split
    def _dampings(self, name: str) -> tuple[float, float]:
        """(λ_A, λ_G) of one layer (Alg 9 line 2; Alg 4 line 2: √λ each)."""
        lam = self.group(name)["damping"]
        if self.damping_split == "sqrt":
            return math.sqrt(lam), math.sqrt(lam)
        locations = self.layer_state(name).get("locations", 1.0)
        return math.sqrt(locations * lam), math.sqrt(lam / locations)

    def _gamma(self, name: str) -> float:
        """Scale of H_G's initial matrix / the L-BFGS base: λ_G^{-1} (ch.3) or 1 (ch.2)."""
        return 1.0 / self._dampings(name)[1] if self.g_init == "inverse_damping" else 1.0

    # --------------------------------------------------------- initialisation
    def _initialise_missing(self, cap: Capture, m: int) -> None:
        """Alg 9 / Alg 4 line 3 from the first mini-batch for layers without a warm start."""
        missing: list[tuple[str, Tensor | None, float]] = []
        for name, layer, inputs, _ in self._records(cap):
            if "H_a" in self.layer_state(name):
                continue
            need_A = self.a_init == "inverse" or self.a_update == "ema"
            A = input_factor(layer, inputs, m) if need_A else None
            missing.append((name, A, _mean_input(layer, inputs, m)[1]))
        self.average_statistics([A for _, A, _ in missing if A is not None])  # over ranks
        for name, A, locations in missing:
            self._reset_layer(name, A, locations)
        self.global_state["initialised"] = True

    def _reset_layer(self, name: str, A: Tensor | None, locations: float) -> None:
        """H_A = (A + λ_A I)^{-1} (or I), ch.2's A; H_G, s_G, y_G if not there yet."""
        layer = self.layers[name]
        state = self.layer_state(name)
        state["locations"] = locations
        lam_a, _ = self._dampings(name)
        w = layer.weight.detach()
        H_a = torch.eye(layer.d_a, dtype=w.dtype, device=w.device)
        if self.a_init == "inverse":
            assert A is not None
            try:
                H_a = damped_inverse(A, lam_a)[0].contiguous()
            except DecompositionError:
                H_a = H_a / lam_a  # keep a positive definite start; counted
                state["failed_inits"] = state.get("failed_inits", 0) + 1
        state["H_a"] = H_a
        if self.a_update == "ema":
            assert A is not None
            state["A"] = A.clone()
        if "s_g" not in state:
            if self.memory is None:
                state["H_g"] = torch.eye(layer.d_out, dtype=w.dtype, device=w.device) * (
                    self._gamma(name)
                )
            else:
                state["S"] = w.new_zeros(0, layer.d_out)
                state["Y"] = w.new_zeros(0, layer.d_out)
            state["s_g"] = w.new_zeros(layer.d_out)
            state["y_g"] = w.new_zeros(layer.d_out)

    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        batch_average: bool = False,
    ) -> int:
        """Alg 9 / Alg 4 line 3: A = E_n[Σ_t ā_t ā_tᵀ] over ``batches`` (e.g. one epoch) at the
        current parameters, then H_A = (A + λ_A I)^{-1}; ch.2 also keeps A for its EMA.

        Only forward passes are made (A depends on the inputs alone); ``loss_fn`` and
        ``batch_average`` are accepted for the bench runner's interface and not used.
        Averages over examples. Returns the number of batches used.
        """
        del loss_fn, batch_average
        sums: dict[str, Tensor] = {}
        rows: dict[str, float] = {}
        examples: dict[str, int] = {}
        count = 0
        for inputs, _ in batches:
            m = int(inputs.shape[0])
            with preserved_buffers(self.model), capture(self.layers) as cap:
                self.model(inputs)
            count += 1
            for name, layer in self.layers.items():
                recorded = cap[name].inputs
                if not recorded:
                    continue
                A = input_factor(layer, recorded, m) * m
                if name in sums:
                    sums[name].add_(A)
                else:
                    sums[name] = A
                rows[name] = rows.get(name, 0.0) + _mean_input(layer, recorded, m)[1] * m
                examples[name] = examples.get(name, 0) + m
        if not sums:
            raise ValueError("batches: no batch reached a Linear/Conv2d layer for the warm start")
        # Data-parallel: ratios of sums over every rank's batches (means of sums: same ratio).
        counts = {
            n: torch.tensor([rows[n], examples[n]], dtype=torch.float64, device=A.device)
            for n, A in sums.items()
        }
        self.average_statistics([*sums.values(), *counts.values()])
        rows = {n: float(c[0]) for n, c in counts.items()}
        seen = {n: float(c[1]) for n, c in counts.items()}
        for name, total in sums.items():
            A = total / seen[name]
            if not torch.isfinite(A).all():
                raise ValueError(
                    f"batches: the warm-start statistics of layer '{name}' are not finite"
                )
            self._reset_layer(name, A, rows[name] / seen[name])
        self.global_state["initialised"] = True
        return count


# ------------------------------------------------------------------------- helpers
def _validated(
    *,
    lr: float,
    damping: float,
    momentum: float,
    weight_decay: float,
    ema_decay: float,
    curvature_every: int,
    mu1: float,
) -> dict[str, Any]:
    return {
        "lr": check_range("lr", lr, 0.0),
        "damping": check_range("damping", damping, 0.0, low_open=True),
        "momentum": check_range("momentum", momentum, 0.0, 1.0, high_open=True),
        "weight_decay": check_range("weight_decay", weight_decay, 0.0),
        "ema_decay": check_range("ema_decay", ema_decay, 0.0, 1.0, high_open=True),
        "curvature_every": check_int("curvature_every", curvature_every, 1),
        "mu1": check_range("mu1", mu1, 0.0, 1.0, low_open=True, high_open=True),
    }


def _weight_matrix(layer: KroneckerLayer) -> Tensor:
    """[W b] of shape (d_out, d_a): h_t = [W b] ā_t."""
    return layer.grad_matrix(layer.weight, layer.bias)


def _mean_input(layer: KroneckerLayer, inputs: list[Tensor], m: int) -> tuple[Tensor, float]:
    """(ā, |T|): the mean of ā_t(n) over examples and locations (with the homogeneous 1 when
    there is a bias) and the number of rows per example.

    The patches are linear in the input, so the sum of all examples' patches is the patch
    matrix of the batch-summed input: one unfold of a single image instead of m.
    """
    total: Tensor | None = None
    n_rows = 0
    for x in inputs:
        per = layer.input_rows(x.sum(0, keepdim=True))
        part = per.sum(0)
        total = part if total is None else total + part
        n_rows += per.shape[0] * x.shape[0]
    assert total is not None
    mean = total / n_rows
    if layer.bias is not None:
        mean = torch.cat([mean, mean.new_ones(1)])
    return mean, n_rows / m


def _sum_outputs(layer: KroneckerLayer, grads: list[Tensor]) -> Tensor:
    """Σ over examples and locations of ∂L/∂h_t(n), a vector of length d_out."""
    total: Tensor | None = None
    for g in grads:
        part = g.sum(dim=(0, 2, 3)) if layer.is_conv else g.reshape(-1, g.shape[-1]).sum(0)
        total = part if total is None else total + part
    assert total is not None
    return total
