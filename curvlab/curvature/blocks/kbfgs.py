r"""`KBFGSBlock`: one layer's K-BFGS / K-BFGS(L) curvature (thesis ch.2–3).

The layer's inverse Hessian block is approximated by ``H_A ⊗ H_G`` (thesis eqs. 2.3, 3.9),
both kept by BFGS updates, and the direction of a gradient matrix V (d_out × d_a, bias last
column) is ``H_G V H_A`` (eq. 2.4 / 3.10). State keys (under the weight):

* ``H_a`` (d_a × d_a), updated by the "Hessian-action" pair ``s_A = H_A ā``,
  ``y_A = A s_A + λ_A s_A`` (thesis §2.4, eq. 3.15: ``A s`` matrix-free from the batch's
  inputs, or ch.2's EMA ``A``, key ``A``);
* ``H_g`` (d_out × d_out) — or, for K-BFGS(L) with p = ``memory`` pairs, the ring buffer
  ``SY`` (2, p, d_out) (``SY[0]`` the s̃, ``SY[1]`` the ỹ; ``pair_count`` rows in use, the
  oldest at row ``pair_start``) with SᵀY and YᵀY (p × p, chronological) kept per pushed pair
  (`curvlab.linalg.bfgs.lbfgs_push_`) and applied in the compact "non-loop" form;
* ``s_g``, ``y_g``: the moving averages of the (h̄⁺ − h̄, D̄h⁺ − D̄h) pairs (Alg 9 line 19);
* ``locations``: |T|, for the damping split λ_A = √(|T|λ), λ_G = √(λ/|T|) (Alg 9 line 2);
* counters ``skipped_g_pairs``, ``skipped_a_pairs``, ``curvature_updates``.

A step's pairs are formed by `propose` (everything of the update that can be computed without
a host synchronisation, with sums whose finiteness the optimizer checks for all layers at
once) and committed by `update`. Deviation A27 (docs/deviations.md): a pair whose s̃ᵀỹ ≤ 0,
or that is not finite after damping, or whose BFGS correction overflows, is skipped and
counted instead of corrupting H, because the thesis's "never skip" assumes exact arithmetic.

The fused update (`apply_fused`): ``V H_A = M_W H_A[:n] + m_b H_A[n]ᵀ`` into a scratch buffer
(no copy of V = [M_W m_b]), then ``W ← (1 − αγ) W − α H_G (V H_A)`` accumulated straight into
W and b, when `fused_norms` show beforehand that nothing can overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from curvlab.curvature.blocks.base import CurvatureBlock, State
from curvlab.curvature.cost import CostItem, LayerShape, StorageFormula, cost_items
from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import DecompositionError, damped_inverse, kron_to_dense
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
from curvlab.linalg.cost import Gemm, Matvec, Op, RowSum, gram_ops, lbfgs_multiply_ops

__all__ = ["FirstPass", "KBFGSBlock", "PendingPair"]


@dataclass
class FirstPass:
    """One layer's statistics from the gradient pass (pre-step weights) of a curvature step."""

    h: Tensor  # h̄ = W ā
    g: Tensor  # D̄h
    s_a: Tensor  # s_A = H_A ā
    y_a: Tensor  # y_A = A s_A + λ_A s_A
    A: Tensor | None  # ch.2: the new EMA of A (committed after the step)


@dataclass
class Pairs:
    """K-BFGS(L)'s stored pairs (views of the layer state), see `KBFGSBlock.pairs`."""

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
            self.S, self.Y, V, gamma, SY=self.SY, StY=self.StY, YtY=self.YtY,
            start=self.start, SV=SV, YV=YV, out=out,
        )  # fmt: skip


@dataclass
class PendingPair:
    """One layer's pairs of a curvature step, until the check of all layers (one sync)."""

    s: Tensor  # the (s_G, y_G) moving averages (Alg 9 line 19)
    y: Tensor
    s_t: Tensor  # the damped pair (s̃, ỹ) (line 20)
    y_t: Tensor
    Hy_t: Tensor  # H_G ỹ
    u_g: Tensor  # the BFGS correction of (s̃, ỹ) (`curvlab.linalg.bfgs.bfgs_correction`)
    s_a: Tensor  # the Hessian-action pair (s_A, y_A) (line 16)
    y_a: Tensor
    u_a: Tensor  # the BFGS correction of (s_A, y_A)
    A: Tensor | None  # ch.2's new EMA of A
    products: tuple[Tensor, Tensor, Tensor] | None  # L-BFGS: of `KBFGSBlock._candidate`

    def averages(self) -> list[Tensor]:
        """What must be finite for (s_G, y_G) to be stored."""
        return [self.s, self.y]

    def g_terms(self) -> list[Tensor]:
        """What must be finite for the H_G update (with the averages and s̃ᵀỹ > 0)."""
        return [self.s_t, self.y_t, self.Hy_t, self.u_g, *(self.products or ())]

    def a_terms(self) -> list[Tensor]:
        """What must be finite for the H_A update (with s_Aᵀy_A > 0)."""
        return [self.s_a, self.y_a, self.u_a]


