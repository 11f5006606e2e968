"""The functional view that the curvature products differentiate: f(θ) = model(inputs; θ).

`ParameterView` maps the optimizer's parameters (a subset of the model's, in the optimizer's
order) to the flat vector θ, the concatenation of ``p.view(-1)`` in that order, and evaluates
the model at any θ with `torch.func.functional_call`:

* the model's other parameters are held fixed (passed detached, so no graph reaches them);
* buffers are passed as copies, so a train-mode BatchNorm normalises with the batch statistics
  (train-mode semantics, as the EDF authors' code runs its products: [C-EDF],
  docs/deviations.md) while its running statistics in the model are never moved by the extra
  passes (which an in-place finite-difference product would move a second time); with
  ``commit_buffers`` the first pass writes its copies back, moving the running statistics
  once, exactly as the training pass it then stands for (an optimizer that skips the step of
  a non-finite batch puts them back: `curvlab.optim.guard.StepGuard.skip`);
* random ops (dropout) can be replayed with one saved RNG state (`replayed_rng`), so that
  several passes at different θ see the same masks (a difference of gradients is meaningless
  otherwise);
* mixed precision: the forward pass runs under the objective's recorded autocast state
  (`curvlab.Objective.autocast`), or with ``autocast=False`` in the parameters' dtype; the
  operators built on it return vectors in the parameters' dtype (output-space quantities are
  upcast to it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from curvlab.objective import Objective, autocast_off, run_with_autocast

__all__ = ["ParameterView", "RngState", "capture_rng", "flatten", "replayed_rng"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``t.reshape(-1)`` over ``tensors`` (the flat-vector view)."""
    return torch.cat([t.reshape(-1) for t in tensors])


@dataclass(frozen=True)
class RngState:
    """The global CPU generator's state and, for a CUDA model, that device's generator."""

    cpu: Tensor
    cuda: Tensor | None
    cuda_device: int | None


def capture_rng(device: torch.device) -> RngState:
    """The RNG state that the next forward pass on ``device`` would draw from."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return RngState(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
    return RngState(torch.get_rng_state(), None, None)


@contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run the body from ``state``; the global RNG is left exactly as it was before."""
    devices = [] if state.cuda_device is None else [state.cuda_device]
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None and state.cuda_device is not None:
            torch.cuda.set_rng_state(state.cuda, state.cuda_device)
        yield


class ParameterView:
    """The optimizer's parameters of ``objective.model`` as one flat vector θ.

    Args:
        objective: the mini-batch (model, loss, inputs, targets).
        params: the parameters to differentiate, in order; each must be a parameter of
            ``objective.model`` (by identity). The model's other parameters are held fixed.
        autocast: run the forward passes under the objective's recorded autocast state
            (default); False: with autocast off, in the parameters' dtype.

    Raises:
        ValueError: ``params`` is empty, repeats a tensor, holds a tensor that is not a
            parameter of the model, or mixes dtypes or devices.
    """

    def __init__(
        self,
        objective: Objective,
        params: Sequence[Tensor],
        *,
        autocast: bool = True,
        commit_buffers: bool = False,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("params: need at least one parameter")
        names_by_id = {id(p): n for n, p in objective.model.named_parameters()}
        names: list[str] = []
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise ValueError(f"params: entry {i} is a {type(p).__name__}, not a tensor")
            if id(p) not in names_by_id:
                raise ValueError(f"params: entry {i} is not a parameter of objective.model")
            if id(p) in seen:
                raise ValueError(f"params: entry {i} ({names_by_id[id(p)]}) appears twice")
            seen.add(id(p))
            names.append(names_by_id[id(p)])
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"params: all parameters need one dtype and one device, got {dtypes} / {devices}"
            )
        if not params[0].is_floating_point():
            raise ValueError(f"params: need floating-point parameters, got {params[0].dtype}")
        self.objective = objective
        self.autocast = autocast
        self._commit_buffers = commit_buffers
        self.params = params
        self.names = names
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.dim = sum(self.numels)
        self.dtype: torch.dtype = params[0].dtype
        self.device: torch.device = params[0].device
        chosen = set(names)
        # Held fixed: detached, so no graph is recorded through them.
        self._fixed = {
            n: p.detach() for n, p in objective.model.named_parameters() if n not in chosen
        }

    # ----------------------------------------------------------------- vectors
    def current(self, *, clone: bool) -> list[Tensor]:
        """The current parameter values as leaves that require grad (cloned or aliased)."""
        return [
            (p.detach().clone() if clone else p.detach()).requires_grad_(True) for p in self.params
        ]

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat (dim,) vector into tensors shaped like ``params``."""
        return [
            piece.view(shape)
            for piece, shape in zip(vector.split(self.numels), self.shapes, strict=True)
        ]

    def check_vector(self, v: Tensor, name: str = "v") -> Tensor:
        """``v`` as a flat (dim,) tensor of the parameters' dtype and device.

        Raises:
            ValueError: ``v`` is not a tensor of shape ``(dim,)``.
        """
        if not isinstance(v, Tensor):
            raise ValueError(f"{name}: expected a tensor of shape ({self.dim},), got {type(v)}")
        if v.shape != (self.dim,):
            raise ValueError(f"{name}: expected shape ({self.dim},), got {tuple(v.shape)}")
        return v.detach().to(dtype=self.dtype, device=self.device)

    # ----------------------------------------------------------------- functional model
    def outputs(self, values: Sequence[Tensor]) -> Tensor:
        """``model(inputs)`` with ``params`` set to ``values`` (buffers copied, model untouched;
        with ``commit_buffers``, the first call writes its buffer copies back)."""
        model = self.objective.model
        buffers = dict(model.named_buffers())
        merged: dict[str, Tensor] = {n: b.clone() for n, b in buffers.items()}
        merged.update(self._fixed)
        merged.update(zip(self.names, values, strict=True))
        # Mixed precision: the forward runs under the objective's recorded autocast state.
        precision = (
            self.objective.autocast() if self.autocast else run_with_autocast(autocast_off())
        )
        with precision:
            out: Tensor = functional_call(model, merged, (self.objective.inputs,), strict=False)
        if self._commit_buffers:
            self._commit_buffers = False
            with torch.no_grad():
                for name, buffer in buffers.items():
                    buffer.copy_(merged[name])
        return out

    def loss(self, values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(outputs, loss)`` at ``values`` on the objective's batch."""
        outputs = self.outputs(values)
        return outputs, self.objective.loss_from_outputs(outputs, self.objective.targets)

    def gradient(self, values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss, flat ∇L)`` at ``values`` (leaves that require grad); no graph is kept."""
        with torch.enable_grad():
            _, loss = self.loss(values)
            grads = torch.autograd.grad(loss, list(values), allow_unused=True)
        return loss.detach(), self.flatten_grads(grads, values)

    @staticmethod
    def flatten_grads(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
        """Flatten gradients, with zeros for parameters that did not take part."""
        return flatten(
            [
                torch.zeros_like(p) if g is None else g.detach()
                for g, p in zip(grads, like, strict=True)
            ]
        )
