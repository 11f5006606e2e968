"""Dense float64 references for the curvature products (torch.func on tiny models): the
curvlab.autodiff tests compare against them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from curvlab.objective import Objective


def _names(objective: Objective, params: Sequence[Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in objective.model.named_parameters()}
    return [by_id[id(p)] for p in params]


def outputs_of_flat(objective: Objective, params: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """θ ↦ model(inputs) with ``params`` replaced by θ's pieces (train mode, buffers copied)."""
    names = _names(objective, params)
    model = objective.model
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(theta: Tensor) -> Tensor:
        merged = {n: b.clone() for n, b in model.named_buffers()}
        merged.update({n: p.detach() for n, p in model.named_parameters()})
        pieces = theta.split(sizes)
        merged.update({n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)})
        out: Tensor = functional_call(model, merged, (objective.inputs,))
        return out

    return f


def theta(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def dense_hessian(objective: Objective, params: Sequence[Tensor]) -> Tensor:
    """∇²L over ``params`` by torch.func.hessian, or row by row for a train-mode BatchNorm.

    torch.func's vmapped batch-norm backward rule gives a wrong, non-symmetric Hessian in train
    mode (pytorch/functorch#534); `torch.autograd.functional.hessian` (one plain double backward
    per row) agrees with finite differences there.
    """
    f = outputs_of_flat(objective, params)

    def loss(t: Tensor) -> Tensor:
        return objective.loss_from_outputs(f(t), objective.targets)

    batchnorm = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        for m in objective.model.modules()
    )
    if batchnorm:
        rows: Tensor = torch.autograd.functional.hessian(loss, theta(params))
        return rows
    H: Tensor = hessian(loss)(theta(params))
    return H


def jacobian(objective: Objective, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(outputs, J) with J of shape (numel(outputs), dim)."""
    f = outputs_of_flat(objective, params)
    th = theta(params)
    out = f(th).detach()
    J = jacrev(f)(th).reshape(out.numel(), th.numel())
    return out, J


def loss_hessian_at(objective: Objective, outputs: Tensor, targets: Tensor) -> Tensor:
    """∂²L/∂f² as a dense (numel, numel) matrix, at given targets."""

    def loss(f: Tensor) -> Tensor:
        return objective.loss_from_outputs(f, targets)

    H = hessian(loss)(outputs)
    return H.reshape(outputs.numel(), outputs.numel())


def dense_ggn(objective: Objective, params: Sequence[Tensor]) -> Tensor:
    """Jᵀ H_L J with H_L the autodiff Hessian of the loss at the outputs."""
    out, J = jacobian(objective, params)
    H_L = loss_hessian_at(objective, out, objective.targets)
    return J.T @ H_L @ J
