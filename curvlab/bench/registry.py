"""Name lookup shared by the bench registries (problems, optimizers, presets).

A wrong name is the most common CLI mistake, so every registry answers it the same way: an
`UnknownNameError` whose message lists the valid names. The CLI turns it into exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

__all__ = ["UnknownNameError", "lookup"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry; ``str(err)`` lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(kind, name)

    def __str__(self) -> str:
        choices = ", ".join(self.valid) if self.valid else "(none)"
        return f"unknown {self.kind} {self.name!r}; valid {self.kind}s: {choices}"


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name]``, or an `UnknownNameError` that lists ``registry``'s keys."""
    try:
        return registry[name]
    except KeyError:
        raise UnknownNameError(kind, name, registry) from None
