"""Matrix-free curvature-vector products with autograd and `torch.func`.

`curvature_operator` builds, once per step, a symmetric linear operator on flat parameter
vectors: the exact Hessian (Pearlmutter), the generalised Gauss-Newton Jᵀ H_L J (R-op / L-op),
the Fisher, or a finite-difference Hessian. The one-shot helpers build one and apply it once.
"""

from __future__ import annotations

from curvlab.autodiff.functional import ParameterView, flatten
from curvlab.autodiff.output_curvature import OutputCurvature, output_curvature
from curvlab.autodiff.products import (
    DEFAULT_FD_EPSILON,
    KINDS,
    CurvatureOperator,
    curvature_operator,
    fisher_vector_product,
    flat_gradient,
    ggn_vector_product,
    hessian_vector_product,
)

__all__ = [
    "DEFAULT_FD_EPSILON",
    "KINDS",
    "CurvatureOperator",
    "OutputCurvature",
    "ParameterView",
    "curvature_operator",
    "fisher_vector_product",
    "flat_gradient",
    "flatten",
    "ggn_vector_product",
    "hessian_vector_product",
    "output_curvature",
]
