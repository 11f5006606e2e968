"""Imports point one way: bench → optim → curvature → linalg → torch (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import curvlab.optim
from curvlab.bench.specs import OPTIMIZERS

ROOT = Path(curvlab.optim.__file__).parents[1]

# package → curvlab packages it must not import
FORBIDDEN = {
    "linalg": {"curvature", "optim", "bench", "data", "testing", "objective", "autodiff"},
    "curvature": {"optim", "bench", "data", "testing"},
    "optim": {"bench", "data", "testing"},
    "data": {"optim", "curvature", "bench", "testing"},
    "solvers": {"optim", "bench", "data", "testing", "curvature", "autodiff", "objective"},
    "distributed": {
        "optim",
        "bench",
        "data",
        "testing",
        "curvature",
        "objective",
        "autodiff",
        "solvers",
    },
    "autodiff": {"optim", "bench", "data", "testing", "solvers", "curvature"},
    "objective.py": {"optim", "curvature", "bench", "data", "testing"},
    "testing": {"bench"},
}


def _curvlab_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "curvlab":
            names = [f"curvlab.{alias.name}" for alias in node.names]  # from curvlab import bench
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "curvlab" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_point_one_way(package: str) -> None:
    target = ROOT / package
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    for path in files:
        bad = _curvlab_imports(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports curvlab.{bad}"


# Wrappers of other optimizers: benchmarked through the methods built on them
# (TwoStage: tso-alra; seed 003's hybrid).
WRAPPERS = {"TwoStage"}


def test_every_exported_optimizer_is_in_the_bench() -> None:
    files = {spec.file for spec in OPTIMIZERS.values()}
    for name in curvlab.optim.__all__:
        obj = getattr(curvlab.optim, name)
        if name.endswith("Optimizer") or name in WRAPPERS or not isinstance(obj, type):
            continue
        if not hasattr(obj, "step"):
            continue
        module = obj.__module__.replace(".", "/") + ".py"
        assert module in files, f"{name} ({module}) has no entry in curvlab.bench.specs"


TESTS = Path(__file__).parent


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in curvlab.testing (or a conftest.py), not in test modules:
    no file under tests/ imports ``tests`` or anything in it."""
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["tests (relative)"]
            else:
                continue
            bad = [n for n in names if n == "tests" or n.startswith(("tests.", "tests "))]
            assert not bad, f"{path.relative_to(TESTS.parent)} imports {bad}"
