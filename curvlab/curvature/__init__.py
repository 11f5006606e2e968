"""Layer-wise curvature machinery: layer adapters, capture hooks, factor statistics, blocks
and the cost model of their work (`curvlab.curvature.cost`)."""

from curvlab.curvature.blocks import CurvatureBlock, KroneckerBlock, TensorBlock
from curvlab.curvature.factors import input_factor, output_factor
from curvlab.curvature.hooks import Capture, LayerRecord, capture
from curvlab.curvature.layers import KroneckerLayer, find_layers, is_supported

__all__ = [
    "Capture",
    "CurvatureBlock",
    "KroneckerBlock",
    "KroneckerLayer",
    "LayerRecord",
    "TensorBlock",
    "capture",
    "find_layers",
    "input_factor",
    "is_supported",
    "output_factor",
]
