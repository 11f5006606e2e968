"""`curvlab reproduce adaptive-norms` and `efficient-tr` at smoke scale (seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from curvlab.bench.reproduce.smoke import check_smoke_reproduction, restored_registries


@pytest.fixture(autouse=True)
def _registries() -> Iterator[None]:
    with restored_registries():
        yield


@pytest.mark.parametrize("name", ["adaptive-norms", "efficient-tr"])
def test_smoke_reproduction_writes_a_report_with_verdicts(name: str, tmp_path: Path) -> None:
    check_smoke_reproduction(name, tmp_path)
