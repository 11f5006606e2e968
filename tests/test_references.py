"""References in curvlab's comments and strings resolve inside the repository.

Docstrings cite the papers themselves (section, algorithm, equation). What stays as a short tag —
a numbered thesis ambiguity (``A7``) or a source label (``[C-TR]``, ``[P3]``, ``[R]``, ...) — must
have an entry in ``docs/deviations.md``, and a file that uses one must say where to look. Nothing
may point at the project's spec files, which are not in the repository ("spec §4.6",
"spec [R]", "spec-thesis A24", "style anchors §L7").
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "curvlab"
DEVIATIONS = ROOT / "docs" / "deviations.md"
POINTER = "docs/deviations.md"

#: Being rewritten; remove from this set when done. A path ending in "/" excludes a folder.
EXCLUDED: set[str] = set()

#: Pointers to files outside the repository.
OUTSIDE = re.compile(
    r"\bspec-(?:papers|thesis)\b"  # spec-papers §5.2, spec-thesis A24
    r"|\bspec\s*(?:§|\[|A\d)"  # spec §4.6, spec [R], spec A21
    r"|\bstyle[ -]anchors?\b"
    r"|\bshared/(?:spec|seeds)\b"
)

#: A thesis ambiguity: "A7", "(A8-like)", "thesis A27" — not "A100", "0xA1", "FP16", "x.A1".
A_TAG = re.compile(r"(?<![\w.\-/])A[1-9]\d?(?!\w)")

#: A source label: "[C-TR]", "[P3]", "[R]", "[M]" — not an index such as "x[M]".
LABEL = re.compile(r"(?<![\w\]])\[(?:C-[A-Z]+|P\d|R|M)\]")


def _defined_tags() -> set[str]:
    """Tags with an entry: a ``### TAG — …`` heading, or the first cell of a table row."""
    text = DEVIATIONS.read_text(encoding="utf-8")
    headings = re.findall(r"^###\s+(A\d+|\[[^\]]+\])\s", text, flags=re.M)
    cells = re.findall(r"^\|\s*(\[[^\]]+\])\s*\|", text, flags=re.M)
    return set(headings) | set(cells)


def _excluded(rel: str) -> bool:
    return any(rel == e or (e.endswith("/") and rel.startswith(e)) for e in EXCLUDED)


def _sources() -> list[tuple[str, Path]]:
    files = sorted(PACKAGE.rglob("*.py"))
    rels = [(p.relative_to(ROOT).as_posix(), p) for p in files]
    return [(rel, p) for rel, p in rels if not _excluded(rel)]


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and string literal (docstrings included) in ``path``."""
    out = []
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            for offset, line in enumerate(tok.string.splitlines()):
                out.append((tok.start[0] + offset, line))
    return out


def _tags(text: str) -> list[str]:
    return A_TAG.findall(text) + LABEL.findall(text)


def test_tag_patterns_skip_identifiers_hex_and_units() -> None:
    assert _tags("FP16, A100, 0xA1, xA1, A1_b, self.A1, A1x, sm_A10, RA2") == []
    assert _tags("Deviation (A8-like), thesis A27; (A7).") == ["A8", "A27", "A7"]
    assert _tags("x[M], ys[R], [C-TR] iter_TR, [P3] §4.2, [R] 0.5") == ["[C-TR]", "[P3]", "[R]"]
    assert OUTSIDE.search("overrides over the spec's defaults") is None
    assert OUTSIDE.search("`curvlab.bench.specs.OPTIMIZERS`") is None
    for ref in ("spec §13 item 10", "spec [R]", "spec A21", "spec-papers §4.6", "spec-thesis §8"):
        assert OUTSIDE.search(ref) is not None, ref


def test_excluded_paths_exist() -> None:
    """Stale entries must go: a path that was moved or finished is no longer excluded."""
    missing = [e for e in sorted(EXCLUDED) if not (ROOT / e).exists()]
    assert not missing, f"remove from EXCLUDED: {missing}"


def test_deviation_entries_are_unique_and_numbered_in_order() -> None:
    text = DEVIATIONS.read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^###\s+A(\d+)\s", text, flags=re.M)]
    assert numbers == sorted(set(numbers)), numbers
    assert OUTSIDE.search(text) is None


def test_no_pointer_outside_the_repository() -> None:
    hits = [
        f"{rel}:{line}: {text.strip()}"
        for rel, path in _sources()
        for line, text in _prose(path)
        if OUTSIDE.search(text)
    ]
    assert not hits, "cite the paper, not the spec:\n" + "\n".join(hits)


def test_every_tag_has_an_entry_in_deviations_md() -> None:
    defined = _defined_tags()
    unknown = [
        f"{rel}:{line}: {tag}"
        for rel, path in _sources()
        for line, text in _prose(path)
        for tag in _tags(text)
        if tag not in defined
    ]
    assert not unknown, f"no entry in {POINTER}:\n" + "\n".join(unknown)


@pytest.mark.parametrize("rel,path", _sources(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_file_with_tags_says_where_they_are_defined(rel: str, path: Path) -> None:
    prose = _prose(path)
    if any(_tags(text) for _, text in prose):
        assert any(POINTER in text for _, text in prose), f"{rel}: mention {POINTER}"
