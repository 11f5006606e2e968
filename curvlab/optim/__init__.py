"""curvlab's optimizers: one file per algorithm, on the bases in `curvlab.optim.base`,
`curvlab.optim.modelwise` and `curvlab.optim.tensorwise`, plus the generic two-stage wrapper
`TwoStage`."""

from curvlab.optim.arc import ARC
from curvlab.optim.base import BlockOptimizer
from curvlab.optim.edf import EDF
from curvlab.optim.efficient_tr import EfficientTR, HybridTRSGD
from curvlab.optim.hessian_free import HessianFree
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.smw import SMWGN, SMWNG, SMWNGBD
from curvlab.optim.switching import TwoStage
from curvlab.optim.tensorwise import TensorwiseOptimizer
from curvlab.optim.tnt import TNT
from curvlab.optim.trust_region import EllipsoidalTR
from curvlab.optim.tso_alra import TSOALRA, TSOALRAFirstStage

__all__ = [
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
    "TNT",
    "TSOALRA",
    "BlockOptimizer",
    "ModelwiseOptimizer",
    "Proposal",
    "Shampoo",
    "TSOALRAFirstStage",
    "TensorwiseOptimizer",
    "TwoStage",
]
