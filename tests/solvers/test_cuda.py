"""The solvers on a CUDA device agree with the CPU (skipped without CUDA; marker ``gpu``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from curvlab.solvers import (
    SolverResult,
    cg,
    cubic_subproblem,
    lanczos,
    minres,
    steihaug_cg,
    tr_gd_subproblem,
)
from curvlab.testing.solvers import symmetric_with_spectrum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64 = torch.float64

Solve = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], SolverResult]

SOLVES: dict[str, Solve] = {
    "cg": lambda mv, g: cg(mv, g, tol=1e-10, max_iters=100),
    "minres": lambda mv, g: minres(mv, g, max_iters=20, shift=0.5),
    "steihaug_cg": lambda mv, g: steihaug_cg(
        mv, g, 0.5, norm_matrix_diag=torch.linspace(0.5, 2.0, g.numel(), dtype=g.dtype).to(g)
    ),
    "cubic_subproblem": lambda mv, g: cubic_subproblem(mv, g, 1.0, tol=0.0),
    "tr_gd_subproblem": lambda mv, g: tr_gd_subproblem(mv, g, 1.0, n1=50, n2=200, step_size=0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SOLVES))
def test_cuda_matches_cpu(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 16
    spectrum = torch.linspace(1.0, 10.0, n, dtype=F64)
    if name not in ("cg",):
        spectrum[:3] *= -1.0
    H = symmetric_with_spectrum(spectrum, gen).to(dtype)
    g = torch.randn(n, generator=gen, dtype=F64).to(dtype)
    cpu = SOLVES[name](lambda v: H @ v, g)
    H_cuda, g_cuda = H.cuda(), g.cuda()
    gpu = SOLVES[name](lambda v: H_cuda @ v, g_cuda)
    assert gpu.solution.device.type == "cuda" and gpu.solution.dtype == dtype
    # statuses can differ at round-off level (e.g. where an Armijo search gives up), steps cannot
    assert gpu.status not in ("non_finite", "breakdown")
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(gpu.solution.cpu(), cpu.solution, rtol=tol, atol=tol)


def test_lanczos_on_cuda() -> None:
    gen = torch.Generator().manual_seed(1)
    H = symmetric_with_spectrum(torch.randn(12, generator=gen, dtype=F64), gen).cuda()
    alphas, betas, Q = lanczos(lambda v: H @ v, torch.ones(12, dtype=F64, device="cuda"), 6)
    assert alphas.device.type == betas.device.type == Q.device.type == "cuda"
    T = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    torch.testing.assert_close(Q.T @ H @ Q, T, rtol=0, atol=1e-10)
