"""Curvature-vector products against dense float64 references on tiny models."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from curvlab.autodiff.products import (
    DEFAULT_FD_EPSILON,
    CurvatureOperator,
    curvature_operator,
    fisher_vector_product,
    flat_gradient,
    ggn_vector_product,
    hessian_vector_product,
)
from curvlab.objective import Objective
from curvlab.testing.autodiff import (
    dense_ggn,
    dense_hessian,
    jacobian,
    loss_hessian_at,
    outputs_of_flat,
    theta,
)
from curvlab.testing.models import tiny_cnn, tiny_mlp

F64 = torch.float64

# torch.func.hessian (jacfwd) loads torch's forward-AD decompositions, which call torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vector(dim: int, seed: int = 1) -> Tensor:
    return torch.randn(dim, generator=_gen(seed), dtype=F64)


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _mlp_x(m: int = 5) -> Tensor:
    return torch.randn(m, 4, generator=_gen(2), dtype=F64)


def _classes(m: int = 5, k: int = 3) -> Tensor:
    return torch.randint(0, k, (m,), generator=_gen(3))


def _soft(m: int = 5, k: int = 3) -> Tensor:
    return torch.rand(m, k, generator=_gen(4), dtype=F64)


def _mlp_objective(case: str) -> Objective:
    """One tiny MLP objective per supported loss / reduction."""
    m = 5
    x = _mlp_x(m)
    model: nn.Module = tiny_mlp((4, 5, 3))
    average = case.endswith("+avg")
    name = case.removesuffix("+avg")
    loss_fn: nn.Module
    if name.startswith("ce"):
        loss_fn = nn.CrossEntropyLoss(reduction=name.split("-")[1])
        y = _classes(m)
    elif name.startswith("bcelogits"):
        loss_fn = nn.BCEWithLogitsLoss(reduction=name.split("-")[1])
        y = (_soft(m) > 0.5).to(F64)
    elif name.startswith("bce"):  # probabilities as outputs
        model = nn.Sequential(model, nn.Sigmoid())
        loss_fn = nn.BCELoss(reduction=name.split("-")[1])
        y = (_soft(m) > 0.5).to(F64)
    elif name.startswith("softbce"):  # soft targets on probabilities
        model = nn.Sequential(model, nn.Sigmoid())
        loss_fn = nn.BCELoss(reduction=name.split("-")[1])
        y = _soft(m)
    else:
        loss_fn = nn.MSELoss(reduction=name.split("-")[1])
        y = torch.randn(m, 3, generator=_gen(5), dtype=F64)
    return Objective(model, loss_fn, x, y, batch_average=average)


LOSS_CASES = [
    "ce-mean",
    "ce-sum",
    "ce-sum+avg",
    "bcelogits-mean",
    "bcelogits-sum",
    "bcelogits-sum+avg",
    "bce-mean",
    "bce-sum",
    "bce-sum+avg",
    "softbce-mean",
    "mse-mean",
    "mse-sum",
    "mse-sum+avg",
]


def _cnn_objective(batchnorm: bool = False, m: int = 4) -> Objective:
    model = tiny_cnn(batchnorm=batchnorm)
    model.train()
    x = torch.randn(m, 2, 5, 5, generator=_gen(6), dtype=F64)
    return Objective(model, nn.CrossEntropyLoss(), x, _classes(m))


# --------------------------------------------------------------------------- exact references
@pytest.mark.parametrize("case", LOSS_CASES)
def test_ggn_and_hessian_match_dense_references(case: str) -> None:
    obj = _mlp_objective(case)
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))
    H = dense_hessian(obj, params)
    G = dense_ggn(obj, params)
    torch.testing.assert_close(hessian_vector_product(obj, params, v), H @ v)
    torch.testing.assert_close(ggn_vector_product(obj, params, v), G @ v)


@pytest.mark.parametrize("case", [c for c in LOSS_CASES if not c.startswith(("bce", "softbce"))])
def test_fisher_equals_ggn_for_canonical_links(case: str) -> None:
    obj = _mlp_objective(case)
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))
    torch.testing.assert_close(
        fisher_vector_product(obj, params, v), ggn_vector_product(obj, params, v)
    )


@pytest.mark.parametrize("case", ["bce-mean", "bce-sum+avg", "softbce-mean"])
def test_bce_on_probabilities_fisher_is_the_label_average_of_the_loss_hessian(case: str) -> None:
    # Not a canonical link: the Fisher is E_{y~Bernoulli(p)}[∂²l/∂p²] = 1/(p(1-p)), built here
    # from autodiff Hessians at the two labels, and it differs from the GGN at the true labels.
    obj = _mlp_objective(case)
    params = _params(obj.model)
    out, J = jacobian(obj, params)
    p = out.reshape(-1)
    ones, zeros = torch.ones_like(out), torch.zeros_like(out)
    diag = (
        p * loss_hessian_at(obj, out, ones).diagonal()
        + (1 - p) * loss_hessian_at(obj, out, zeros).diagonal()
    )
    F = J.T @ torch.diag(diag) @ J
    v = _vector(J.shape[1])
    fv = fisher_vector_product(obj, params, v)
    torch.testing.assert_close(fv, F @ v)
    assert not torch.allclose(fv, ggn_vector_product(obj, params, v))


def test_cross_entropy_with_probability_targets_scales_by_their_mass() -> None:
    # [P0] eq. 29: H_j = (s_j/n)(diag θ − θθᵀ) with s_j = Σ_c y_jc ≠ 1 here.
    model = tiny_mlp((4, 5, 3))
    y = 0.7 * torch.softmax(_soft(), dim=1)
    obj = Objective(model, nn.CrossEntropyLoss(), _mlp_x(), y)
    params = _params(model)
    v = _vector(sum(p.numel() for p in params))
    torch.testing.assert_close(ggn_vector_product(obj, params, v), dense_ggn(obj, params) @ v)


def test_cross_entropy_over_extra_dimensions() -> None:
    # Outputs (m, C, L): softmax over dim 1 at every position, mean over m·L positions.
    model = nn.Conv1d(2, 3, kernel_size=2).to(F64)
    x = torch.randn(4, 2, 4, generator=_gen(7), dtype=F64)
    y = torch.randint(0, 3, (4, 3), generator=_gen(8))
    for reduction in ("mean", "sum"):
        obj = Objective(model, nn.CrossEntropyLoss(reduction=reduction), x, y)
        params = _params(model)
        v = _vector(sum(p.numel() for p in params))
        torch.testing.assert_close(ggn_vector_product(obj, params, v), dense_ggn(obj, params) @ v)
        torch.testing.assert_close(
            fisher_vector_product(obj, params, v), ggn_vector_product(obj, params, v)
        )


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=F64)),
        lambda f, y: (f - y).pow(4).sum() / 7,
    ],
    ids=["label-smoothing", "class-weights", "custom"],
)
def test_other_losses_use_the_autodiff_output_hessian(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> None:
    model = tiny_mlp((4, 5, 3))
    custom = not isinstance(loss_fn, nn.Module)
    y = torch.randn(5, 3, generator=_gen(9), dtype=F64) if custom else _classes()
    obj = Objective(model, loss_fn, _mlp_x(), y)
    params = _params(model)
    v = _vector(sum(p.numel() for p in params))
    torch.testing.assert_close(ggn_vector_product(obj, params, v), dense_ggn(obj, params) @ v)
    with pytest.raises(ValueError, match="^kind"):
        curvature_operator(obj, params, "fisher")


def test_ignored_targets_fall_back_to_autodiff() -> None:
    model = tiny_mlp((4, 5, 3))
    y = _classes()
    y[1] = -100
    obj = Objective(model, nn.CrossEntropyLoss(), _mlp_x(), y)
    params = _params(model)
    v = _vector(sum(p.numel() for p in params))
    torch.testing.assert_close(ggn_vector_product(obj, params, v), dense_ggn(obj, params) @ v)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cnn_products_match_dense(kind: str) -> None:
    obj = _cnn_objective()
    params = _params(obj.model)
    op = curvature_operator(obj, params, kind)
    ref = dense_hessian(obj, params) if kind == "hessian" else dense_ggn(obj, params)
    torch.testing.assert_close(op.to_dense(), ref)


def test_parameter_subset_holds_the_others_fixed() -> None:
    model = tiny_mlp((4, 5, 3))
    obj = Objective(model, nn.CrossEntropyLoss(), _mlp_x(), _classes())
    params = [model[2].bias, model[0].weight]  # any order: flat vectors follow it
    dim = sum(p.numel() for p in params)
    v = _vector(dim)
    torch.testing.assert_close(
        hessian_vector_product(obj, params, v), dense_hessian(obj, params) @ v
    )
    torch.testing.assert_close(ggn_vector_product(obj, params, v), dense_ggn(obj, params) @ v)
    op = curvature_operator(obj, params, "hessian-fd")
    assert op.dim == dim
    torch.testing.assert_close(op(v), dense_hessian(obj, params) @ v, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("case", ["ce-mean", "mse-sum", "bcelogits-sum+avg"])
def test_finite_difference_hessian_approximates_the_exact_product(case: str) -> None:
    obj = _mlp_objective(case)
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))
    exact = hessian_vector_product(obj, params, v)
    fd = curvature_operator(obj, params, "hessian-fd")
    assert fd.epsilon == DEFAULT_FD_EPSILON
    # [P3] §4.2 reports a relative error ≤ 1%; in float64 it is far smaller.
    err = (fd(v) - exact).norm() / exact.norm()
    assert err < 1e-3
    finer = curvature_operator(obj, params, "hessian-fd", fd_epsilon=1e-7)
    assert (finer(v) - exact).norm() / exact.norm() < err
    torch.testing.assert_close(fd(torch.zeros_like(v)), torch.zeros_like(v), rtol=0, atol=0)


def test_finite_differences_replay_dropout_masks_and_leave_the_rng_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    model.train()
    obj = Objective(model, nn.CrossEntropyLoss(), _mlp_x(), _classes())
    params = _params(model)
    v = _vector(sum(p.numel() for p in params))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fd = curvature_operator(obj, params, "hessian-fd", fd_epsilon=1e-6)
    fd_v = fd(v)
    fd(v)
    assert torch.equal(torch.get_rng_state(), state)
    exact = curvature_operator(obj, params, "hessian")  # built from the same RNG state
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(fd_v, exact(v), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fd.gradient(), exact.gradient())


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "hessian-fd"])
def test_damping_adds_lambda_v_and_products_are_counted(kind: str) -> None:
    obj = _mlp_objective("ce-mean")
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))
    plain = curvature_operator(obj, params, kind)
    damped = curvature_operator(obj, params, kind, damping=0.3)
    torch.testing.assert_close(damped.matvec(v), plain(v) + 0.3 * v)
    damped(v)
    damped(2 * v)
    assert damped.products == 3 and plain.products == 1
    assert (damped.dim, damped.dtype, damped.device) == (v.numel(), F64, v.device)
    assert isinstance(damped, CurvatureOperator) and damped.kind == kind


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "hessian-fd"])
def test_batchnorm_products_use_batch_statistics_and_keep_running_stats(kind: str) -> None:
    obj = _cnn_objective(batchnorm=True)
    model = obj.model
    with torch.no_grad():  # non-trivial running statistics to protect
        model(obj.inputs)
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = _params(model)
    v = _vector(sum(p.numel() for p in params))
    # ReLU kinks and a batch of 4 make this net rough: a finer ε than the [C-TR] default.
    eps = {"fd_epsilon": 1e-7} if kind == "hessian-fd" else {}
    op = curvature_operator(obj, params, kind, **eps)
    got = op(v)
    op(v)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    ref = dense_ggn(obj, params) if kind in ("ggn", "fisher") else dense_hessian(obj, params)
    if kind == "hessian-fd":
        assert (got - ref @ v).norm() < 1e-5 * (ref @ v).norm()
    else:
        torch.testing.assert_close(got, ref @ v)
    assert model.training


@pytest.mark.parametrize("kind", ["hessian", "ggn", "hessian-fd"])
def test_gradient_and_loss_come_with_the_operator(kind: str) -> None:
    obj = _cnn_objective(batchnorm=True)
    params = _params(obj.model)
    loss, grad = flat_gradient(obj, params)
    op = curvature_operator(obj, params, kind)
    torch.testing.assert_close(op.gradient(), grad)
    torch.testing.assert_close(op.loss, loss)
    expected = torch.func.grad(
        lambda t: obj.loss_from_outputs(outputs_of_flat(obj, params)(t), obj.targets)
    )(theta(params))
    torch.testing.assert_close(grad, expected)
    assert all(p.grad is None for p in params) and obj.outputs is None
    assert not grad.requires_grad and not loss.requires_grad


@pytest.mark.parametrize("kind", ["hessian", "ggn", "hessian-fd"])
def test_works_under_no_grad_and_ignores_later_parameter_changes(kind: str) -> None:
    obj = _mlp_objective("mse-mean")
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))
    expected = curvature_operator(obj, params, kind)(v)
    with torch.no_grad():
        op = curvature_operator(obj, params, kind)
        for p in params:  # the optimizer's update; the operator stays at its build point
            p.add_(0.5)
        got = op(v)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "hessian-fd"])
def test_no_graph_outlives_the_operator(kind: str) -> None:
    obj = _cnn_objective(batchnorm=True)
    params = _params(obj.model)
    v = _vector(sum(p.numel() for p in params))

    def build() -> Iterator[weakref.ref[object]]:
        op = curvature_operator(obj, params, kind)
        out = op(v)
        assert out.grad_fn is None and not out.requires_grad
        held = [x for x in vars(op).values() if isinstance(x, (Tensor, list, tuple))]
        tensors = [t for x in held for t in (x if isinstance(x, (list, tuple)) else [x])]
        yield weakref.ref(op)
        yield from (weakref.ref(t) for t in tensors if isinstance(t, Tensor))

    gc.disable()  # freed by reference counting alone: no reference cycle holds the graphs
    try:
        refs = list(build())
        assert refs and all(r() is None for r in refs)
    finally:
        gc.enable()


# --------------------------------------------------------------------------- validation
def test_invalid_arguments_are_rejected_by_name() -> None:
    obj = _mlp_objective("ce-mean")
    params = _params(obj.model)
    with pytest.raises(ValueError, match="^kind"):
        curvature_operator(obj, params, "newton")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^damping"):
            curvature_operator(obj, params, "ggn", damping=bad)
    for bad in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="^fd_epsilon"):
            curvature_operator(obj, params, "hessian-fd", fd_epsilon=bad)
    with pytest.raises(ValueError, match="^fd_epsilon"):
        curvature_operator(obj, params, "ggn", fd_epsilon=1e-4)
    with pytest.raises(ValueError, match="^params"):
        curvature_operator(obj, [], "ggn")
    with pytest.raises(ValueError, match="^params"):
        curvature_operator(obj, [nn.Parameter(torch.zeros(2, dtype=F64))], "ggn")
    with pytest.raises(ValueError, match="^params"):
        curvature_operator(obj, [params[0], params[0]], "ggn")
    op = curvature_operator(obj, params, "ggn")
    with pytest.raises(ValueError, match="^v"):
        op(torch.zeros(3, dtype=F64))
