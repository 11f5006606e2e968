"""curvlab's optimizers: one file per algorithm, on the bases in `curvlab.optim.base` and
`curvlab.optim.modelwise`, plus the generic two-stage wrapper `TwoStage`."""

from curvlab.optim.base import LayerwiseOptimizer
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.modelwise import ModelwiseOptimizer, Proposal
from curvlab.optim.switching import TwoStage
from curvlab.optim.tso_alra import TSOALRA, TSOALRAFirstStage

__all__ = [
    "KBFGS",
    "KFAC",
    "TSOALRA",
    "LayerwiseOptimizer",
    "ModelwiseOptimizer",
    "Proposal",
    "TSOALRAFirstStage",
    "TwoStage",
]
