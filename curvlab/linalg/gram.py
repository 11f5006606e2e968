r"""Gram matrices and exponential moving averages for Kronecker-factor statistics.

K-FAC estimates its factors as :math:`A = \frac{1}{n} \sum_i a_i a_i^\top = \frac1n X^\top X`
(Martens & Grosse 2015, §3), which makes the Gram matrix the hot path of the factor statistics.
BLAS ``syrk`` would compute only one triangle, but torch exposes none, and a general ``gemm`` on
:math:`X^\top X` is neither half the work nor guaranteed to be bitwise symmetric (MKL's result
for a (1000, 7) input is not). :func:`gram` therefore

* for wide inputs on CPU (``d ≥ 192``) splits the columns into blocks of ``b`` and computes only
  the block upper triangle, one ``gemm`` per block row (:math:`X_{:,I}^\top X_{:,I:}`), then
  mirrors the strictly upper blocks into the lower ones: :math:`(B + 1)/(2B)` of the flops for
  ``B`` blocks;
* otherwise uses one ``gemm`` followed by the symmetrisation :math:`(R + R^\top)/2`.

Measured on the development machine (AMD EPYC, 2 vCPUs, MKL, ``torch.set_num_threads(2)``,
float32, median ms on an otherwise idle machine; plain is ``X.T @ X`` without symmetrisation,
which ``torch.mm(X.t(), X)`` and ``torch.addmm`` match):

===============  =======  ========  =======================
shape (n, d)     plain    gram      path
===============  =======  ========  =======================
(1000, 1001)     9.4      6.0       blocked, b = 128
(1000, 785)      5.7      3.8       blocked, b = 128
(1000, 501)      2.4      1.7       blocked, b = 96
(1000, 31)       0.028    0.032     gemm + symmetrise
(12800, 76)      0.91     0.92      gemm + symmetrise
(1000, 7)        0.007    0.011     gemm + symmetrise
===============  =======  ========  =======================

The gain starts around ``d ≈ 200`` (0.44 vs 0.48 ms at (1000, 200), none at d = 129), hence the
threshold 192 (at d = 250, 0.54 vs 0.66 ms in the K-FAC step). It holds for other
``n`` ((128, 1001): 1.6 vs 3.4 ms; (12800, 785): 57 vs 76 ms)
and single-threaded. Caveat: with the two cores oversubscribed by other processes, the ~3 parallel
regions per block row wait on descheduled threads and the blocked path can become slower than one
gemm. Accelerators were not measured; they keep the single-gemm path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ema_", "gram"]

#: Smallest number of columns for which the blocked upper-triangle product is used (CPU only).
_BLOCKED_MIN_COLS = 192


def _block_size(d: int) -> int:
    """Column block size of the blocked Gram product (tuned on CPU with 2 threads)."""
    return 128 if d >= 512 else 96


def _gram_blocked(X: Tensor, scale: float, b: int, out: Tensor, beta: float) -> Tensor:
    """``beta · out + scale · XᵀX`` computing only the upper block triangle, then mirroring it
    (``out`` symmetric when ``beta`` ≠ 0)."""
    d = X.shape[1]
    Xt = X.t()
    starts = range(0, d, b)
    for i in starts:
        e = min(i + b, d)
        # Block row I, columns I and everything to its right, scaled, straight into the output.
        block = out[i:e, i:]
        torch.addmm(block, Xt[i:e], X[:, i:], beta=beta, alpha=scale, out=block)
        if e < d:
            out[e:, i:e] = out[i:e, e:].t()
    _symmetrise_diagonal_blocks(out, b)
    return out


def _symmetrise_diagonal_blocks(out: Tensor, b: int) -> None:
    """``D ← (D + Dᵀ)/2`` for the (b, b) diagonal blocks of ``out`` and its smaller last one:
    the full blocks as one strided batch (two ops instead of five per block)."""
    d = out.shape[0]
    full = d // b
    rows, cols = out.stride()
    if full:
        blocks = out.as_strided(
            (full, b, b), (b * (rows + cols), rows, cols), storage_offset=out.storage_offset()
        )
        blocks.copy_(torch.add(blocks, blocks.transpose(1, 2)).mul_(0.5))
    if full * b < d:
        tail = out[full * b :, full * b :]
        tail.copy_(torch.add(tail, tail.t()).mul_(0.5))


def gram(X: Tensor, scale: float = 1.0, *, out: Tensor | None = None, beta: float = 0.0) -> Tensor:
    r"""Scaled Gram matrix :math:`\text{scale}\cdot X^\top X`, exactly symmetric; with ``beta``
    accumulated into ``out``: :math:`\text{out} \leftarrow \beta\,\text{out} +
    \text{scale}\cdot X^\top X`.

    See the module docstring for the two computation paths and their measured timings. The
    result equals ``scale * X.T @ X`` to floating-point tolerance (blocks are summed over the
    same rows, only in a different gemm partition) and satisfies ``torch.equal(R, R.T)``.
    Accumulating fuses an exponential moving average ``β M + (1−β) XᵀX/n`` into the product
    (``beta=β, scale=(1−β)/n``): no separate statistics buffer and no extra pass over it.

    Args:
        X: Matrix of shape ``(n, d)``, e.g. the ``n`` input rows (activations) or output
            gradients of a layer.
        scale: Factor applied to the product, e.g. ``1 / n``.
        out: optional ``(d, d)`` tensor (may be a view into a larger matrix) to write into;
            required when ``beta`` ≠ 0, and then exactly symmetric (as this function's results
            are), which keeps the result exactly symmetric.
        beta: Factor of ``out``'s previous content; 0 (default) ignores it (NaN included).

    Returns:
        The ``(d, d)`` symmetric PSD (up to round-off) matrix, ``out`` when given, in ``X``'s
        dtype.
    """
    if beta != 0.0 and out is None:
        raise ValueError("gram: beta != 0 accumulates into out, which must be given")
    if X.dim() != 2:
        raise ValueError(f"gram expects a matrix (n, d), got shape {tuple(X.shape)}")
    d = X.shape[1]
    blocked = (
        X.device.type == "cpu"
        and d >= _BLOCKED_MIN_COLS
        and not (X.requires_grad and torch.is_grad_enabled())
    )
    if out is None:
        out = X.new_empty(d, d)
    elif out.shape != (d, d):
        raise ValueError(f"gram: out must have shape {(d, d)}, got {tuple(out.shape)}")
    if blocked:
        return _gram_blocked(X, scale, _block_size(d), out, beta)
    R = torch.mm(X.t(), X)
    # (R + Rᵀ)·(scale/2): fl(a + b) = fl(b + a), so the result is bitwise symmetric.
    if beta == 0.0:
        return out.copy_(torch.add(R, R.t())).mul_(0.5 * scale)
    return out.mul_(beta).add_(torch.add(R, R.t()), alpha=0.5 * scale)


def ema_(avg: Tensor, new: Tensor, decay: float) -> Tensor:
    r"""In-place exponential moving average :math:`\bar{M} \leftarrow \beta \bar{M} + (1-\beta) M`.

    Implemented as ``avg.lerp_(new, 1 - decay)``, i.e. :math:`\bar M + (1-\beta)(M - \bar M)`,
    one fused pass (Martens & Grosse 2015, §5, running estimates of the factors). Elementwise, so
    symmetric inputs give a bitwise symmetric average.

    Args:
        avg: Running average, updated in place.
        new: New estimate, broadcastable to ``avg``.
        decay: :math:`\beta \in [0, 1]`; 0 replaces ``avg`` by ``new``, 1 keeps ``avg``.

    Returns:
        ``avg`` (the same tensor object).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    return avg.lerp_(new, 1.0 - decay)
