"""The block methods in the training loops users have: ``loss.backward(); opt.step()`` and
``opt.step(closure)``, against the same algorithm stepped with a `curvlab.Objective` (float64,
equal to round-off); and the errors that say what to pass where a loop cannot work."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab import Objective
from curvlab.optim import KBFGS, KFAC, TNT, EllipsoidalTR, HessianFree, Shampoo, TSOALRAFirstStage
from curvlab.testing.models import tiny_mlp

F64 = torch.float64


def _data(steps: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(steps, 16, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (steps, 16), generator=g)
    return list(zip(x, y, strict=True))


#: name → (factory(model, loss_fn), whether the plain loop (no closure) is supported).
CASES: dict[str, Callable[..., Any]] = {
    "kfac": lambda m, lf: KFAC(m, lr=0.1, damping=0.1, loss_fn=lf),
    "kfac-before-step": lambda m, lf: KFAC(
        m, lr=0.1, damping=0.1, statistics="before_step", loss_fn=lf
    ),
    "kfac-ef-before-step": lambda m, lf: KFAC(
        m, lr=0.1, damping=0.1, fisher="empirical", statistics="before_step", loss_fn=lf
    ),
    "tso-alra": lambda m, lf: TSOALRAFirstStage(m, lr=0.1, inverse_every=2, loss_fn=lf),
    "tso-alra-true": lambda m, lf: TSOALRAFirstStage(
        m, lr=0.1, inverse_every=2, fisher="true", init="first_batch", loss_fn=lf
    ),
    "tnt": lambda m, lf: TNT(m, lr=0.01, damping=0.1, loss_fn=lf),
    "tnt-ef": lambda m, lf: TNT(m, lr=0.01, damping=0.1, fisher="empirical", loss_fn=lf),
    "shampoo": lambda m, lf: Shampoo(m, lr=0.01, damping=1e-3, root_method="eigh", loss_fn=lf),
}


def _objective_run(make: Callable[..., Any], loss_fn: Any) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_mlp((4, 8, 3))
    opt = make(model, None)
    for x, y in _data():
        opt.step(Objective(model, loss_fn, x, y))
    return [p.detach().clone() for p in model.parameters()]


def _plain_run(make: Callable[..., Any], loss_fn: Any, closure: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_mlp((4, 8, 3))
    opt = make(model, loss_fn)
    for x, y in _data():

        def step_closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(step_closure)
        else:
            step_closure()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("closure", [False, True], ids=["backward-then-step", "closure"])
@pytest.mark.parametrize("name", CASES)
def test_plain_loop_step_equals_the_objective_step(name: str, closure: bool) -> None:
    loss_fn = nn.CrossEntropyLoss()
    expected = _objective_run(CASES[name], loss_fn)
    got = _plain_run(CASES[name], loss_fn, closure)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kfac_empirical_after_step_reruns_a_plain_closure() -> None:
    def make(m: nn.Module, lf: Any) -> KFAC:
        return KFAC(m, lr=0.1, damping=0.1, fisher="empirical", loss_fn=lf)

    loss_fn = nn.CrossEntropyLoss()
    expected = _objective_run(make, loss_fn)
    got = _plain_run(make, loss_fn, closure=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", [None, 3], ids=["kbfgs", "kbfgs-l"])
def test_kbfgs_with_a_plain_closure_equals_the_objective_step(memory: int | None) -> None:
    def make(m: nn.Module, lf: Any) -> KBFGS:
        return KBFGS(m, lr=0.1, damping=0.3, memory=memory)

    loss_fn = nn.CrossEntropyLoss()
    expected = _objective_run(make, loss_fn)
    got = _plain_run(make, loss_fn, closure=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- what needs what
def _backward(model: nn.Module) -> None:
    x, y = _data(1)[0]
    F.cross_entropy(model(x), y).backward()


def test_without_the_loss_the_plain_loop_says_to_pass_it() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model)
    _backward(model)
    with pytest.raises(ValueError, match=r"^loss_fn: KFAC needs to know the loss .*loss_fn="):
        opt.step()


def test_empirical_after_step_without_a_closure_says_what_to_pass() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, fisher="empirical", loss_fn=nn.CrossEntropyLoss())
    _backward(model)
    with pytest.raises(ValueError, match="pass a closure.*or a curvlab.Objective"):
        opt.step()


def test_kbfgs_without_a_closure_says_why_it_needs_one() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KBFGS(model)
    _backward(model)
    with pytest.raises(ValueError, match=r"^closure: K-BFGS's second pass"):
        opt.step()


@pytest.mark.parametrize("cls", [HessianFree, EllipsoidalTR])
def test_model_wide_methods_say_they_need_an_objective_and_why(cls: type) -> None:
    model = tiny_mlp((4, 8, 3))
    opt = cls(model)
    _backward(model)
    with pytest.raises(TypeError, match="needs a curvlab.Objective.*curvature-vector products"):
        opt.step()
    with pytest.raises(TypeError, match="needs a curvlab.Objective"):
        opt.step(lambda: torch.zeros(()))


def test_objective_steps_keep_no_records_of_passes_between_them() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, lr=0.1, fisher="empirical", statistics="before_step")
    x, y = _data(1)[0]
    for _ in range(3):
        model(x).sum().backward()  # e.g. a diagnostic pass between steps
        opt.step(Objective(model, nn.CrossEntropyLoss(), x, y))
    assert not opt._recorder.calls
    assert all(not record.inputs for record in opt._recorder.capture.records.values())


def test_evaluation_passes_without_autograd_are_not_recorded() -> None:
    model = tiny_mlp((4, 8, 3))
    opt = KFAC(model, fisher="empirical", statistics="before_step")
    x, _ = _data(1)[0]
    with torch.no_grad():
        model(x)
    assert not opt._recorder.calls


# ---------------------------------------------------------------------- functional losses
FUNCTIONAL = {
    "cross_entropy": (F.cross_entropy, nn.CrossEntropyLoss()),
    "cross_entropy-sum": (
        functools.partial(F.cross_entropy, reduction="sum"),
        nn.CrossEntropyLoss(reduction="sum"),
    ),
    "mse": (F.mse_loss, nn.MSELoss()),
    "bce-with-logits": (F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss()),
}


def _targets(name: str, y: torch.Tensor) -> torch.Tensor:
    if name.startswith("cross_entropy"):
        return y
    return torch.nn.functional.one_hot(y, 3).to(F64)


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_losses_are_recognised_like_their_modules(name: str) -> None:
    functional, module = FUNCTIONAL[name]
    results = []
    for loss_fn in (functional, module):
        torch.manual_seed(0)
        model = tiny_mlp((4, 8, 3))
        opt = KFAC(model, lr=0.1, damping=0.1)  # the true Fisher: labels sampled by the loss
        for x, y in _data():
            opt.step(Objective(model, loss_fn, x, _targets(name, y)))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_nll_loss_on_log_probabilities_samples_from_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(tiny_mlp((4, 8, 3)), nn.LogSoftmax(dim=1))
    reference = copy.deepcopy(model[0])
    opt = KFAC(model, lr=0.1, damping=0.1)
    ref_opt = KFAC(reference, lr=0.1, damping=0.1)
    torch.manual_seed(1)
    opt._generator.manual_seed(5)
    ref_opt._generator.manual_seed(5)
    for x, y in _data():
        opt.step(Objective(model, F.nll_loss, x, y))
        ref_opt.step(Objective(reference, F.cross_entropy, x, y))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_unknown_functional_loss_names_the_fix() -> None:
    model = tiny_mlp((4, 8, 3))
    x, y = _data(1)[0]

    def my_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)

    with pytest.raises(ValueError, match=r"^loss_fn: cannot sample labels from my_loss.*empirical"):
        KFAC(model).step(Objective(model, my_loss, x, y))
    message = r"^loss_fn: curvlab does not know how my_loss reduces over the batch"
    with pytest.raises(ValueError, match=message) as info:
        KFAC(model, fisher="empirical").step(Objective(model, my_loss, x, y))
    assert "empirical" not in str(info.value)
