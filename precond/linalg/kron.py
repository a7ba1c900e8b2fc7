"""Kronecker-factored preconditioning kernels (docs/algorithms.md#k-fac, docs/algorithms.md#shampoo).

Conventions
-----------
A block is a tensor ``X`` of order ``k`` with one symmetric PSD factor ``F_i``
per dimension; the factors act by mode products (:func:`mode_products`).  For
a K-FAC layer ``X = V = [dW | db]`` has shape ``(d_out, d_in)`` (the bias as an
extra *last input column*), the factors are ``[G, A]`` (``G`` the
output-gradient side, ``(d_out, d_out)``; ``A`` the input side,
``(d_in, d_in)``) and the curvature acting on ``V`` is
``mode_products(V, [G, A]) = G V Aᵀ``.  As an explicit matrix this is

* ``kron(A, G)`` for the **column-major** vec (stacking columns,
  ``V.mT.flatten()`` / numpy ``order="F"``) — the paper's ``A ⊗ G``;
* ``kron(G, A)`` for the **row-major** vec that torch uses
  (``V.flatten()``):  ``kron(G, A) @ V.flatten() == (G @ V @ A.T).flatten()``.

The kernels the ``kronecker`` structure preconditions with, one per damping
form (docs/algorithms.md#kronecker-damping-forms), each tested against the
dense closed form:

* ``exact`` and the eigenbasis mode: :func:`kron_spectrum` (the eigenvalues of
  ``C`` from the factors') at a refresh, :func:`kron_precondition_exact`
  (``f(λ_C)`` applied in the joint eigenbasis) on every step;
* ``factored``: :func:`pi_adjusted_damping` (Martens & Grosse's π split of the
  damping) at a refresh, then as ``per_factor``;
* ``per_factor``: one root per factor
  (:func:`~precond.linalg.spectral.inverse_root`) at a refresh,
  :func:`mode_products` on every step (Shampoo).

Shampoo's statistics and Distributed-Shampoo blocking live here too, as well
as the K-FAC KL-clipping scale.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import product
from typing import Literal, Sequence, Union

import torch
from torch import Tensor

from precond.linalg.spectral import EigLike

__all__ = [
    "kron_spectrum",
    "kron_precondition_exact",
    "tracenorm_pi",
    "pi_adjusted_damping",
    "shampoo_statistics",
    "mode_products",
    "BlockPartition",
    "merge_small_dims",
    "block_partition",
    "split_into_blocks",
    "reassemble_blocks",
    "kl_clip_scale",
]

Factor = Union[Tensor, EigLike]


# --------------------------------------------------------------------------- damping forms


def _trace_and_dim(f: Factor) -> tuple[Tensor, int]:
    if isinstance(f, Tensor):
        return f.diagonal(dim1=-2, dim2=-1).sum(-1), f.shape[-1]
    vals = f[0]
    return vals.sum(-1), vals.shape[-1]


def kron_spectrum(eigenvalues: Sequence[Tensor], share: int = 1) -> Tensor:
    """The eigenvalues of ``C = (F_1 ⊗ … ⊗ F_k)^(1/share)`` from each factor's, shape ``(n_1, …, n_k)``.

    Entry ``(j_1, …, j_k)`` is ``(Π_i λ_i[j_i])^(1/share)``, the eigenvalue of the joint
    eigenvector ``q_1[j_1] ⊗ … ⊗ q_k[j_k]`` (K-FAC: ``share = 1``, ``λ_G λ_Aᵀ``; Shampoo's
    ``k``-th root: ``share = k``). Leading batch dimensions ``(..., n_i)`` are carried through.
    """
    out = eigenvalues[0]
    for j, lam in enumerate(eigenvalues[1:], 1):
        out = out.unsqueeze(-1) * lam.reshape(*lam.shape[:-1], *(1,) * j, lam.shape[-1])
    return out ** (1.0 / share) if share != 1 else out


def kron_precondition_exact(V: Tensor, bases: Sequence[Tensor], scale: Tensor) -> Tensor:
    """``Q (scale ⊙ (Qᵀ V Q)) Qᵀ``: ``scale`` applied elementwise in the factors' joint eigenbasis.

    ``bases`` holds each factor's eigenvectors (in the columns), one per dimension of ``V``.
    With ``scale = f(kron_spectrum(eigenvalues))`` this is ``f(C) vec(V)`` exactly (the
    ``exact`` damping form); for K-FAC with ``f(λ) = 1/(λ + damping)``::

        Q_G [ (Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + damping) ] Q_Aᵀ = solve(kron(G, A) + damping·I, V.flatten())

    (row-major vec). With ``scale`` an estimate of ``C``'s eigenvalues (a second moment of
    rotated gradients), the eigenbasis mode (EKFAC, SOAP). Two factors also take leading
    batch dimensions (matrix products); other orders go through :func:`mode_products`.
    """
    if len(bases) == 2:
        q0, q1 = bases
        return q0 @ ((q0.mT @ V @ q1) * scale) @ q1.mT
    rotated = mode_products(V, [q.mT for q in bases])
    return mode_products(rotated * scale, list(bases))


def tracenorm_pi(factors: Sequence[Factor]) -> list[Tensor]:
    """Martens & Grosse §6.3: ``π_i = t_i / (Π_j t_j)^(1/k)`` with ``t_i = tr F_i / dim F_i``.

    For two factors ``[A, G]``: ``[π, 1/π]`` with ``π = sqrt((tr A / dim A) / (tr G / dim G))``.
    Factors are matrices or decompositions (``(eigenvalues, eigenvectors)``: the trace is the
    eigenvalues' sum); each ``π_i`` has the batch shape ``(...)``. Where a normalised trace is
    not positive (an all-zero factor, e.g. before any statistics were gathered) every ``π_i = 1``.
    The geometric mean is taken in float64.
    """
    traces = []
    for f in factors:
        tr, dim = _trace_and_dim(f)
        traces.append(tr.double() / dim)
    ok = functools.reduce(torch.logical_and, [t > 0 for t in traces])
    safe = [torch.where(ok, t, torch.ones_like(t)) for t in traces]
    mean = torch.exp(sum(torch.log(t) for t in safe) / len(safe))
    return [torch.where(ok, t / mean, torch.ones_like(t)) for t in safe]


def pi_adjusted_damping(
    factors: Sequence[Factor], damping: float, pi: Literal["tracenorm"] | float = "tracenorm"
) -> list[Tensor] | list[float]:
    """Per-factor damping ``π_i λ^(1/k)`` of the factored Tikhonov approximation.

    ``(F_1 ⊗ … ⊗ F_k + λI) ≈ (F_1 + π_1 λ^(1/k) I) ⊗ … ⊗ (F_k + π_k λ^(1/k) I)``, for K-FAC
    ``[A, G]``: ``(π√λ, √λ/π)``. ``pi="tracenorm"`` uses :func:`tracenorm_pi`; a float fixes π
    for two factors (``pi=1`` gives ``√λ`` on each, the K-BFGS repository's K-FAC baseline).
    Use the results as the damping of :func:`~precond.linalg.spectral.inverse_root` with ``p=1``
    (the ``factored`` form precomputes one damped root per factor).
    """
    k = len(factors)
    root = damping ** (1.0 / k)
    if isinstance(pi, str):
        if pi != "tracenorm":
            raise ValueError(f"pi must be 'tracenorm' or a positive float, got {pi!r}")
        return [p * root for p in tracenorm_pi(factors)]
    if pi <= 0 or k != 2:
        raise ValueError(f"a fixed pi needs two factors and pi > 0, got {k} factors and pi={pi}")
    return [pi * root, root / pi]


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
    For a matrix ``T`` this is ``M_1 T M_2ᵀ`` (two matrix products). The
    ``kronecker`` structure applies its per-factor roots with it (``per_factor``
    and ``factored``: Shampoo's ``G ×_1 F_1^(−1/(2k)) … ×_k F_k^(−1/(2k))``).
    """
    if len(matrices) != tensor.ndim:
        raise ValueError(
            f"need one matrix (or None) per dimension: tensor has {tensor.ndim} dims, "
            f"got {len(matrices)} matrices"
        )
    if tensor.ndim == 2 and matrices[0] is not None and matrices[1] is not None:
        return matrices[0] @ tensor @ matrices[1].mT
    out = tensor
    for i, m in enumerate(matrices):
        if m is None:
            continue
        out = torch.tensordot(m, out, dims=([1], [i])).movedim(0, i)
    return out


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
    if partition.num_blocks == 1:  # one block: no split (each torch.split costs a small model's step dearly)
        return blocks
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
