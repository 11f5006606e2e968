"""curvlab: second-order (curvature-aware) optimizers for PyTorch, and a benchmark lab."""

from curvlab.objective import Objective
from curvlab.optim import KFAC, LayerwiseOptimizer, ModelwiseOptimizer, Proposal

__version__ = "0.1.0"

__all__ = [
    # closures
    "Objective",
    # optimizers
    "KFAC",
    # bases for new methods
    "LayerwiseOptimizer",
    "ModelwiseOptimizer",
    "Proposal",
]
