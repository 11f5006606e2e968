r"""Each curvature method's floor: the operations of its work beyond an SGD-m step.

`floor_items` lists the `curvlab.bench.cost.floor_model.FloorItem`\ s of a configured
optimizer; `kfac_floor`, `kbfgs_floor` and `tensorwise_floor` write them out from the
settings and the layer sizes (`curvlab.bench.cost.geometry.LayerGeometry`). `real_factors`
hands the optimizer's own factors to the timing of its decompositions.

Per Linear layer with r rows (the batch m), fan-in n, d_out outputs and d_a = n + 1 (bias),
and per parameter tensor of shape d_1×…×d_k (TNT, Shampoo):

K-FAC (thesis Alg 12; statistics every T1, inverses every T2)
    extra_forward (``statistics="after_step"``): ``x Wᵀ``, (r×n)(n×d_out), / T1.
    statistics_backward (after the step, or sampled labels): layer-output gradients only,
    ``g W`` (r×d_out)(d_out×n), for the layers whose input needs a gradient, / T1.
    factor_A, factor_G: the block GEMMs of `curvlab.linalg.gram` on the (r×n) inputs and the
    (r×d_out) output gradients (upper block triangle for ≥ 192 columns) and, with a bias, the
    column sums of the inputs, / T1.
    precondition: ``G⁻¹ V`` (d_out×d_out)(d_out×d_a) and ``(G⁻¹V) A⁻ᵀ`` (d_out×d_a)(d_a×d_a).
    inversion: `curvlab.linalg.damped_inverse` of A and G, measured, / T2.

K-BFGS, K-BFGS(L) (thesis Alg 9; curvature every T; no decomposition at all)
    extra_forward and statistics_backward: the second pass at the new weights (line 13); it
    needs only the pre-activations and their gradients, not weight gradients, / T.
    factor_A: ā (column sums of the inputs), s_A = H_A ā, the matrix-free Hessian action
    ``Ã s_A = (1/m) Xᵀ(X s_A)`` (two matrix–vector products over the r×n inputs, eq. 3.15;
    K-BFGS-20's ``a_update="ema"`` instead forms A by `gram` and multiplies it), H_A y_A and the
    rank-2 BFGS update of H_A (an ``addmm`` with inner dimension 2), / T.
    factor_G: h̄ = [W b] ā at the old and new weights, ā⁺ of the second pass, D̄h and D̄h⁺
    (column sums of the output gradients), then for BFGS H_G y (Powell damping) and H_G ỹ
    and the rank-2 update of H_G; for L-BFGS with p pairs (the steady state: the buffer is full)
    one compact product H_G y (Powell damping) and the update of the p×p matrices SᵀY and YᵀY
    for the new pair (three (p×d_out) matrix–vector products), / T.
    precondition: ``V H_A`` (d_out×d_a)(d_a×d_a), then ``H_G (V H_A)`` (d_out×d_out)(d_out×d_a),
    or for L-BFGS the compact form (Byrd, Nocedal & Schnabel 1994) with SᵀY, YᵀY known:
    ``[S;Y](VH_A)`` (2p×d_out)(d_out×d_a), two p×p triangular solves and a (p×p)(p×d_a)
    product on p×d_a right-hand sides, and ``[S;Y]ᵀ C`` (d_out×2p)(2p×d_a).

TNT and Shampoo (thesis Alg 15, 16; statistics every T1, inverses / roots every T2)
    statistics_backward, statistics_weight_grad (TNT with sampled labels only): the second
    backward pass through the forward graph of the gradient pass, with the weight gradients
    (the statistics are contractions of the sampled weight gradient) and the bias sums, / T1.
    factor_G, factor_A: the contractions ``mat_i(G) mat_i(G)ᵀ`` by `gram`, mode 0 (the output
    side of a weight, and every bias) under factor_G and the other modes under factor_A, / T1.
    precondition: one mode product per mode, ``U₀ X`` (d_out×d_out)(d_out×n) and ``X U₁ᵀ``
    (d_out×n)(n×n) for a weight, ``x Uᵀ`` (1×d)(d×d) for a bias.
    inversion: every factor's Cholesky inverse (TNT) or eigh / coupled-Newton inverse
    ``2k``-th root (Shampoo), measured on the optimizer's own factors when they are given
    (`real_factors`), on a random SPD matrix of the same size otherwise, / T2.

`measure_floor_model` times every distinct operation once; `FloorModel.terms_ms` and

Conv layers are costed as their im2col GEMMs and TNT / Shampoo's 3-way conv tensors by their
batched mode products (an approximation); the floors are exact in form for MLPs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab.bench.cost.floor_model import FloorItem
from curvlab.bench.cost.geometry import LayerGeometry
from curvlab.linalg.cost import (
    Decomposition,
    Gemm,
    Matvec,
    Op,
    RowSum,
    gram_ops,
    lbfgs_multiply_ops,
    mode_product_op,
    mode_statistics_ops,
)
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.tensorwise import TensorwiseOptimizer

__all__ = [
    "TensorSpec",
    "floor_items",
    "kbfgs_floor",
    "kfac_floor",
    "real_factors",
    "tensorwise_floor",
]


# --------------------------------------------------------------------------- building blocks
def _items(term: str, ops: Iterable[Op], per_step: float, layer: str, what: str) -> list[FloorItem]:
    return [FloorItem(term, op, per_step, layer, what) for op in ops]


# --------------------------------------------------------------------------- method floors
def kfac_floor(
    geometry: Sequence[LayerGeometry],
    *,
    curvature_every: int,
    inverse_every: int,
    after_step: bool,
    sampled: bool,
    damping: float = 1.0,
) -> list[FloorItem]:
    """K-FAC's floor (thesis Alg 12; see the module docstring)."""
    stats = 1.0 / curvature_every
    out: list[FloorItem] = []
    for g in geometry:
        if after_step:
            out += _items(
                "extra_forward", [Gemm(g.rows, g.fan_in, g.d_out, "nt")], stats, g.name, "x Wᵀ"
            )
        if (after_step or sampled) and g.input_grad:
            out += _items(
                "statistics_backward",
                [Gemm(g.rows, g.d_out, g.fan_in, "nn")],
                stats,
                g.name,
                "g W (output gradients only)",
            )
        a_ops: list[Op] = list(gram_ops(g.rows, g.fan_in))
        if g.bias:
            a_ops.append(RowSum(g.rows, g.fan_in))
        out += _items("factor_A", a_ops, stats, g.name, "A = āᵀā / m")
        out += _items("factor_G", gram_ops(g.rows, g.d_out), stats, g.name, "G = ĝᵀĝ")
        out += _items(
            "precondition",
            [Gemm(g.d_out, g.d_out, g.d_a, "nn"), Gemm(g.d_out, g.d_a, g.d_a, "nt")],
            1.0,
            g.name,
            "G⁻¹ V A⁻ᵀ",
        )
        out += _items(
            "inversion",
            [
                Decomposition("cholesky", g.d_a, 1, damping),
                Decomposition("cholesky", g.d_out, 1, damping),
            ],
            1.0 / inverse_every,
            g.name,
            "(A + λ_A I)⁻¹, (G + λ_G I)⁻¹",
        )
    return out


