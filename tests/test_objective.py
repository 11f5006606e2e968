"""Objective: closure behaviour, sampling distributions, loss scale, functional view."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from curvlab import Objective
from curvlab.objective import preserved_buffers
from curvlab.testing.models import tiny_cnn, tiny_mlp


def test_closure_matches_manual_backward() -> None:
    model = tiny_mlp()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    obj = Objective(model, nn.CrossEntropyLoss(), x, y)
    loss = obj()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert not loss.requires_grad and obj.outputs is not None and not obj.outputs.requires_grad
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    # A second call starts from zero gradients (no accumulation).
    obj()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_batch_average_is_sum_over_outputs_mean_over_examples() -> None:
    model = tiny_mlp((4, 5, 3))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    obj = Objective(model, nn.BCEWithLogitsLoss(reduction="sum"), x, y, batch_average=True)
    expected = nn.BCEWithLogitsLoss(reduction="none")(model(x), y).sum(1).mean()
    torch.testing.assert_close(obj(), expected.detach())
    assert obj.loss_scale(obj.outputs) == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    ("loss_fn", "targets", "scale"),
    [
        (nn.CrossEntropyLoss(), torch.tensor([0, 1, 2, 0]), 1 / 4),
        (nn.CrossEntropyLoss(reduction="sum"), torch.tensor([0, 1, 2, 0]), 1.0),
        (nn.MSELoss(), torch.zeros(4, 3, dtype=torch.float64), 1 / 12),
        (nn.BCELoss(), torch.zeros(4, 3, dtype=torch.float64), 1 / 12),
    ],
)
def test_loss_scale(loss_fn: nn.Module, targets: torch.Tensor, scale: float) -> None:
    model = nn.Sequential(tiny_mlp((4, 5, 3)), nn.Sigmoid())
    obj = Objective(model, loss_fn, torch.randn(4, 4, dtype=torch.float64), targets)
    assert obj.loss_scale(torch.zeros(4, 3)) == pytest.approx(scale)


def test_sampling_follows_the_predictive_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 20000
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(n, 1)
    obj = Objective(nn.Identity(), nn.CrossEntropyLoss(), logits, torch.zeros(n, dtype=torch.long))
    counts = torch.bincount(obj.sample_targets(logits, gen), minlength=3) / n
    torch.testing.assert_close(counts, torch.softmax(logits[0], 0), atol=0.015, rtol=0)
    z = torch.full((n, 1), 0.7)
    obj = Objective(nn.Identity(), nn.BCEWithLogitsLoss(), z, torch.zeros(n, 1))
    assert obj.sample_targets(z, gen).mean().item() == pytest.approx(
        1 / (1 + math.exp(-0.7)), abs=0.015
    )
    f = torch.full((n, 1), 3.0)
    obj = Objective(nn.Identity(), nn.MSELoss(), f, torch.zeros(n, 1))
    y = obj.sample_targets(f, gen)
    assert y.mean().item() == pytest.approx(3.0, abs=0.03)
    assert y.var().item() == pytest.approx(0.5, abs=0.03)  # N(f, ½I): Fisher = GGN for MSE


def test_invalid_inputs_are_rejected() -> None:
    model = tiny_mlp()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="targets: batch size"):
        Objective(model, nn.MSELoss(), x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction='none'"):
        Objective(model, nn.MSELoss(reduction="none"), x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="batch_average"):
        Objective(model, nn.MSELoss(), x, torch.zeros(3, 3), batch_average=True)
    with pytest.raises(ValueError, match="inputs"):
        Objective(model, nn.MSELoss(), torch.zeros(0, 4), torch.zeros(0, 3))
    obj = Objective(model, nn.CrossEntropyLoss(label_smoothing=0.1), x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label_smoothing"):
        obj.sample_targets(torch.zeros(3, 3))


def test_loss_at_trial_parameters_leaves_model_and_buffers_alone() -> None:
    model = tiny_cnn(batchnorm=True)
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    obj = Objective(model, nn.CrossEntropyLoss(), x, y)
    params, _ = obj.params_and_buffers()
    running = model[1].running_mean.clone()
    base = obj.loss_at(params)
    trial = {n: p + 0.1 for n, p in params.items()}
    moved = obj.loss_at(trial)
    assert torch.equal(model[1].running_mean, running)
    assert not torch.equal(base, moved)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(obj.loss_at(dict(model.named_parameters())), moved)
    assert torch.equal(model[1].running_mean, running)


def test_preserved_buffers_restores_running_statistics() -> None:
    model = tiny_cnn(batchnorm=True)
    before = model[1].running_var.clone()
    with preserved_buffers(model):
        model(torch.randn(4, 2, 5, 5, dtype=torch.float64))
        assert not torch.equal(model[1].running_var, before)
    assert torch.equal(model[1].running_var, before)


def _linear_output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list[Any]]:
    seen: list[torch.dtype] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    return seen, handles


def test_objective_reenters_its_autocast_state_outside_the_block() -> None:
    model = tiny_mlp((4, 5, 3), dtype=torch.float32)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj = Objective(model, nn.MSELoss(), x, y)
    assert ("cpu", True, torch.bfloat16) in obj.autocast_state
    seen, handles = _linear_output_dtypes(model)
    loss = obj()  # called outside the user's block
    assert obj.outputs is not None and obj.outputs.dtype == torch.bfloat16
    assert loss.dtype == torch.float32  # mse_loss autocasts to float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    outputs, _ = obj.forward()
    params, _ = obj.params_and_buffers()
    functional = obj.functional_outputs(params)
    at = obj.loss_at({n: p + 0.1 for n, p in params.items()})
    for h in handles:
        h.remove()
    assert outputs.dtype == functional.dtype == torch.bfloat16 and at.dtype == torch.float32
    assert seen and set(seen) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the objective
    with torch.no_grad():
        reference = nn.MSELoss()(model(x), y)
    assert not torch.equal(loss, reference)  # really the bf16 forward, not float32
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.0)


def test_objective_built_outside_autocast_stays_in_full_precision_inside_a_block() -> None:
    model = tiny_mlp((4, 5, 3), dtype=torch.float32)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    obj = Objective(model, nn.MSELoss(), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj()
        assert torch.is_autocast_enabled("cpu")  # the user's state is back after the call
    assert obj.outputs is not None and obj.outputs.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = Objective(model, nn.MSELoss(), x, y).autocast_state
    bf16 = Objective(model, nn.MSELoss(), x, y, autocast=state)  # an explicit state
    bf16()
    assert bf16.outputs is not None and bf16.outputs.dtype == torch.bfloat16


def test_objective_forward_sees_in_place_weight_updates_within_one_autocast_block() -> None:
    """Autocast caches weight casts for its whole block and never notices in-place updates;
    every forward pass of an objective starts from a cleared cache."""
    model = tiny_mlp((4, 5, 3), dtype=torch.float32)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stale = model(x)  # the cast weights are now cached
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        obj = Objective(model, nn.MSELoss(), x, y)
        obj()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x)
    assert obj.outputs is not None
    assert torch.equal(obj.outputs, fresh.detach()) and not torch.equal(fresh, stale)


def test_labels_are_sampled_in_float32_from_low_precision_outputs() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.full((4000, 1), 3.0, dtype=torch.bfloat16)
    obj = Objective(nn.Identity(), nn.MSELoss(), f, torch.zeros(4000, 1))
    y = obj.sample_targets(f, gen)
    assert y.dtype == torch.float32
    assert y.var().item() == pytest.approx(0.5, abs=0.05)
    z = torch.zeros(4000, 1, dtype=torch.bfloat16)
    obj = Objective(nn.Identity(), nn.BCEWithLogitsLoss(), z, torch.zeros(4000, 1))
    labels = obj.sample_targets(z, gen)
    assert labels.dtype == torch.float32 and labels.mean().item() == pytest.approx(0.5, abs=0.05)
    # Full-precision outputs keep their dtype (and their random stream).
    f64 = torch.zeros(3, 2, dtype=torch.float64)
    obj = Objective(nn.Identity(), nn.MSELoss(), f64, torch.zeros(3, 2, dtype=torch.float64))
    assert obj.sample_targets(f64, gen).dtype == torch.float64
