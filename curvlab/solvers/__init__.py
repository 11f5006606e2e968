"""Matrix-free solvers: pure functions on flat vectors that see the curvature through a matvec.

* :func:`cg` — preconditioned conjugate gradients for SPD systems (Hessian-free).
* :func:`steihaug_cg` — preconditioned Steihaug–Toint CG for the (ellipsoidal) trust-region
  subproblem (Conn, Gould & Toint Alg. 7.5.1; Kohler, Adolphs & Lucchi's ellipsoidal TR).
* :func:`minres` — k-step MINRES of the EDF paper, Algorithm 1.
* :func:`lanczos` — the Lanczos tridiagonalisation.
* :func:`cubic_subproblem` — the ARC cubic subproblem by Lanczos and a secular equation
  (Cartis, Gould & Toint).
* :func:`tr_gd_subproblem` — Liu, Lee & Hsieh's GD-then-Riemannian-GD trust-region subproblem
  solver.

All return a :class:`SolverResult`; indefinite or singular curvature is reported in its
``status``, a non-finite input gives ``status="non_finite"`` and a zero step.
"""

from __future__ import annotations

from curvlab.solvers.cg import cg
from curvlab.solvers.cubic import cubic_subproblem, minimize_cubic_dense
from curvlab.solvers.lanczos import lanczos
from curvlab.solvers.minres import minres
from curvlab.solvers.result import STATUSES, Matvec, SolverResult
from curvlab.solvers.steihaug import steihaug_cg
from curvlab.solvers.tr_gd import tr_gd_subproblem

__all__ = [
    "STATUSES",
    "Matvec",
    "SolverResult",
    "cg",
    "cubic_subproblem",
    "lanczos",
    "minimize_cubic_dense",
    "minres",
    "steihaug_cg",
    "tr_gd_subproblem",
]
