"""Curvature-vector products on a `curvlab.Objective`: Hessian, GGN, Fisher, finite-difference.

A `CurvatureOperator` is built once per optimizer step at the current parameters θ (the
optimizer's parameters, flattened in order) and then applied to many vectors
(CG / MINRES / Lanczos iterations). Building it does the forward pass and keeps what the
products need; each product then costs only the extra passes of its kind:

Source labels ([P0], [P3], [C-AN], [C-EDF], [C-TR]) are defined in docs/deviations.md.

Exact Hessian, Pearlmutter (1994), as the adaptive-norms code ([C-AN]
``HessianVectorSolver.apply_Hv``) computes it::

    build:  1  g = ∇L(θ) with create_graph            (one forward + one backward, graph kept)
    matvec: 2  Hv = ∇_θ ⟨g, v⟩                         (one backward through the backward graph)

GGN via R-op / L-op ([P0] §3 and App. A; [C-EDF] ``custom_grad.py``)::

    build:  1  z = f(θ)                                (forward, graph kept)
            2  u = ∂L/∂z                               (backward through the loss only)
            3  g = Jᵀ u  with create_graph             (the gradient ∇L, graph kept)
    matvec: 4  r = J v = ∂⟨g, v⟩/∂u                    (R-op by the double-vjp trick)
            5  q = H_L r                               (analytic, `output_curvature`)
            6  Gv = Jᵀ q                               (L-op on the kept forward graph)

Fisher: the same with H_L replaced by the Fisher of the predictive distribution (equal to H_L
for cross-entropy, BCE-with-logits and MSE, the canonical links; different for `nn.BCELoss`
on probabilities: see `curvlab.autodiff.output_curvature`).

Finite-difference Hessian ([P3] §4.2, [C-TR] ``Hv_approx2``)::

    build:  1  g₀ = ∇L(θ)
    matvec: 2  Hv ≈ (∇L(θ + εv) − g₀) / ε              (one gradient, same batch, same masks)

Why these passes (matrix-product FLOPs counted with `torch.utils.flop_counter.FlopCounterMode`
on the thesis autoencoder 784-1000-500-250-30-250-500-1000-784, BCE-with-logits, in units of
one gradient = forward + backward; wall-clock ratios: `curvlab.bench.cost.products`):

* GGN: the double-vjp R-op on the kept graph costs 1.27 per product (build 1.0). The
  `torch.func` alternatives recompute or re-trace the forward: ``jvp`` + a cached ``vjp_fn``
  costs 1.73 per product, and ``torch.func.linearize`` measured the same 1.73 (its
  constant folding does not remove the primal work here) plus a 1.84 build.
* Hessian: reverse-over-reverse on the kept gradient graph costs 1.80 per product (build 1.0);
  forward-over-reverse ``jvp(grad(L))`` costs 3.0 per product, 2.63 under ``linearize``.
* Finite differences: 1.0 per product (build 1.0).

Every kind also returns the loss and the gradient at θ from its build
(`CurvatureOperator.loss`, `CurvatureOperator.gradient`), so a step needs no separate backward.

Semantics shared by all kinds:

* The model is evaluated functionally (`curvlab.autodiff.functional.ParameterView`): the
  model's other parameters are held fixed, a train-mode BatchNorm uses batch statistics (train
  semantics) and its running statistics are never changed, ``.grad`` is never touched, and the
  objective's ``outputs`` / ``loss`` attributes are left alone.
* θ is copied at build time: the operator is the curvature at the parameters it was built at,
  even if the optimizer then changes them in place.
* Every forward pass of an operator replays the global RNG state of the moment it was built
  (the same dropout masks in every pass) and leaves the global RNG as it was.
* The operator holds its linearisation (the autograd graphs of the forward and of the
  gradient) until it is dropped: keep it for one step only. The vectors it returns carry no
  graph, and no reference cycle keeps the graphs alive once the operator is gone.
* Mixed precision: forward passes run under the objective's recorded autocast state
  (`curvlab.Objective.autocast`), except those of ``"hessian-fd"``, which run in the
  parameters' dtype (a difference quotient at ε = 1e-5 is all round-off in bfloat16); products
  and gradients are returned in the parameters' dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.autodiff.functional import ParameterView, capture_rng, replayed_rng
from curvlab.autodiff.output_curvature import OutputCurvature, output_curvature
from curvlab.objective import Objective

__all__ = [
    "DEFAULT_FD_EPSILON",
    "KINDS",
    "CurvatureOperator",
    "curvature_operator",
    "fisher_vector_product",
    "flat_gradient",
    "ggn_vector_product",
    "hessian_vector_product",
]

KINDS: tuple[str, ...] = ("hessian", "ggn", "fisher", "hessian-fd")

#: ε of the forward difference: [C-TR] ``Hv_approx2`` uses ``scale = 1e5`` on the unnormalised
#: direction v (the paper only says ε → 0 and reports ≤ 1% relative error).
DEFAULT_FD_EPSILON = 1e-5


class CurvatureOperator(ABC):
    """A symmetric linear operator ``v ↦ (C + damping·I) v`` on flat vectors over ``params``.

    (``"hessian-fd"`` is symmetric up to its O(ε) truncation error.)

    Attributes:
        kind: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"hessian-fd"``.
        dim: the length of the flat parameter vector.
        dtype, device: those of the parameters (and of every vector in and out).
        damping: λ ≥ 0 added as λ·v; read at every product, so it may be changed in between.
        products: the number of matvecs done so far.
        loss: the (detached) loss at the parameters the operator was built at.
        reduce: None, or a function applied in place to every undamped product ``C v``
            before it is returned (a data-parallel run averages products over ranks with it;
            `curvlab.optim.ModelwiseOptimizer.distribute`).
    """

    kind: str

    def __init__(self, view: ParameterView, damping: float, loss: Tensor, grad: Tensor) -> None:
        self.dim: int = view.dim
        self.dtype: torch.dtype = view.dtype
        self.device: torch.device = view.device
        self.damping = damping
        self.products = 0
        self.loss = loss
        self.reduce: Callable[[Tensor], None] | None = None
        self._view = view
        self._gradient = grad

    def gradient(self) -> Tensor:
        """The flat gradient ∇L at the build point (computed while building; no extra pass)."""
        return self._gradient.clone()

    def matvec(self, v: Tensor) -> Tensor:
        """``(C + damping·I) v`` for a flat ``(dim,)`` vector; the result carries no graph.

        Raises:
            ValueError: ``v`` does not have shape ``(dim,)``.
        """
        v = self._view.check_vector(v)
        with torch.enable_grad():
            out = self._apply(v)
        if self.reduce is not None:
            self.reduce(out)
        self.products += 1
        if self.damping != 0.0:
            out = out.add(v, alpha=self.damping)
        return out

    def __call__(self, v: Tensor) -> Tensor:
        """Same as `matvec`."""
        return self.matvec(v)

    def to_dense(self) -> Tensor:
        """The (dim, dim) matrix, one matvec per column (for tests on tiny models)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)

    @abstractmethod
    def _apply(self, v: Tensor) -> Tensor:
        """C v without damping (v flat, detached)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, damping={self.damping}, "
            f"products={self.products})"
        )


def _live(grads: Sequence[Tensor | None]) -> tuple[list[int], list[Tensor]]:
    """Indices and tensors of the gradient pieces that carry a graph (the others are constant)."""
    live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    return [i for i, _ in live], [g for _, g in live]


def _zeros_if_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return ParameterView.flatten_grads(grads, like)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """The passes the Hessian's reverse-over-reverse and the GGN's double-vjp R-op build need a
    double backward, which neither the fused CPU / flash kernels of
    ``F.scaled_dot_product_attention`` nor torch.compile's AOT autograd have: attention runs in
    the math kernel and a compiled model eagerly (the same function of the same parameters)."""
    with sdpa_kernel([SDPBackend.MATH]), torch.compiler.set_stance("force_eager"):
        yield


class _HessianOperator(CurvatureOperator):
    """Pearlmutter's exact HVP, reverse-over-reverse on one kept gradient graph."""

    kind = "hessian"

    def __init__(self, view: ParameterView, damping: float) -> None:
        self._rng = capture_rng(view.device)
        self._values = view.current(clone=True)
        with torch.enable_grad(), replayed_rng(self._rng), twice_differentiable():
            _, loss = view.loss(self._values)
            # build line 1: g = ∇L(θ) with create_graph (module docstring).
            grads = torch.autograd.grad(loss, self._values, create_graph=True, allow_unused=True)
        self._live, self._grads = _live(grads)
        super().__init__(view, damping, loss.detach(), _zeros_if_none(grads, self._values))

    def _apply(self, v: Tensor) -> Tensor:
        if not self._live:  # the gradient does not depend on θ: H = 0
            return torch.zeros_like(v)
        pieces = self._view.unflatten(v)
        # matvec line 2: Hv = ∇_θ ⟨g, v⟩, the gradient graph retained for the next product.
        hv = torch.autograd.grad(
            self._grads,
            self._values,
            grad_outputs=[pieces[i] for i in self._live],
            retain_graph=True,
            allow_unused=True,
        )
        return _zeros_if_none(hv, self._values)


