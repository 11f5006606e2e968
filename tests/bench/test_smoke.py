"""Smoke tests of the `curvlab` CLI, in-process (style anchors §L7: seconds, no benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvlab.bench.cli import main, parse_value
from curvlab.bench.records import load_record, load_records

RUN = ["--problem", "synthetic-mlp", "--steps", "3", "--no-progress"]


def _bench(out: Path, optimizer: str = "sgd-m", *extra: str) -> int:
    return main(["bench", *RUN, "--optimizer", optimizer, "--out", str(out), *extra])


def test_bench_writes_a_record_that_reads_back(tmp_path: Path) -> None:
    assert _bench(tmp_path, "sgd-m", "--set", "lr=0.05") == 0
    path = tmp_path / "synthetic-mlp" / "sgd-m" / "seed0.json"
    record = load_record(path)
    assert record.to_dict() == json.loads(path.read_text())
    assert record.hyperparameters == {"lr": 0.05, "momentum": 0.9}
    assert len(record.step_loss) == len(record.step_time) == 3
    assert [e.step for e in record.epochs] == [0, 3]
    assert record.summary["steps"] == 3 and record.summary["status"] == "completed"
    assert record.config["test_metric"] == "test_error"
    assert record.environment["torch"]
    assert (tmp_path / "environment.json").is_file()


def test_report_writes_markdown_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench(tmp_path, "sgd-m") == 0
    assert _bench(tmp_path, "adam", "--seed", "1") == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--target", "10"]) == 0
    printed = capsys.readouterr().out.split()
    md = tmp_path / "report.md"
    png = tmp_path / "plots" / "synthetic-mlp.png"
    assert printed == [str(md), str(png)]
    text = md.read_text()
    assert "| synthetic-mlp | adam |" in text and "| synthetic-mlp | sgd-m |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_each_optimizer_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compare", *RUN, "--optimizers", "sgd-m,adam", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "× sgd-m" in out and "| synthetic-mlp | adam |" in out
    assert {r.label for r in load_records(tmp_path)} == {"sgd-m", "adam"}


def test_list_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"sgd-m", "adam", "rmsprop", "adagrad", "amsgrad"} <= {
        o["name"] for o in data["optimizers"]
    }
    assert "curves-autoencoder" in {p["name"] for p in data["problems"]}
    assert main(["list"]) == 0
    assert "Presets" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--problem", "nope", "--optimizer", "sgd-m", "--steps", "1"],
        ["bench", "--problem", "synthetic-mlp", "--optimizer", "nope", "--steps", "1"],
        ["bench", *RUN, "--optimizer", "adam", "--preset", "nope"],
        ["bench", *RUN, "--optimizer", "adam", "--set", "novalue"],
        ["bench", *RUN, "--optimizer", "adam", "--set", "lr=-1"],
        ["compare", *RUN, "--optimizers", "sgd-m,nope"],
        ["compare", "--problem", "nope"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path)] if argv[0] != "frobnicate" else argv) == 2
    err = capsys.readouterr().err
    if "nope" in argv:
        assert "nope" in err and "valid" in err


def test_unknown_optimizer_message_lists_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--problem", "synthetic-mlp", "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'sgd'" in err and "sgd-m" in err and "adam" in err


def test_report_of_empty_directory_fails_cleanly(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("0.1", 0.1),
        ("1e-3", 1e-3),
        ("true", True),
        ("False", False),
        ("none", None),
        ("true_fisher", "true_fisher"),
        ("0.9,0.999", [0.9, 0.999]),
    ],
)
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_products_command_prints_ratios_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "products.json"
    argv = ["products", "--problem", "synthetic-mlp", "--repeats", "1", "--threads", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "| hessian |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["problem"] == "synthetic-mlp"
    assert {"hessian", "ggn"} <= set(result["ratios"])
    assert all(r > 0 for r in result["ratios"].values())


def test_bench_resume_needs_a_checkpoint_and_finished_runs_leave_none(tmp_path: Path) -> None:
    assert _bench(tmp_path, "sgd-m", "--resume") == 2  # nothing to resume
    assert _bench(tmp_path, "sgd-m") == 0
    assert not list(tmp_path.rglob("*.ckpt.pt"))


def test_smw_cost_command_prints_both_tables_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from curvlab.bench.problems import get_problem

    try:
        get_problem("fmnist-mlp-logistic").load_dataset()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "smw.json"
    argv = ["smw-cost", "--widths", "20", "--steps", "1", "--repeats", "1", "--threads", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| width | parameters |" in printed and "per million parameters" in printed
    row = json.loads(out.read_text())["widths"][0]
    assert row["methods"]["sgd-m"]["ratio_to_sgd"] == 1.0
    assert row["methods"]["hessian-free"]["mean_cg_iterations"] >= 1
