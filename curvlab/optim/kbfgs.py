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

* The first pass records the layer inputs and Σ_{n,t} ∂L/∂h_t(n) (only on curvature steps);
  the second pass is a forward pass plus a backward pass to the layer outputs only (no weight
  gradients), with BatchNorm buffers restored (thesis A18). When every layer has a bias of
  its own, Σ_{n,t} ∂L/∂h_t(n) *is* the bias gradient: the inputs are recorded by forward
  pre-hooks alone, the first pass reads ``b.grad`` and the second asks autograd for the bias
  gradients; otherwise `curvlab.curvature.hooks.capture` records ∂L/∂h (a tensor hook per
  layer output, and the whole ∂L/∂h kept until it is summed).
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
  with one synchronisation per curvature step (by sums: a NaN or Inf reaches the sum).
* Per step, beyond the floor of `curvlab.bench.floors`, nothing of size d_out × d_a is
  allocated or copied: ``V H_A`` is formed from the weight and bias momenta as
  ``M_W H_A[:n] + m_b H_A[n]ᵀ`` in one buffer shared by the layers, K-BFGS accumulates
  ``−α H_G (V H_A)`` straight into W and b (K-BFGS(L) forms H_G (V H_A) in that buffer), and
  h̄ = W ā + b without ``[W b]``.
* K-BFGS(L): the p pairs live in a ring buffer ``SY`` (2, p, d_out) (``SY[0]`` the s̃,
  ``SY[1]`` the ỹ; ``pair_count`` rows in use, the oldest in row ``pair_start``), with SᵀY and
  YᵀY (p × p, chronological) updated per pushed pair (`curvlab.linalg.bfgs.lbfgs_push_`:
  three (p × d_out) matrix–vector products) instead of being recomputed by every product.
  The products of the push also give ``Sᵀỹ, Yᵀỹ`` of H_G ỹ, which the pair's overflow check
  and Fig 2.1's ratio need, so that costs two (d_out × p) matrix–vector products.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

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
    lbfgs_push_,
)
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import LayerwiseOptimizer, MomentumStyle, require_objective
from curvlab.optim.validation import (
    LAYERWISE_RULES,
    check_choice,
    check_hyperparameters,
    check_int,
    check_range,
)

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


#: A recorded pass: per layer used in it, its inputs (one per call, in the parameters' dtype)
#: and Σ_{n,t} ∂L/∂h_t(n) over all calls.
_Recorded = dict[str, tuple[list[Tensor], Tensor]]


@contextmanager
def _recorded_inputs(layers: Mapping[str, KroneckerLayer]) -> Iterator[dict[str, list[Tensor]]]:
    """Each layer's inputs in the forward passes inside the ``with`` body, in its weight's
    dtype (mixed precision), by forward pre-hooks: `curvlab.curvature.hooks.capture` without
    the output hooks, for passes whose output-gradient sums come from the bias gradients."""
    inputs: dict[str, list[Tensor]] = {name: [] for name in layers}

    def pre_hook(name: str, dtype: torch.dtype) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            inputs[name].append(x.to(dtype) if x.is_floating_point() else x)

        return hook

    handles: list[RemovableHandle] = []
    try:
        for name, layer in layers.items():
            hook = pre_hook(name, layer.weight.dtype)
            handles.append(layer.module.register_forward_pre_hook(hook))
        with torch.enable_grad():
            yield inputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _FirstPass:
    """One layer's statistics from the gradient pass (pre-step weights) of a curvature step."""

    h: Tensor  # h̄ = W ā
    g: Tensor  # D̄h
    s_a: Tensor  # s_A = H_A ā
    y_a: Tensor  # y_A = A s_A + λ_A s_A
    A: Tensor | None  # ch.2: the new EMA of A (committed after the step)


