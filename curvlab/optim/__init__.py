"""curvlab's optimizers: one file per algorithm, on the bases in `curvlab.optim.base` and
`curvlab.optim.modelwise`."""

from curvlab.optim.base import LayerwiseOptimizer
from curvlab.optim.kfac import KFAC
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal

__all__ = ["KFAC", "LayerwiseOptimizer", "ModelwiseOptimizer", "Proposal"]
