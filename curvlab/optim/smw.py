r"""SMW-GN, SMW-NG and SMW-NG-BD: subsampled Gauss-Newton / natural gradient with
Levenberg–Marquardt damping, inverted by Sherman–Morrison–Woodbury (thesis ch.5).

Thesis Alg 23 (§5.5), with α = ``lr``, N2 = ``curvature_batch_size``, the LM rule's
(λ_LM(0), boost, drop, ε, τ) = (``damping``, ``boost``, ``drop``, ``epsilon``, ``tau``)::

    1  Parameters: N1, N2, 0 < ε < 1/2, learning rate α
    2  for t = 0, 1, 2, ...
    3      S1 ⊆ [N] of size N1 (the objective's batch);  S2 ⊆ S1 of size N2
    4      g_t = (1/N1) Σ_{i∈S1} ∇f_i(θ_t)
    5      D_t on S2 and p_t = −G_t⁻¹ g_t by (5.6) or (5.7),   G_t = B_t + λ_t I
    6      ρ_t (5.5) from S1 estimates of f; update λ_LM (§5.2.3)
    7      θ_{t+1} = θ_t + α p_t

Curvature B_t = (1/N2) Σ_{i∈S2} J_iᵀ H_i J_i (GN, eq. 5.2 subsampled; J_i = ∂ŷ_i/∂θ with ŷ
the model outputs, i.e. the logits when softmax/sigmoid live in the loss, A20 in
docs/deviations.md), or
B_t = (1/N2) Σ_{i∈S2} ∇f_i ∇f_iᵀ (NG, eq. 5.3: the *empirical* Fisher, true labels, A22).
SMW (5.6): G⁻¹ = (1/λ)(I − (1/N2) Jᵀ D⁻¹ J), D = λH⁻¹ + (1/N2) JJᵀ; (5.7) when H is singular
(softmax + cross-entropy): G⁻¹ = (1/λ)(I − (1/N2) JᵀH D⁻¹ J), D = λI + (1/N2) JJᵀH (LU).
D is N2·m_L square (GN) or N2 square (NG); see `curvlab.linalg.woodbury`.

JJᵀ, J g and Jᵀw come from layer inputs and backpropagated layer-output vectors
(`curvlab.curvature.per_sample`): NG's Gram entries are Σ_l (g_iᵀg_j)(ā_iᵀā_j) (§5.3.3 with
the bias of §5.4.6); GN's block matrix (J_i J_jᵀ) is Alg 22, each output unit backpropagated
once for all samples of S2; J g is Σ_l ĥᵀ G_l ā (one product per layer, the O(m_L N2 n) term
of §5.7); Jᵀw is the backprop of the custom function Σ_i w_iᵀŷ_i (§5.3.2), formed from the
same vectors without another pass. No per-sample weight gradient is formed for Linear layers.
Passes per step: NG and NG-BD take g_i and ā_i from the gradient pass of line 4 itself (hooks
on the layers during the closure, `_SubsampledLM.evaluate`; §5.3.3), so beyond SGD they add
only the trial forward pass of ρ on S1; GN adds one forward pass on S2 and m_L backward passes
to the layer outputs (no weight gradients). The gradient pass is the ordinary closure (it fills
``.grad``): S2 ⊆ S1 and the per-sample quantities need hooks, not a curvature operator. With
dropout, GN's forward pass on S2 and the trial forward pass of ρ_t replay the masks of the
gradient pass (`ModelwiseOptimizer.step_randomness`), so that g_t, D_t and both losses of ρ_t
belong to one sampled network (for S2 ⊂ S1, masks of S2's shape from the same RNG state).

LM rule (§5.2.3, `curvlab.optim.control.levenberg_marquardt_update`; its state and the accept
rule are `curvlab.optim.levenberg_marquardt.LevenbergMarquardtDamping`'s, shared with
`curvlab.optim.hessian_free`): ρ_t < ε → λ_LM ← boost·λ_LM; ρ_t > 1 − ε → λ_LM ← drop·λ_LM;
then λ_{t+1} = λ_LM + τ. ρ_t is formed by `ModelwiseOptimizer.step` at the trial point
(``Proposal.trial_step``, see ``ratio_point`` below). The model reduction of (5.5) is
m_t(0) − m_t(p) = −gᵀp − ½ pᵀB_t p, with pᵀB_t p = (1/N2)(Jp)ᵀH(Jp) and
Jp = −(Jg − (1/N2) JJᵀ w)/λ from quantities at hand (exact even when the solve needed extra
damping).

SMW-NG-BD (§5.8): the NG matrix restricted to its layer blocks, each block inverted by its own
SMW solve with D_l = λI + (1/N2) J_l J_lᵀ (the same λ and 1/N2 for every block, A23).

Options and deviations:

* Theorem 6 (semi-stochastic, thesis §5.6): pass an `Objective` over the whole training set
  (N1 = N), ``lr=1`` and ``accept_threshold=η`` with 0 < η < ε: θ moves only when ρ_t ≥ η
  (a rejected step leaves θ exactly as it was; λ still follows the LM rule).
* ``ratio_point`` (A21): (5.5) evaluates f(θ + p_t) while Alg 23 steps θ + αp_t. The
  default ``"direction"`` is the literal reading (trial loss and model reduction at p_t); with
  ``"step"`` both are taken at αp_t. For α = 1 they agree.
* ``curvature_subset``: Alg 23 line 3 draws S2 at random from S1 (``"random"``, default, from
  the optimizer's own generator, saved in ``state_dict``); ``"first"`` takes the first N2 rows
  (equivalent in distribution when the loader shuffles). ``curvature_batch_size=None`` means
  N2 = N1 (the whole batch); the thesis uses N2 = N1/2 in every experiment (§8.4 presets).
* Deviation: a step whose trial loss is not finite is rejected even in the practical version
  (which always accepts), because it would move θ towards a non-finite loss; λ_LM is boosted.
  So is a step whose model reduction is ≤ −1e-15 (ρ_t = −∞; Lemma 11 rules it out for the
  exact solve, so only round-off gets there: docs/deviations.md, "A model that predicts no
  decrease").
* Deviation: a non-finite Gram matrix or J g, or a D that cannot be factorised even in float64
  with extra damping (`curvlab.linalg.DecompositionError`), skips the step: parameters and λ
  are untouched and ``last_step_info`` gives the reason. When D needed the retry's extra
  damping δ, the direction is (1/λ)(I − (1/N2)Jᵀ(D + δI)⁻¹J)(−g), still a descent direction
  (``decomposition_attempts`` > 1 in ``last_step_info``).
* Extension: Conv2d layers (and Linear layers on inputs with extra dimensions) are handled
  exactly by summing rank-one terms over locations (thesis ch.5 treats fully-connected nets);
  every trainable parameter must belong to an nn.Linear or nn.Conv2d (groups=1) layer, other
  parameters (BatchNorm, LayerNorm, Embedding, ...) raise a ValueError, and the model must
  treat samples independently (BatchNorm in training mode does not).
* Losses: nn.MSELoss (H_i = 2κI, (5.6)), nn.CrossEntropyLoss on logits (H_i =
  κ(diag p − ppᵀ), (5.7)), nn.BCEWithLogitsLoss (κ diag σ(1−σ)) and nn.BCELoss
  (κ diag(y/p² + (1−y)/(1−p)²)), with mean or sum reduction; f_i = κ l_i is the per-sample
  loss with L = (1/N1) Σ_i f_i for the loss L as reduced (κ = 1 for cross-entropy with mean
  reduction, the thesis's f_i = ε(ŷ_i, y_i)). ``form="auto"`` takes (5.6) when every H_i is
  invertible (MSE; BCE unless a σ(1−σ) falls below machine precision times the largest) and
  (5.7) otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.hooks import Capture, capture
from curvlab.curvature.layers import KroneckerLayer, find_layers
from curvlab.curvature.per_sample import (
    jacobian_mv,
    jacobian_tmv,
    layer_gram,
    output_jacobian_rows,
    sample_rows,
)
from curvlab.linalg import DecompositionError
from curvlab.linalg.woodbury import WoodburyForm, woodbury_coefficients
from curvlab.objective import Objective, preserved_buffers
from curvlab.optim.levenberg_marquardt import LevenbergMarquardtDamping, check_initial_damping
from curvlab.optim.modelwise import Proposal, SkipStep
from curvlab.optim.validation import check_choice, check_int, check_range

__all__ = ["SMWGN", "SMWNG", "SMWNGBD"]

Curvature = Literal["gn", "ng"]
RatioPoint = Literal["direction", "step"]
Subset = Literal["random", "first"]
FormChoice = Literal["auto", "symmetric", "general"]


class _SubsampledLM(LevenbergMarquardtDamping):
    """Thesis Alg 23 for one curvature (``_curvature``) and block structure.

    The gradient of line 4 is the closure's (``step`` fills ``.grad``); for NG, `evaluate` runs
    it under layer hooks so that it also records the per-sample quantities of D_t.
    """

    _curvature: ClassVar[Curvature]
    _block_diagonal: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1.0,
        tau: float = 1e-3,
        boost: float = 1.01,
        drop: float = 0.99,
        epsilon: float = 0.25,
        curvature_batch_size: int | None = None,
        accept_threshold: float | None = None,
        curvature_subset: Subset = "random",
        ratio_point: RatioPoint = "direction",
        form: FormChoice = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model)!r}")
        defaults = _validated(
            lr=lr,
            damping=damping,
            tau=tau,
            boost=boost,
            drop=drop,
            epsilon=epsilon,
            curvature_batch_size=curvature_batch_size,
            accept_threshold=accept_threshold,
        )
        self.curvature_subset = check_choice(
            "curvature_subset", curvature_subset, ("random", "first")
        )
        self.ratio_point = check_choice("ratio_point", ratio_point, ("direction", "step"))
        self.form = check_choice("form", form, ("auto", "symmetric", "general"))
        super().__init__(model, defaults)
        self.model = model
        owned = {id(p) for p in self.params}
        self.layers: dict[str, KroneckerLayer] = {
            name: layer
            for name, layer in find_layers(model).items()
            if any(id(p) in owned for p in layer.params)
        }
        covered = {id(p) for layer in self.layers.values() for p in layer.params}
        outside = sorted(
            {
                type(m).__name__
                for m in model.modules()
                for p in m.parameters(recurse=False)
                if id(p) in owned and id(p) not in covered
            }
        )
        if outside:
            raise ValueError(
                f"model: {type(self).__name__} needs every trainable parameter in an nn.Linear "
                f"or nn.Conv2d (groups=1) layer (per-sample Jacobians by layer backpropagation, "
                f"thesis §5.4); found trainable parameters in {', '.join(outside)}"
            )
        device = self.params[0].device
        self._generator = self.new_sampler(device)
        self._gradient_capture: Capture | None = None

    # -------------------------------------------------------------------- hooks
    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        _validated(**{k: group[k] for k in _HYPERPARAMETERS})

    def end_step(self) -> None:
        self._gradient_capture = None  # the records of this step's gradient pass

    def check_data_parallel(self) -> None:
        """The N2×N2 Gram matrix couples the examples of every rank: not data-parallel."""
        raise ValueError(
            f"{type(self).__name__}: the Sherman-Morrison-Woodbury solve needs the N2×N2 Gram "
            "matrix of per-example Jacobians across all ranks (an all-gather of per-example "
            "quantities), which curvlab does not implement; train it in one process"
        )

    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Line 4: loss and g_t on S1 by the closure. NG: the same pass also records what D_t
        needs (§5.3.3: "all the vectors needed have been computed when doing backpropagation
        for the gradient"); the hooks are gone before the trial forward pass."""
        self._gradient_capture = None
        if self._curvature != "ng":
            return super().evaluate(objective)
        with capture(self.layers) as cap:
            loss, grad = super().evaluate(objective)
        self._gradient_capture = cap
        return loss, grad

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Alg 23 lines 3–6: S2, D_t, p_t = −G_t⁻¹g_t, and the model reduction of ρ_t."""
        group = self.param_groups[0]
        if objective.model is not self.model:
            raise ValueError("objective: its model is not the model this optimizer was built on")
        n1 = objective.batch_size
        n2 = n1 if group["curvature_batch_size"] is None else group["curvature_batch_size"]
        if n2 > n1:
            raise ValueError(
                f"curvature_batch_size: N2 = {n2} exceeds the objective's batch size N1 = {n1} "
                "(thesis Alg 23 needs S2 ⊆ S1)"
            )
        lam = self.damping  # λ_t = λ_LM + τ
        scale = 1.0 / n2  # the 1/N2 of (5.6)
        kappa = _per_sample_factor(objective)
        index = self._curvature_subset(objective, n1, n2)  # line 3: S2 ⊆ S1

        # Per-sample Jacobian rows of S2 (NG: ∇f_i; GN: ∂ŷ_ij/∂θ) in factored form.
        H: Tensor | None = None
        form: WoodburyForm = "symmetric"
        if self._curvature == "ng":
            cap = self._gradient_capture
            assert cap is not None
            # The gradient pass recorded ∂L/∂h_i = c ∂l_i/∂h_i; ∂f_i/∂h_i = κ ∂l_i/∂h_i, κ = N1 c.
            captured = sample_rows(cap, self.layers, ["loss"], n1)
            rows = {name: r.select(index, scale=float(n1)) for name, r in captured.items()}
        else:
            inputs = objective.inputs if index is None else objective.inputs[index]
            # The forward pass in the objective's precision (mixed precision: its autocast
            # state); rows are recorded, and H formed, in the parameters' dtype. With dropout
            # it replays the masks of the gradient pass (`step_randomness`; S2 = S1: the same
            # network as g_t, S2 ⊂ S1: masks of S2's shape from the same RNG state).
            with preserved_buffers(self.model), objective.autocast(), self.step_randomness():
                rows, outputs = output_jacobian_rows(self.layers, self.model, inputs)
            targets = objective.targets
            if index is not None and targets.dim() > 0:
                targets = targets[index]
            H, form = self._loss_hessian(objective, outputs.to(grad.dtype), targets, kappa)

        # Layer gradient matrices G_l = [∇W, ∇b] of g_t (line 4, from the base's pass).
        flat = dict(zip(map(id, self.params), self.unflatten(grad), strict=True))
        grads = {
            name: layer.grad_matrix(flat[id(layer.weight)], _bias_of(layer, flat))
            for name, layer in self.layers.items()
        }
        used = [name for name in self.layers if name in rows]

        # Line 5: D_t from JJᵀ, then w = D⁻¹ J g (5.6) or H D⁻¹ J g (5.7).
        grams = [layer_gram(rows[n]) for n in used]
        Jg = [jacobian_mv(rows[n], grads[n]).reshape(-1) for n in used]
        if used:
            if self._block_diagonal:
                K, a = torch.stack(grams), torch.stack(Jg)  # one system per layer (§5.8)
            else:
                K, a = sum(grams[1:], grams[0]), sum(Jg[1:], Jg[0])
            if not (bool(torch.isfinite(K).all()) and bool(torch.isfinite(a).all())):
                raise SkipStep("non-finite Gram matrix or J·g")
            try:
                w, solved = woodbury_coefficients(K, a, lam, scale=scale, loss_hessian=H, form=form)
            except DecompositionError as err:
                raise SkipStep(f"Woodbury solve failed: {err}") from err
            attempts = solved.attempts
        k = rows[used[0]].rows_per_sample if used else 1

        # p_t = −(1/λ)(g − (1/N2) Jᵀw) per layer; Jᵀw backpropagates Σ_i w_iᵀŷ_i (§5.3.2).
        direction: dict[int, Tensor] = {}
        for name, layer in self.layers.items():
            P = grads[name]
            if name in rows:
                block = used.index(name)
                coeffs = (w[block] if self._block_diagonal else w).reshape(-1, k)
                P = P - scale * jacobian_tmv(rows[name], coeffs)
            for param, d in zip(layer.params, layer.split(P), strict=True):
                direction[id(param)] = d.reshape(-1) / -lam
        p = torch.cat([direction[id(q)] for q in self.params])

        # pᵀB p = (1/N2)(Jp)ᵀH(Jp), Jp = −(Jg − (1/N2)K w)/λ (per block for NG-BD).
        curvature = 0.0
        if used:
            Jp = (a - scale * (K @ w.unsqueeze(-1)).squeeze(-1)) / -lam
            HJp = Jp if H is None else torch.einsum("bkl,bl->bk", H, Jp.reshape(H.shape[:2]))
            curvature = scale * float((Jp * HJp.reshape(Jp.shape)).sum())
        gp = float(grad @ p)

        # Line 6: ρ_t (5.5) on S1 at the trial point c·p (c = 1 literal, c = α at the step).
        alpha = float(group["lr"])
        c = 1.0 if self.ratio_point == "direction" else alpha
        predicted = -c * gp - 0.5 * c * c * curvature  # m_t(0) − m_t(c p)
        info = {
            "predicted_reduction": predicted,
            "damping": lam,
            "curvature_batch_size": n2,
            "woodbury_form": "5.6" if H is None or form == "symmetric" else "5.7",
        }
        if used:
            info["decomposition_attempts"] = attempts
        # Line 7: θ + α p_t; line 6: the base's trial loss f(θ_t + c p_t) on S1 gives ρ_t.
        return Proposal(alpha * p, predicted, info, trial_step=c * p)

    # ---------------------------------------------------------------- helpers
    def _curvature_subset(self, objective: Objective, n1: int, n2: int) -> Tensor | None:
        """Alg 23 line 3: the indices of S2 ⊆ S1, |S2| = N2 (None: all of S1)."""
        if n2 == n1:
            return None
        if self.curvature_subset == "first":
            return torch.arange(n2, device=objective.inputs.device)
        index = torch.randperm(n1, generator=self._generator, device=self._generator.device)
        return index[:n2].to(objective.inputs.device)

    def _loss_hessian(
        self, objective: Objective, outputs: Tensor, targets: Tensor, kappa: float
    ) -> tuple[Tensor, WoodburyForm]:
        """H_i = ∂²f_i/∂ŷ_i² per sample of S2 as blocks (N2, m_L, m_L), and (5.6) or (5.7)."""
        kind = objective.likelihood
        n = outputs.shape[0]
        out = outputs.reshape(n, -1)
        q = out.shape[1]
        eye = torch.eye(q, dtype=out.dtype, device=out.device)
        invertible = True
        if kind == "gaussian":  # l = ‖ŷ − y‖², ∇²l = 2I
            H = (2.0 * kappa) * eye.expand(n, q, q)
        elif kind == "categorical":  # softmax + CE on logits: diag(p) − ppᵀ, singular
            if outputs.dim() != 2:
                raise ValueError("loss_fn: CrossEntropyLoss needs outputs of shape (N, classes)")
            prob = torch.softmax(out, dim=1)
            H = kappa * (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :])
            invertible = False
        else:
            if kind == "bernoulli_logits":
                s = torch.sigmoid(out)
                h = s * (1.0 - s)
            else:  # BCE on probabilities p: y/p² + (1−y)/(1−p)²
                y = targets.reshape(n, -1).to(out.dtype)
                h = y / out.square() + (1.0 - y) / (1.0 - out).square()
            H = kappa * torch.diag_embed(h)
            top = float(h.max())
            invertible = bool(float(h.min()) > torch.finfo(h.dtype).eps * top > 0.0)
        if self.form == "symmetric" and not invertible:
            raise ValueError(
                "form: 'symmetric' (thesis 5.6) needs invertible loss Hessians; this loss's "
                "are singular, use 'general' (5.7) or 'auto'"
            )
        form: WoodburyForm
        if self.form == "auto":
            form = "symmetric" if invertible else "general"
        else:
            form = "symmetric" if self.form == "symmetric" else "general"
        return H, form


def _bias_of(layer: KroneckerLayer, flat: dict[int, Tensor]) -> Tensor | None:
    return None if layer.bias is None else flat[id(layer.bias)]


def _per_sample_factor(objective: Objective) -> float:
    """κ with f_i = κ l_i and L = (1/N1) Σ_i f_i (thesis 5.1), from L = c Σ_i l_i: κ = N1 c."""
    if objective.likelihood is None:
        raise ValueError(
            f"loss_fn: {type(objective.loss_fn).__name__} is not supported; SMW needs "
            "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss or nn.BCELoss"
        )
    assert objective.outputs is not None  # set by the gradient pass of the base's step
    return objective.batch_size * objective.loss_scale(objective.outputs)


class SMWGN(_SubsampledLM):
    """SMW-GN: subsampled Gauss-Newton with LM damping, Woodbury-inverted (thesis Alg 23).

    Args:
        model: the network; every trainable parameter in nn.Linear / nn.Conv2d layers.
        lr: α (thesis: 0.1 MNIST, 0.01 CIFAR-10, 0.05 webspam).
        damping: initial λ_LM > 0 (thesis 1); afterwards λ_LM evolves in ``state``.
        tau: τ > 0 added to λ_LM (thesis 0.001).
        boost: λ_LM factor when ρ < ε (> 1; thesis 1.01).
        drop: λ_LM factor when ρ > 1 − ε (in (0, 1); thesis 0.99).
        epsilon: ε in (0, 1/2) (thesis 1/4).
        curvature_batch_size: N2 ≤ N1, or None for N2 = N1 (thesis N2 = N1/2).
        accept_threshold: None (Alg 23: always step) or η in (0, ε) (Theorem 6).
        curvature_subset: ``"random"`` S2 ⊆ S1 (Alg 23) or ``"first"`` N2 rows.
        ratio_point: ``"direction"`` (ρ at p_t, literal 5.5) or ``"step"`` (at α p_t).
        form: ``"auto"``, ``"symmetric"`` (5.6) or ``"general"`` (5.7).

    ``step`` takes a `curvlab.Objective`; ``last_step_info`` has ρ, the trial loss, the model
    reduction, λ used (``damping``) and λ next (``next_damping``), or the reason of a skip.
    """

    _curvature = "gn"


class SMWNG(_SubsampledLM):
    """SMW-NG: subsampled empirical-Fisher natural gradient with LM damping (thesis Alg 23).

    Arguments as `SMWGN` (``form`` is irrelevant: H = I).
    """

    _curvature = "ng"


class SMWNGBD(_SubsampledLM):
    """SMW-NG-BD: SMW-NG restricted to the Fisher's layer blocks, one SMW solve per layer
    (thesis §5.8). Arguments as `SMWNG`."""

    _curvature = "ng"
    _block_diagonal = True


_HYPERPARAMETERS = (
    "lr",
    "damping",
    "tau",
    "boost",
    "drop",
    "epsilon",
    "curvature_batch_size",
    "accept_threshold",
)


def _validated(
    *,
    lr: float,
    damping: float,
    tau: float,
    boost: float,
    drop: float,
    epsilon: float,
    curvature_batch_size: int | None,
    accept_threshold: float | None,
) -> dict[str, Any]:
    eps = check_range("epsilon", epsilon, 0.0, 0.5, low_open=True, high_open=True)
    return {
        "lr": check_range("lr", lr, 0.0),
        "damping": check_initial_damping(damping),
        "tau": check_range("tau", tau, 0.0, low_open=True),
        "boost": check_range("boost", boost, 1.0, low_open=True),
        "drop": check_range("drop", drop, 0.0, 1.0, low_open=True, high_open=True),
        "epsilon": eps,
        "curvature_batch_size": None
        if curvature_batch_size is None
        else check_int("curvature_batch_size", curvature_batch_size, 1),
        "accept_threshold": None
        if accept_threshold is None
        else check_range(
            "accept_threshold", accept_threshold, 0.0, eps, low_open=True, high_open=True
        ),
    }
