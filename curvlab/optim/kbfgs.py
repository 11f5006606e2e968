r"""K-BFGS / K-BFGS(L) (thesis ch.3, Alg 9; MLPs and CNNs) and their chapter-2 predecessors
K-BFGS-20 / K-BFGS(L)-20 (thesis ch.2, Alg 4; Goldfarb, Ren & Bahamou 2020; MLPs).

Each layer's Hessian block is approximated by ``A ⊗ G`` (thesis eqs. 2.3, 3.9) and its
inverse by ``H_A ⊗ H_G``, both kept by BFGS updates (`curvlab.curvature.blocks.KBFGSBlock`);
the (L) variants keep H_G as p = ``memory`` L-BFGS pairs. Thesis Alg 9 (``variant="ch3"``),
β = ``ema_decay`` = ``momentum``, μ1 = ``mu1``, T = ``curvature_every``::

    1  μ1 = 0.2, β = 0.9
    2  λ_A = sqrt(|T_l| λ),  λ_G = sqrt(λ / |T_l|)          (FC layers: |T| = 1, both √λ)
    3  D̂W = 0;  A = E_n Σ_t a_t a_tᵀ (warm start);  H_A = (A + λ_A I)^{-1};  H_G = λ_G^{-1} I
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

Alg 4 (``variant="ch2"``) differs in: line 8 is the EMA ``∇̂f = β ∇̂f + (1−β) ∇̄f``;
λ_A = λ_G = √λ; H_G = I; DD pair damping (Alg 3); H_A's pair uses an EMA of A (line 20) and
``y_A = (A + λ_A I) s_A``; T = 1. Each difference is also an option (thesis Table 3.8's
ablations): ``pair_damping``, ``a_update``, ``damping_split``, ``g_init``,
``momentum_style``; ``a_init="identity"`` (§2.8.2's H_A = I); ``fallback_lr`` for parameters
outside Linear/Conv2d (thesis §3.4.3: α/λ in ch.3).

On `curvlab.optim.base.BlockOptimizer`'s step: the gradient pass records the layer inputs and
Σ ∂L/∂h (the bias gradient when every layer has its own bias); line 16 needs only that pass
and H_A before its update, so it is the step's `statistics`; lines 13–21 are the after-step
hook, with one host synchronisation for all layers' pair checks. Deviations
(docs/deviations.md): A27 (pairs that are not usable are skipped and counted), A8-like (no
warm start: A and H_A from the first mini-batch), A18 (dropout draws new masks in the second
pass), ch.2 accepts conv layers with ch.3's statistics. Data-parallel: ā, D̄h, ā⁺, D̄h⁺ and
y_A are averaged over ranks, so every rank makes the same BFGS updates. Not implemented:
ch.2's "double-grad" variant (§2.8.3) and the authors' code's homogeneous coordinate quirk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, cast, get_args

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks.kbfgs import FirstPass, KBFGSBlock, fused_update_is_finite
from curvlab.curvature.cost import (
    CostItem,
    LayerShape,
    cost_items,
    forward_product,
    output_gradient_product,
)
from curvlab.curvature.factors import input_factor, require_records
from curvlab.curvature.hooks import Capture, capture
from curvlab.curvature.layers import find_layers
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.base import BlockOptimizer, MomentumStyle, Refreshed
from curvlab.optim.guard import full_precision
from curvlab.optim.validation import (
    LAYERWISE_RULES,
    Rule,
    check_choice,
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
#: Per layer used in a pass: its inputs (one per call) and Σ_{n,t} ∂L/∂h_t(n) over all calls.
Recorded = dict[str, tuple[list[Tensor], Tensor]]

#: What each chapter's algorithm fixes (thesis Alg 9 vs Alg 4).
_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ch3": dict(lr=0.03, pair_damping="dp_dlm", a_update="minibatch", damping_split="locations",
                g_init="inverse_damping", momentum_style="heavy_ball",
                fallback_lr="lr_over_damping"),
    "ch2": dict(lr=0.3, pair_damping="dd", a_update="ema", damping_split="sqrt",
                g_init="identity", momentum_style="ema", fallback_lr="lr"),
}  # fmt: skip
_CHOICES = dict(
    pair_damping=get_args(PairDamping), a_update=get_args(AUpdate), a_init=get_args(AInit),
    damping_split=get_args(DampingSplit), g_init=get_args(GInit),
    momentum_style=get_args(MomentumStyle), fallback_lr=get_args(FallbackLR),
)  # fmt: skip


class KBFGS(BlockOptimizer):
    """Kronecker-factored BFGS / L-BFGS (thesis Alg 9, ``variant="ch3"``; Alg 4, ``"ch2"``).

    ``display_name`` is "K-BFGS", "K-BFGS(L)" (``memory=p``), "K-BFGS-20" or "K-BFGS(L)-20".

    Args:
        model: the network; its Linear and Conv2d (groups = 1) layers are preconditioned.
        lr: α (default 0.03 for ch.3, 0.3 for ch.2: thesis Tables 3.5 / 2.5 on MNIST).
        damping: λ > 0, split into λ_A, λ_G with λ_A λ_G = λ (Alg 9 line 2).
        momentum: β of the gradient momentum (0.9).
        weight_decay: γ, decoupled, added after preconditioning (ch.3 CNNs).
        ema_decay: β of the (s_G, y_G) moving average and of ch.2's A (0.9).
        curvature_every: T, curvature updates (second pass) every T steps (1; CNNs 20).
        mu1: μ1 ∈ (0, 1) of Powell's damping on H (0.2; "leave at default").
        variant: ``"ch3"`` (K-BFGS, Alg 9) or ``"ch2"`` (K-BFGS-20, Alg 4).
        memory: ``None`` for full BFGS on H_G, or p (thesis: 100) pairs for L-BFGS.
        pair_damping, a_update, a_init, damping_split, g_init, momentum_style, fallback_lr:
            the options of the module docstring; default by variant (`KBFGSBlock`).
        params: optional parameter groups.

    ``step`` takes a `curvlab.Objective` (the second pass re-uses its mini-batch).
    ``last_step_info`` reports the loss, whether the curvature was updated, the pairs skipped
    in this step and in total, and per layer the ratio ỹᵀHỹ / s̃ᵀỹ of thesis Fig 2.1.
    """

    pair_damping: str
    a_update: str
    a_init: str
    damping_split: str
    g_init: str
    momentum_style: MomentumStyle
    fallback_lr: str
    hyperparameters = (
        "lr", "damping", "momentum", "weight_decay", "ema_decay", "curvature_every", "mu1"
    )  # fmt: skip
    #: The shared layer-wise rules, plus DD's μ1 ∈ (0, 1) (Alg 4).
    rules: ClassVar[Mapping[str, Rule]] = {
        **LAYERWISE_RULES,
        "mu1": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True, high_open=True),
    }

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
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.variant = check_choice("variant", variant, tuple(_VARIANT_DEFAULTS))
        preset = _VARIANT_DEFAULTS[self.variant]
        lr = preset["lr"] if lr is None else lr
        defaults = self.checked(locals())
        self.memory = None if memory is None else check_int("memory", memory, 1)
        given = dict(pair_damping=pair_damping, a_update=a_update, a_init=a_init,
                     damping_split=damping_split, g_init=g_init,
                     momentum_style=momentum_style, fallback_lr=fallback_lr)  # fmt: skip
        for name, value in given.items():  # self.pair_damping, self.a_update, ...
            setattr(self, name, check_choice(name, preset[name] if value is None else value,
                                             _CHOICES[name]))  # fmt: skip
        if isinstance(model, nn.Module) and not find_layers(model):
            raise ValueError(
                f"model: {self.display_name} preconditions nn.Linear and nn.Conv2d (groups=1) "
                f"layers, and {type(model).__name__} has no trainable one"
            )
        style = cast(MomentumStyle, self.momentum_style)
        super().__init__(model, defaults, params=params, momentum_style=style, loss_fn=loss_fn)
        self._scratch_buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        # Σ_{n,t} ∂L/∂h_t(n) is a layer's bias gradient when every layer has a bias of its own.
        self.blocks_changed()

    def blocks_changed(self) -> None:
        biases = [layer.bias for layer in self.layers.values()]
        self._sums_from_bias = all(b is not None for b in biases) and len(
            {id(b) for b in biases}
        ) == len(biases)

    def make_blocks(self, model: nn.Module) -> list[KBFGSBlock]:
        return [
            KBFGSBlock(layer, memory=self.memory, pair_damping=self.pair_damping,
                       a_update=self.a_update, a_init=self.a_init,
                       damping_split=self.damping_split, g_init=self.g_init)
            for layer in find_layers(model).values()
        ]  # fmt: skip

    @property
    def display_name(self) -> str:
        """The thesis's name of this configuration (K-BFGS, K-BFGS(L), K-BFGS-20, ...)."""
        name = "K-BFGS" if self.memory is None else "K-BFGS(L)"
        return name + ("-20" if self.variant == "ch2" else "")

    def block(self, name: str) -> KBFGSBlock:
        return cast(KBFGSBlock, self.blocks[name])

    def _curvature_due(self, k: int) -> bool:
        return k % self.param_groups[0]["curvature_every"] == 0  # Alg 9 line 12

    # ------------------------------------------------------------ the hooks
    #: A plain closure's pass is recorded (inputs, output gradients) for lines 6 and 16.
    records_layer_passes = True

    def entry_points(self) -> frozenset[str]:
        """The second pass (line 13) evaluates the loss again: an `Objective` or a closure."""
        return frozenset({"objective", "closure"})

    def gradient_pass(self, batch: Any, k: int) -> tuple[Tensor | None, Recorded | None]:
        """Lines 5–6; the inputs and Σ ∂L/∂h are recorded on curvature steps (and the first).
        Without an `Objective`, a plain closure's recorded pass."""
        record = self._curvature_due(k) or not self.global_state.get("initialised", False)
        if not isinstance(batch, Objective):
            if batch.closure is None:
                raise ValueError(
                    f"closure: {self.display_name}'s second pass (Alg 9 line 13) evaluates the "
                    "loss again at the updated parameters on the same mini-batch; pass a "
                    "closure that computes it, opt.step(closure), or a curvlab.Objective"
                )
            return batch.loss, self._recorded(batch.capture) if record else None
        if not record:
            with torch.enable_grad():
                return batch(), None
        return self._recorded_pass(batch, weight_gradients=True)

    def statistics(self, closure: Any, record: Recorded | None, k: int) -> Any:
        """Line 3 for layers not initialised yet; on curvature steps h̄, D̄h and line 16's
        H_A pair, which need only this pass and H_A before its update."""
        if record is None:
            return None
        self._initialise_missing(record, closure.batch_size)
        return self._first_pass(record, closure.batch_size) if self._curvature_due(k) else None

    def statistics_finite(self, statistics: Any) -> bool:
        return True  # each pair is checked after the second pass (one synchronisation)

    def update_statistics(self, statistics: Any, k: int) -> None:
        """Nothing before the step: H_A and H_G are updated after it (`after_step`)."""

    def fallback_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Thesis §3.4.3: α/λ for parameters outside Linear/Conv2d in ch.3."""
        if self.fallback_lr == "lr_over_damping":
            return {**group, "lr": group["lr"] / group["damping"]}
        return group

    def apply_update(self) -> bool:
        """Lines 8–10. K-BFGS in one process (and mode "inverses") accumulates each layer's
        update straight into its parameters (`KBFGSBlock.apply_fused`) when a norm bound shows
        beforehand that nothing overflows; otherwise, and for K-BFGS(L), the base's checked
        path (every direction formed and checked before any is applied)."""
        if self._parallel.shares_directions or self.memory is not None:
            return super().apply_update()
        entries = [(n, m, self.group(n)) for n, m in self.block_momenta()]
        rows = [self.block(n).fused_norms(self.block_state(n), m) for n, m, _ in entries]
        limits = [torch.finfo(self.layers[n].weight.dtype).max / 4 for n, _, _ in entries]
        scales = [(abs(1.0 - g["lr"] * g["weight_decay"]), g["lr"]) for _, _, g in entries]
        if not fused_update_is_finite(rows, limits, scales):
            return self.apply_directions((n, self.blocks[n].gradient(m)) for n, m, _ in entries)
        for name, momenta, group in entries:
            state = self.block_state(name)
            if "H_a" not in state:  # never seen in a recorded pass: plain gradient
                for p, direction in zip(self.blocks[name].params, momenta, strict=True):
                    self.apply(p, direction, group)
                continue
            VH = self._scratch(name, state["H_a"])
            self.block(name).apply_fused(state, momenta, group["lr"], group["weight_decay"], VH)
        self.apply_fallback()
        return True

    def after_step(self, batch: Any, k: int, statistics: Any) -> dict[str, Any]:
        """Lines 13–21 (Alg 4 lines 13–23); one host synchronisation for all layers."""
        skipped = {"g": 0, "a": 0}
        ratios: dict[str, float | None] = {}
        if not self._curvature_due(k):
            return {"skipped": skipped, "ratios": ratios}
        second = self._second_pass(batch)
        first: dict[str, FirstPass] = statistics or {}
        pending = []
        for name, f in first.items():
            if name in second:
                group = self.group(name)
                pair, sums = self.block(name).propose(
                    self.block_state(name), f, *second[name],
                    group["ema_decay"], group["mu1"], group["damping"],
                )  # fmt: skip
                pending.append((name, pair, sums))
        if pending:
            flags = torch.stack([sums for _, _, sums in pending]).tolist()  # the one sync
            for (name, pair, _), checked in zip(pending, flags, strict=True):
                state, beta = self.block_state(name), self.group(name)["ema_decay"]
                g_ok, a_ok, ratios[name] = self.block(name).update(state, (pair, checked), beta)
                skipped["g"] += not g_ok
                skipped["a"] += not a_ok
            # global_state shares its dict with the first layer's state: distinct key names.
            glob = self.global_state
            glob["skipped_g_pairs_total"] = glob.get("skipped_g_pairs_total", 0) + skipped["g"]
            glob["skipped_a_pairs_total"] = glob.get("skipped_a_pairs_total", 0) + skipped["a"]
        return {"skipped": skipped, "ratios": ratios, "curvature": True}

    def step_information(
        self, statistics: Any, refreshed: Refreshed, info: dict[str, Any]
    ) -> dict[str, Any]:
        glob = self.global_state
        return {
            "curvature_updated": info.get("curvature", False),
            "skipped_g_pairs": info["skipped"]["g"],
            "skipped_a_pairs": info["skipped"]["a"],
            "skipped_g_pairs_total": glob.get("skipped_g_pairs_total", 0),
            "skipped_a_pairs_total": glob.get("skipped_a_pairs_total", 0),
            "yHy_over_sy": info["ratios"],
        }

    # ------------------------------------------------------------ passes
    def _recorded(self, cap: Capture) -> Recorded:
        """(inputs, Σ_{n,t} ∂L/∂h_t(n)) of every layer used in a captured pass with weight
        gradients: the bias gradients when every layer has its own bias, else the sums of the
        recorded ∂L/∂h (the bias gradients are averaged over ranks in place later)."""
        require_records(cap, self.layers)
        if self._sums_from_bias:
            return {
                n: (cap[n].inputs, la.bias.grad)
                for n, la in self.layers.items()
                if cap[n].inputs and la.bias is not None and la.bias.grad is not None
            }
        recorded = {}
        for name, layer in self.layers.items():
            inputs, grads = cap[name].inputs, cap[name].output_grads("loss")
            if inputs and len(grads) == len(inputs):
                recorded[name] = (inputs, layer.sum_outputs(grads))
        return recorded

    def _recorded_pass(self, batch: Any, weight_gradients: bool) -> tuple[Tensor, Recorded]:
        """A pass recording each used layer's inputs and Σ_{n,t} ∂L/∂h_t(n): the closure
        (``weight_gradients``; without an `Objective`, always a plain closure run again), or a
        forward pass and a backward pass to the layer outputs only (line 13). When every layer
        has its own bias, Σ ∂L/∂h is the bias gradient and only the inputs are recorded;
        otherwise `capture` records ∂L/∂h."""
        if weight_gradients or not isinstance(batch, Objective):
            closure = batch if isinstance(batch, Objective) else batch.closure
            with capture(self.layers, output_gradients=not self._sums_from_bias) as cap:
                loss = closure()
            return loss, self._recorded(cap)
        if not self._sums_from_bias:
            with capture(self.layers) as cap:
                _, loss = batch.forward()
                cap.backward_to_outputs(loss, retain_graph=False)
            return loss, self._recorded(cap)
        with capture(self.layers, output_gradients=False) as cap:
            objective = batch
            _, loss = objective.forward()
            used = [n for n in self.layers if cap[n].inputs]
            biases = [cast(Tensor, self.layers[n].bias) for n in used]
            grads = list(torch.autograd.grad(loss, biases, allow_unused=True)) if used else []
        return loss, {
            n: (cap[n].inputs, g) for n, g in zip(used, grads, strict=True) if g is not None
        }

    def _first_pass(self, recorded: Recorded, m: int) -> dict[str, FirstPass]:
        """h̄, D̄h (line 6) and the H_A pair (line 16; Alg 4 lines 20–22) per layer."""
        means = []
        for name, (inputs, total) in recorded.items():
            layer = self.layers[name]
            a_bar, locations = layer.mean_input(inputs, m)
            self.block_state(name)["locations"] = locations
            A_batch = input_factor(layer, inputs, m) if self.a_update == "ema" else None
            means.append((a_bar, total / locations, A_batch))
        # Data-parallel: ā and D̄h are means over examples: mean over ranks.
        self.average_statistics([t for a_bar, g, _ in means for t in (a_bar, g)])
        out: dict[str, FirstPass] = {}
        for (name, (inputs, _)), (a_bar, g, A_batch) in zip(recorded.items(), means, strict=True):
            group = self.group(name)
            s_a, y_a, A_new = self.block(name).hessian_action(
                self.block_state(name), a_bar, inputs, m, A_batch,
                group["ema_decay"], group["damping"],
            )  # fmt: skip
            h = self.layers[name].pre_activation(a_bar)  # h̄ = W ā at the pre-step weights
            out[name] = FirstPass(h=h, g=g, s_a=s_a, y_a=y_a, A=A_new)
        # Data-parallel: this shard's A s_A + λ_A s_A; their mean over ranks is the batch's.
        self.average_statistics([f.y_a for f in out.values()])
        return out

    def _second_pass(self, objective: Any) -> dict[str, tuple[Tensor, Tensor]]:
        """Line 13: h̄⁺, D̄h⁺ on the same mini-batch at the new weights; no weight gradients;
        BatchNorm running statistics restored (deviation A18)."""
        with preserved_buffers(self.model):
            _, recorded = self._recorded_pass(objective, weight_gradients=False)
        means = {}
        for name, (xs, total) in recorded.items():
            a_bar, locations = self.layers[name].mean_input(xs, objective.batch_size)
            means[name] = (a_bar, total / locations)
        self.average_statistics([t for pair in means.values() for t in pair])  # over ranks
        return {n: (self.layers[n].pre_activation(a), g) for n, (a, g) in means.items()}

    # --------------------------------------------------------- initialisation
    def _initialise_missing(self, recorded: Recorded, m: int) -> None:
        """Line 3 from the first mini-batch for layers without a warm start (deviation A8)."""
        missing: list[tuple[str, Tensor | None, float]] = []
        for name, (inputs, _) in recorded.items():
            if "H_a" in self.block_state(name):
                continue
            layer = self.layers[name]
            need_A = self.a_init == "inverse" or self.a_update == "ema"
            A = input_factor(layer, inputs, m) if need_A else None
            missing.append((name, A, layer.mean_input(inputs, m)[1]))
        self.average_statistics([A for _, A, _ in missing if A is not None])  # over ranks
        for name, A, locations in missing:
            self.block(name).reset(
                self.block_state(name), A, locations, self.group(name)["damping"]
            )
        self.global_state["initialised"] = True

    def _reset(self, name: str, A: Tensor | None, locations: float) -> None:
        self.block(name).reset(self.block_state(name), A, locations, self.group(name)["damping"])

    def _scratch(self, name: str, like: Tensor) -> Tensor:
        """A reused (d_out, d_a) buffer, shared by all layers (fresh multi-megabyte tensors
        every step cost page faults on CPU; not state: nothing in it outlives an update)."""
        layer = self.layers[name]
        key, size = (like.dtype, like.device), layer.d_out * layer.d_a
        buf = self._scratch_buffers.get(key)
        if buf is None or buf.numel() < size:
            largest = max(la.d_out * la.d_a for la in self.layers.values())
            buf = like.new_empty(max(size, largest))
            self._scratch_buffers[key] = buf
        return buf[:size].view(layer.d_out, layer.d_a)

    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        batch_average: bool = False,
    ) -> int:
        """Line 3: A = E_n[Σ_t ā_t ā_tᵀ] over ``batches`` (e.g. one epoch) at the current
        parameters, then H_A = (A + λ_A I)^{-1}; ch.2 also keeps A for its EMA. Forward passes
        only (``loss_fn`` and ``batch_average`` are accepted for the bench runner and unused).
        Returns the number of batches used."""
        del loss_fn, batch_average
        sums: dict[str, Tensor] = {}
        rows: dict[str, float] = {}
        examples: dict[str, int] = {}
        count = 0
        with full_precision():
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
                    sums[name] = sums[name].add_(A) if name in sums else A
                    rows[name] = rows.get(name, 0.0) + layer.mean_input(recorded, m)[1] * m
                    examples[name] = examples.get(name, 0) + m
            if not sums:
                raise ValueError(
                    "batches: no batch reached a Linear/Conv2d layer for the warm start"
                )
            # Data-parallel: ratios of sums over every rank's batches (means of sums: same ratio).
            counts = {
                n: torch.tensor([rows[n], examples[n]], dtype=torch.float64, device=A.device)
                for n, A in sums.items()
            }
            self.average_statistics([*sums.values(), *counts.values()])
            for name, total in sums.items():
                A = total / float(counts[name][1])
                if not torch.isfinite(A).all():
                    raise ValueError(
                        f"batches: the warm-start statistics of layer '{name}' are not finite"
                    )
                locations = float(counts[name][0]) / float(counts[name][1])
                self.block(name).reset(
                    self.block_state(name), A, locations, self.group(name)["damping"]
                )
            self.global_state["initialised"] = True
        return count

    # -------------------------------------------------------------- cost model
    def pass_cost(self, shape: LayerShape) -> list[CostItem]:
        """Alg 9 line 13's second pass at the new weights, per layer, once per T steps: a forward
        pass, ``x Wᵀ`` (r×n)(n×d_out), and a backward pass to the pre-activations only,
        ``g W`` (r×d_out)(d_out×n) for the layers whose input needs a gradient (no weight
        gradients). The block's pairs and preconditioning: `KBFGSBlock.cost`."""
        if shape.name not in self.layers:
            return []
        c, name = self.cost_schedule()[0], shape.name
        out = cost_items("extra_forward", [forward_product(shape)], c, name, "x Wᵀ (second pass)")
        if shape.input_grad:
            what = "g W (second pass, output gradients only)"
            out += cost_items(
                "statistics_backward", [output_gradient_product(shape)], c, name, what
            )
        return out

    def cost_warmup_steps(self) -> int:
        """K-BFGS(L): p curvature updates fill the pair buffer (Alg 9 line 21; a step's cost
        grows with the pairs), then one more step; K-BFGS: 0."""
        if self.memory is None:
            return 0
        return self.memory * int(self.param_groups[0]["curvature_every"]) + 1

    def cost_diagnostics(self) -> dict[str, Any]:
        """The base's, the pairs skipped so far (deviation A27) and K-BFGS(L)'s stored pairs
        per layer."""
        out = super().cost_diagnostics()
        glob = self.global_state
        out["skipped_g_pairs_total"] = glob.get("skipped_g_pairs_total", 0)
        out["skipped_a_pairs_total"] = glob.get("skipped_a_pairs_total", 0)
        if self.memory is not None:
            states = {name: self.block_state(name) for name in self.layers}
            out["lbfgs_pairs"] = {
                name: int(state["pair_count"])
                for name, state in states.items()
                if "pair_count" in state
            }
        return out
