"""`curvlab reproduce thesis-ch4` and `thesis-ch5` at smoke scale (generated data, seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from curvlab.bench.reproduce.smoke import check_smoke_reproduction, restored_registries


@pytest.fixture(autouse=True)
def _registries() -> Iterator[None]:
    with restored_registries():
        yield


@pytest.mark.parametrize("name", ["thesis-ch4", "thesis-ch5"])
def test_smoke_reproduction_writes_a_report_with_verdicts(name: str, tmp_path: Path) -> None:
    check_smoke_reproduction(name, tmp_path)


def test_a_second_invocation_reuses_every_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from curvlab.bench.reproduce.cli import main

    check_smoke_reproduction("thesis-ch5", tmp_path)
    report = (tmp_path / "thesis-ch5" / "report.md").read_text()
    capsys.readouterr()
    assert main(["thesis-ch5", "--scale", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "[thesis-ch5]" not in capsys.readouterr().err  # nothing ran again
    assert (tmp_path / "thesis-ch5" / "report.md").read_text() == report
