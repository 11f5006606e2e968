r"""EDF: Exponentially Decaying Flows ([P0], an ICLR 2019 submission), EDF-G and EDF-H.

Source labels ([P0] the paper, [C-EDF] its released code, [R] a reconstruction) are defined in
docs/deviations.md.

The damped flow (eq. 24) ``(A + λI) dw/dt = −∇L`` with ``A = G = JᵀH_L J`` (EDF-G, eq. 21) or
the Hessian ``A = H`` (EDF-H, eq. 20), ``λ = a‖∇L‖^b``, is integrated by explicit Euler with
step η = ``lr`` and χ = −1, the inverse replaced by k steps of MINRES on the Krylov space
``K_k(A + λI, g)`` (eq. 22; App. A). Paper Algorithm 1 (parameter space, k = ``order``;
its MINRES loop is `curvlab.solvers.minres`, with the typo "u = u + λg" read as λ·v1)::

     1  g = ∇L(w_i) ;  s = ‖g‖ ;  λ = a s^b
     2  β = s, ξ = β, γ0 = γ1 = 1, σ0 = σ1 = 0, v = v0 = 0, v1 = g, q0 = q1 = 0
     3  for j = 1 .. k:                         # MINRES on (A + λI) v = g
     4      v1 = v1/β ;  u = A v1 (R-op then L-op for G; Pearlmutter for H) ;  u = u + λ v1
     5      α = ⟨v1, u⟩ ; u = u − α v1 − β v0 ; v0 = v1 ; v1 = u
     6      δ = γ1α − γ0σ1β ; ρ2 = σ1α + γ0γ1β ; ρ3 = σ0β ; β = ‖v1‖ ; ρ1 = √(δ² + β²)
     7      γ0 = γ1 ; γ1 = δ/ρ1 ; σ0 = σ1 ; σ1 = β/ρ1
     8      tmp = q0 ; q0 = q1 ; q1 = (v0 − ρ2 q0 − ρ3 tmp)/ρ1 ; v = v + γ1 ξ q1 ; ξ = −σ1 ξ
     9  w_{i+1} = w_i − η v

Algorithm 2 (k = 1, eq. 23; used when ``order=1``)::

     1  g = ∇L ; λ = a‖g‖^b
     2  u = A g + λ g
     3  c = ⟨g, u⟩ / ⟨u, u⟩ ;  v = c g
     4  w_{i+1} = w_i − η v

For EDF-H, c < 0 when gᵀ(H + λI)g < 0: the step then goes uphill. The paper does not discuss
it; it is not clipped, and ``last_step_info["coefficient"]`` reports c.

Acceleration of the second-order flow (eq. 25) ``G ẅ + κ G ẇ + ∇L = 0``, with the EDF
direction ``d(y) = P_k(A(y) + λ(y)I, ∇L(y))`` of lines 1–8 at the point y the parameters hold:

* ``acceleration="w1"`` (κ = α constant, "similar to the momentum gradient descent method";
  α = 0.9 in §6.2). Discretised as the released code [C-EDF] does::

      m ← α m + (1 − α) d(w) ;  w ← w − η m          (m₀ = 0, no bias correction)

* ``acceleration="w2"`` (κ = α/t, "discretized in a similar way as Su et al. (2014), analogous
  to Nesterov's acceleration"). A reconstruction, [R]: the paper gives neither the scheme nor
  α, so this is Su, Boyd & Candès's Nesterov scheme with α = 3 (the standard case), r = α, s = η::

      x_t = y_{t−1} − s d(y_{t−1}) ;  y_t = x_t + (t − 1)/(t + r − 1) · (x_t − x_{t−1})

  d is evaluated at the look-ahead point y (the parameters hold y). Written with the velocity
  u_t = (x_t − x_{t−1})/s, as kept in ``state`` (c_t = (t − 1)/(t + r − 1), u₀ = 0)::

      u_t = c_{t−1} u_{t−1} − d(y_{t−1}) ;  y_t = y_{t−1} + s (c_t u_t − d(y_{t−1}))

  which is the scheme above exactly for a constant s; under an LR schedule the velocity is in
  direction units (as torch.optim.SGD keeps its buffer), so ``lr = 0`` freezes the parameters.
  t counts optimizer steps and is not restarted when the LR changes unless
  ``restart_on_lr_change=True`` (the paper does not say).
* ``acceleration="none"``: the plain Euler step of Algorithms 1/2.

Released-code variant ``space="output"`` (EDF-G only; [C-EDF] ``train_edf``): the
MINRES recurrence runs in output space R^{n·C} on ``(H_L J Jᵀ + λI) x = ∂L/∂φ`` and maps back
with ``d = Jᵀ x`` (H_L and ∂L/∂φ of the loss as reduced, e.g. with the 1/n of a batch mean; the
code's unscaled F with its ``x/n`` gives the same d because MINRES is linear in its right-hand
side). By the push-through identity its exact solution equals the parameter-space one; its
k-step iterates differ, and for cross-entropy H_L JJᵀ is not symmetric, so the recurrence is
then a heuristic (as in the code). The code hard-codes a = b = 1 and always applies W1 with
α = 0.9; here those stay separate choices.

Deviations and conventions:

* λ uses ‖g‖ of the loss as reduced by ``loss_fn`` (eq. 27 and the code: the mean loss); the GGN
  and Hessian products use the same scaling (`curvlab.autodiff.curvature_operator`).
* The MINRES guards of `curvlab.solvers.minres` (invariant Krylov space, inconsistent singular
  systems: status ``"breakdown"`` with the least-squares iterate) are not in the paper.
* Alg 2 with ⟨u, u⟩ = 0: g = 0 gives a zero step (status ``"converged"``); g ≠ 0 with
  (A + λI)g = 0 (singular, undamped) gives a zero step with status ``"breakdown"``.
* A non-finite product or solution skips the step (parameters and momentum untouched,
  ``last_step_info["reason"]``), as does a non-finite loss or gradient (the base's rule).
* Cost: the loss and g of line 1 come from the build of the step's operator (`EDF.evaluate`;
  the GGN / Hessian operator, or the output-space one with g = Jᵀ ∂L/∂φ), so a step is one
  gradient + k products and ``.grad`` is not filled. The operator's passes are functional (the
  global RNG not advanced; BatchNorm running statistics move only in the parameter-space
  build, once per step, as in a training pass); for a model whose training pass draws random
  numbers (`curvlab.optim.modelwise.has_random_forward`: dropout), and for the output-space
  operator of a model with running statistics (`has_stateful_forward`), the ordinary training
  pass (the closure) gives loss and g, and the operator is built after it on the same batch
  with the closure's dropout masks (`ModelwiseOptimizer.step_randomness`): one gradient more. The
  operator is dropped at the end of ``step``: no autograd graph outlives a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.autodiff import (
    CurvatureOperator,
    ParameterView,
    output_curvature,
)
from curvlab.autodiff.functional import capture_rng, replayed_rng
from curvlab.objective import Objective
from curvlab.optim.modelwise import (
    ModelwiseOptimizer,
    Proposal,
    SkipStep,
    has_random_forward,
    has_stateful_forward,
)
from curvlab.optim.validation import check_choice, check_int, check_range
from curvlab.solvers import SolverResult, minres
from curvlab.solvers.result import BREAKDOWN, CONVERGED, MAX_ITERATIONS, NON_FINITE, Matvec

__all__ = ["EDF", "edf_damping", "edf_first_order_direction"]

Kind = Literal["ggn", "hessian"]
Acceleration = Literal["none", "w1", "w2"]
Space = Literal["parameter", "output"]

#: α of W1 (paper §6.2, [C-EDF]) and of W2 ([R]: Nesterov's r = 3).
DEFAULT_ALPHA = {"w1": 0.9, "w2": 3.0}


# --------------------------------------------------------------------------- pure functions
def edf_damping(grad_norm: float, scale: float, power: float) -> float:
    """λ = a‖g‖^b (eq. 24; Alg 1 line 1): ``scale`` a ≥ 0, ``power`` b ≥ 0."""
    return float(scale) * float(grad_norm) ** float(power)


def edf_first_order_direction(matvec: Matvec, g: Tensor, shift: float = 0.0) -> SolverResult:
    """Paper Algorithm 2 (eq. 23): v = c g with c = ⟨g, u⟩/⟨u, u⟩, u = (A + shift·I) g.

    The one-step MINRES iterate: c minimises ‖(A + λI)(c g) − g‖. ``residual_norm`` is that
    minimum, ``info["coefficient"]`` is c (negative when gᵀ(A + λI)g < 0, e.g. EDF-H).
    """
    g_norm = float(torch.linalg.vector_norm(g))
    if not math.isfinite(g_norm):
        return _zero(g, NON_FINITE, math.inf, 0, math.nan)
    if g_norm == 0.0:
        return _zero(g, CONVERGED, 0.0, 0, 0.0)
    u = matvec(g)  # Alg 2 line 2: R-op, L-op (or the HVP) ...
    if shift != 0.0:
        u = u + shift * g  # ... then u = u + λ g
    gu, uu = float(g @ u), float(u @ u)
    if not (math.isfinite(gu) and math.isfinite(uu)):
        return _zero(g, NON_FINITE, math.inf, 1, math.nan)
    if uu == 0.0:
        # Deviation: Alg 2 divides by ⟨u, u⟩ = 0 here ((A + λI) g = 0, singular and undamped);
        # a zero step with status "breakdown" because no multiple of g reduces the residual.
        return _zero(g, BREAKDOWN, g_norm, 1, 0.0)
    c = gu / uu  # Alg 2 line 3
    residual = math.sqrt(max(g_norm**2 - gu * gu / uu, 0.0))  # ‖g − c u‖
    return SolverResult(
        solution=c * g,
        iterations=1,
        residual_norm=residual,
        status=CONVERGED if residual == 0.0 else MAX_ITERATIONS,
        info={"matvecs": 1, "coefficient": c},
    )


def _zero(g: Tensor, status: str, residual: float, matvecs: int, c: float) -> SolverResult:
    return SolverResult(
        solution=torch.zeros_like(g),
        iterations=matvecs,
        residual_norm=residual,
        status=status,
        info={"matvecs": matvecs, "coefficient": c},
    )


# --------------------------------------------------------------------------- output space
class _OutputSpaceOperator:
    """The released code's operator V ↦ H_L J Jᵀ V on output-space vectors ([C-EDF]).

    Built once per step at the current parameters: one forward pass with the graph kept, the
    output gradient ∂L/∂φ, and Jᵀw with ``create_graph`` for the R-op by the double-vjp trick
    (as [C-EDF] ``custom_grad.Rop``). ``products`` counts applications (one L-op + one R-op).
    ``loss`` is the loss of that forward pass and `gradient` its gradient Jᵀ ∂L/∂φ.
    """

    def __init__(self, objective: Objective, params: Sequence[Tensor]) -> None:
        view = ParameterView(objective, params)
        self._view = view
        self._rng = capture_rng(view.device)
        self._values = view.current(clone=True)
        with torch.enable_grad(), replayed_rng(self._rng):
            outputs = view.outputs(self._values)
            loss = objective.loss_from_outputs(outputs, objective.targets)
            rhs = torch.zeros_like(outputs)
            if outputs.requires_grad:
                (rhs,) = torch.autograd.grad(loss, outputs, retain_graph=True)
            dummy = torch.zeros_like(outputs).requires_grad_(True)
            jt_dummy: tuple[Tensor | None, ...] = tuple(None for _ in self._values)
            if outputs.requires_grad:
                jt_dummy = torch.autograd.grad(
                    outputs, self._values, grad_outputs=dummy, create_graph=True, allow_unused=True
                )
        self._outputs = outputs
        self._dummy = dummy
        live = [(i, t) for i, t in enumerate(jt_dummy) if t is not None and t.requires_grad]
        self._live = [i for i, _ in live]
        self._jt_dummy: list[Tensor] = [t for _, t in live]
        # Mixed precision: output-space vectors and H_L in the parameters' dtype (a no-op
        # without autocast), so MINRES never runs in bfloat16 / float16.
        self._curvature = output_curvature(objective, outputs.detach().to(view.dtype), "ggn")
        #: ∂L/∂φ, flattened: the right-hand side of the output-space system.
        self.rhs = rhs.detach().to(view.dtype).reshape(-1)
        self.loss = loss.detach()
        self.products = 0

    def gradient(self) -> Tensor:
        """∇L = Jᵀ ∂L/∂φ at the build point (one L-op on the kept forward graph)."""
        return self.transpose_jacobian(self.rhs)

    def transpose_jacobian(self, x: Tensor) -> Tensor:
        """Jᵀ x (L-op) for a flat output-space vector x, as a flat parameter vector."""
        if not self._outputs.requires_grad:
            return torch.zeros(self._view.dim, dtype=self._view.dtype, device=self._view.device)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self._outputs,
                self._values,
                grad_outputs=x.view_as(self._outputs),
                retain_graph=True,
                allow_unused=True,
            )
        return ParameterView.flatten_grads(grads, self._values)

    def jacobian(self, v: Tensor) -> Tensor:
        """J v (R-op, ∂⟨Jᵀw, v⟩/∂w) for a flat parameter vector v, flattened."""
        if not self._live:
            return torch.zeros_like(self.rhs)
        pieces = self._view.unflatten(v)
        with torch.enable_grad():
            (r,) = torch.autograd.grad(
                self._jt_dummy,
                self._dummy,
                grad_outputs=[pieces[i] for i in self._live],
                retain_graph=True,
                allow_unused=True,
            )
        if r is None:
            return torch.zeros_like(self.rhs)
        return r.detach().to(self.rhs.dtype).reshape(-1)  # mixed precision: upcast

    def matvec(self, x: Tensor) -> Tensor:
        """H_L J Jᵀ x ([C-EDF]: U = J_F(Jᵀ V1), J_F = H_L J)."""
        self.products += 1
        r = self.jacobian(self.transpose_jacobian(x))
        return self._curvature(r.view_as(self._outputs)).reshape(-1)


# --------------------------------------------------------------------------- optimizer
class EDF(ModelwiseOptimizer):
    """EDF-G / EDF-H with k-step MINRES (paper Alg 1), the k = 1 closed form (Alg 2), W1 / W2.

    Args:
        model: the network (or an iterable of its parameters).
        lr: the Euler step η (paper §6.2 grid: 10 values in [0.1, 2.0]; 0.5 and 0.75 best,
            reused in §6.3; 1.0 in the full-batch §6.1).
        order: the Krylov order k = MINRES iterations (paper: 1 or 2 in the ResNet runs,
            1…30 in §6.1; the code's ``imax = 2``). ``order=1`` uses the closed form (Alg 2).
        damping_scale: a ≥ 0 of λ = a‖g‖^b (paper a = 1; 0 = undamped, as in §6.1).
        damping_power: b ≥ 0 of λ = a‖g‖^b (paper b = 1).
        kind: ``"ggn"`` (EDF-G, eq. 21) or ``"hessian"`` (EDF-H, eq. 20).
        acceleration: ``"w1"`` (κ = α, the §6.2 runs and the code), ``"w2"`` (κ = α/t, [R]
            Nesterov / Su–Boyd–Candès reconstruction, §6.1) or ``"none"``.
        alpha: α of W1 in [0, 1) (default 0.9) or of W2 > 0 (default 3); None picks the
            default, and must stay None with ``acceleration="none"``.
        space: ``"parameter"`` (paper Alg 1) or ``"output"`` (the released code's MINRES in
            output space, EDF-G only; [C-EDF]).
        restart_on_lr_change: W2 only: restart t and the velocity when ``lr`` changes.

    ``step`` takes a `curvlab.Objective`. ``last_step_info`` has λ (``damping``), the solver's
    ``solver_status`` / ``solver_iterations`` / ``residual_norm``, ``matvecs``, Alg 2's
    ``coefficient`` (order 1), ``accepted`` (always True: EDF has no model test), ``rho`` (NaN:
    not defined), or the reason of a skip. Loss and gradient come from the build of the step's
    curvature operator (`evaluate`), so ``step`` does not fill ``.grad`` (it does for a model
    with BatchNorm or dropout, see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module | Any,
        lr: float = 0.5,
        order: int = 2,
        damping_scale: float = 1.0,
        damping_power: float = 1.0,
        kind: Kind = "ggn",
        acceleration: Acceleration = "w1",
        alpha: float | None = None,
        space: Space = "parameter",
        restart_on_lr_change: bool = False,
    ) -> None:
        self.kind = check_choice("kind", kind, ("ggn", "hessian"))
        self.acceleration = check_choice("acceleration", acceleration, ("none", "w1", "w2"))
        self.space = check_choice("space", space, ("parameter", "output"))
        if self.space == "output" and self.kind != "ggn":
            raise ValueError(
                "space: the released code's output-space MINRES exists for EDF-G only "
                "(kind='ggn'), not for the Hessian"
            )
        if not isinstance(restart_on_lr_change, bool):
            raise ValueError(f"restart_on_lr_change: expected a bool, got {restart_on_lr_change!r}")
        self.restart_on_lr_change = restart_on_lr_change
        if alpha is None and self.acceleration != "none":
            alpha = DEFAULT_ALPHA[self.acceleration]
        defaults = {
            "lr": lr,
            "order": order,
            "damping_scale": damping_scale,
            "damping_power": damping_power,
            "alpha": alpha,
        }
        self._validate(defaults)
        super().__init__(model, defaults)
        self._pending: Callable[[], None] | None = None
        self._operator: CurvatureOperator | _OutputSpaceOperator | None = None

    # -------------------------------------------------------------------- hooks
    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_int("order", group["order"], 1)
        check_range("damping_scale", group["damping_scale"], 0.0)
        check_range("damping_power", group["damping_power"], 0.0)
        alpha = group["alpha"]
        if self.acceleration == "w1":
            check_range("alpha", alpha, 0.0, 1.0, high_open=True)
        elif self.acceleration == "w2":
            check_range("alpha", alpha, 0.0, low_open=True)
        elif alpha is not None:
            raise ValueError(
                f"alpha: only used with acceleration 'w1' or 'w2', got {alpha!r} with 'none'"
            )

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        self._validate(group)

    def end_step(self) -> None:
        self._pending = None
        self._operator = None  # no autograd graph outlives the step

    def check_data_parallel(self) -> None:
        """The output-space system is over this rank's outputs (R^{n·C}): no data-parallel form."""
        if self.space == "output":
            raise ValueError(
                "space: the output-space MINRES solves over one rank's outputs and has no "
                "data-parallel form; use space='parameter' (paper Alg 1) with distribute"
            )

    def evaluate(self, objective: Objective) -> tuple[Tensor, Tensor]:
        """Line 1's loss and g from the build of the step's curvature operator (one gradient
        pass, which moves BatchNorm running statistics once; ``.grad`` is not filled), or from
        the closure for a random training pass (or running statistics in output space)."""
        model = objective.model
        stateful = has_stateful_forward if self.space == "output" else has_random_forward
        if stateful(model):
            return super().evaluate(objective)  # the operator is built in `propose`
        self._operator = self._build_operator(objective, update_buffers=True)
        return self._operator.loss, self._operator.gradient()

    def _build_operator(
        self, objective: Objective, update_buffers: bool = False
    ) -> CurvatureOperator | _OutputSpaceOperator:
        """A = G or H by products (parameter space), or H_L J Jᵀ (output space)."""
        if self.space == "output":
            with self.step_randomness():  # dropout: the masks of the step's gradient pass
                return _OutputSpaceOperator(objective, self.params)
        return self.curvature_operator(objective, self.kind, update_buffers=update_buffers)

    def propose(self, objective: Objective, loss: Tensor, grad: Tensor) -> Proposal:
        """Alg 1 / Alg 2 for the direction d, then the W1 / W2 / plain update."""
        group = self.param_groups[0]
        k = int(group["order"])
        g_norm = float(torch.linalg.vector_norm(grad))
        lam = edf_damping(g_norm, group["damping_scale"], group["damping_power"])  # line 1
        if not math.isfinite(lam):
            # Deviation: skip (nothing changes). ‖g‖ overflowed (finite entries, e.g. a
            # diverging run) and λ = a‖g‖^b with it: the damped system is undefined.
            raise SkipStep(f"non-finite damping λ = a‖g‖^b (‖g‖ = {g_norm})")
        if self._operator is None:  # the closure gave loss and g (stateful training pass)
            self._operator = self._build_operator(objective)
        result, matvecs = self._direction(self._operator, grad, k, lam)
        info: dict[str, Any] = {
            "damping": lam,
            "grad_norm": g_norm,
            "order": k,
            "solver_status": result.status,
            "solver_iterations": result.iterations,
            "residual_norm": result.residual_norm,
            "matvecs": matvecs,
        }
        if "coefficient" in result.info:
            info["coefficient"] = result.info["coefficient"]
        d = result.solution
        if result.status == NON_FINITE or not bool(torch.isfinite(d).all()):
            # Deviation: skip (nothing changes) because a non-finite product has no useful step.
            raise SkipStep(f"non-finite EDF direction (solver status {result.status})")
        step = self._accelerated_step(d, float(group["lr"]), float(group["alpha"] or 0.0), info)
        return Proposal(step, None, info)

    def control(self, rho: float, proposal: Proposal) -> bool:
        """EDF has no model test: always accept, and commit the momentum / velocity state."""
        if self._pending is not None:
            self._pending()
            self._pending = None
        return True

    # ---------------------------------------------------------------- helpers
    def _direction(
        self,
        operator: CurvatureOperator | _OutputSpaceOperator,
        grad: Tensor,
        k: int,
        lam: float,
    ) -> tuple[SolverResult, int]:
        """d = P_k(A + λI, g): Alg 1 lines 2–8 (MINRES) or Alg 2 (k = 1)."""
        if isinstance(operator, _OutputSpaceOperator):
            out = operator
            if k == 1:
                r = edf_first_order_direction(out.matvec, out.rhs, lam)
            else:
                r = minres(out.matvec, out.rhs, max_iters=k, shift=lam)
            d = out.transpose_jacobian(r.solution)  # [C-EDF]: dZ = Jᵀ(x/n)
            result = SolverResult(
                solution=d,
                iterations=r.iterations,
                residual_norm=r.residual_norm,
                status=r.status,
                info=r.info,
            )
            return result, out.products
        op = operator
        if k == 1:
            result = edf_first_order_direction(op.matvec, grad, lam)  # Alg 2
        else:
            result = minres(op.matvec, grad, max_iters=k, shift=lam)  # Alg 1 lines 2–8
        return result, op.products

    def _accelerated_step(self, d: Tensor, lr: float, alpha: float, info: dict[str, Any]) -> Tensor:
        """The parameter change for direction d; new state committed in `control`."""
        info["acceleration"] = self.acceleration
        if self.acceleration == "none":
            return -lr * d  # Alg 1 line 9: w_{i+1} = w_i − η v
        params = self.params
        pieces = self.unflatten(d)
        if self.acceleration == "w1":
            # [C-EDF]: m ← α m + (1 − α) d ; w ← w − η m
            new = []
            for p, piece in zip(params, pieces, strict=True):
                m = self.state[p].get("momentum_buffer")
                m = (1.0 - alpha) * piece if m is None else alpha * m + (1.0 - alpha) * piece
                new.append(m)

            def commit_w1() -> None:
                for p, m in zip(params, new, strict=True):
                    self.state[p]["momentum_buffer"] = m

            self._pending = commit_w1
            return -lr * torch.cat([m.reshape(-1) for m in new])

        # W2 ([R]): u_t = c_{t−1} u_{t−1} − d ; y_t = y_{t−1} + s (c_t u_t − d).
        # Deviation (reconstruction): the paper gives no W2 scheme; this is Su–Boyd–Candès's
        # Nesterov discretisation with r = α, velocity in direction units (module docstring).
        state = self.global_state
        t = int(state.get("w2_iteration", 0)) + 1
        last_lr = state.get("w2_lr")
        restart = self.restart_on_lr_change and last_lr is not None and last_lr != lr
        if restart:
            t = 1
        c_prev = (t - 2) / (t + alpha - 2) if t >= 2 else 0.0
        c_now = (t - 1) / (t + alpha - 1)
        velocities = []
        for p, piece in zip(params, pieces, strict=True):
            u = None if restart else self.state[p].get("velocity")
            velocities.append(-piece if u is None else c_prev * u - piece)

        def commit_w2() -> None:
            for p, u in zip(params, velocities, strict=True):
                self.state[p]["velocity"] = u
            state["w2_iteration"] = t
            state["w2_lr"] = lr

        self._pending = commit_w2
        info["w2_iteration"] = t
        info["w2_coefficient"] = c_now
        return lr * torch.cat(
            [(c_now * u - piece).reshape(-1) for u, piece in zip(velocities, pieces, strict=True)]
        )
