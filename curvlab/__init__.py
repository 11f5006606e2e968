"""curvlab: second-order (curvature-aware) optimizers for PyTorch, and a benchmark lab."""

from curvlab.objective import Objective
from curvlab.optim import KFAC, LayerwiseOptimizer

__version__ = "0.1.0"

__all__ = [
    # closures
    "Objective",
    # optimizers
    "KFAC",
    "LayerwiseOptimizer",
]
