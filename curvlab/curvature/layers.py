"""Layers with Kronecker structure: `nn.Linear` and `nn.Conv2d` in "matrix form".

A supported layer computes ``h = W ā`` per location, with the weight matrix
``W ∈ R^{d_out × d_a}`` whose last column is the bias when there is one (thesis §2.2, Alg 1;
§3.2.2):

* Linear: ``ā = (a, 1)``; inputs of shape (m, ..., d_in) are flattened to rows, so the extra
  dimensions play the part of the spatial locations T of a conv layer.
* Conv2d (thesis §3.2, Theorem 3; Grosse & Martens 2016): ``ā_t`` is the unfolded input patch
  at output location t, ordered (channel, kh, kw) as ``weight.view(d_out, -1)``, plus the
  homogeneous 1. Any stride, padding (numbers, "same", "valid", every ``padding_mode``) and
  dilation; ``groups`` must be 1. Thesis A4 (docs/deviations.md): |T| is the number of output
  locations.

Rows of the matrix forms are ordered (example, location).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KroneckerLayer", "find_layers", "is_supported"]


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` has a Kronecker-factored curvature block here."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1


@dataclass(frozen=True, eq=False)
class KroneckerLayer:
    """One supported layer and the maps between its tensors and the matrix form."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> nn.Parameter:
        w = self.module.weight
        assert isinstance(w, nn.Parameter)
        return w

    @property
    def bias(self) -> nn.Parameter | None:
        b = self.module.bias
        return b if isinstance(b, nn.Parameter) and b.requires_grad else None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_a(self) -> int:
        """Dimension of ā: fan-in, plus one for the bias."""
        return int(self.weight[0].numel()) + (self.bias is not None)

    # ------------------------------------------------------------- matrix forms
    def input_rows(self, x: Tensor) -> Tensor:
        """The layer inputs as rows ``a`` of shape (m·|T|, fan_in), without the bias column."""
        if not self.is_conv:
            return x.reshape(-1, x.shape[-1])
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding: tuple[int, ...] | int = 0
        else:
            padding = conv.padding
        cols = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # (m, fan_in, T)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-side tensors (e.g. ∂L/∂h) as rows of shape (m·|T|, d_out)."""
        if not self.is_conv:
            return g.reshape(-1, g.shape[-1])
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """``[∇W, ∇b]`` of shape (d_out, d_a) from the parameters' gradient-shaped tensors."""
        w = weight_grad.reshape(self.d_out, -1)
        if self.bias is None:
            return w
        assert bias_grad is not None
        return torch.cat([w, bias_grad.reshape(-1, 1)], dim=1)

    def pre_activation(self, a: Tensor) -> Tensor:
        """``[W b] a`` (h = W ā, the homogeneous 1 last in ``a`` when there is a bias), without
        copying W into ``[W b]``."""
        W = self.weight.reshape(self.d_out, -1)
        if self.bias is None:
            return W @ a
        return torch.addmv(self.bias, W, a[:-1])

    def mean_input(self, inputs: list[Tensor], m: int) -> tuple[Tensor, float]:
        """(ā, |T|): the mean of ā_t(n) over examples and locations of every call (with the
        homogeneous 1 when there is a bias) and the number of rows per example.

        The patches are linear in the input, so the sum of all examples' patches is the patch
        matrix of the batch-summed input: one unfold of a single image instead of m.
        """
        total: Tensor | None = None
        n_rows = 0
        for x in inputs:
            per = self.input_rows(x.sum(0, keepdim=True))
            part = per.sum(0)
            total = part if total is None else total + part
            n_rows += per.shape[0] * x.shape[0]
        assert total is not None
        mean = total / n_rows
        if self.bias is not None:
            mean = torch.cat([mean, mean.new_ones(1)])
        return mean, n_rows / m

    def sum_outputs(self, grads: list[Tensor]) -> Tensor:
        """Σ over examples, locations and calls of output-side tensors (e.g. ∂L/∂h_t(n))."""
        total: Tensor | None = None
        for g in grads:
            part = g.sum(dim=(0, 2, 3)) if self.is_conv else g.reshape(-1, g.shape[-1]).sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of `grad_matrix`: tensors shaped like ``params``."""
        if self.bias is None:
            return [matrix.reshape(self.weight.shape)]
        return [matrix[:, :-1].reshape(self.weight.shape), matrix[:, -1].reshape(self.bias.shape)]


def find_layers(model: nn.Module) -> dict[str, KroneckerLayer]:
    """Every supported layer of ``model`` whose weight is trainable, by module name."""
    return {
        name: KroneckerLayer(name, module)
        for name, module in model.named_modules()
        if is_supported(module) and module.weight.requires_grad
    }