class KBFGSBlock(CurvatureBlock):
    """The ``H_A ⊗ H_G`` inverse-Hessian block of one layer (module docstring).

    Args:
        layer: the layer.
        memory: ``None`` for BFGS on H_G, or p pairs for L-BFGS.
        pair_damping: ``"dp_dlm"`` (Alg 8), ``"dd"`` (Alg 3) or ``"dpi_dlm"`` (Alg 11).
        a_update: ``"minibatch"`` (ch.3: A s from the batch) or ``"ema"`` (ch.2: EMA A).
        a_init: ``"inverse"`` (H_A = (A + λ_A I)^{-1}) or ``"identity"``.
        damping_split: ``"locations"`` (ch.3) or ``"sqrt"`` (ch.2: √λ each).
        g_init: ``"inverse_damping"`` (H_G and the L-BFGS base λ_G^{-1} I) or ``"identity"``.
    """

    layer: KroneckerLayer

    def __init__(
        self,
        layer: KroneckerLayer,
        *,
        memory: int | None,
        pair_damping: str,
        a_update: str,
        a_init: str,
        damping_split: str,
        g_init: str,
    ) -> None:
        self.layer = layer
        self.name = layer.name
        self.memory = memory
        self.pair_damping = pair_damping
        self.a_update = a_update
        self.a_init = a_init
        self.damping_split = damping_split
        self.g_init = g_init

    @property
    def params(self) -> list[nn.Parameter]:
        return self.layer.params

    def gradient(self, tensors: list[Tensor]) -> Tensor:
        return self.layer.grad_matrix(tensors[0], tensors[1] if len(tensors) > 1 else None)

    def split(self, matrix: Tensor) -> list[Tensor]:
        return self.layer.split(matrix)

    @staticmethod
    def has_statistics(state: State) -> bool:
        return "H_a" in state

    @staticmethod
    def is_ready(state: State) -> bool:
        return "H_a" in state

    def refresh_cost(self) -> float:
        """``d_a³ + d_out³`` (K-BFGS refreshes nothing; the owner assignment of the data-
        parallel mode "preconditioned" weighs layers by this)."""
        return float(self.layer.d_a**3 + self.layer.d_out**3)

    # ------------------------------------------------------------- damping
    def dampings(self, state: State, damping: float) -> tuple[float, float]:
        """(λ_A, λ_G) (Alg 9 line 2; Alg 4 line 2: √λ each)."""
        if self.damping_split == "sqrt":
            return math.sqrt(damping), math.sqrt(damping)
        locations = state.get("locations", 1.0)
        return math.sqrt(locations * damping), math.sqrt(damping / locations)

    def gamma(self, state: State, damping: float) -> float:
        """Scale of H_G's initial matrix / the L-BFGS base: λ_G^{-1} (ch.3) or 1 (ch.2)."""
        if self.g_init == "inverse_damping":
            return 1.0 / self.dampings(state, damping)[1]
        return 1.0

    # -------------------------------------------------------- initialisation
    def reset(self, state: State, A: Tensor | None, locations: float, damping: float) -> None:
        """Alg 9 / Alg 4 line 3: H_A = (A + λ_A I)^{-1} (or I), ch.2's A; H_G, s_G, y_G (or
        the L-BFGS buffers) if not there yet."""
        layer = self.layer
        state["locations"] = locations
        lam_a, _ = self.dampings(state, damping)
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
                eye = torch.eye(layer.d_out, dtype=w.dtype, device=w.device)
                state["H_g"] = eye * self.gamma(state, damping)
            else:
                p = self.memory  # rows beyond pair_count are unused
                state["SY"] = w.new_zeros(2, p, layer.d_out)
                state["StY"] = w.new_zeros(p, p)
                state["YtY"] = w.new_zeros(p, p)
                state["pair_count"] = 0
                state["pair_start"] = 0
            state["s_g"] = w.new_zeros(layer.d_out)
            state["y_g"] = w.new_zeros(layer.d_out)

    # ------------------------------------------------------------ products
    def pairs(self, state: State) -> Pairs:
        """The stored L-BFGS pairs: the rows in use of the ring buffer and their Gram
        matrices in chronological order."""
        k, SY = state["pair_count"], state["SY"]
        return Pairs(
            S=SY[0, :k],
            Y=SY[1, :k],
            SY=SY.view(2 * k, -1) if k == SY.shape[1] else None,
            StY=state["StY"][:k, :k],
            YtY=state["YtY"][:k, :k],
            start=state["pair_start"],
        )

    def H_g_times(self, state: State, v: Tensor, damping: float) -> Tensor:
        """The current H_G (BFGS matrix or L-BFGS operator) applied to a vector."""
        if self.memory is None:
            return state["H_g"] @ v
        return self.pairs(state).multiply(v, self.gamma(state, damping))

    def precondition(self, state: State, V: Tensor, damping: float) -> Tensor:
        """``H_G (V H_A)`` of a whole direction matrix (Alg 9 line 9)."""
        VH = V @ state["H_a"]
        if self.memory is None:
            return state["H_g"] @ VH
        return self.pairs(state).multiply(VH, self.gamma(state, damping), out=VH)

    def to_dense(self, state: State, damping: float = math.nan) -> Tensor:
        """``(H_G ⊗ H_A)^{-1}``: the curvature whose inverse `precondition` applies (row-major
        vec of V); K-BFGS(L) needs the ``damping`` of its L-BFGS base."""
        eye = torch.eye(self.layer.d_out, dtype=state["H_a"].dtype, device=state["H_a"].device)
        H_g = self.H_g_times(state, eye, damping) if self.memory is not None else state["H_g"]
        return torch.linalg.inv(kron_to_dense(H_g, state["H_a"]))

    # ------------------------------------------------------------ the pairs
    def hessian_action(
        self,
        state: State,
        a_bar: Tensor,
        inputs: list[Tensor],
        m: int,
        A_batch: Tensor | None,
        ema_decay: float,
        damping: float,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Alg 9 line 16 (Alg 4 lines 20–22): (s_A, y_A) and ch.2's new EMA of A."""
        lam_a, _ = self.dampings(state, damping)
        if A_batch is None:
            # Eq. 3.15: Ã s = (1/m) Σ_{n,t} (ā_tᵀ s) ā_t, A never formed.
            parts = [self.layer.input_rows(x) for x in inputs]
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy for Linear
            homogeneous = self.layer.bias is not None
            matvec = partial(gram_matvec, rows, scale=1.0 / m, homogeneous=homogeneous)
            s_a, y_a = hessian_action_pair(state["H_a"], a_bar, matvec, lam_a)
            return s_a, y_a, None
        # Alg 4 line 20: A = β A + (1−β) mean_i ā āᵀ; lines 21–22: y_A = A s_A + λ_A s_A.
        A_new = torch.lerp(state["A"], A_batch, 1.0 - ema_decay)
        s_a, y_a = hessian_action_pair(state["H_a"], a_bar, A_new.mv, lam_a)
        return s_a, y_a, A_new

    def propose(
        self,
        state: State,
        first: FirstPass,
        h_plus: Tensor,
        g_plus: Tensor,
        ema_decay: float,
        mu1: float,
        damping: float,
    ) -> tuple[PendingPair, Tensor]:
        """Alg 9 lines 19–20 (Alg 4 lines 16–17) and the BFGS corrections, without a host
        synchronisation; returns the pair and the sums that decide whether it is used
        (a NaN or an Inf reaches a sum; `update` tells an overflowing sum of finite entries
        apart)."""
        s = torch.lerp(h_plus - first.h, state["s_g"], ema_decay)  # averages before damping
        y = torch.lerp(g_plus - first.g, state["y_g"], ema_decay)
        s_t, y_t = self._damp(state, s, y, mu1, damping)
        products: tuple[Tensor, Tensor, Tensor] | None = None
        if self.memory is None:
            Hy_t = state["H_g"] @ y_t
        else:
            Hy_t, products = self._candidate(state, s_t, y_t, damping)
        sy = torch.dot(s_t, y_t)
        u_g = bfgs_correction(s_t, y_t, Hy_t)
        sy_a = torch.dot(first.s_a, first.y_a)
        u_a = bfgs_correction(first.s_a, first.y_a, state["H_a"] @ first.y_a)
        pair = PendingPair(s, y, s_t, y_t, Hy_t, u_g, first.s_a, first.y_a, u_a, first.A, products)
        sums = [torch.cat(pair.averages()).sum(), torch.cat(pair.g_terms()).sum(), sy]
        sums += [torch.cat(pair.a_terms()).sum(), sy_a, torch.dot(y_t, Hy_t) / sy]
        sums.append(first.A.sum() if first.A is not None else sy_a)  # ch.2's EMA of A
        return pair, torch.stack(sums)

    def _damp(
        self, state: State, s: Tensor, y: Tensor, mu1: float, damping: float
    ) -> tuple[Tensor, Tensor]:
        """Alg 9 line 20 (D_P D_LM), Alg 4 line 17 (DD) or Alg 11 (D_PI D_LM), μ2 = λ_G."""
        _, lam_g = self.dampings(state, damping)
        if self.pair_damping == "dpi_dlm":
            return dpi_dlm_damping(s, y, mu1, lam_g)
        Hy = self.H_g_times(state, y, damping)
        damp = dp_dlm_damping if self.pair_damping == "dp_dlm" else double_damping
        return damp(s, y, Hy, mu1, lam_g)

    def _candidate(
        self, state: State, s: Tensor, y: Tensor, damping: float
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """H_G ỹ of the stored pairs, and the products the push of (s̃, ỹ) needs: ``(s_iᵀ ỹ)``,
        ``(y_iᵀ s̃)``, ``(y_iᵀ ỹ)`` over the stored pairs are the new row and column of SᵀY and
        YᵀY and also the ``Sᵀỹ``, ``Yᵀỹ`` of the compact product."""
        pairs = self.pairs(state)
        k = pairs.S.shape[0]
        if pairs.SY is not None:  # full buffer: [S; Y] ỹ in one product
            SYy = pairs.SY.mv(y)
            Sy, Yy = SYy[:k], SYy[k:]
        else:
            Sy, Yy = pairs.S.mv(y), pairs.Y.mv(y)
        Ys = pairs.Y.mv(s)
        Hy = pairs.multiply(y, self.gamma(state, damping), SV=Sy, YV=Yy)
        return Hy, (Sy, Ys, Yy)

    def update(
        self, state: State, statistics: tuple[PendingPair, list[float]], ema_decay: float
    ) -> tuple[bool, bool, float | None]:
        """Commit a proposed pair given its checked sums (Alg 9 lines 17, 19, 21; Alg 4 lines
        18, 20, 23). Returns whether the H_G and H_A pairs were used, and the ratio
        ỹᵀHỹ / s̃ᵀỹ of thesis Fig 2.1 (None for a skipped H_G pair)."""
        pair, (avg, g_sum, sy, a_sum, sy_a, ratio, A_sum) = statistics
        avg_ok = _all_finite(avg, pair.averages())
        g_ok = avg_ok and sy > 0 and _all_finite(g_sum, pair.g_terms())
        a_stat_ok = pair.A is None or _all_finite(A_sum, [pair.A])
        a_ok = a_stat_ok and sy_a > 0 and _all_finite(a_sum, pair.a_terms())
        if pair.A is not None and a_stat_ok:
            state["A"] = pair.A  # Alg 4 line 20
        if a_ok:  # Alg 9 line 17 (Alg 4 line 23)
            bfgs_update(state["H_a"], pair.s_a, pair.y_a, u=pair.u_a, inplace=True)
        else:
            state["skipped_a_pairs"] = state.get("skipped_a_pairs", 0) + 1
        if avg_ok:
            state["s_g"], state["y_g"] = pair.s, pair.y
        if g_ok:  # Alg 9 line 21 (Alg 4 line 18)
            if pair.products is None:
                bfgs_update(state["H_g"], pair.s_t, pair.y_t, u=pair.u_g, inplace=True)
            else:  # push (s̃, ỹ), dropping the oldest pair beyond p (ring buffer)
                Sy, Ys, Yy = pair.products
                state["pair_count"], state["pair_start"] = lbfgs_push_(
                    state["SY"][0], state["SY"][1], state["StY"], state["YtY"],
                    state["pair_count"], state["pair_start"], pair.s_t, pair.y_t,
                    Sy=Sy, Ys=Ys, Yy=Yy,
                )  # fmt: skip
        else:
            state["skipped_g_pairs"] = state.get("skipped_g_pairs", 0) + 1
        state["curvature_updates"] = state.get("curvature_updates", 0) + 1
        return g_ok, a_ok, ratio if g_ok else None

    # -------------------------------------------------------- the fused update
    def fused_norms(self, state: State, momenta: list[Tensor]) -> Tensor:
        """``(‖M‖, ‖H_A‖, ‖H_G‖, ‖W‖)`` in float64 (Frobenius; M = [D̂W D̂b], W = [W b]) for the
        a-priori bound of `apply_fused`; a layer without H moves along its momentum (norm 1)."""
        ones = [self.layer.weight.new_ones(())] * 2
        factors = [state["H_a"], state["H_g"]] if "H_a" in state else ones
        norms = [
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))
            for ts in (momenta, factors[:1], factors[1:], list(self.params))
        ]
        return torch.stack(norms).to(torch.float64)

    def apply_fused(
        self, state: State, momenta: list[Tensor], lr: float, weight_decay: float, VH: Tensor
    ) -> None:
        """Alg 9 lines 9–10 from the weight (and bias) momentum, accumulated straight into
        the parameters; ``VH``: a (d_out, d_a) scratch buffer."""
        layer = self.layer
        H_a = state["H_a"]
        n = layer.d_a - (layer.bias is not None)
        M_w = momenta[0].reshape(layer.d_out, n)
        if layer.bias is None:
            torch.mm(M_w, H_a, out=VH)
        else:  # the bias column's rank-1 term as a product
            torch.mm(M_w, H_a[:n], out=VH)
            torch.addmm(VH, momenta[1].unsqueeze(1), H_a[n:], out=VH)
        W = layer.weight
        if W.is_contiguous():
            # W − α (H_G (V H_A) + γ W) as one accumulating product per parameter.
            targets: list[tuple[Tensor, Tensor]] = [(W.view(layer.d_out, n), VH[:, :n])]
            if layer.bias is not None:
                targets.append((layer.bias.view(-1, 1), VH[:, n:]))
            for target, part in targets:
                torch.addmm(target, state["H_g"], part, beta=1.0 - lr * weight_decay, alpha=-lr,
                            out=target)  # fmt: skip
            return
        P = state["H_g"] @ VH
        directions = [P[:, :n].view_as(W)]
        if layer.bias is not None:
            directions.append(P[:, n])
        for p, direction in zip(self.params, directions, strict=True):
            # W ← W − α (p + γ W); the direction is scratch, so γW is added in place.
            if weight_decay != 0:
                direction.add_(p, alpha=weight_decay)
            p.add_(direction, alpha=-lr)

    # ------------------------------------------------- cost (curvlab.curvature.cost)
    def cost(
        self, shape: LayerShape | None, *, statistics: float, refresh: float, damping: float
    ) -> list[CostItem]:
        """The block's work per step (thesis Alg 9; Alg 4 for ``a_update="ema"``), for a layer
        with r rows, fan-in n, d_out outputs and d_a = n + 1; ``statistics`` = 1/T, curvature
        updates per step. No decomposition at all (``refresh`` and ``damping`` are unused).

        * ``factor_A`` (lines 16–17): ā (column sums of the inputs), s_A = H_A ā, the
          matrix-free Hessian action ``Ã s_A = (1/m) Xᵀ(X s_A)`` (two matrix–vector products
          over the r×n inputs, eq. 3.15; ``a_update="ema"``, Alg 4 lines 20–22, instead forms
          A by `curvlab.linalg.gram` and multiplies it), H_A y_A and the rank-2 BFGS update of
          H_A (an ``addmm_`` with inner dimension 2);
        * ``factor_G`` (lines 19–21): h̄ = [W b] ā at the old and the new weights, ā⁺ of the
          second pass, D̄h and D̄h⁺ (column sums of the output gradients), then for BFGS
          H_G y (Powell damping, not for ``"dpi_dlm"``), H_G ỹ and the rank-2 update of H_G;
          for L-BFGS with p = ``memory`` pairs (the steady state: the buffer full) one compact
          product H_G y (Powell damping, `curvlab.linalg.bfgs.lbfgs_multiply`) and the new
          row of SᵀY and YᵀY (three (p×d_out) matrix–vector products);
        * ``precondition`` (line 9), every step: ``V H_A`` (d_out×d_a)(d_a×d_a), then
          ``H_G (V H_A)`` (d_out×d_out)(d_out×d_a), or for L-BFGS the compact form with SᵀY,
          YᵀY known on the d_a columns of V H_A.

        The second pass (line 13) is the method's (`curvlab.optim.kbfgs.KBFGS`).
        """
        assert shape is not None, "a K-BFGS block is costed at its layer's shape"
        name, c, k = self.name, statistics, self.memory
        n, do, da, r = shape.fan_in, shape.d_out, shape.d_a, shape.rows
        # Alg 9 lines 16–17: H_A.
        a_ops: list[Op] = [RowSum(r, n), Matvec(da, da)]  # ā, s_A = H_A ā
        if self.a_update == "minibatch":
            a_ops += [Matvec(r, n), Matvec(r, n, transposed=True)]  # Ã s_A = Xᵀ(X s_A)/m
        else:  # Alg 4 line 20: A's EMA formed, then A s_A
            a_ops += list(gram_ops(r, n))
            if shape.bias:
                a_ops.append(RowSum(r, n))
            a_ops.append(Matvec(da, da))
        a_ops += [Matvec(da, da), Gemm(da, 2, da, "nn", accumulate=True)]  # H_A y_A, rank 2
        # Alg 9 lines 19–21: H_G.
        g_ops: list[Op] = [
            Matvec(do, da),  # h̄ = [W b] ā (old weights)
            Matvec(do, da),  # h̄⁺ (new weights)
            RowSum(r, n),  # ā⁺ of the second pass
            RowSum(r, do),  # D̄h
            RowSum(r, do),  # D̄h⁺
        ]
        if k is None:
            if self.pair_damping != "dpi_dlm":
                g_ops.append(Matvec(do, do))  # H_G y (Powell damping)
            g_ops += [Matvec(do, do), Gemm(do, 2, do, "nn", accumulate=True)]  # H_G ỹ, rank 2
        else:
            if self.pair_damping != "dpi_dlm":
                g_ops += lbfgs_multiply_ops(k, do)  # H_G y (Powell damping)
            g_ops += [Matvec(k, do), Matvec(k, do), Matvec(k, do)]  # new row of SᵀY, YᵀY
        # Alg 9 line 9: p = H_G D̂W H_A.
        p_ops: list[Op] = [Gemm(do, da, da, "nn")]
        p_ops += [Gemm(do, do, da, "nn")] if k is None else lbfgs_multiply_ops(k, do, da)
        return [
            *cost_items("factor_A", a_ops, c, name, "ā, Hessian-action pair, BFGS on H_A"),
            *cost_items("factor_G", g_ops, c, name, "h̄, D̄h, damped pair, update of H_G"),
            *cost_items("precondition", p_ops, 1.0, name, "H_G (V H_A)"),
        ]

    def storage(self) -> StorageFormula:
        """Thesis Table 3.1: H_A and H_G, ``d_a² + d_out²`` (K-BFGS), or H_A and p pairs,
        ``d_a² + p·d_out`` (K-BFGS(L))."""
        da, do, p = self.layer.d_a, self.layer.d_out, self.memory
        if p is None:
            return StorageFormula(da**2 + do**2, "Σ d_a² + d_out²", "thesis Table 3.1, K-BFGS")
        return StorageFormula(da**2 + p * do, f"Σ d_a² + {p}·d_out", "thesis Table 3.1, K-BFGS(L)")