class _GaussNewtonOperator(CurvatureOperator):
    """G v = Jᵀ H_L J v with one kept forward graph and one kept gradient graph."""

    def __init__(self, view: ParameterView, damping: float, kind: Literal["ggn", "fisher"]) -> None:
        self.kind = kind
        objective = view.objective
        self._rng = capture_rng(view.device)
        self._values = view.current(clone=True)
        with torch.enable_grad(), replayed_rng(self._rng), twice_differentiable():
            # line 1: z = f(θ), forward graph kept for the L-op.
            outputs = view.outputs(self._values)
            # line 2: u = ∂L/∂z, a backward through the loss alone (output space).
            loss = objective.loss_from_outputs(outputs, objective.targets)
            u = torch.zeros_like(outputs)
            if outputs.requires_grad:
                (u,) = torch.autograd.grad(loss, outputs, retain_graph=True)
            u = u.detach().requires_grad_(True)
            # line 3: g = Jᵀu = ∇L with create_graph. g is linear in u, so ∂⟨g, v⟩/∂u = J v
            # at any u ([C-EDF] Rop with a dummy w); using u = ∂L/∂z makes g the gradient.
            grads: tuple[Tensor | None, ...] = tuple(None for _ in self._values)
            if outputs.requires_grad:
                grads = torch.autograd.grad(
                    outputs, self._values, grad_outputs=u, create_graph=True, allow_unused=True
                )
        self._outputs = outputs
        self._u = u
        self._live, self._grads = _live(grads)
        # Deviation: [P0]/[C-EDF] take the R-op of F = ∂L/∂z (so J_F v = H_L J v) instead of
        # applying H_L, because the closed forms (CE, BCE, MSE) are exact, cheaper than a second
        # differentiation, and give the Fisher by swapping H_L (line 5).
        # Mixed precision: H_L from outputs in the parameters' dtype (a no-op without autocast).
        self._curvature: OutputCurvature = output_curvature(
            objective, outputs.detach().to(view.dtype), kind
        )
        super().__init__(view, damping, loss.detach(), _zeros_if_none(grads, self._values))

    def _apply(self, v: Tensor) -> Tensor:
        if not self._live:
            return torch.zeros_like(v)
        pieces = self._view.unflatten(v)
        # line 4: r = J v = ∂⟨Jᵀu, v⟩/∂u (double-vjp R-op).
        (r,) = torch.autograd.grad(
            self._grads,
            self._u,
            grad_outputs=[pieces[i] for i in self._live],
            retain_graph=True,
            allow_unused=True,
        )
        if r is None:
            return torch.zeros_like(v)
        # line 5: q = H_L r (or F_L r), in the parameters' dtype.
        q = self._curvature(r.detach().to(self.dtype))
        # line 6: Gv = Jᵀ q (L-op on the forward graph).
        gv = torch.autograd.grad(
            self._outputs, self._values, grad_outputs=q, retain_graph=True, allow_unused=True
        )
        return _zeros_if_none(gv, self._values)