def kbfgs_floor(
    geometry: Sequence[LayerGeometry],
    *,
    curvature_every: int = 1,
    memory: int | None = None,
    a_update: str = "minibatch",
    pair_damping: str = "dp_dlm",
) -> list[FloorItem]:
    """K-BFGS's (``memory=None``) or K-BFGS(L)'s floor (thesis Alg 9; module docstring).

    ``memory``: p, the number of L-BFGS pairs at the steady state (the buffer full).
    """
    c = 1.0 / curvature_every
    k = memory
    out: list[FloorItem] = []
    for g in geometry:
        n, do, da, r = g.fan_in, g.d_out, g.d_a, g.rows
        # Alg 9 line 13: the second pass, pre-activations and their gradients only.
        out += _items("extra_forward", [Gemm(r, n, do, "nt")], c, g.name, "x Wᵀ (second pass)")
        if g.input_grad:
            out += _items(
                "statistics_backward",
                [Gemm(r, do, n, "nn")],
                c,
                g.name,
                "g W (second pass, output gradients only)",
            )
        # Alg 9 lines 16–17: H_A.
        a_ops: list[Op] = [RowSum(r, n), Matvec(da, da)]  # ā, s_A = H_A ā
        if a_update == "minibatch":
            a_ops += [Matvec(r, n), Matvec(r, n, transposed=True)]  # Ã s_A = Xᵀ(X s_A)/m
        else:  # K-BFGS-20 (Alg 4 line 20): A's EMA formed, then A s_A
            a_ops += list(gram_ops(r, n))
            if g.bias:
                a_ops.append(RowSum(r, n))
            a_ops.append(Matvec(da, da))
        a_ops += [Matvec(da, da), Gemm(da, 2, da, "nn", accumulate=True)]  # H_A y_A, rank 2
        out += _items("factor_A", a_ops, c, g.name, "ā, Hessian-action pair, BFGS on H_A")
        # Alg 9 lines 19–21: H_G.
        g_ops: list[Op] = [
            Matvec(do, da),  # h̄ = [W b] ā (old weights)
            Matvec(do, da),  # h̄⁺ (new weights)
            RowSum(r, n),  # ā⁺ of the second pass
            RowSum(r, do),  # D̄h
            RowSum(r, do),  # D̄h⁺
        ]
        if k is None:
            if pair_damping != "dpi_dlm":
                g_ops.append(Matvec(do, do))  # H_G y (Powell damping)
            g_ops += [Matvec(do, do), Gemm(do, 2, do, "nn", accumulate=True)]  # H_G ỹ, rank 2
        else:
            if pair_damping != "dpi_dlm":
                g_ops += lbfgs_multiply_ops(k, do)  # H_G y (Powell damping)
            g_ops += [Matvec(k, do), Matvec(k, do), Matvec(k, do)]  # new row of SᵀY, YᵀY
        out += _items("factor_G", g_ops, c, g.name, "h̄, D̄h, damped pair, update of H_G")
        # Alg 9 line 9: p = H_G D̂W H_A.
        p_ops: list[Op] = [Gemm(do, da, da, "nn")]
        p_ops += [Gemm(do, do, da, "nn")] if k is None else lbfgs_multiply_ops(k, do, da)
        out += _items("precondition", p_ops, 1.0, g.name, "H_G (V H_A)")
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of TNT / Shampoo: its name, tensor shape and decomposition."""

    name: str
    shape: tuple[int, ...]
    method: str
    root: int
    damping: float


def tensorwise_floor(
    geometry: Sequence[LayerGeometry],
    tensors: Sequence[TensorSpec],
    *,
    curvature_every: int,
    inverse_every: int,
    extra_backward: bool,
    source_prefix: str | None = None,
) -> list[FloorItem]:
    """TNT's or Shampoo's floor (thesis Alg 15 / 16; see the module docstring).

    ``source_prefix``: the decompositions are timed on the factors ``real_factors`` returns
    under this prefix (None: random SPD matrices).
    """
    stats = 1.0 / curvature_every
    out: list[FloorItem] = []
    if extra_backward:  # Alg 15 line 7: a full backward pass of the sampled-label loss
        for g in geometry:
            if g.input_grad:
                out += _items(
                    "statistics_backward",
                    [Gemm(g.rows, g.d_out, g.fan_in, "nn")],
                    stats,
                    g.name,
                    "g W",
                )
            wg: list[Op] = [Gemm(g.d_out, g.rows, g.fan_in, "tn")]
            if g.bias:
                wg.append(RowSum(g.rows, g.d_out))
            out += _items("statistics_weight_grad", wg, stats, g.name, "gᵀ x, Σ g")
    for t in tensors:
        shape = t.shape
        for mode in range(len(shape)):
            d = shape[mode]
            term = "factor_G" if mode == 0 else "factor_A"
            grams = mode_statistics_ops(shape, mode)
            out += _items(term, grams, stats, t.name, f"mode-{mode} contraction")
            prod = mode_product_op(shape, mode)
            out += _items("precondition", [prod], 1.0, t.name, f"×_{mode} P_{mode}")
            source = "" if source_prefix is None else f"{source_prefix}{t.name}:{mode}"
            out += _items(
                "inversion",
                [Decomposition(t.method, d, t.root, t.damping, source)],
                1.0 / inverse_every,
                t.name,
                f"mode-{mode} factor",
            )
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def floor_items(
    optimizer: torch.optim.Optimizer,
    geometry: Sequence[LayerGeometry],
    *,
    source_prefix: str | None = None,
) -> list[FloorItem] | None:
    """The floor of a configured optimizer, from its settings (None: no floor model).

    K-FAC (`curvlab.optim.kfac.KFAC`), K-BFGS / K-BFGS(L) (`curvlab.optim.kbfgs.KBFGS`), TNT and
    Shampoo (`curvlab.optim.tensorwise.TensorwiseOptimizer`); SGD-m's floor is empty.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return []
    if isinstance(optimizer, KFAC):
        group = optimizer.param_groups[0]
        used = [g for g in geometry if g.name in optimizer.layers]
        return kfac_floor(
            used,
            curvature_every=int(group["curvature_every"]),
            inverse_every=int(group["inverse_every"]),
            after_step=optimizer.statistics_point == "after_step",
            sampled=optimizer.fisher == "true",
            damping=float(group["damping"]),
        )
    if isinstance(optimizer, KBFGS):
        used = [g for g in geometry if g.name in optimizer.layers]
        return kbfgs_floor(
            used,
            curvature_every=int(optimizer.param_groups[0]["curvature_every"]),
            memory=optimizer.memory,
            a_update=optimizer.a_update,
            pair_damping=optimizer.pair_damping,
        )
    if isinstance(optimizer, TensorwiseOptimizer):
        names = _param_names(optimizer.model)
        tensors = [
            TensorSpec(
                names.get(id(p), f"param{i}"),
                optimizer.tensor_block(optimizer._name_of[id(p)]).shape,
                optimizer.tensor_block(optimizer._name_of[id(p)]).method,
                optimizer.tensor_block(optimizer._name_of[id(p)]).root,
                float(optimizer.group_of(p)["damping"]),
            )
            for i, p in enumerate(optimizer.params)
            if p.numel() > 0
        ]
        group = optimizer.param_groups[0]
        return tensorwise_floor(
            geometry,
            tensors,
            curvature_every=int(group["curvature_every"]),
            inverse_every=int(group["inverse_every"]),
            extra_backward=optimizer.extra_backward,
            source_prefix=source_prefix,
        )
    return None


def real_factors(optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, Tensor]:
    """The undamped factors a TNT / Shampoo optimizer decomposes, by ``prefix + name:mode``.

    (TNT: the trace-normalised Ũ_i of eq. 4.10; Shampoo: the statistics Ĝ^{(i)}.) Empty for
    other optimizers and for tensors without statistics yet.
    """
    if not isinstance(optimizer, TensorwiseOptimizer):
        return {}
    names = _param_names(optimizer.model)
    out: dict[str, Tensor] = {}
    for i, p in enumerate(optimizer.params):
        state = optimizer.state[p]
        if "statistics" not in state:
            continue
        name = names.get(id(p), f"param{i}")
        for mode, F in enumerate(optimizer.tensor_block(optimizer._name_of[id(p)]).factors(state)):
            out[f"{prefix}{name}:{mode}"] = F.detach().clone()
    return out