def _all_finite(total: float, tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` are finite, given the sum of all their entries: a finite sum
    decides it; a non-finite one may also come from finite entries that overflow, so then
    the entries are tested (one more synchronisation, only on that rare path)."""
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def fused_update_is_finite(
    rows: list[Tensor], limits: list[float], scales: list[tuple[float, float]]
) -> bool:
    """Whether K-BFGS's fused update provably stays finite, before anything is written.

    Per layer, with the Frobenius norms of `KBFGSBlock.fused_norms` (each bounds every entry):
    ``V H_A`` is bounded by ``‖M‖‖H_A‖``, ``H_G V H_A`` by ``‖M‖‖H_A‖‖H_G‖`` and the new
    parameters by ``|1 − αγ|‖W‖ + α‖M‖‖H_A‖‖H_G‖``; all must stay within ``limits`` (a quarter
    of the dtype's largest value). ``scales``: ``(|1 − αγ|, α)`` per layer. One host
    synchronisation; a norm that overflows, or a bound that fails, gives False.
    """
    if not rows:
        return True
    table = torch.stack(rows).cpu()  # the one synchronisation
    for (m, h_a, h_g, w), limit, (keep, lr) in zip(table.tolist(), limits, scales, strict=True):
        bounds = (m * h_a, m * h_a * h_g, keep * w + lr * m * h_a * h_g)
        if not all(b <= limit for b in bounds):  # False for NaN too
            return False
    return True