class _FiniteDifferenceHessian(CurvatureOperator):
    """Hv ≈ (∇L(θ + εv) − ∇L(θ)) / ε on the same batch ([P3] §4.2, [C-TR] ``Hv_approx2``)."""

    kind = "hessian-fd"

    def __init__(self, view: ParameterView, damping: float, epsilon: float) -> None:
        self.epsilon = epsilon
        self._rng = capture_rng(view.device)
        self._theta = [t.detach() for t in view.current(clone=True)]
        with replayed_rng(self._rng):
            # line 1: g₀ = ∇L(θ), reused by every product ([C-TR] reuses the step's gradient).
            loss, g0 = view.gradient([t.clone().requires_grad_(True) for t in self._theta])
        super().__init__(view, damping, loss, g0)

    def _apply(self, v: Tensor) -> Tensor:
        pieces = self._view.unflatten(v)
        # [C-TR]: w += v/scale with the unnormalised v; here functionally, θ itself unchanged.
        shifted = [
            (t + self.epsilon * p).requires_grad_(True)
            for t, p in zip(self._theta, pieces, strict=True)
        ]
        # The same batch and, by the replayed RNG, the same dropout masks as g₀.
        with replayed_rng(self._rng):
            _, g1 = self._view.gradient(shifted)
        # line 2: Hv ≈ (g(θ + εv) − g₀) / ε
        return (g1 - self._gradient) / self.epsilon


