"""Smoke test of the product-cost benchmark helper (one round on a tiny model, no timing claims)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.bench.cost.products import PRODUCT_TARGETS, format_products, measure_products
from curvlab.objective import Objective
from curvlab.testing.models import tiny_cnn, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def test_measure_products_reports_every_method_with_finite_ratios() -> None:
    model = tiny_cnn(batchnorm=True)
    model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    obj = Objective(model, nn.CrossEntropyLoss(), x, y)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    result = measure_products(model, obj, repeats=1, products_per_build=2)
    names = [m["name"] for m in result["methods"]]
    assert names == ["hessian", "ggn", "hessian-fd", "hessian/torch.func", "ggn/torch.func"]
    for m in result["methods"]:
        assert math.isfinite(m["ratio_min"]) and m["ratio_min"] > 0
        assert m["flop_ratio"] is not None and m["flop_ratio"] > 0
        assert m["target"] == PRODUCT_TARGETS.get(m["kind"])
    ggn = next(m for m in result["methods"] if m["name"] == "ggn")
    assert ggn["build_ms"] is not None and ggn["product_ms"]["min"] > 0
    assert result["ratios"]["ggn"] == ggn["ratio_min"]
    # The measurement leaves the model, its gradients and the global RNG as they were.
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    table = format_products(result)
    assert "| ggn |" in table and "≤ 2" in table


def test_measure_products_validates_its_arguments() -> None:
    model = tiny_mlp()
    obj = Objective(
        tiny_mlp(),
        nn.MSELoss(),
        torch.randn(3, 4, dtype=torch.float64),
        torch.randn(3, 3, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="^objective"):
        measure_products(model, obj, repeats=1)
    obj = Objective(model, nn.MSELoss(), obj.inputs, obj.targets)
    with pytest.raises(ValueError, match="^repeats"):
        measure_products(model, obj, repeats=0)
    with pytest.raises(ValueError, match="^products_per_build"):
        measure_products(model, obj, repeats=1, products_per_build=0)
