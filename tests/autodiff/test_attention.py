"""Curvature products through attention: the fused scaled-dot-product kernels have no double
backward, so the operators that need one (Hessian, GGN R-op) run attention in the math kernel
without the user asking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.optim import EllipsoidalTR, HessianFree


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: HessianFree(m),
        lambda m: EllipsoidalTR(m),
        lambda m: EllipsoidalTR(m, curvature="ggn"),
    ],
    ids=["hessian-free-ggn", "tr-hessian", "tr-ggn"],
)
def test_model_wide_steps_through_attention(make: object) -> None:
    torch.manual_seed(0)
    model = _Encoder()
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    opt = make(model)  # type: ignore[operator]
    loss = opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert torch.isfinite(loss)
    assert opt.last_step_info["skipped"] is False
