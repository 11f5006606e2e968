"""Spies for the model-wide methods' tests: forward passes, curvature operators, proposals."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from curvlab.objective import Objective
from curvlab.optim.modelwise import Proposal

__all__ = ["count_forwards", "spy_operators", "spy_proposals"]


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[list[int]]:
    """``[n]``: the number of forward passes of ``model`` inside the block (functional ones,
    `torch.func.functional_call`, included)."""
    count = [0]

    def hook(*args: Any) -> None:
        count[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def spy_operators(opt: Any) -> list[weakref.ref[Any]]:
    """Weak references to the curvature operator of every step (``opt._operator`` at the end
    of `propose`); dead after ``step`` when no autograd graph outlives the step."""
    refs: list[weakref.ref[Any]] = []
    original = opt.propose

    def propose(objective: Objective, loss: Tensor, g: Tensor) -> Proposal:
        proposal: Proposal = original(objective, loss, g)
        assert opt._operator is not None
        refs.append(weakref.ref(opt._operator))
        return proposal

    opt.propose = propose
    return refs


def spy_proposals(opt: Any) -> list[Proposal]:
    """Record every proposal the optimizer makes (its step before acceptance)."""
    seen: list[Proposal] = []
    original = opt.propose

    def propose(objective: Objective, loss: Tensor, g: Tensor) -> Proposal:
        proposal: Proposal = original(objective, loss, g)
        seen.append(proposal)
        return proposal

    opt.propose = propose
    return seen
