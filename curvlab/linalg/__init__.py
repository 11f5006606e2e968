"""Numerical linear algebra for curvature-based optimizers.

Pure functions on tensors: Kronecker products in row-major layout (:mod:`.kron`), factored
Tikhonov damping (:mod:`.damping`), damped Cholesky inverses and solves with a float64 / growing
damping retry policy (:mod:`.inverse`), inverse p-th roots and eigendecompositions
(:mod:`.roots`), the Gram / moving-average statistics of Kronecker factors (:mod:`.gram`), and
(damped) BFGS / L-BFGS updates and products (:mod:`.bfgs`), and Sherman-Morrison-Woodbury
solves (:mod:`.woodbury`). :mod:`.cost` describes the operations these routines execute, for
the cost model of the curvature blocks.
"""

from __future__ import annotations

from curvlab.linalg.bfgs import (
    bfgs_correction,
    bfgs_update,
    double_damping,
    dp_dlm_damping,
    dpi_dlm_damping,
    gram_matvec,
    hessian_action_pair,
    lbfgs_multiply,
    lbfgs_two_loop,
    powell_damping_h,
    powell_damping_identity,
)
from curvlab.linalg.checks import all_finite, contractions_bounded
from curvlab.linalg.damping import add_to_diagonal, pi_damping
from curvlab.linalg.errors import DecompositionError
from curvlab.linalg.gram import ema_, gram
from curvlab.linalg.inverse import DecompositionInfo, damped_inverse, damped_solve
from curvlab.linalg.kron import kron_mv, kron_to_dense
from curvlab.linalg.roots import coupled_newton_inverse_root, damped_inverse_root, symmetric_eigh
from curvlab.linalg.woodbury import WoodburyForm, woodbury_coefficients, woodbury_solve

__all__ = [
    "all_finite",
    "contractions_bounded",
    "bfgs_correction",
    "bfgs_update",
    "double_damping",
    "dp_dlm_damping",
    "dpi_dlm_damping",
    "gram_matvec",
    "hessian_action_pair",
    "lbfgs_multiply",
    "lbfgs_two_loop",
    "powell_damping_h",
    "powell_damping_identity",
    "DecompositionError",
    "DecompositionInfo",
    "add_to_diagonal",
    "coupled_newton_inverse_root",
    "damped_inverse",
    "damped_inverse_root",
    "damped_solve",
    "ema_",
    "gram",
    "kron_mv",
    "kron_to_dense",
    "pi_damping",
    "symmetric_eigh",
    "WoodburyForm",
    "woodbury_coefficients",
    "woodbury_solve",
]
