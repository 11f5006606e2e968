"""The cost model the block methods give of their step (`BlockOptimizer.step_cost`): terms,
schedules, the real matrices behind each decomposition, the storage formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from curvlab import KBFGS, KFAC, TNT, Objective, Shampoo
from curvlab.curvature.cost import COST_TERMS, LayerShape
from curvlab.linalg.cost import Decomposition
from curvlab.optim.base import BlockOptimizer
from curvlab.optim.tso_alra import TSOALRAFirstStage
from curvlab.testing.models import regression_problem, tiny_mlp

M = 16
#: tiny_mlp (4, 5, 3) at a batch of M: no input gradient below the first layer.
SHAPES = [LayerShape("0", M, 4, 5, True, False), LayerShape("2", M, 5, 3, True, True)]

METHODS: dict[str, Callable[[nn.Module], BlockOptimizer]] = {
    "kfac": lambda m: KFAC(m, lr=1e-3, curvature_every=2, inverse_every=6),
    "kfac-alg7": lambda m: KFAC(m, lr=1e-3, inverse_warmup=4, statistics="before_step"),
    "kbfgs": lambda m: KBFGS(m, lr=1e-3, curvature_every=3),
    "kbfgs-l": lambda m: KBFGS(m, lr=1e-3, memory=2),
    "tnt": lambda m: TNT(m, lr=1e-4, curvature_every=2, inverse_every=4),
    "shampoo": lambda m: Shampoo(m, root_method="eigh", inverse_every=5, inverse_warmup=False),
    "tso-alra": lambda m: TSOALRAFirstStage(m, inverse_every=3, fisher="true"),
}


def _stepped(method: str, steps: int = 2) -> BlockOptimizer:
    model = tiny_mlp()
    opt = METHODS[method](model)
    x, y = regression_problem(M)
    for _ in range(steps):
        opt.step(Objective(model, nn.MSELoss(), x, y))
    return opt


@pytest.mark.parametrize("method", list(METHODS))
def test_items_have_known_terms_and_the_schedule_frequencies(method: str) -> None:
    opt = _stepped(method)
    items = opt.step_cost(SHAPES)
    assert items and all(item.term in COST_TERMS for item in items)
    statistics, refresh = opt.cost_schedule()
    for item in items:
        want = {"precondition": 1.0, "inversion": refresh}.get(item.term, statistics)
        assert item.per_step == pytest.approx(want), (item.term, item.what)
    assert all(item.op.flops > 0 for item in items if item.term != "inversion")
    assert opt.cost_period() % round(1 / statistics) == 0
    if refresh:
        assert opt.cost_period() % round(1 / refresh) == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_decompositions_name_the_matrices_the_refresh_decomposes(method: str) -> None:
    opt = _stepped(method)
    matrices = opt.refresh_matrices()
    decompositions = [i.op for i in opt.step_cost(SHAPES) if isinstance(i.op, Decomposition)]
    assert {dec.source for dec in decompositions} == set(matrices)
    for dec in decompositions:
        assert matrices[dec.source].shape == (dec.d, dec.d)
    if method.startswith("kbfgs"):
        assert not decompositions  # K-BFGS refreshes nothing
    # A copy: the optimizer's state is not handed out.
    for name, matrix in matrices.items():
        matrix.add_(1.0)
        assert not torch.equal(matrix, opt.refresh_matrices()[name])


def test_unused_layers_cost_nothing() -> None:
    opt = _stepped("kfac")
    only_last = opt.step_cost(SHAPES[1:])
    assert {item.block for item in only_last} == {"2"}
    assert opt.storage_formula(SHAPES[1:]).elements == 6**2 + 3**2


def test_warmup_steps_and_storage_formulas() -> None:
    layers = [(4, 5), (5, 3)]  # (fan-in, d_out)
    kronecker = sum((n + 1) ** 2 + d * d for n, d in layers)
    tensors = sum(d * d + n * n + d * d for n, d in layers)  # weight (d, n) and bias (d,)
    expected = {
        "kfac": (0, kronecker, "thesis Table 3.1, KFAC"),
        "kfac-alg7": (4, kronecker, "thesis Table 3.1, KFAC"),
        "kbfgs": (0, kronecker, "thesis Table 3.1, K-BFGS"),
        "kbfgs-l": (
            2 * 1 + 1,
            sum((n + 1) ** 2 + 2 * d for n, d in layers),
            "thesis Table 3.1, K-BFGS(L)",
        ),
        "tnt": (4, tensors, "thesis Table 4.1"),  # inverse_warmup: the first T2 steps
        "shampoo": (0, tensors, "thesis Table 4.1"),
        "tso-alra": (0, kronecker, "thesis Table 3.1, KFAC"),
    }
    for method, (warmup, elements, table) in expected.items():
        opt = METHODS[method](tiny_mlp())
        formula = opt.storage_formula(SHAPES)
        assert (opt.cost_warmup_steps(), formula.elements, formula.table) == (
            warmup,
            elements,
            table,
        ), method


def test_diagnostics_report_pairs_and_retries() -> None:
    lbfgs = _stepped("kbfgs-l", steps=3)
    diagnostics = lbfgs.cost_diagnostics()
    assert diagnostics["lbfgs_pairs"] == {"0": 2, "2": 2}  # p = 2: full after 2 updates
    assert diagnostics["skipped_g_pairs_total"] == 0 == diagnostics["skipped_a_pairs_total"]
    assert _stepped("shampoo").cost_diagnostics() == {
        "retried_decompositions": 0,
        "failed_refreshes": 0,
    }


def test_tso_alra_roots_are_eigh_square_roots_every_t_int_steps() -> None:
    opt = _stepped("tso-alra")
    decs = [i for i in opt.step_cost(SHAPES) if isinstance(i.op, Decomposition)]
    assert {(i.op.method, i.op.root) for i in decs} == {("eigh", 2)}
    assert all(math.isclose(i.per_step, 1 / 3) for i in decs)
    assert [i.block for i in opt.step_cost(SHAPES) if i.term == "statistics_backward"] == ["2"]
