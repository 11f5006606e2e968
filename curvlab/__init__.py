"""curvlab: second-order (curvature-aware) optimizers for PyTorch, and a benchmark lab."""

from curvlab import distributed
from curvlab.objective import Objective
from curvlab.optim import (
    ARC,
    EDF,
    KBFGS,
    KFAC,
    SMWGN,
    SMWNG,
    SMWNGBD,
    TNT,
    TSOALRA,
    BlockOptimizer,
    EfficientTR,
    EllipsoidalTR,
    HessianFree,
    HybridTRSGD,
    ModelwiseOptimizer,
    Proposal,
    Shampoo,
    TensorwiseOptimizer,
    TSOALRAFirstStage,
    TwoStage,
)

__version__ = "0.1.0"

__all__ = [
    # data-parallel helpers (torch.distributed)
    "distributed",
    # closures
    "Objective",
    # optimizers
    "ARC",
    "EDF",
    "EfficientTR",
    "EllipsoidalTR",
    "HessianFree",
    "HybridTRSGD",
    "KBFGS",
    "KFAC",
    "SMWGN",
    "SMWNG",
    "SMWNGBD",
    "Shampoo",
    "TNT",
    "TSOALRA",
    "TSOALRAFirstStage",
    # wrappers
    "TwoStage",
    # bases for new methods
    "BlockOptimizer",
    "ModelwiseOptimizer",
    "TensorwiseOptimizer",
    "Proposal",
]
