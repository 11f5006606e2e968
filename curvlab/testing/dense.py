"""Dense float64 references (torch.func on tiny models) that the approximations must equal."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, hessian, jacrev

from curvlab.curvature.factors import input_factor, output_factor
from curvlab.curvature.hooks import capture
from curvlab.curvature.layers import KroneckerLayer
from curvlab.objective import Objective

__all__ = ["expected_kfac_factors", "layer_ggn_block", "output_loss_hessian"]


def output_loss_hessian(objective: Objective) -> Tensor:
    """∂²L/∂f² at the current outputs, as a dense (numel(f), numel(f)) matrix."""
    with torch.no_grad():
        outputs = objective.model(objective.inputs)
    H = hessian(lambda f: objective.loss_from_outputs(f, objective.targets))(outputs)
    n = outputs.numel()
    return H.reshape(n, n)


def layer_ggn_block(objective: Objective, layer: KroneckerLayer) -> Tensor:
    """The exact GGN block Jᵀ H_L J of one layer, in the row-major vec of ``[W, b]``."""
    model = objective.model
    params = dict(model.named_parameters())
    prefix = f"{layer.name}." if layer.name else ""

    def outputs_of(matrix: Tensor) -> Tensor:
        pieces = layer.split(matrix)
        override = {prefix + "weight": pieces[0]}
        if layer.bias is not None:
            override[prefix + "bias"] = pieces[1]
        merged = {**params, **override}
        return functional_call(model, merged, (objective.inputs,)).reshape(-1)

    W = layer.grad_matrix(
        layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    )
    J = jacrev(outputs_of)(W).reshape(-1, W.numel())
    return J.T @ output_loss_hessian(objective) @ J


def expected_kfac_factors(
    layers: dict[str, KroneckerLayer], objective: Objective
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC's (A, G) with G's expectation over sampled labels computed exactly.

    E[ĝĝᵀ] over labels sampled from the model equals Jᵀ H_L J; backpropagating every column
    of H_L^{1/2} through the same capture and factor code gives that expectation.
    """
    H = output_loss_hessian(objective)
    evals, evecs = torch.linalg.eigh(H)
    S = evecs * evals.clamp_min(0).sqrt()
    m = objective.batch_size
    with capture(layers) as cap:
        outputs, _ = objective.forward()
        scale = objective.loss_scale(outputs)
        for k in range(S.shape[1]):
            cap.phase = f"col{k}"
            cap.backward_to_outputs((outputs * S[:, k].reshape(outputs.shape)).sum())
    result = {}
    for name, layer in layers.items():
        A = input_factor(layer, cap[name].inputs, m)
        # E[ĝĝᵀ] = c · Σ_k (column k's ĝ)(column k's ĝ)ᵀ, since ĝ = c·∇l and H_L = c·∇²l.
        G = scale * sum(
            output_factor(layer, cap[name].output_grads(f"col{k}"), m, scale)
            for k in range(S.shape[1])
        )
        assert isinstance(G, Tensor)
        result[name] = (A, G)
    return result
