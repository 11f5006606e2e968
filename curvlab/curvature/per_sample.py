r"""Per-sample Jacobian rows in factored form: Gram matrices and J·v, Jᵀ·w without them.

Thesis §5.3.3 and §5.4.5–5.4.7 (Algs 20–22). For a layer computing :math:`h = W\bar a` per
location :math:`t` (``KroneckerLayer``: weight matrix :math:`W` with the bias as last column,
:math:`\bar a = (a, 1)`), backpropagating a scalar :math:`s` gives the layer-output vectors
:math:`\hat h_t = \partial s/\partial h_t`, and :math:`\partial s/\partial W =
\sum_t \hat h_t \bar a_t^\top`: rank one per location (Alg 20 lines 6–9). A Jacobian row of
sample :math:`i` (an output unit :math:`j` for Gauss-Newton, the loss :math:`f_i` for the
empirical Fisher) is therefore determined by the layer inputs :math:`\bar a_{it}` and the
backpropagated vectors :math:`\hat h_{ijt}`, kept here as `SampleRows`:

* ``inputs``  :math:`(N, T, d_a)`: :math:`\bar a_{it}` (the homogeneous 1 when there is a bias);
* ``outputs`` :math:`(N, k, T, d_{out})`: :math:`\hat h_{ijt}`, ``k`` rows per sample.

Inner products of two rows never form them (§5.4.6):
:math:`\langle \hat h_{ij}\bar a_i^\top, \hat h_{i'j'}\bar a_{i'}^\top\rangle =
(\bar a_i^\top\bar a_{i'})(\hat h_{ij}^\top\hat h_{i'j'})`, so a layer's Gram block is
:math:`(\hat H\hat H^\top)\odot(\bar A\bar A^\top\otimes 1_{k\times k})` (Alg 22 line 16; for
``k = 1`` the NG formula of §5.3.3 with the bias term of §5.4.6).

Extension beyond the thesis (which treats fully-connected layers, T = 1): with several
locations (Conv2d, or Linear on inputs with extra dimensions) a row is a *sum* of T rank-one
terms; the Gram block is then either the location-pair kernel
:math:`\sum_{t,t'}(\hat h_{ijt}^\top\hat h_{i'j't'})(\bar a_{it}^\top\bar a_{i't'})` or, when
that is cheaper, the product of the explicitly formed per-sample layer gradients. A layer
called several times in one forward pass contributes each call's locations.

The collectors run one forward pass of the given inputs with `capture` and backpropagate to
the layer outputs only (no weight gradients): once per output unit for GN (Alg 22 lines 3–8,
each pass batched over the samples) and once for the per-sample losses for NG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from curvlab.curvature.hooks import Capture, capture
from curvlab.curvature.layers import KroneckerLayer
from curvlab.linalg import gram

__all__ = [
    "GramMethod",
    "SampleRows",
    "jacobian_mv",
    "jacobian_tmv",
    "layer_gram",
    "loss_gradient_rows",
    "output_jacobian_rows",
    "sample_rows",
]


#: How `layer_gram` contracts locations: ``"kernel"`` (pairs of rank-one terms, the thesis's
#: form) or ``"explicit"`` (per-sample layer gradients formed first); ``"auto"``: fewer flops.
GramMethod = Literal["auto", "kernel", "explicit"]


@dataclass(frozen=True)
class SampleRows:
    """One layer's factored Jacobian rows: row (i, j) is ``Σ_t outputs[i,j,t] inputs[i,t]ᵀ``."""

    inputs: Tensor  # (N, T, d_a): ā with the homogeneous 1 for a bias
    outputs: Tensor  # (N, k, T, d_out): backpropagated ĥ

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def rows_per_sample(self) -> int:
        return int(self.outputs.shape[1])

    def select(self, index: Tensor | None, scale: float = 1.0) -> SampleRows:
        """The rows of the samples ``index`` (all when None), backpropagated vectors scaled."""
        inputs = self.inputs if index is None else self.inputs[index]
        outputs = self.outputs if index is None else self.outputs[index]
        return SampleRows(inputs, outputs if scale == 1.0 else outputs * scale)


def layer_gram(rows: SampleRows, method: GramMethod = "auto") -> Tensor:
    r"""The layer's block of :math:`JJ^\top`, shape ``(N·k, N·k)``, rows ordered (i, j).

    T = 1 (thesis Alg 22 line 16):
    :math:`(\hat H\hat H^\top) \odot (\bar A\bar A^\top \otimes 1_{k\times k})`.
    T > 1 (extension, see the module docstring): ``method="auto"`` takes the cheaper (in
    flops) of the location-pair kernel (``"kernel"``) and the explicit per-sample layer
    gradients (``"explicit"``); for T = 1 the kernel is always the cheaper.
    """
    if method not in ("auto", "kernel", "explicit"):
        raise ValueError(f"method: expected 'auto', 'kernel' or 'explicit', got {method!r}")
    A, Hh = rows.inputs, rows.outputs
    N, k, T, d_out = Hh.shape
    d_a = A.shape[-1]
    if T == 1 and method != "explicit":
        P = gram(Hh.reshape(N * k, d_out).T)  # ĥᵀĥ for every pair of rows
        V = gram(A.reshape(N, d_a).T)  # āᵀā + 1 per pair of samples (Alg 22 line 11)
        return (P.view(N, k, N, k) * V[:, None, :, None]).reshape(N * k, N * k)
    kernel_cost = (N * k * T) ** 2 * d_out + (N * T) ** 2 * d_a
    explicit_cost = N * k * T * d_out * d_a + (N * k) ** 2 * d_out * d_a
    if method == "kernel" or (method == "auto" and kernel_cost <= explicit_cost):
        P = gram(Hh.reshape(N * k * T, d_out).T).view(N, k, T, N, k, T)
        Q = gram(A.reshape(N * T, d_a).T).view(N, T, N, T)
        return torch.einsum("iatjbs,itjs->iajb", P, Q).reshape(N * k, N * k)
    M = torch.einsum("iktd,ite->ikde", Hh, A).reshape(N * k, d_out * d_a)
    return gram(M.T)


