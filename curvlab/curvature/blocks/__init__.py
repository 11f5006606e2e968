"""Curvature blocks: the `CurvatureBlock` interface and its kinds (Kronecker, tensor)."""

from curvlab.curvature.blocks.base import CurvatureBlock, State, count_retry
from curvlab.curvature.blocks.kronecker import DampingSplit, KroneckerBlock
from curvlab.curvature.blocks.tensor import RootMethod, TensorBlock

__all__ = [
    "CurvatureBlock",
    "DampingSplit",
    "KroneckerBlock",
    "RootMethod",
    "State",
    "TensorBlock",
    "count_retry",
]
