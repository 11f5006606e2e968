r"""Tensor modes: contractions, mode products and shapes of thesis §4.2.1 (TNT, Shampoo).

Definitions of thesis §4.2.1, row-major ``vec``, for a tensor ``W ∈ R^{d_1×⋯×d_k}``:

* ``mat_i(A) ∈ R^{d_i × ∏_{j≠i} d_j}``, whose rows are the slices of A along mode i;
* the contraction ``A^{(i)} = mat_i(A) mat_i(A)ᵀ`` (`mode_statistics`);
* the mode-i product ``(A ×_i U)_{…j'_i…} = Σ_{j_i} A_{…j_i…} U_{j'_i j_i}`` (`mode_product`);
* Prop. 1 (eq. 4.3): ``(U_1 ⊗ ⋯ ⊗ U_k) vec(G) = vec(G ×_1 U_1 ×_2 ⋯ ×_k U_k)``, so a
  preconditioner never needs the dense Kronecker product (`kron_dense` builds it for tests);
* TNT's trace normalisation of the factors, eq. (4.10) (`trace_normalise`);
* the tensor shapes the thesis preconditions (§4.2; `tensor_shape`): a bias, BatchNorm weight
  or bias is 1-way, a Linear weight 2-way ``(d_out, d_in)``, a conv weight 3-way
  ``(I, J, kh·kw)`` (the authors' ``view(I, J, kh*kw)``: the kernel dimensions flattened
  into one "filter" mode).

Costs per tensor (thesis Table 4.1): contractions ``Σ_i d_i ∏_j d_j`` (one GEMM per mode,
symmetric via `curvlab.linalg.gram`), mode products the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.linalg.gram import gram

__all__ = [
    "kron_dense",
    "mode_product",
    "mode_statistics",
    "multi_mode_product",
    "tensor_shape",
    "trace_normalise",
]


def tensor_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The tensor-variable shape TNT and Shampoo precondition (thesis §4.2).

    A scalar becomes a 1-way tensor of length 1; 1- and 2-way tensors keep their shape; a
    tensor of order ≥ 3 keeps its first two dimensions and flattens the rest into one mode, so
    a conv weight ``(I, J, kh, kw)`` is the 3-way ``(I, J, kh·kw)`` of the authors' code
    (``view(I, J, kh*kw)``, thesis §4.2), and a Conv3d weight ``(I, J, kd·kh·kw)``.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) == 0:
        return (1,)
    if len(dims) <= 2:
        return dims
    return (dims[0], dims[1], math.prod(dims[2:]))


def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    """(∏ of the dimensions before ``mode``, d_mode, ∏ of those after)."""
    return math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])


def mode_statistics(
    G: Tensor, out: Sequence[Tensor] | None = None, *, scale: float = 1.0, beta: float = 0.0
) -> list[Tensor]:
    r"""The contractions ``G^{(i)} = mat_i(G) mat_i(G)ᵀ``, i = 1..k (thesis §4.2.1).

    One symmetric GEMM per mode through `curvlab.linalg.gram` (bitwise symmetric results; the
    blocked upper-triangle path for wide modes on CPU): the first mode is ``G₁G₁ᵀ`` of the
    ``(d_1, ∏_{j>1} d_j)`` view, the last ``GₖᵀGₖ`` of the ``(∏_{j<k} d_j, d_k)`` view, a middle
    mode moves its axis to the front first. Every trace equals ``‖G‖_F²``.

    Args:
        G: a tensor of order k ≥ 1 (already in its `tensor_shape`).
        out: optional k buffers of shapes ``(d_i, d_i)`` to write into. An optimizer that
            recomputes the statistics every step should reuse them: a fresh large result each
            step pays first-touch page faults on CPU (see `curvlab.curvature.factors`).
        scale: factor of every contraction.
        beta: accumulate into ``out`` (required then): ``out_i ← β out_i + scale · G^{(i)}``
            (`curvlab.linalg.gram`), e.g. an EMA in one pass.

    Returns:
        k symmetric PSD matrices of shapes ``(d_i, d_i)``.
    """
    if G.dim() == 0:
        raise ValueError("mode_statistics: needs a tensor of order >= 1 (see tensor_shape)")
    shape = tuple(G.shape)
    if out is not None and len(out) != len(shape):
        raise ValueError(f"out: expected {len(shape)} buffers, got {len(out)}")
    result = []
    for mode in range(len(shape)):
        pre, d, post = _split(shape, mode)
        if post == 1:  # last mode (or a vector): rows are the (∏_{j<i} d_j) fibres
            rows = G.reshape(pre, d)
        elif pre == 1:  # first mode: mat_1(G) is a plain view
            rows = G.reshape(d, post).t()
        else:
            rows = G.reshape(pre, d, post).transpose(0, 1).reshape(d, pre * post).t()
        result.append(gram(rows, scale, out=None if out is None else out[mode], beta=beta))
    return result


def trace_normalise(statistics: Sequence[Tensor]) -> list[Tensor]:
    r"""TNT's factors ``Ũ_i`` from the statistics ``E[G^{(i)}]`` (thesis eq. 4.10).

    With ``c = 1`` and the same average eigenvalue ``tr(Ũ_i)/d_i`` for every mode:

    .. math::

        c_0 = \Big(\frac{\operatorname{tr} E[G^{(1)}]}{\prod_j d_j}\Big)^{1/k}, \qquad
        \tilde U_i = \frac{E[G^{(i)}]}{c_0^{k-1} \prod_{j \ne i} d_j},

    so that ``tr(Ũ_i)/d_i = c_0`` and ``Ũ_i ∏_{j≠i} tr(Ũ_j) = E[G^{(i)}]`` (eq. 4.2). All
    traces are equal in exact arithmetic; like the authors' code we use the first mode's.
    For k = 1, ``Ũ_1 = E[G Gᵀ]``. A zero statistic (e.g. a bias whose gradient is always 0)
    gives ``Ũ_i = 0``, the limit of eq. 4.10 as the statistic goes to 0 (``Ũ_i`` scales as
    ``‖G‖^{2/k}``), instead of 0/0.
    """
    k = len(statistics)
    if k == 0:
        raise ValueError("trace_normalise: needs at least one statistic")
    if k == 1:
        return [statistics[0].clone()]
    dims = [int(s.shape[0]) for s in statistics]
    numel = math.prod(dims)
    trace = torch.diagonal(statistics[0]).sum()
    c0 = (trace / numel).clamp_min(0.0).pow(1.0 / k)
    out = []
    for stat, d in zip(statistics, dims, strict=True):
        denominator = c0.pow(k - 1) * (numel // d)
        scale = torch.where(denominator > 0, denominator.reciprocal(), torch.zeros_like(c0))
        out.append(stat * scale)
    return out


def mode_product(X: Tensor, U: Tensor, mode: int) -> Tensor:
    r"""``X ×_mode U``: ``B_{…j'…} = Σ_j X_{…j…} U_{j'j}`` (thesis §4.2.1); ``U`` is (d', d_mode).

    For a matrix, ``X ×_0 U = U X`` and ``X ×_1 U = X Uᵀ``. One GEMM (batched over the leading
    dimensions for a middle mode).
    """
    shape = tuple(X.shape)
    pre, d, post = _split(shape, mode)
    if U.dim() != 2 or U.shape[1] != d:
        raise ValueError(f"mode_product: U {tuple(U.shape)} does not act on mode {mode} of {shape}")
    new_shape = (*shape[:mode], U.shape[0], *shape[mode + 1 :])
    if post == 1:
        return (X.reshape(pre, d) @ U.mT).reshape(new_shape)
    if pre == 1:
        return (U @ X.reshape(d, post)).reshape(new_shape)
    return torch.matmul(U, X.reshape(pre, d, post)).reshape(new_shape)


def multi_mode_product(X: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """``X ×_1 U_1 ×_2 ⋯ ×_k U_k`` = (U_1 ⊗ ⋯ ⊗ U_k) vec(X) reshaped (Prop. 1, eq. 4.3)."""
    if len(matrices) != X.dim():
        raise ValueError(
            f"multi_mode_product: {len(matrices)} matrices for a tensor of order {X.dim()}"
        )
    for mode, U in enumerate(matrices):
        X = mode_product(X, U, mode)
    return X


def kron_dense(matrices: Sequence[Tensor]) -> Tensor:
    """``U_1 ⊗ ⋯ ⊗ U_k`` acting on the row-major vec (tests and tiny tensors only)."""
    if not matrices:
        raise ValueError("kron_dense: needs at least one matrix")
    out = matrices[0]
    for U in matrices[1:]:
        out = torch.kron(out, U)
    return out
