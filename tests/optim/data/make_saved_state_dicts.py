"""Writes ``saved_state_dicts.pt``: optimizer state dicts saved by an earlier curvlab, so that
`tests/optim/test_saved_state_dicts.py` checks that they still load and continue exactly.

Run from a checkout of the version to record (the file in the repository was written at
commit c3f3a18, before the block-base redesign)::

    python tests/optim/data/make_saved_state_dicts.py tests/optim/data/saved_state_dicts.pt

Per configuration: the model's and the optimizer's state dicts after 5 steps of a tiny
float64 MLP, and the parameters after 5 more steps.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

import curvlab.optim as O
from curvlab import Objective
from curvlab.testing.models import regression_problem, tiny_mlp

#: name → (class name, keyword arguments); also read by the test.
CONFIGURATIONS: dict[str, tuple[str, dict]] = {
    "kfac": ("KFAC", dict(lr=0.1, damping=0.1)),
    "kfac-before-step-ef": (
        "KFAC", dict(lr=0.1, damping=0.1, statistics="before_step", fisher="empirical")
    ),
    "tso-alra-first-stage": ("TSOALRAFirstStage", dict(lr=0.1, inverse_every=2)),
    "tso-alra": ("TSOALRA", dict(lr=0.1, inverse_every=2, switch_at_step=7)),
    "kbfgs": ("KBFGS", dict(lr=0.1, damping=0.1)),
    "kbfgs-l-20": ("KBFGS", dict(lr=0.3, damping=0.1, variant="ch2", memory=3)),
    "tnt": ("TNT", dict(lr=0.01, damping=0.1)),
    "shampoo": ("Shampoo", dict(lr=0.01, damping=1e-3, root_method="eigh")),
    "hessian-free": ("HessianFree", {}),
    "smw-gn": ("SMWGN", dict(lr=1.0)),
    "ellipsoidal-tr": ("EllipsoidalTR", dict(radius=0.05)),
    "arc": ("ARC", {}),
    "edf": ("EDF", {}),
    "efficient-tr": ("EfficientTR", {}),
}  # fmt: skip


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = regression_problem(n=16 * 10, seed=1)
    return list(zip(x.split(16), y.split(16), strict=True))


def main(path: str) -> None:
    warnings.filterwarnings("ignore")
    out = {}
    for name, (cls, kwargs) in CONFIGURATIONS.items():
        torch.manual_seed(0)
        model = tiny_mlp((4, 8, 3))
        opt = getattr(O, cls)(model, **kwargs)
        data = batches()
        for x, y in data[:5]:
            opt.step(Objective(model, nn.MSELoss(), x, y))
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        for x, y in data[5:]:
            opt.step(Objective(model, nn.MSELoss(), x, y))
        out[name] = {"model": saved[0], "optimizer": saved[1], "final": model.state_dict()}
    torch.save(out, path)


if __name__ == "__main__":
    main(sys.argv[1])
