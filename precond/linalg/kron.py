"""Kronecker-factored preconditioning kernels (docs/algorithms.md#k-fac, docs/algorithms.md#shampoo).

Conventions (K-FAC, one layer)
------------------------------
A weight ``W`` has shape ``(d_out, d_in)`` (with a bias, the bias is folded in
as an extra *last input column*, so ``d_in`` counts it).  The layer curvature
is approximated by two symmetric PSD factors

* ``A`` — ``(d_in, d_in)``, the input/activation side (``E[a aᵀ]``),
* ``G`` — ``(d_out, d_out)``, the output-gradient side (``E[ds dsᵀ]``),

and the curvature acting on a gradient-shaped matrix ``V`` is ``G V Aᵀ``
(:func:`kron_matvec`).  As an explicit matrix this is

* ``kron(A, G)`` for the **column-major** vec (stacking columns,
  ``V.mT.flatten()`` / numpy ``order="F"``) — the paper's ``A ⊗ G``;
* ``kron(G, A)`` for the **row-major** vec that torch uses
  (``V.flatten()``):  ``kron(G, A) @ V.flatten() == (G @ V @ A.T).flatten()``.

Hence the preconditioned gradient for the plain inverse is ``G⁻¹ V A⁻¹``.
Every function here takes and returns ``V``-shaped matrices; leading batch
dimensions ``(..., d_out, d_in)`` with factors ``(..., d, d)`` are supported so
that same-sized layers can be stacked.

Factors are given either as matrices or as eigendecompositions
(:class:`~precond.linalg.spectral.EighResult` or ``(eigenvalues,
eigenvectors)``) where stated.

Shampoo (any tensor order) and Distributed-Shampoo blocking live here too, as
well as the K-FAC KL-clipping scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Literal, Sequence, Union

import torch
from torch import Tensor

from precond.linalg.spectral import EigLike, _as_eig, matrix_power

__all__ = [
    "kron_matvec",
    "kron_precondition_exact",
    "kron_precondition_factored",
    "kron_precondition_per_factor",
    "tracenorm_pi",
    "pi_adjusted_damping",
    "shampoo_statistics",
    "shampoo_precondition",
    "mode_products",
    "BlockPartition",
    "merge_small_dims",
    "block_partition",
    "split_into_blocks",
    "reassemble_blocks",
    "kl_clip_scale",
]

Factor = Union[Tensor, EigLike]


# --------------------------------------------------------------------------- helpers


def _is_matrix(f: Factor) -> bool:
    return isinstance(f, Tensor)


def _trace_and_dim(f: Factor) -> tuple[Tensor, int]:
    if _is_matrix(f):
        return f.diagonal(dim1=-2, dim2=-1).sum(-1), f.shape[-1]
    vals = f[0]
    return vals.sum(-1), vals.shape[-1]


def _as_batch_scalar(c: float | Tensor) -> float | Tensor:
    """Per-matrix scalars (shape ``(...)``) broadcast against ``(..., n, n)``."""
    if isinstance(c, Tensor):
        return c.unsqueeze(-1).unsqueeze(-1)
    return c


def _damped_solve_left(f: Factor, c: float | Tensor, x: Tensor) -> Tensor:
    """``(F + cI)⁻¹ X`` for a factor given as a matrix or a decomposition."""
    if _is_matrix(f):
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return torch.linalg.solve(f + _as_batch_scalar(c) * eye, x)
    vals, vecs = f[0], f[1]
    if isinstance(c, Tensor):
        c = c.unsqueeze(-1)
    scale = (vals.clamp_min(0.0) + c).reciprocal()
    return vecs @ (scale.unsqueeze(-1) * (vecs.mT @ x))


def _damped_solve_right(x: Tensor, f: Factor, c: float | Tensor) -> Tensor:
    """``X (F + cI)⁻¹`` for symmetric ``F``."""
    return _damped_solve_left(f, c, x.mT).mT


# --------------------------------------------------------------------------- K-FAC


def kron_matvec(V: Tensor, A: Tensor, G: Tensor) -> Tensor:
    """The curvature product ``(A ⊗ G) vec(V)`` in matrix form: ``G V Aᵀ``.

    Equals ``kron(G, A) @ V.flatten()`` reshaped (row-major vec) and
    ``kron(A, G) @ vec_colmajor(V)``.
    """
    return G @ V @ A.mT


def kron_precondition_exact(V: Tensor, eigA: Factor, eigG: Factor, damping: float) -> Tensor:
    """Exact Kronecker damping: ``(A ⊗ G + λI)⁻¹ vec(V)`` through both eigenbases.

    With ``A = Qa diag(da) Qaᵀ`` and ``G = Qg diag(dg) Qgᵀ``::

        result = Qg [ (Qgᵀ V Qa) / (dg daᵀ + λ) ] Qaᵀ        (elementwise division)

    which equals ``solve(kron(G, A) + λI, V.flatten())`` reshaped (row-major)
    (the ``exact`` form of docs/algorithms.md#kronecker-damping-forms).  Eigenvalues below zero (round-off)
    are clamped to 0.  ``eigA``/``eigG`` are decompositions; a matrix is
    decomposed on the fly with :func:`~precond.linalg.spectral.robust_eigh`.
    """
    da, qa = _as_eig(eigA)
    dg, qg = _as_eig(eigG)
    da = da.clamp_min(0.0)
    dg = dg.clamp_min(0.0)
    v_rot = qg.mT @ V @ qa
    v_rot = v_rot / (dg.unsqueeze(-1) * da.unsqueeze(-2) + damping)
    return qg @ v_rot @ qa.mT


def tracenorm_pi(A: Factor, G: Factor) -> Tensor:
    """Martens & Grosse §6.3: ``π = sqrt((tr A / dim A) / (tr G / dim G))``.

    Returns a tensor of shape ``(...)`` (the batch shape).  Where either
    normalised trace is not positive (an all-zero factor, e.g. before any
    statistics were gathered) ``π = 1``.
    """
    tr_a, dim_a = _trace_and_dim(A)
    tr_g, dim_g = _trace_and_dim(G)
    na, ng = tr_a / dim_a, tr_g / dim_g
    ok = (na > 0) & (ng > 0)
    ratio = torch.where(ok, na / torch.where(ok, ng, torch.ones_like(ng)), torch.ones_like(na))
    return ratio.sqrt()


def pi_adjusted_damping(
    A: Factor, G: Factor, damping: float, pi: Literal["tracenorm"] | float = "tracenorm"
) -> tuple[float | Tensor, float | Tensor]:
    """Per-factor damping ``(π√λ, √λ/π)`` of the factored Tikhonov approximation.

    ``(A ⊗ G + λI) ≈ (A + π√λ I) ⊗ (G + √λ/π I)``.  ``pi="tracenorm"`` uses
    :func:`tracenorm_pi`; a float fixes π (``pi=1`` gives ``√λ`` on each
    factor, the K-BFGS repository's K-FAC baseline).  Use the results as the
    damping of :func:`~precond.linalg.spectral.inverse_root` with ``p=1`` to
    precompute the two damped inverses.
    """
    sq = math.sqrt(damping)
    if isinstance(pi, str):
        if pi != "tracenorm":
            raise ValueError(f"pi must be 'tracenorm' or a positive float, got {pi!r}")
        pi_t = tracenorm_pi(A, G)
        return pi_t * sq, sq / pi_t
    if pi <= 0:
        raise ValueError(f"pi must be positive, got {pi}")
    return pi * sq, sq / pi


def kron_precondition_factored(
    V: Tensor,
    A: Factor,
    G: Factor,
    damping: float,
    pi: Literal["tracenorm"] | float = "tracenorm",
) -> Tensor:
    """Factored Tikhonov damping (Martens & Grosse 2015 §6.3, tf-kfac default).

    ``result = (G + √λ/π I)⁻¹ V (A + π√λ I)⁻¹``, i.e.
    ``((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ vec(V)``, with π from
    :func:`pi_adjusted_damping`.  ``A``/``G`` are matrices (solved directly)
    or decompositions (applied in their eigenbases).
    """
    damp_a, damp_g = pi_adjusted_damping(A, G, damping, pi)
    return _damped_solve_right(_damped_solve_left(G, damp_g, V), A, damp_a)


def kron_precondition_per_factor(V: Tensor, A: Factor, G: Factor, damping: float) -> Tensor:
    """Per-factor damping (kfac-pytorch ``compute_method='inverse'``).

    ``result = (G + λI)⁻¹ V (A + λI)⁻¹``.  Note λ, not √λ, on each factor;
    this is *not* the same as :func:`kron_precondition_exact` (the ``per_factor``
    form of docs/algorithms.md#kronecker-damping-forms).
    """
    return _damped_solve_right(_damped_solve_left(G, damping, V), A, damping)


# --------------------------------------------------------------------------- Shampoo


def shampoo_statistics(grad: Tensor) -> list[Tensor]:
    """One Gram matrix per dimension of ``grad`` (Shampoo, docs/algorithms.md#shampoo).

    For dimension ``i`` of an order-k tensor: ``G_(i) G_(i)ᵀ`` where ``G_(i)``
    is the mode-i unfolding (all other dimensions contracted), shape
    ``(n_i, n_i)``.  For a matrix: ``[G Gᵀ, Gᵀ G]``; for a vector ``[g gᵀ]``;
    for a 0-d tensor ``[]``.
    """
    k = grad.ndim
    stats = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        stats.append(torch.tensordot(grad, grad, dims=(others, others)))
    return stats


def mode_products(tensor: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    """``T ×_1 M_1 ×_2 M_2 … ×_k M_k`` (``None`` entries are skipped).

    The mode-i product is ``(T ×_i M)[…, j, …] = Σ_l M[j, l] T[…, l, …]``.
    Use it with cached Shampoo roots so they are not recomputed each step.
    """
    if len(matrices) != tensor.ndim:
        raise ValueError(
            f"need one matrix (or None) per dimension: tensor has {tensor.ndim} dims, "
            f"got {len(matrices)} matrices"
        )
    out = tensor
    for i, m in enumerate(matrices):
        if m is None:
            continue
        out = torch.tensordot(m, out, dims=([1], [i])).movedim(0, i)
    return out


def shampoo_precondition(
    grad: Tensor,
    factor_eigs: Sequence[EigLike | None],
    exponent: float | Sequence[float] | None = None,
    damping: float = 0.0,
) -> Tensor:
    """Shampoo's preconditioned gradient ``G ×_1 H_1^{e_1} ×_2 … ×_k H_k^{e_k}``.

    Args:
        grad: order-k gradient tensor.
        factor_eigs: one decomposition per dimension of the accumulated
            statistic ``H_i`` (``None`` leaves that dimension unpreconditioned).
        exponent: per-factor exponents; a float applies to every factor;
            default ``-1/(2k)`` (the paper: ``-1/4`` for matrices, ``-1/2``
            for vectors, where Shampoo is full-matrix AdaGrad).
        damping: ``ε`` added to the eigenvalues before the power,
            ``(H_i + εI)^{e_i}`` (Distributed Shampoo's placement; with sum
            accumulation the same as starting from ``H_0 = εI``).

    A 0-d ``grad`` is returned unchanged (as a copy).
    """
    k = grad.ndim
    if len(factor_eigs) != k:
        raise ValueError(f"need {k} factor decompositions (one per dimension), got {len(factor_eigs)}")
    if k == 0:
        return grad.clone()
    if exponent is None:
        exps = [-1.0 / (2 * k)] * k
    elif isinstance(exponent, (int, float)):
        exps = [float(exponent)] * k
    else:
        exps = [float(e) for e in exponent]
        if len(exps) != k:
            raise ValueError(f"need {k} exponents, got {len(exps)}")
    mats = [None if e is None else matrix_power(e, x, damping) for e, x in zip(factor_eigs, exps)]
    return mode_products(grad, mats)


# --------------------------------------------------------------------------- blocking


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dimensions and greedily merge neighbours up to ``max_dim``.

    Scanning left to right, a dimension is multiplied into the previous
    merged one while the product stays ``<= max_dim``; otherwise it starts a
    new dimension (Distributed Shampoo's dimension merging).  A tensor with
    one element gives ``(1,)``.  Examples (``max_dim=1024``):
    ``(1, 3, 1, 5, 7) -> (105,)``, ``(64, 32, 3, 3) -> (64, 288)``,
    ``(4096, 4096) -> (4096, 4096)``.
    """
    dims = [int(d) for d in shape if int(d) != 1]
    if not dims:
        return (1,)
    merged = [dims[0]]
    for d in dims[1:]:
        if merged[-1] * d <= max_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged)


def _chunks(d: int, max_dim: int) -> tuple[int, ...]:
    if d <= max_dim:
        return (d,)
    full, rest = divmod(d, max_dim)
    return (max_dim,) * full + ((rest,) if rest else ())


@dataclass(frozen=True)
class BlockPartition:
    """How a tensor of ``shape`` is cut into blocks with no dimension > ``max_dim``.

    The tensor is reshaped to ``merged_shape`` and every dimension ``i`` is
    split into consecutive chunks of sizes ``splits[i]`` (all ``max_dim``
    except possibly a smaller last one).  Blocks are the Cartesian product of
    the chunks, in row-major order (last dimension fastest).
    """

    shape: tuple[int, ...]
    max_dim: int
    merged_shape: tuple[int, ...]
    splits: tuple[tuple[int, ...], ...]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(c) for c in product(*self.splits)]

    @property
    def num_blocks(self) -> int:
        return math.prod(len(s) for s in self.splits)

    @property
    def factor_dims(self) -> list[int]:
        """Sizes of all Shampoo factors over all blocks (one per block dimension)."""
        return [d for b in self.block_shapes for d in b]


def block_partition(shape: Sequence[int], max_dim: int, *, merge_dims: bool = True) -> BlockPartition:
    """Distributed-Shampoo blocking of a tensor shape (pure shape logic).

    With ``merge_dims`` the shape is first reduced by :func:`merge_small_dims`
    (otherwise it is used as is); then every dimension larger than
    ``max_dim`` is split into chunks of ``max_dim``.  E.g. ``(4096, 4096)``
    with ``max_dim=1024`` gives 16 blocks of ``(1024, 1024)``; ``(1500,)``
    gives blocks ``(1024,)`` and ``(476,)``.
    """
    if max_dim < 1:
        raise ValueError(f"max_dim must be >= 1, got {max_dim}")
    shape = tuple(int(d) for d in shape)
    merged = merge_small_dims(shape, max_dim) if merge_dims else shape
    return BlockPartition(shape, max_dim, merged, tuple(_chunks(d, max_dim) for d in merged))


def split_into_blocks(tensor: Tensor, partition: BlockPartition) -> list[Tensor]:
    """Cut ``tensor`` into the blocks of ``partition`` (row-major block order).

    The blocks are views of ``tensor`` when its reshape to ``merged_shape``
    is a view (e.g. contiguous input); do not rely on writes propagating.
    """
    if tuple(tensor.shape) != partition.shape:
        raise ValueError(f"tensor shape {tuple(tensor.shape)} != partition shape {partition.shape}")
    blocks = [tensor.reshape(partition.merged_shape)]
    for dim, sizes in enumerate(partition.splits):
        blocks = [piece for b in blocks for piece in torch.split(b, list(sizes), dim=dim)]
    return blocks


def reassemble_blocks(blocks: Sequence[Tensor], partition: BlockPartition) -> Tensor:
    """Inverse of :func:`split_into_blocks`: a tensor of ``partition.shape``.

    A dimension in one piece is not copied: a single block comes back as a view of itself.
    """
    if len(blocks) != partition.num_blocks:
        raise ValueError(f"expected {partition.num_blocks} blocks, got {len(blocks)}")
    parts = list(blocks)
    for dim in range(len(partition.splits) - 1, -1, -1):
        n = len(partition.splits[dim])
        if n > 1:
            parts = [torch.cat(parts[j : j + n], dim=dim) for j in range(0, len(parts), n)]
    return parts[0].reshape(partition.shape)


# --------------------------------------------------------------------------- KL clipping


def kl_clip_scale(vg_sum: float | Tensor, lr: float, c: float) -> float | Tensor:
    """K-FAC KL-clipping factor ``ν = min(1, sqrt(c / (lr² · vg_sum)))``.

    ``vg_sum = Σ_layers Σ v ⊙ g`` where ``v = F̂⁻¹ g`` is the (damped)
    preconditioned gradient, so ``vg_sum = vᵀ F̂ v`` (because ``F̂ v = g``).
    The step is ``ν · lr · v`` and, when clipping is active (``ν < 1``), its
    predicted squared Fisher norm is exactly the budget::

        (ν lr v)ᵀ F̂ (ν lr v) = lr² ν² vg_sum = c

    (Ba, Grosse & Martens 2017 §5 as implemented in tf-kfac, kfac-pytorch,
    baselines: ``c`` is used directly, no factor 2).  When ``vg_sum <= 0``
    (only possible for an indefinite preconditioner or round-off) or
    ``lr == 0`` no finite scale exists and ``ν = 1`` is returned.  A tensor
    ``vg_sum`` gives a tensor (no host sync); a float gives a float.
    """
    if isinstance(vg_sum, Tensor):
        denom = (lr * lr) * vg_sum
        ok = denom > 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        nu = torch.sqrt(c / safe).clamp(max=1.0)
        return torch.where(ok, nu, torch.ones_like(nu))
    denom = lr * lr * float(vg_sum)
    if denom <= 0:
        return 1.0
    return min(1.0, math.sqrt(c / denom))
