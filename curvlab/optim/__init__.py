"""curvlab's optimizers: one file per algorithm, on the bases in `curvlab.optim.base`."""

from curvlab.optim.base import LayerwiseOptimizer
from curvlab.optim.kfac import KFAC

__all__ = ["KFAC", "LayerwiseOptimizer"]
