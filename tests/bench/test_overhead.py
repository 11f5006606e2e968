"""Tests of ``curvlab overhead`` and its floors on tiny problems: seconds, no real benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from curvlab.bench.cli import main
from curvlab.bench.cost.floor_model import FLOOR_TERMS, floor_flops
from curvlab.bench.cost.floors import floor_items
from curvlab.bench.cost.geometry import layer_geometry
from curvlab.bench.cost.memory import state_bytes, storage_formula
from curvlab.bench.cost.operations import best_time, counted_flops
from curvlab.bench.cost.overhead import (
    DEFAULT_METHODS,
    Variant,
    default_variants,
    format_overhead,
    measure_overhead,
    through_entries,
)
from curvlab.bench.problems import get_problem
from curvlab.linalg.cost import Decomposition, Gemm, RowSum
from curvlab.objective import Objective
from curvlab.optim.kbfgs import KBFGS
from curvlab.optim.kfac import KFAC
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.tnt import TNT

TINY = ["--problem", "synthetic-mlp", "--steps", "1", "--repeats", "1", "--warmup", "1"]
#: synthetic-mlp 20-32-32-3: (fan-in, d_out) of its three Linear layers, all with a bias.
LAYERS = [(20, 32), (32, 32), (32, 3)]
M = 5  # rows of the hand-counted geometry


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _tiny_geometry() -> tuple[nn.Module, list[Any]]:
    model = get_problem("synthetic-mlp").make_model(0)
    return model, layer_geometry(model, torch.zeros(M, 20))


def _per_term(items: list[Any]) -> dict[str, float]:
    return {k: v for k, v in floor_flops(items).items() if v}


# ------------------------------------------------------------------ floor terms by hand
def test_kfac_floor_equals_hand_count() -> None:
    model, geo = _tiny_geometry()
    opt = KFAC(model, curvature_every=2, inverse_every=20)  # true Fisher, after the step
    items = floor_items(opt, geo)
    assert items is not None
    fwd = sum(2 * M * n * d for n, d in LAYERS)
    bwd = sum(2 * M * d * n for n, d in LAYERS[1:])  # no input gradient below layer 1
    A = sum(2 * n * M * n + M * n for n, _ in LAYERS)  # XᵀX + column sums (bias)
    G = sum(2 * d * M * d for _, d in LAYERS)
    P = sum(2 * d * d * (n + 1) + 2 * d * (n + 1) * (n + 1) for n, d in LAYERS)
    assert _per_term(items) == pytest.approx(
        {
            "extra_forward": fwd / 2,
            "statistics_backward": bwd / 2,
            "factor_A": A / 2,
            "factor_G": G / 2,
            "precondition": P,
        }
    )
    decs = sorted((i.op.d, i.per_step) for i in items if isinstance(i.op, Decomposition))
    assert decs == sorted([(n + 1, 1 / 20) for n, _ in LAYERS] + [(d, 1 / 20) for _, d in LAYERS])


@pytest.mark.parametrize("memory", [None, 4])
def test_kbfgs_floor_equals_hand_count(memory: int | None) -> None:
    model, geo = _tiny_geometry()
    items = floor_items(KBFGS(model, memory=memory), geo)
    assert items is not None
    fwd = sum(2 * M * n * d for n, d in LAYERS)
    bwd = sum(2 * M * d * n for n, d in LAYERS[1:])  # second pass: no weight gradients
    # ā (M·n adds), s_A = H_A ā, Xᵀ(X s_A), H_A y_A (matvecs), rank-2 update of H_A.
    A = sum(M * n + 2 * (n + 1) ** 2 + 2 * (2 * M * n) + 2 * (n + 1) ** 2 + 4 * (n + 1) ** 2
            for n, _ in LAYERS)  # fmt: skip
    # h̄ and h̄⁺ (matvecs), ā⁺, D̄h, D̄h⁺ (sums), then the H_G work.
    G = sum(2 * (2 * d * (n + 1)) + M * n + 2 * M * d for n, d in LAYERS)
    if memory is None:
        G += sum(2 * d * d + 2 * d * d + 4 * d * d for _, d in LAYERS)  # H y, H ỹ, rank 2
        P = sum(2 * d * (n + 1) ** 2 + 2 * d * d * (n + 1) for n, d in LAYERS)
    else:
        k = memory
        # one compact H y: [S;Y]y, two k×k triangular solves, (YᵀY) r, [S Y] c; new SᵀY, YᵀY row
        G += sum(4 * k * d + 2 * k * k + 2 * k * k + 4 * k * d + 3 * 2 * k * d for _, d in LAYERS)
        P = sum(
            2 * d * (n + 1) ** 2  # V H_A
            + 2 * 2 * k * d * (n + 1)  # [S;Y] (V H_A)
            + 2 * k * k * (n + 1)  # two triangular solves
            + 2 * k * k * (n + 1)  # (YᵀY) R
            + 2 * d * 2 * k * (n + 1)  # [S Y] C
            for n, d in LAYERS
        )
    assert _per_term(items) == pytest.approx(
        {
            "extra_forward": fwd,
            "statistics_backward": bwd,
            "factor_A": A,
            "factor_G": G,
            "precondition": P,
        }
    )
    assert not any(isinstance(i.op, Decomposition) for i in items)  # no decomposition at all


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
def test_tensorwise_floor_equals_hand_count(method: str) -> None:
    model, geo = _tiny_geometry()
    opt = TNT(model) if method == "tnt" else Shampoo(model, root_method="eigh")
    items = floor_items(opt, geo)
    assert items is not None
    # Weight (d, n): mode 0 contracts over n (d×d), mode 1 over d (n×n); bias (d,): an outer
    # product. Preconditioning: U₀ V, V U₁ᵀ, and bᵀ Uᵀ.
    G = sum(2 * n * d * d + 2 * d * d for n, d in LAYERS)
    A = sum(2 * d * n * n for n, d in LAYERS)
    P = sum(2 * d * d * n + 2 * d * n * n + 2 * d * d for n, d in LAYERS)
    expected = {"factor_A": A, "factor_G": G, "precondition": P}
    if method == "tnt":  # the sampled-label backward, with weight gradients and bias sums
        expected["statistics_backward"] = sum(2 * M * d * n for n, d in LAYERS[1:])
        expected["statistics_weight_grad"] = sum(2 * d * M * n + M * d for n, d in LAYERS)
    assert _per_term(items) == pytest.approx(expected)
    decs = sorted(
        (i.op.method, i.op.d, i.op.root) for i in items if isinstance(i.op, Decomposition)
    )
    if method == "tnt":
        want = [("cholesky", x, 1) for n, d in LAYERS for x in (d, n, d)]
    else:  # inverse 4th roots of a matrix's factors, square root of a vector's
        want = [("eigh", d, 4) for n, d in LAYERS] + [("eigh", n, 4) for n, d in LAYERS]
        want += [("eigh", d, 2) for _, d in LAYERS]
    assert decs == sorted(want)
    assert all(i.per_step == pytest.approx(1 / 20) for i in items if i.term == "inversion")


# ------------------------------------------------------------------ memory accounting
def test_state_bytes_and_storage_formulas() -> None:
    problem = get_problem("synthetic-mlp")
    data = problem.data()
    x, y = data.train_inputs[:16], data.train_targets[:16]
    loss_fn = problem.make_loss()

    def stepped(make: Any) -> torch.optim.Optimizer:
        model = problem.make_model(0)
        opt: torch.optim.Optimizer = make(model)
        for _ in range(3):
            opt.step(Objective(model, loss_fn, x, y))  # type: ignore[arg-type]
        return opt

    sgd = stepped(lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    n_params = sum(n * d + d for n, d in LAYERS)
    assert state_bytes(sgd) == 4 * n_params  # the momentum, float32
    _, geo = _tiny_geometry()
    # K-BFGS: H_A (d_a²), H_G (d_out²), s_G and y_G (d_out each), and one preconditioning
    # buffer shared by the layers (the largest d_out × d_a).
    big = max(d * (n + 1) for n, d in LAYERS)
    kbfgs = stepped(lambda m: KBFGS(m, lr=1e-3))
    assert state_bytes(kbfgs) - state_bytes(sgd) == 4 * (
        sum((n + 1) ** 2 + d * d + 2 * d for n, d in LAYERS) + big
    )
    formula = storage_formula(kbfgs, geo)
    assert formula is not None and formula.elements == sum((n + 1) ** 2 + d * d for n, d in LAYERS)
    # K-BFGS(L), p = 2 pairs: the ring of S and Y (2 · p × d_out), its SᵀY and YᵀY (2p²);
    # no shared buffer (its directions are formed and checked before any is applied).
    p = 2
    lbfgs = stepped(lambda m: KBFGS(m, lr=1e-3, memory=p))
    assert state_bytes(lbfgs) - state_bytes(sgd) == 4 * sum(
        (n + 1) ** 2 + 2 * p * d + 2 * p * p + 2 * d for n, d in LAYERS
    )
    formula = storage_formula(lbfgs, geo)
    assert formula is not None and formula.elements == sum((n + 1) ** 2 + 2 * d for n, d in LAYERS)
    # K-FAC: A, G, their inverses and the reused factor buffers (`FactorBuffers`), 3 × Σ
    # (d_a² + d_out²), plus the true-Fisher sampler's generator state.
    kfac = stepped(lambda m: KFAC(m, lr=1e-3))
    factors = sum((n + 1) ** 2 + d * d for n, d in LAYERS)
    sampler = kfac.state_dict()["state"][0]["sampler_state"].numel()
    assert state_bytes(kfac) - state_bytes(sgd) == 4 * 3 * factors + sampler
    # TNT / Shampoo: statistics and preconditioners, Σ_i d_i² each, per tensor (Table 4.1
    # counts Σ_i d_i² once); the statistics buffers of the first step are freed once the
    # statistics go straight into the EMAs (`TensorBlock.accumulate`).
    per_tensor = sum(d * d + n * n + d * d for n, d in LAYERS)
    for make in (lambda m: TNT(m, lr=1e-4), lambda m: Shampoo(m, root_method="eigh")):
        opt = stepped(make)
        assert state_bytes(opt) - state_bytes(sgd) == 4 * 2 * per_tensor
        formula = storage_formula(opt, geo)
        assert formula is not None and formula.elements == per_tensor
    # K-FAC's reused factor buffers (an attribute, not state) count too.
    kfac = stepped(lambda m: KFAC(m, lr=1e-3))
    assert state_bytes(kfac) - state_bytes(sgd) == 4 * 3 * sum(
        (n + 1) ** 2 + d * d for n, d in LAYERS
    )


# ------------------------------------------------------------------ end to end
def _lbfgs_excess(k: int) -> float:
    """Matrix-product FLOPs per step K-BFGS(L) executes beyond its floor, by hand: the product
    H ỹ for the pair check (the products SᵀY and YᵀY are kept up to date, not recomputed).
    """
    return float(sum(2 * k * k + 4 * k * d for _, d in LAYERS))


def test_cli_runs_every_method_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    # T2 = 2 keeps the FLOP-counting period (one T1/T2 cycle, under FlopCounterMode) short.
    fast = ["--inverse-every", "2", "--floor-repeats", "1", "--threads", "1", "--no-progress"]
    chosen = "kfac,kbfgs,kbfgs-l,tnt,shampoo"
    assert main(["overhead", *TINY, "--methods", chosen, *fast, "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "| variant | ms/step (mean) |" in printed and "| kbfgs-l |" in printed
    assert "memory beyond sgd-m (MB)" in printed and "thesis Table 4.1" in printed

    result = json.loads(out.read_text())
    assert result["config"]["problem"] == "synthetic-mlp" and result["config"]["threads"] == 1
    methods = {m["name"]: m for m in result["methods"]}
    want = default_variants(2, methods=chosen.split(","))
    assert [m["name"] for m in result["methods"]] == [v.name for v in want]
    assert methods["tnt"]["hyperparameters"]["inverse_every"] == 2
    assert methods["sgd-m"]["ratio"] == pytest.approx(1.0)
    assert all(m["target"] is None for m in methods.values())  # the targets: AE only
    for name, row in methods.items():
        assert _finite(row["mean_ms"]) and row["mean_ms"] > 0, name
        assert len(row["turn_means_ms"]) == 1 and row["skipped_steps"] == 0, name
        if name in ("sgd-m", "adam"):
            continue
        assert _finite(row["floor_ratio"]) and row["floor_ratio"] > 1.0, name
        assert _finite(row["measured_over_floor"]), name
        terms = row["floor_terms_ms"]
        assert set(terms) == set(FLOOR_TERMS) and all(t >= 0 for t in terms.values()), name
        assert row["floor_extra_ms"] == pytest.approx(sum(terms.values())), name
        # The floor's matrix products are what the optimizer executes (FlopCounterMode over a
        # full T1/T2 period), except the work K-BFGS(L) repeats beyond its floor.
        excess = _lbfgs_excess(100) if name == "kbfgs-l" else 0.0
        assert 1e9 * row["executed_beyond_floor_gflop"] == pytest.approx(excess, abs=1), name
    assert methods["kbfgs-l"]["warmup"] == 101  # until its 100 pairs are stored
    assert methods["kbfgs-l"]["diagnostics"]["lbfgs_pairs"] == {"0": 100, "2": 100, "4": 100}
    assert methods["shampoo"]["diagnostics"] == {"retried_decompositions": 0, "failed_refreshes": 0}
    # Statistics terms follow the method: K-BFGS's second pass has no weight gradients, TNT's
    # sampled backward has no forward, Shampoo has no extra pass; only TNT/Shampoo decompose.
    kb, tnt, sh = (methods[k]["floor_terms_ms"] for k in ("kbfgs", "tnt", "shampoo"))
    assert kb["extra_forward"] > 0 and kb["statistics_weight_grad"] == 0 == kb["inversion"]
    assert tnt["extra_forward"] == 0 and tnt["statistics_weight_grad"] > 0 < tnt["inversion"]
    assert sh["statistics_backward"] == 0 == sh["statistics_weight_grad"] and sh["inversion"] > 0
    mem = {k: methods[k]["memory"] for k in ("tnt", "kbfgs", "kbfgs-l", "sgd-m")}
    assert mem["sgd-m"]["extra_bytes"] == 0
    assert mem["tnt"]["over_formula"] == pytest.approx(2.0)  # statistics and inverses
    assert mem["kbfgs-l"]["extra_bytes"] == 4 * sum(
        (n + 1) ** 2 + 200 * d + 2 * 100**2 + 2 * d for n, d in LAYERS
    )
    assert any("eigh root 1/4" in k for k in result["inversions_ms"])  # Shampoo, real factors
    assert all(_finite(t) and t > 0 for t in result["inversions_ms"].values())
    assert all(_finite(g["gflop_per_s"]) and g["gflop_per_s"] > 0 for g in result["gemms"].values())


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_floor_of_a_method_without_a_cli_group_is_what_it_executes(fisher: str) -> None:
    """Any block method has a floor (here TSO-ALRA's first stage, eigh square roots): its
    matrix products are those the step executes, and the decompositions of K-FAC and
    TSO-ALRA are timed on their own factors A and G."""
    hp = {"inverse_every": 2, "fisher": fisher}
    result = measure_overhead(
        "synthetic-mlp",
        steps=2,
        repeats=1,
        warmup=2,
        threads=1,
        floor_repeats=1,
        variants=[
            Variant("sgd-m", "sgd-m"),
            Variant("tso", "tso-alra-stage1", hp),
            Variant("kfac", "kfac", {"inverse_every": 2, "lr": 1e-3}),
        ],
    )
    tso = next(m for m in result["methods"] if m["name"] == "tso")
    assert 1e9 * tso["executed_beyond_floor_gflop"] == pytest.approx(0.0, abs=1)
    assert tso["memory"]["table"] == "thesis Table 3.1, KFAC"
    assert (tso["floor_terms_ms"]["statistics_backward"] > 0) == (fisher == "true")
    labels = set(result["inversions_ms"])
    layers = [("0", 21, 32), ("2", 33, 32), ("4", 33, 3)]  # (name, d_a, d_out)
    assert {f"eigh root 1/2 d={da} [tso/{name}:A]" for name, da, _ in layers} <= labels
    assert {f"inverse d={do} [kfac/{name}:G]" for name, _, do in layers} <= labels


def test_methods_and_lr_options(capsys: pytest.CaptureFixture[str]) -> None:
    variants = default_variants(methods=["tnt", "kbfgs"], lrs={"tnt": 1e-6})
    assert [v.name for v in variants] == ["sgd-m", "tnt", "kbfgs"]
    assert variants[1].hparams["lr"] == 1e-6 and variants[1].hparams["inverse_warmup"] is False
    assert variants[1].target == 3.0 and variants[2].target == 2.8
    assert {"kbfgs", "kbfgs-l", "tnt", "shampoo"} <= set(DEFAULT_METHODS)
    assert main(["overhead", *TINY, "--methods", "kfac,nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["overhead", *TINY, "--lr", "tnt", "--no-progress"]) == 2
    assert "lr" in capsys.readouterr().err


def test_layer_geometry_of_the_synthetic_mlp() -> None:
    problem = get_problem("synthetic-mlp")
    geo = layer_geometry(problem.make_model(0), torch.zeros(5, 20))
    assert [(g.rows, g.fan_in, g.d_out, g.d_a) for g in geo] == [
        (5, 20, 32, 21),
        (5, 32, 32, 33),
        (5, 32, 3, 33),
    ]
    assert [g.input_grad for g in geo] == [False, True, True]  # no input gradient below layer 1


def test_operations_flops_labels_and_timing() -> None:
    g = Gemm(4, 5, 6, "tn")
    assert g.flops == 240 and g.label == "(4×5)@(5×6) tn" and g.counted_by_torch
    assert 0 < best_time(g.runner(torch.float32)) < 1
    rank2 = Gemm(6, 2, 6, "nn", accumulate=True)
    assert rank2.flops == 144 and not rank2.counted_by_torch  # FlopCounterMode skips addmm_
    H = torch.zeros(6, 6)
    assert counted_flops(lambda: H.addmm_(torch.ones(6, 2), torch.ones(2, 6))) == 0
    assert RowSum(3, 4).flops == 12


def test_measure_overhead_needs_the_baseline_and_valid_counts() -> None:
    with pytest.raises(ValueError, match="baseline"):
        measure_overhead("synthetic-mlp", steps=1, repeats=1, variants=[Variant("adam", "adam")])
    with pytest.raises(ValueError, match="steps"):
        measure_overhead("synthetic-mlp", steps=0)
    with pytest.raises(ValueError, match="methods"):
        default_variants(methods=["sgd"])


def test_format_marks_targets() -> None:
    result = measure_overhead(
        "synthetic-mlp",
        steps=2,
        repeats=1,
        warmup=0,
        threads=1,
        floor_repeats=1,
        variants=[Variant("sgd-m", "sgd-m"), Variant("kbfgs", "kbfgs", {"lr": 1e-3}, 1000.0)],
    )
    text = format_overhead(result)
    assert "| kbfgs |" in text and "≤ 1000 ✓" in text and "amortisation exact: yes" in text


def test_unknown_problem_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["overhead", "--problem", "nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_entry_points_are_timed_side_by_side_and_run_the_same_step() -> None:
    """``--entries``: each method also through a plain closure and the loop's own backward
    pass (told the loss), interleaved in the same turns; every entry executes the same matrix
    products per step (a step through the user's loop costs what the Objective's does)."""
    variants = through_entries(
        [Variant("sgd-m", "sgd-m"), Variant("kfac", "kfac", {"lr": 1e-3})],
        ["objective", "backward", "closure"],
    )
    assert [v.name for v in variants] == [
        "sgd-m", "sgd-m@backward", "sgd-m@closure", "kfac", "kfac@backward", "kfac@closure"
    ]  # fmt: skip
    result = measure_overhead(
        "synthetic-mlp", steps=2, repeats=1, warmup=2, threads=1, floor_repeats=1,
        variants=variants,
    )  # fmt: skip
    methods = {m["name"]: m for m in result["methods"]}
    for name in ("kfac@backward", "kfac@closure"):
        assert methods[name]["skipped_steps"] == 0
        assert methods[name]["executed_beyond_floor_gflop"] == pytest.approx(
            methods["kfac"]["executed_beyond_floor_gflop"], abs=1e-9
        )
    with pytest.raises(ValueError, match="^entries"):
        through_entries(variants, ["objectiv"])
