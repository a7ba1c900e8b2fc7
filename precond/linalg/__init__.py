"""Pure linear-algebra kernels behind precond's structures and transforms.

* :mod:`~precond.linalg.spectral` — robust ``eigh`` (one matrix or many, batched
  by size), SOAP's power-iteration + QR refresh of an eigenbasis, spectral
  functions, inverse roots, keep-last-good failure counting.
* :mod:`~precond.linalg.kron` — the Kronecker damping forms (exact spectrum,
  π-adjusted damping, mode products), Shampoo statistics, Distributed-Shampoo
  blocking, KL clip.
* :mod:`~precond.linalg.newton` — matmul-only matrix functions: Newton–Schulz
  (Muon's orthogonalization, the polar factor), coupled Newton inverse roots.
* :mod:`~precond.linalg.cg` — (preconditioned) conjugate gradients with the
  Martens stop rule, Levenberg–Marquardt damping.
* :mod:`~precond.linalg.quasi_newton` — BFGS/DFP/SR1 updates with guards,
  the L-BFGS two-loop recursion, K-BFGS damping.

Everything is a small pure function (or a tiny state holder) on tensors, so
each kernel is tested against an independent numpy/scipy reference; the
structures call these kernels, not copies of them.
"""

from __future__ import annotations

from precond.linalg.cg import CGResult, cg, lm_damping_update
from precond.linalg.kron import (
    BlockPartition,
    block_partition,
    kl_clip_scale,
    kron_precondition_exact,
    kron_spectrum,
    merge_small_dims,
    mode_products,
    pi_adjusted_damping,
    reassemble_blocks,
    shampoo_statistics,
    split_into_blocks,
    tracenorm_pi,
)
from precond.linalg.newton import NewtonRoot, coupled_newton, inverse_roots_many, newton_schulz, polar
from precond.linalg.quasi_newton import (
    DampedPair,
    QNUpdate,
    bfgs_direct_update,
    bfgs_inverse_update,
    dfp_direct_update,
    dfp_inverse_update,
    double_damping,
    initial_scale,
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
    eigh_many,
    floor_eigenvalues,
    inverse_root,
    matrix_function,
    matrix_power,
    PowerQRResult,
    power_qr,
    power_qr_many,
    robust_eigh,
    symmetrize,
)

__all__ = [
    # spectral
    "EigLike",
    "EighFailureError",
    "EighResult",
    "SpectralCache",
    "eigh_many",
    "floor_eigenvalues",
    "inverse_root",
    "matrix_function",
    "matrix_power",
    "PowerQRResult",
    "power_qr",
    "power_qr_many",
    "robust_eigh",
    "symmetrize",
    # kron
    "BlockPartition",
    "block_partition",
    "kl_clip_scale",
    "kron_precondition_exact",
    "kron_spectrum",
    "merge_small_dims",
    "mode_products",
    "pi_adjusted_damping",
    "reassemble_blocks",
    "shampoo_statistics",
    "split_into_blocks",
    "tracenorm_pi",
    # newton
    "NewtonRoot",
    "coupled_newton",
    "inverse_roots_many",
    "newton_schulz",
    "polar",
    # cg
    "CGResult",
    "cg",
    "lm_damping_update",
    # quasi-Newton
    "DampedPair",
    "QNUpdate",
    "bfgs_direct_update",
    "bfgs_inverse_update",
    "dfp_direct_update",
    "dfp_inverse_update",
    "double_damping",
    "initial_scale",
    "lm_damping_pair",
    "powell_damping",
    "sherman_morrison_update",
    "sr1_direct_update",
    "sr1_inverse_update",
    "two_loop",
]
