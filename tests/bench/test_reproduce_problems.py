"""The reproductions' problems at quick scale (built, not trained), the CIFAR-10 substitute, and
thesis Fig 4.1's exact block-Fisher statistics against a per-sample reference."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.bench.problems import Problem
from curvlab.bench.reproduce import problems as P
from curvlab.bench.reproduce.cli import EXPERIMENTS
from curvlab.bench.reproduce.framework import Context, Options, RunTask, StagedTask
from curvlab.bench.reproduce.smoke import restored_registries
from curvlab.bench.reproduce.thesis_ch4 import block_fisher_statistics
from curvlab.data import load_fashion_mnist


@pytest.fixture(autouse=True)
def _registries() -> Iterator[None]:
    with restored_registries():
        P.register()
        yield


def _fmnist_installed() -> bool:
    try:
        load_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


def _forward_two(problem: Problem) -> torch.Tensor:
    data = problem.data()
    model = problem.make_model(0)
    model.eval()
    with torch.no_grad():
        out = model(data.train_inputs[:2])
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    return out


@pytest.mark.skipif(not _fmnist_installed(), reason="Fashion-MNIST is not installed")
def test_every_quick_problem_loads_and_runs_a_forward_pass(tmp_path: Path) -> None:
    seen: dict[tuple[str, str], Problem] = {}
    for exp in EXPERIMENTS.values():
        ctx = Context(exp, Options(scale="quick", out=tmp_path))
        for need in exp.data(ctx):
            need.load()
        for task in exp.plan(ctx):
            if isinstance(task, RunTask | StagedTask):
                seen.setdefault((task.problem.name, task.problem.data_source), task.problem)
    seen[("fisher", "")] = P.fisher_mlp("quick")
    assert len(seen) >= 12
    for problem in seen.values():
        out = _forward_two(problem)
        if problem.autoencoder:
            assert out.shape[1] == 784
        else:
            assert out.shape[1] == 10


def _write_fake_cifar10(root: Path, n: int = 20) -> None:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("model", ["small-cnn", "cnn2fc", "vgg-srelu"])
def test_cnn_problems_use_a_local_cifar10_copy(tmp_path: Path, model: str) -> None:
    _write_fake_cifar10(tmp_path)
    problem = P.cnn_classifier("quick", model, dataset="cifar10", data_root=tmp_path)
    assert problem.name == f"cifar10-{model}" and "CIFAR-10" in problem.data_source
    data = problem.data()
    assert tuple(data.train_inputs.shape) == (100, 3, 32, 32)
    assert _forward_two(problem).shape == (2, 10)


def test_experiments_switch_to_cifar10_with_a_data_root(tmp_path: Path) -> None:
    _write_fake_cifar10(tmp_path / "data")
    for name in ("thesis-ch4", "efficient-tr", "tso-alra", "edf"):
        exp = EXPERIMENTS[name]
        ctx = Context(exp, Options(scale="quick", out=tmp_path, data_root=tmp_path / "data"))
        cnn = [
            t.problem
            for t in exp.plan(ctx)
            if isinstance(t, RunTask | StagedTask) and not t.problem.flatten
        ]
        assert cnn and all("CIFAR-10" in p.data_source for p in cnn), name
        assert any("CIFAR-10" in n for n in exp.notes(ctx)), name


def test_block_fisher_statistics_match_a_per_sample_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    grads, fishers = block_fisher_statistics(model, x, y)
    layers = [model[0], model[2]]

    def flat(layer: nn.Linear) -> torch.Tensor:
        assert layer.weight.grad is not None and layer.bias.grad is not None
        return torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()])

    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for layer, g in zip(layers, grads, strict=True):
        torch.testing.assert_close(g, flat(layer))
    reference = [torch.zeros_like(f) for f in fishers]
    for n in range(5):
        probs = torch.softmax(model(x[n : n + 1]), -1).detach()[0]
        for c in range(3):
            model.zero_grad()
            torch.log_softmax(model(x[n : n + 1]), -1)[0, c].backward()
            for ref, layer in zip(reference, layers, strict=True):
                v = flat(layer)
                ref += probs[c] * torch.outer(v, v) / 5
    for f, ref in zip(fishers, reference, strict=True):
        torch.testing.assert_close(f, ref)
