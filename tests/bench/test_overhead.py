"""Tests of ``curvlab overhead`` on the tiny synthetic MLP: seconds, no real benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from curvlab.bench.cli import main
from curvlab.bench.overhead import (
    FLOOR_TERMS,
    Gemm,
    Variant,
    default_variants,
    format_overhead,
    layer_geometry,
    measure_overhead,
)
from curvlab.bench.problems import get_problem

TINY = ["--problem", "synthetic-mlp", "--steps", "3", "--repeats", "1", "--warmup", "1"]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_cli_writes_table_and_json_with_floor_at_least_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    assert main(["overhead", *TINY, "--json", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "| variant | ms/step (mean) |" in printed and "| kfac-ef/before |" in printed

    result = json.loads(out.read_text())
    assert result["config"]["problem"] == "synthetic-mlp"
    assert result["config"]["threads"] == 2
    methods = {m["name"]: m for m in result["methods"]}
    assert set(methods) == {v.name for v in default_variants()}
    assert methods["sgd-m"]["ratio"] == pytest.approx(1.0)
    assert all(m["target"] is None for m in methods.values())  # the bounds: AE only
    for name, row in methods.items():
        assert _finite(row["mean_ms"]) and row["mean_ms"] > 0, name
        assert _finite(row["median_ms"]) and row["median_ms"] > 0, name
        assert len(row["turn_means_ms"]) == 1
        assert row["skipped_steps"] == 0
        if name.startswith("kfac"):
            assert _finite(row["floor_ratio"]) and row["floor_ratio"] >= 1.0, name
            assert _finite(row["measured_over_floor"]), name
            terms = row["floor_terms_ms"]
            assert set(terms) == set(FLOOR_TERMS)
            assert all(_finite(t) and t >= 0 for t in terms.values())
            assert row["floor_extra_ms"] == pytest.approx(sum(terms.values()))
            # The analytic FLOP model equals what the optimizer really executes.
            assert row["floor_extra_gflop"] == pytest.approx(row["counted_extra_gflop"])
    # The statistics terms follow the variant: no extra forward before the step, no
    # statistics backward for the empirical Fisher that shares the loss's backward pass.
    assert methods["kfac"]["floor_terms_ms"]["extra_forward"] > 0
    assert methods["kfac/before"]["floor_terms_ms"]["extra_forward"] == 0
    assert methods["kfac/before"]["floor_terms_ms"]["statistics_backward"] > 0
    assert methods["kfac-ef/before"]["floor_terms_ms"]["statistics_backward"] == 0
    every = methods["kfac/T1=10"]["floor_terms_ms"]
    assert every["factor_A"] == pytest.approx(methods["kfac"]["floor_terms_ms"]["factor_A"] / 10)
    assert all(_finite(g["gflop_per_s"]) and g["gflop_per_s"] > 0 for g in result["gemms"].values())
    assert all(_finite(t) and t > 0 for t in result["inversions_ms"].values())


def test_layer_geometry_of_the_synthetic_mlp() -> None:
    problem = get_problem("synthetic-mlp")
    geo = layer_geometry(problem.make_model(0), torch.zeros(5, 20))
    assert [(g.rows, g.fan_in, g.d_out, g.d_a) for g in geo] == [
        (5, 20, 32, 21),
        (5, 32, 32, 33),
        (5, 32, 3, 33),
    ]
    assert [g.input_grad for g in geo] == [False, True, True]  # no input gradient below layer 1


def test_gemm_flops_and_timing() -> None:
    g = Gemm(4, 5, 6, "tn")
    assert g.flops == 240 and g.label == "(4×5)@(5×6) tn"
    assert 0 < g.seconds(torch.float32) < 1


def test_measure_overhead_needs_the_baseline_and_valid_counts() -> None:
    with pytest.raises(ValueError, match="baseline"):
        measure_overhead("synthetic-mlp", steps=1, repeats=1, variants=[Variant("adam", "adam")])
    with pytest.raises(ValueError, match="steps"):
        measure_overhead("synthetic-mlp", steps=0)


def test_format_marks_targets() -> None:
    result = measure_overhead(
        "synthetic-mlp",
        steps=2,
        repeats=1,
        warmup=0,
        threads=1,
        variants=[Variant("sgd-m", "sgd-m"), Variant("kfac", "kfac", {}, 1000.0)],
    )
    text = format_overhead(result)
    assert "| kfac |" in text and "≤ 1000 ✓" in text and "amortisation exact: no" in text


def test_unknown_problem_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["overhead", "--problem", "nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