# --------------------------------------------------------------------------- public functions
def _check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def curvature_operator(
    objective: Objective,
    params: Sequence[Tensor],
    kind: str = "ggn",
    *,
    damping: float = 0.0,
    fd_epsilon: float | None = None,
    update_buffers: bool = False,
) -> CurvatureOperator:
    """Build the curvature operator of ``objective`` at the current values of ``params``.

    Args:
        objective: the mini-batch loss (its model, loss function, inputs and targets).
        params: the optimizer's parameters, in order: a subset of ``objective.model``'s
            parameters; the others are held fixed. Flat vectors concatenate them in this order.
        kind: ``"hessian"`` (exact, Pearlmutter), ``"ggn"`` (Jᵀ H_L J), ``"fisher"`` (Jᵀ F_L J,
            equal to the GGN for cross-entropy, BCE-with-logits and MSE), or ``"hessian-fd"``
            (forward differences of the gradient, [P3] §4.2).
        damping: λ ≥ 0; the operator applies ``(C + λI) v``.
        fd_epsilon: ε > 0 of ``"hessian-fd"`` (default `DEFAULT_FD_EPSILON` = 1e-5, [C-TR]),
            applied to v as given (not normalised); only valid with that kind.
        update_buffers: let the build pass move the model's buffers (BatchNorm running
            statistics) once, as the training pass whose loss and gradient it provides would;
            the products never move them. Default: the model is left untouched.

    Returns:
        A `CurvatureOperator`; reuse it for every product of the step, then drop it (it holds
        the step's autograd graphs).

    Raises:
        ValueError: unknown ``kind``, negative or non-finite ``damping``, invalid
            ``fd_epsilon`` (or given for another kind), invalid ``params``, or ``"fisher"``
            for a loss without a supported likelihood.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    damping = _check_nonnegative("damping", damping)
    if fd_epsilon is not None:
        if kind != "hessian-fd":
            raise ValueError(f"fd_epsilon: only used with kind='hessian-fd', not {kind!r}")
        if _check_nonnegative("fd_epsilon", fd_epsilon) == 0.0:
            raise ValueError(f"fd_epsilon: expected a finite number > 0, got {fd_epsilon!r}")
    # Mixed precision: the finite-difference passes run in the parameters' dtype, because a
    # shift εv (ε = 1e-5) vanishes below bfloat16 / float16 resolution (measured: relative
    # error 1.0 under bf16 autocast); every other kind forwards in the objective's precision.
    view = ParameterView(
        objective, params, autocast=kind != "hessian-fd", commit_buffers=update_buffers
    )
    if kind == "hessian":
        return _HessianOperator(view, damping)
    if kind == "hessian-fd":
        eps = DEFAULT_FD_EPSILON if fd_epsilon is None else float(fd_epsilon)
        return _FiniteDifferenceHessian(view, damping, eps)
    return _GaussNewtonOperator(view, damping, "fisher" if kind == "fisher" else "ggn")


def hessian_vector_product(objective: Objective, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """One exact product H v (Pearlmutter); build a `curvature_operator` for several."""
    return curvature_operator(objective, params, "hessian").matvec(v)


def ggn_vector_product(objective: Objective, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """One product G v = Jᵀ H_L J v; build a `curvature_operator` for several."""
    return curvature_operator(objective, params, "ggn").matvec(v)


def fisher_vector_product(objective: Objective, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """One product F v = Jᵀ F_L J v (true Fisher, exact expectation over the model's labels)."""
    return curvature_operator(objective, params, "fisher").matvec(v)


def flat_gradient(objective: Objective, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(loss, flat ∇L)`` over ``params`` on the objective's batch, both detached.

    One forward and one backward, evaluated functionally: ``.grad`` is not touched, BatchNorm
    running statistics do not move, no graph is kept. Random ops draw from the global RNG as
    an ordinary forward pass does.
    """
    view = ParameterView(objective, params)
    return view.gradient(view.current(clone=False))
