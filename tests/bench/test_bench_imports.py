"""The bench's modules import each other one way: no import cycle among them.

An import cycle makes a module's names depend on which module was imported first and has to be
hidden behind imports inside functions; the reproductions had one (the framework imported the
report to write it, the report imported the framework's types). Every import counts, those
inside functions included. Importing a submodule (``from curvlab.bench.reproduce import
problems``) is an edge to that submodule, not to the package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import curvlab

SOURCE = Path(curvlab.__file__).parents[1]  # the directory that holds curvlab/


def _module(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = SOURCE.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(source: str, package: str) -> set[str]:
    """The curvlab modules that ``source``, a module of ``package``, imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_module(sub) else base)
    return {name for name in found if name.split(".")[0] == "curvlab"}


def import_graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports."""
    root = SOURCE.joinpath(*package.split("."))
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = _module(path)
        parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(path.read_text(), parent)
    return {m: found & graph.keys() - {m} for m, found in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["curvlab.bench.reproduce", "curvlab.bench"])
def test_no_import_cycle(package: str) -> None:
    assert cycles(import_graph(package)) == []


def test_the_check_finds_cycles_and_imports_inside_functions() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    package = "curvlab.bench.reproduce"
    lazy = "def f():\n    from curvlab.bench.reproduce.report import write_report\n"
    assert _imports(lazy, package) == {"curvlab.bench.reproduce.report"}
    submodule = "from curvlab.bench.reproduce import problems as P\nimport torch\n"
    assert _imports(submodule, package) == {"curvlab.bench.reproduce.problems"}
    relative = "from . import report\nfrom .framework import Context\n"
    assert _imports(relative, package) == {
        "curvlab.bench.reproduce.report",
        "curvlab.bench.reproduce.framework",
    }
