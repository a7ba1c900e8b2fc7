"""Pure linear-algebra kernels behind precond's structures and transforms.

* :mod:`~precond.linalg.spectral` — robust ``eigh``, spectral functions,
  inverse roots, a failure-counting decomposition cache.
* :mod:`~precond.linalg.kron` — Kronecker-factored (K-FAC) damping variants,
  Shampoo statistics/preconditioning, Distributed-Shampoo blocking, KL clip.
* :mod:`~precond.linalg.cg` — (preconditioned) conjugate gradients with the
  Martens stop rule, CG backtracking, Levenberg–Marquardt damping.
* :mod:`~precond.linalg.quasi_newton` — BFGS/DFP/SR1 updates with guards,
  L-BFGS two-loop recursion and history, K-BFGS damping.

Everything is a small pure function (or a tiny state holder) on tensors, so
each kernel is tested against an independent numpy/scipy reference.
"""

from __future__ import annotations

from precond.linalg.cg import (
    CGResult,
    backtrack_iterations,
    cg,
    lm_damping_update,
    select_backtracked_iterate,
)
from precond.linalg.kron import (
    BlockPartition,
    block_partition,
    kl_clip_scale,
    kron_matvec,
    kron_precondition_exact,
    kron_precondition_factored,
    kron_precondition_per_factor,
    merge_small_dims,
    mode_products,
    pi_adjusted_damping,
    reassemble_blocks,
    shampoo_precondition,
    shampoo_statistics,
    split_into_blocks,
    tracenorm_pi,
)
from precond.linalg.quasi_newton import (
    DampedPair,
    LBFGSHistory,
    QNUpdate,
    bfgs_direct_update,
    bfgs_inverse_update,
    dfp_direct_update,
    dfp_inverse_update,
    double_damping,
    initial_scale,
    lbfgs_history,
    lm_damping_pair,
    powell_damping,
    sherman_morrison_update,
    sr1_direct_update,
    sr1_inverse_update,
    two_loop,
)
from precond.linalg.spectral import (
    EigLike,
    EighFailureError,
    EighResult,
    SpectralCache,
    inverse_root,
    matrix_function,
    matrix_power,
    robust_eigh,
    symmetrize,
)

__all__ = [
    # spectral
    "EigLike",
    "EighFailureError",
    "EighResult",
    "SpectralCache",
    "inverse_root",
    "matrix_function",
    "matrix_power",
    "robust_eigh",
    "symmetrize",
    # kron
    "BlockPartition",
    "block_partition",
    "kl_clip_scale",
    "kron_matvec",
    "kron_precondition_exact",
    "kron_precondition_factored",
    "kron_precondition_per_factor",
    "merge_small_dims",
    "mode_products",
    "pi_adjusted_damping",
    "reassemble_blocks",
    "shampoo_precondition",
    "shampoo_statistics",
    "split_into_blocks",
    "tracenorm_pi",
    # cg
    "CGResult",
    "backtrack_iterations",
    "cg",
    "lm_damping_update",
    "select_backtracked_iterate",
    # quasi-Newton
    "DampedPair",
    "LBFGSHistory",
    "QNUpdate",
    "bfgs_direct_update",
    "bfgs_inverse_update",
    "dfp_direct_update",
    "dfp_inverse_update",
    "double_damping",
    "initial_scale",
    "lbfgs_history",
    "lm_damping_pair",
    "powell_damping",
    "sherman_morrison_update",
    "sr1_direct_update",
    "sr1_inverse_update",
    "two_loop",
]