def jacobian_mv(rows: SampleRows, matrix: Tensor) -> Tensor:
    r""":math:`(J_l V)_{ij} = \sum_t \hat h_{ijt}^\top V \bar a_{it}` for a layer matrix ``V``
    of shape ``(d_out, d_a)``; returns ``(N, k)``. Cost :math:`O(NT\,d_{out}d_a)`."""
    U = rows.inputs @ matrix.T  # (N, T, d_out)
    return torch.einsum("iktd,itd->ik", rows.outputs, U)


def jacobian_tmv(rows: SampleRows, coeffs: Tensor) -> Tensor:
    r""":math:`J_l^\top c = \sum_{i,j,t} c_{ij}\hat h_{ijt}\bar a_{it}^\top`, shape
    ``(d_out, d_a)``, for coefficients ``c`` of shape ``(N, k)``.

    This is what backpropagating the custom function :math:`\sum_i c_i^\top\hat y_i` (thesis
    §5.3.2, Alg 21) computes for the layer: by linearity its output vectors are
    :math:`\sum_j c_{ij}\hat h_{ijt}`, and the weight gradient is their product with the
    inputs; the vectors are already at hand, so no further pass is needed.
    """
    d_out, d_a = rows.outputs.shape[-1], rows.inputs.shape[-1]
    C = torch.einsum("ik,iktd->itd", coeffs, rows.outputs).reshape(-1, d_out)
    return C.T @ rows.inputs.reshape(-1, d_a)


# ----------------------------------------------------------------------------- collectors
def sample_rows(
    cap: Capture, layers: Mapping[str, KroneckerLayer], phases: list[str], n: int
) -> dict[str, SampleRows]:
    """`SampleRows` per layer from a capture of a forward pass over ``n`` samples, with one
    row per sample and phase (the phases' backpropagated scalars); layers that were not
    called are left out, a phase that did not reach a layer gives zero rows."""
    out: dict[str, SampleRows] = {}
    for name, layer in layers.items():
        record = cap[name]
        if not record.inputs:
            continue
        inputs, outputs = [], []
        for call, x in enumerate(record.inputs):
            a = layer.input_rows(x)
            if a.shape[0] % n:
                raise ValueError(
                    f"model: layer '{name}' sees {a.shape[0]} input rows for {n} samples; "
                    "its input must have the batch as dimension 0"
                )
            a = a.reshape(n, -1, a.shape[-1])
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            per_phase = []
            for phase in phases:
                g = record.grads.get(phase, {}).get(call)
                if g is None:  # the layer's output does not reach this row's scalar
                    per_phase.append(a.new_zeros(n, a.shape[1], layer.d_out))
                else:
                    per_phase.append(layer.output_rows(g).reshape(n, a.shape[1], layer.d_out))
            inputs.append(a)
            outputs.append(torch.stack(per_phase, dim=1))
        out[name] = SampleRows(torch.cat(inputs, dim=1), torch.cat(outputs, dim=2))
    return out


def output_jacobian_rows(
    layers: Mapping[str, KroneckerLayer], model: nn.Module, inputs: Tensor
) -> tuple[dict[str, SampleRows], Tensor]:
    r"""Gauss-Newton rows: :math:`\hat h^{(l),(j)}_i` for every output unit j (Alg 22 l. 3–8).

    One forward pass of ``inputs`` (N samples), then for each output unit j one backward pass
    of :math:`\sum_i \hat y_{ij}` to the layer outputs only ("partial mode" of Alg 20); since
    the samples are independent, that pass gives every sample's :math:`\partial\hat y_{ij}/
    \partial h_i` at once. The outputs are flattened per sample (k = their numel / N).

    Returns:
        ``(rows, outputs)``: rows per layer with ``k = m_L`` and the detached outputs.
    """
    n = int(inputs.shape[0])
    with capture(layers) as cap:
        outputs = model(inputs)
        flat = outputs.reshape(n, -1)
        k = flat.shape[1]
        phases = [f"unit{j}" for j in range(k)]
        for j, phase in enumerate(phases):
            cap.phase = phase
            cap.backward_to_outputs(flat[:, j].sum(), retain_graph=j < k - 1)
    return sample_rows(cap, layers, phases, n), outputs.detach()


def loss_gradient_rows(
    layers: Mapping[str, KroneckerLayer],
    model: nn.Module,
    inputs: Tensor,
    summed_loss: Callable[[Tensor], Tensor],
) -> tuple[dict[str, SampleRows], Tensor]:
    r"""Empirical-Fisher rows: :math:`g_i^{(l)} = \partial f_i/\partial h_i^{(l)}` (§5.3.3).

    One forward pass and one backward pass of ``summed_loss(outputs)``, which must be
    :math:`\sum_i f_i` (the per-sample losses *summed*, so that each captured row is that
    sample's own gradient), to the layer outputs only.

    Returns:
        ``(rows, outputs)``: rows per layer with ``k = 1`` and the detached outputs.
    """
    n = int(inputs.shape[0])
    with capture(layers) as cap:
        outputs = model(inputs)
        cap.phase = "loss"
        cap.backward_to_outputs(summed_loss(outputs), retain_graph=False)
    return sample_rows(cap, layers, ["loss"], n), outputs.detach()