@dataclass
class _Pairs:
    """K-BFGS(L)'s stored pairs (views of the layer state), see `KBFGS._lbfgs_pairs`."""

    S: Tensor
    Y: Tensor
    SY: Tensor | None  # [S; Y] as one (2p, d_out) matrix when the buffer is full
    StY: Tensor
    YtY: Tensor
    start: int

    def multiply(
        self,
        V: Tensor,
        gamma: float,
        *,
        SV: Tensor | None = None,
        YV: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """H_G V (`curvlab.linalg.bfgs.lbfgs_multiply`)."""
        return lbfgs_multiply(
            self.S,
            self.Y,
            V,
            gamma,
            SY=self.SY,
            StY=self.StY,
            YtY=self.YtY,
            start=self.start,
            SV=SV,
            YV=YV,
            out=out,
        )


@dataclass
class _Pending:
    """One layer's pairs of a curvature step, until the check of all layers (one sync)."""

    name: str
    s: Tensor  # the (s_G, y_G) moving averages (Alg 9 line 19)
    y: Tensor
    s_t: Tensor  # the damped pair (s̃, ỹ) (line 20)
    y_t: Tensor
    Hy_t: Tensor  # H_G ỹ
    u_g: Tensor  # the BFGS correction of (s̃, ỹ) (`curvlab.linalg.bfgs.bfgs_correction`)
    s_a: Tensor  # the Hessian-action pair (s_A, y_A) (line 16)
    y_a: Tensor
    u_a: Tensor  # the BFGS correction of (s_A, y_A)
    products: tuple[Tensor, Tensor, Tensor] | None  # L-BFGS: of `KBFGS._lbfgs_candidate`

    def averages(self) -> list[Tensor]:
        """What must be finite for (s_G, y_G) to be stored."""
        return [self.s, self.y]

    def g_terms(self) -> list[Tensor]:
        """What must be finite for the H_G update (with the averages and s̃ᵀỹ > 0)."""
        return [self.s_t, self.y_t, self.Hy_t, self.u_g, *(self.products or ())]

    def a_terms(self) -> list[Tensor]:
        """What must be finite for the H_A update (with s_Aᵀy_A > 0)."""
        return [self.s_a, self.y_a, self.u_a]


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
        self._scratch_buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        # Σ_{n,t} ∂L/∂h_t(n) is a layer's bias gradient when every layer has a bias of its own.
        biases = [layer.bias for layer in self.layers.values()]
        self._sums_from_bias = all(b is not None for b in biases) and len(
            {id(b) for b in biases}
        ) == len(biases)

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
        loss, recorded = self._gradient_pass(objective, record=curvature or bootstrap)
        if not torch.isfinite(loss):
            self.skip_step(loss, "non-finite loss")
            return loss
        if not self.grads_finite():
            self.skip_step(loss, "non-finite gradient")
            return loss
        first: dict[str, _FirstPass] = {}
        if recorded is not None:
            self._initialise_missing(recorded, objective.batch_size)
            if curvature:
                first = self._first_pass(recorded, objective.batch_size)
            del recorded  # the first pass's activations are not needed any more
        applied = self._apply_step()  # Alg 9 lines 7–11 (Alg 4 lines 7–12)
        if not applied:  # a non-finite direction: the parameters keep their values
            self.withhold_update()
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
            "update_applied": applied,
            "skipped_steps": self.global_state["skipped_steps"],
        }
        return loss

    # ------------------------------------------------------------ passes
    def _gradient_pass(self, objective: Objective, record: bool) -> tuple[Tensor, _Recorded | None]:
        """The closure (zero_grad, forward, backward), recording inputs and Σ ∂L/∂h if asked.

        When every layer has its own bias, Σ_{n,t} ∂L/∂h_t(n) is the bias gradient and only
        the inputs are recorded (`_recorded_inputs`); otherwise `capture` records ∂L/∂h.
        """
        if not record:
            with torch.enable_grad():
                loss = objective()
            return self.synchronize_gradients(loss), None  # data-parallel: mean over ranks
        if not self._sums_from_bias:
            with capture(self.layers) as cap:
                loss = objective()
            return self.synchronize_gradients(loss), self._from_capture(cap)
        with _recorded_inputs(self.layers) as inputs:
            loss = objective()
        loss = self.synchronize_gradients(loss)
        recorded: _Recorded = {}
        for name, xs in inputs.items():
            bias = self.layers[name].bias
            if xs and bias is not None and bias.grad is not None:
                recorded[name] = (xs, bias.grad)
        return loss, recorded

    def _from_capture(self, cap: Capture) -> _Recorded:
        """(inputs, Σ_{n,t} ∂L/∂h_t(n)) of the layers used in a captured pass, in the
        parameters' dtype (mixed precision; a no-op when recorded in it, `capture`)."""
        out: _Recorded = {}
        for name, layer in self.layers.items():
            record = cap[name]
            grads = record.output_grads("loss")
            if record.inputs and len(grads) == len(record.inputs):
                dtype = layer.weight.dtype
                inputs = [x.to(dtype) for x in record.inputs]
                out[name] = (inputs, _sum_outputs(layer, [g.to(dtype) for g in grads]))
        return out

    def _first_pass(self, recorded: _Recorded, m: int) -> dict[str, _FirstPass]:
        """h̄, D̄h (Alg 9 line 6) and the H_A pair (line 16; Alg 4 lines 20–22) per layer."""
        records = [(n, self.layers[n], xs, total) for n, (xs, total) in recorded.items()]
        means: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for name, layer, inputs, total in records:
            a_bar, locations = _mean_input(layer, inputs, m)
            self.layer_state(name)["locations"] = locations
            g = total / locations
            A_batch = input_factor(layer, inputs, m) if self.a_update == "ema" else None
            means.append((a_bar, g, A_batch))
        # Data-parallel: ā and D̄h are means over examples: mean over ranks. (ch.2's A is an
        # EMA kept per rank for its shard; only A s_A below needs the mean.)
        self.average_statistics([t for a_bar, g, _ in means for t in (a_bar, g)])
        out: dict[str, _FirstPass] = {}
        actions: list[Tensor] = []
        for (name, layer, inputs, _), (a_bar, g, A_batch) in zip(records, means, strict=True):
            state = self.layer_state(name)
            h = _pre_activation(layer, a_bar)  # h̄ = W ā at the pre-step weights
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
        recorded: _Recorded = {}
        if not self._sums_from_bias:
            with preserved_buffers(self.model), capture(self.layers) as cap:
                _, loss = objective.forward()
                cap.backward_to_outputs(loss, retain_graph=False)
            recorded = self._from_capture(cap)
        else:
            # Σ ∂L/∂h⁺ are the bias gradients: autograd computes the layer-output gradients
            # (to reach the lower biases) and no weight gradient.
            with preserved_buffers(self.model), _recorded_inputs(self.layers) as inputs:
                _, loss = objective.forward()
                used = [n for n, xs in inputs.items() if xs]
                biases = [cast(Tensor, self.layers[n].bias) for n in used]
                grads = torch.autograd.grad(loss, biases, allow_unused=True) if used else ()
            recorded = {
                n: (inputs[n], g) for n, g in zip(used, grads, strict=True) if g is not None
            }
        means: dict[str, tuple[Tensor, Tensor]] = {}
        for name, (xs, total) in recorded.items():
            a_bar, locations = _mean_input(self.layers[name], xs, m)
            means[name] = (a_bar, total / locations)
        # Data-parallel: ā⁺ and D̄h⁺ are means over examples: mean over ranks.
        self.average_statistics([t for pair in means.values() for t in pair])
        return {n: (_pre_activation(self.layers[n], a), g) for n, (a, g) in means.items()}

    # ------------------------------------------------------------ updates
    def _apply_step(self) -> bool:
        """Momentum on the raw gradient, p = H_G D̂W H_A, W ← W − α(p + γW) (Alg 9 lines 8–10).

        Parameters outside Linear/Conv2d (BatchNorm) take the momentum gradient at the learning
        rate α/λ when ``fallback_lr="lr_over_damping"`` (thesis §3.4.3). K-BFGS in one process
        (and data-parallel mode ``"inverses"``) preconditions each layer from its weight and
        bias momenta without forming ``[D̂W D̂b]`` and accumulates the update straight into the
        parameters (`_precondition_parts`), when `_fused_update_is_finite` shows beforehand
        that no entry can overflow; otherwise, and for K-BFGS(L) and mode ``"preconditioned"``,
        every direction matrix is formed and checked before any is applied
        (`precondition_blocks`). Returns whether the update was applied (False: a direction
        was not finite and no parameter moved).
        """

        def fallback(group: dict[str, Any]) -> dict[str, Any]:
            if self.fallback_lr == "lr_over_damping":
                return {**group, "lr": group["lr"] / group["damping"]}
            return group

        if self._parallel.shares_directions or self.memory is not None:
            return self.precondition_and_apply(self._precondition, fallback_group=fallback)
        entries: list[tuple[str, list[Tensor], dict[str, Any]]] = []
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                continue
            group = self.group(name)
            momenta = [
                self._momentum(p, p.grad if p.grad is not None else torch.zeros_like(p), group)
                for p in layer.params
            ]
            entries.append((name, momenta, group))
        if self._fused_update_is_finite(entries):
            for name, momenta, group in entries:
                self._precondition_parts(name, momenta, group)
            self.apply_fallback(fallback)
            return True

        matrices = (
            (name, self.layers[name].grad_matrix(m[0], m[1] if len(m) > 1 else None))
            for name, m, _ in entries
        )
        return self.apply_preconditioned(matrices, self._precondition, fallback)

    def _fused_update_is_finite(
        self, entries: list[tuple[str, list[Tensor], dict[str, Any]]]
    ) -> bool:
        """Whether K-BFGS's fused update provably stays finite, before anything is written.

        Per layer, with Frobenius norms (each bounds every entry): ``V H_A`` is bounded by
        ``‖M‖‖H_A‖``, ``H_G V H_A`` by ``‖M‖‖H_A‖‖H_G‖`` and the new parameters by
        ``|1 − αγ|‖W‖ + α‖M‖‖H_A‖‖H_G‖`` (M = [D̂W D̂b] the momenta, W = [W b]); all must stay
        within a quarter of the dtype's largest value. One norm per tensor (about 1 ms per step
        on the thesis autoencoder) and one host synchronisation; a norm that overflows, or a
        bound that fails, sends the step to the checked path (directions formed and checked
        first), which only costs time.
        """
        rows: list[Tensor] = []
        limits: list[float] = []
        scales: list[tuple[float, float]] = []
        for name, momenta, group in entries:
            layer, state = self.layers[name], self.layer_state(name)
            # A layer never seen in a recorded pass moves along its momentum: H = I (norm 1).
            factors = (
                [state["H_a"], state["H_g"]] if "H_a" in state else [layer.weight.new_ones(())] * 2
            )
            norms = [
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))
                for ts in (momenta, factors[:1], factors[1:], list(layer.params))
            ]
            rows.append(torch.stack(norms).to(torch.float64))
            limits.append(torch.finfo(layer.weight.dtype).max / 4)
            lr, wd = group["lr"], group["weight_decay"]
            scales.append((abs(1.0 - lr * wd), lr))
        if not rows:
            return True
        table = torch.stack(rows).cpu()  # the one synchronisation
        for (m, h_a, h_g, w), limit, (keep, lr) in zip(table.tolist(), limits, scales, strict=True):
            bounds = (m * h_a, m * h_a * h_g, keep * w + lr * m * h_a * h_g)
            if not all(b <= limit for b in bounds):  # False for NaN too
                return False
        return True

    def _precondition_parts(self, name: str, momenta: list[Tensor], group: dict[str, Any]) -> None:
        """Alg 9 lines 9–10 for one layer from its weight (and bias) momentum.

        ``V H_A = M_W H_A[:n] + m_b H_A[n]ᵀ`` (V = [M_W m_b], n = fan-in) into a buffer shared
        by all layers: the products of ``V H_A`` without copying V. K-BFGS then accumulates
        ``W ← (1 − αγ) W − α H_G (V H_A)`` straight into the parameters (one product each for
        W and b, no direction matrix). Only after `_fused_update_is_finite`.
        """
        layer = self.layers[name]
        state = self.layer_state(name)
        if "H_a" not in state:  # never seen in a recorded pass: plain gradient
            for p, direction in zip(layer.params, momenta, strict=True):
                self._apply(p, direction, group)
            return
        H_a = state["H_a"]
        n = layer.d_a - (layer.bias is not None)
        VH = self._scratch(layer, H_a)
        M_w = momenta[0].reshape(layer.d_out, n)
        if layer.bias is None:
            torch.mm(M_w, H_a, out=VH)
        else:  # the bias column's rank-1 term as a product (FLOPs counted as in the floor)
            torch.mm(M_w, H_a[:n], out=VH)
            torch.addmm(VH, momenta[1].unsqueeze(1), H_a[n:], out=VH)
        lr, wd = group["lr"], group["weight_decay"]
        W = layer.weight
        if W.is_contiguous():
            # W − α (H_G (V H_A) + γ W) as one accumulating product per parameter.
            H_g = state["H_g"]
            targets: list[tuple[Tensor, Tensor]] = [(W.view(layer.d_out, n), VH[:, :n])]
            if layer.bias is not None:
                targets.append((layer.bias.view(-1, 1), VH[:, n:]))
            for target, part in targets:
                torch.addmm(target, H_g, part, beta=1.0 - lr * wd, alpha=-lr, out=target)
            return
        P = state["H_g"] @ VH
        directions = [P[:, :n].view_as(W)]
        if layer.bias is not None:
            directions.append(P[:, n])
        for p, direction in zip(layer.params, directions, strict=True):
            # W ← W − α (p + γ W); the direction is scratch, so γW is added in place.
            if wd != 0:
                direction.add_(p, alpha=wd)
            p.add_(direction, alpha=-lr)

    def _scratch(self, layer: KroneckerLayer, like: Tensor) -> Tensor:
        """A reused (d_out, d_a) buffer, shared by all layers.

        Fresh multi-megabyte tensors every step cost page faults on CPU; one buffer sized for
        the largest layer is kept per dtype and device (not state: nothing in it outlives a
        layer's update).
        """
        key = (like.dtype, like.device)
        size = layer.d_out * layer.d_a
        buf = self._scratch_buffers.get(key)
        if buf is None or buf.numel() < size:
            largest = max(la.d_out * la.d_a for la in self.layers.values())
            buf = like.new_empty(max(size, largest))
            self._scratch_buffers[key] = buf
        return buf[:size].view(layer.d_out, layer.d_a)

    def _precondition(self, name: str, V: Tensor) -> Tensor:
        """H_G (V H_A) of a whole direction matrix (data-parallel mode ``"preconditioned"``)."""
        state = self.layer_state(name)
        if "H_a" not in state:  # never seen in a recorded pass: plain gradient
            return V
        VH = V @ state["H_a"]
        if self.memory is None:
            return state["H_g"] @ VH
        return self._lbfgs_pairs(name).multiply(VH, self._gamma(name), out=VH)

    def _H_g_times(self, name: str, v: Tensor) -> Tensor:
        """The current H_G (BFGS matrix or L-BFGS operator) applied to a vector (spec A26)."""
        state = self.layer_state(name)
        if self.memory is None:
            return state["H_g"] @ v
        return self._lbfgs_pairs(name).multiply(v, self._gamma(name))

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
        pending: list[_Pending] = []
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
            products: tuple[Tensor, Tensor, Tensor] | None = None
            if self.memory is None:
                Hy_t = state["H_g"] @ y_t
            else:
                Hy_t, products = self._lbfgs_candidate(name, s_t, y_t)
            sy = torch.dot(s_t, y_t)
            # Deviation: a pair whose BFGS correction overflows (sᵀy > 0 but tiny) is skipped
            # like one with sᵀy ≤ 0, so that H never holds an Inf or NaN.
            u_g = bfgs_correction(s_t, y_t, Hy_t)
            sy_a = torch.dot(f.s_a, f.y_a)
            u_a = bfgs_correction(f.s_a, f.y_a, state["H_a"] @ f.y_a)
            pair = _Pending(name, s, y, s_t, y_t, Hy_t, u_g, f.s_a, f.y_a, u_a, products)
            # Finiteness by sums (a NaN or an Inf reaches the sum; `_all_finite` after the
            # sync tells an overflowing sum of finite entries apart).
            sums = [torch.cat(pair.averages()).sum(), torch.cat(pair.g_terms()).sum(), sy]
            sums += [torch.cat(pair.a_terms()).sum(), sy_a, torch.dot(y_t, Hy_t) / sy]
            sums.append(f.A.sum() if f.A is not None else sy_a)  # ch.2's EMA of A
            checks.append(torch.stack(sums))
            pending.append(pair)
        skipped = {"g": 0, "a": 0}
        ratios: dict[str, float | None] = {}
        if not pending:
            return skipped, ratios
        flags = torch.stack(checks).tolist()  # the one synchronisation
        for pair, (avg, g_sum, sy_, a_sum, sy_a_, ratio, A_sum) in zip(pending, flags, strict=True):
            name = pair.name
            state = self.layer_state(name)
            f = first[name]
            avg_ok = _all_finite(avg, pair.averages())
            g_ok = avg_ok and sy_ > 0 and _all_finite(g_sum, pair.g_terms())
            a_stat_ok = f.A is None or _all_finite(A_sum, [f.A])
            a_ok = a_stat_ok and sy_a_ > 0 and _all_finite(a_sum, pair.a_terms())
            if f.A is not None and a_stat_ok:
                state["A"] = f.A  # Alg 4 line 20
            if a_ok:  # Alg 9 line 17 (Alg 4 line 23)
                bfgs_update(state["H_a"], f.s_a, f.y_a, u=pair.u_a, inplace=True)
            else:
                state["skipped_a_pairs"] = state.get("skipped_a_pairs", 0) + 1
                skipped["a"] += 1
            if avg_ok:
                state["s_g"], state["y_g"] = pair.s, pair.y
            if g_ok:  # Alg 9 line 21 (Alg 4 line 18)
                ratios[name] = ratio
                if pair.products is None:
                    bfgs_update(state["H_g"], pair.s_t, pair.y_t, u=pair.u_g, inplace=True)
                else:
                    self._lbfgs_push(name, pair.s_t, pair.y_t, pair.products)
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

    # ---------------------------------------------------------------- L-BFGS
    def _lbfgs_pairs(self, name: str) -> _Pairs:
        """The stored pairs: the rows in use of the ring buffer ``SY`` (``SY[0]`` holds the
        s, ``SY[1]`` the y; oldest at row ``pair_start``) and their Gram matrices in
        chronological order, kept by `lbfgs_push_`."""
        state = self.layer_state(name)
        k, SY = state["pair_count"], state["SY"]
        full = k == SY.shape[1]
        return _Pairs(
            S=SY[0, :k],
            Y=SY[1, :k],
            SY=SY.view(2 * k, -1) if full else None,
            StY=state["StY"][:k, :k],
            YtY=state["YtY"][:k, :k],
            start=state["pair_start"],
        )

    def _lbfgs_candidate(
        self, name: str, s: Tensor, y: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """H_G ỹ of the stored pairs, and the products the push of (s̃, ỹ) needs.

        The products ``(s_iᵀ ỹ)``, ``(y_iᵀ s̃)``, ``(y_iᵀ ỹ)`` over the stored pairs (three
        (k × d_out) matrix–vector products) are the new row and column of SᵀY and YᵀY and also
        the ``Sᵀỹ``, ``Yᵀỹ`` of the compact product, so H_G ỹ (for the overflow check of the
        pair and thesis Fig 2.1's ratio) costs only the (d_out × k) products on top.
        """
        pairs = self._lbfgs_pairs(name)
        k = pairs.S.shape[0]
        if pairs.SY is not None:  # full buffer: [S; Y] ỹ in one product
            SYy = pairs.SY.mv(y)
            Sy, Yy = SYy[:k], SYy[k:]
        else:
            Sy, Yy = pairs.S.mv(y), pairs.Y.mv(y)
        Ys = pairs.Y.mv(s)
        Hy = pairs.multiply(y, self._gamma(name), SV=Sy, YV=Yy)
        return Hy, (Sy, Ys, Yy)

    def _lbfgs_push(
        self, name: str, s: Tensor, y: Tensor, products: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        """Alg 9 line 21 (L): push (s̃, ỹ), dropping the oldest pair beyond p (ring buffer)."""
        state = self.layer_state(name)
        Sy, Ys, Yy = products
        state["pair_count"], state["pair_start"] = lbfgs_push_(
            state["SY"][0],
            state["SY"][1],
            state["StY"],
            state["YtY"],
            state["pair_count"],
            state["pair_start"],
            s,
            y,
            Sy=Sy,
            Ys=Ys,
            Yy=Yy,
        )

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
    def _initialise_missing(self, recorded: _Recorded, m: int) -> None:
        """Alg 9 / Alg 4 line 3 from the first mini-batch for layers without a warm start."""
        missing: list[tuple[str, Tensor | None, float]] = []
        for name, (inputs, _) in recorded.items():
            layer = self.layers[name]
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
                # The pair ring buffer (SY[0]: s, SY[1]: y; oldest row at pair_start) and
                # the Gram matrices SᵀY, YᵀY, allocated once; rows beyond pair_count unused.
                p = self.memory
                state["SY"] = w.new_zeros(2, p, layer.d_out)
                state["StY"] = w.new_zeros(p, p)
                state["YtY"] = w.new_zeros(p, p)
                state["pair_count"] = 0
                state["pair_start"] = 0
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
#: The shared layer-wise rules, plus DD's μ1 ∈ (0, 1) (thesis Alg 4).
_RULES = {
    **LAYERWISE_RULES,
    "mu1": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True, high_open=True),
}


def _validated(**values: Any) -> dict[str, Any]:
    return check_hyperparameters(values, _RULES)


def _all_finite(total: float, tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` are finite, given the sum of all their entries: a finite sum
    decides it; a non-finite one may also come from finite entries that overflow, so then
    the entries are tested (one more synchronisation, only on that rare path)."""
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _pre_activation(layer: KroneckerLayer, a: Tensor) -> Tensor:
    """``[W b] a`` (h̄ = W ā, with the homogeneous 1 last in ``a`` when there is a bias),
    without copying W into ``[W b]``."""
    W = layer.weight.reshape(layer.d_out, -1)
    if layer.bias is None:
        return W @ a
    return torch.addmv(layer.bias, W, a[:-1])


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
