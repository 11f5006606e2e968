"""Smoke checks of ``curvlab reproduce`` (for its tests): run a NAME at smoke scale and check
its report."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curvlab.bench import problems as bench_problems
from curvlab.bench import specs
from curvlab.bench.reproduce.cli import EXPERIMENTS, main

__all__ = ["DOCUMENTED_NOT_TESTABLE", "check_smoke_reproduction", "restored_registries"]

#: Claims whose verdict is "not testable here" by design (their reports say why).
DOCUMENTED_NOT_TESTABLE = frozenset(
    {"ranking-changes", "full-batch-generalization", "augmentation-l2", "cifar100-duplicates"}
)
_PNG = b"\x89PNG\r\n\x1a\n"


@contextmanager
def restored_registries() -> Iterator[None]:
    """Undo what the reproductions register in the bench registries (problems, optimizers)."""
    problems, optimizers = dict(bench_problems.PROBLEMS), dict(specs.OPTIMIZERS)
    try:
        yield
    finally:
        bench_problems.PROBLEMS.clear()
        bench_problems.PROBLEMS.update(problems)
        specs.OPTIMIZERS.clear()
        specs.OPTIMIZERS.update(optimizers)


def check_smoke_reproduction(name: str, out: Path) -> dict[str, Any]:
    """Run ``curvlab reproduce NAME --scale smoke`` into ``out`` and check what it wrote.

    Checks: exit code 0; ``report.md`` has every claim of the experiment with a computed
    verdict (held / not held; "not testable" only for `DOCUMENTED_NOT_TESTABLE`); no run was
    skipped or failed; every plot the report links is a PNG; ``verdicts.json`` and
    ``summary.md`` list the claims. Returns ``verdicts.json``.
    """
    code = main([name, "--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0, f"{name}: exit code {code}"
    root = out / name
    report = (root / "report.md").read_text()
    verdicts: dict[str, Any] = json.loads((root / "verdicts.json").read_text())
    claims = verdicts["claims"]
    assert [c["id"] for c in claims] == [c.id for c in EXPERIMENTS[name].claims]
    for claim in claims:
        assert f"**{claim['id']}**" in report
        if claim["id"] in DOCUMENTED_NOT_TESTABLE:
            assert claim["status"] == "not testable" and claim["detail"]
        else:
            assert claim["status"] in ("held", "not held"), (claim["id"], claim["detail"])
            assert claim["ours"] and claim["ours"] != "—"
    assert "## Runs not done" not in report, report.split("## Runs not done")[-1]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert links, f"{name}: the report links no plot"
    for link in links:
        assert (root / link).read_bytes()[:8] == _PNG
    summary = (out / "summary.md").read_text()
    assert all(c["id"] in summary for c in claims)
    return verdicts
