"""Robust eigendecompositions and spectral functions of symmetric PSD matrices.

Every dense preconditioner in precond (Kronecker factors, Shampoo statistics,
full matrices) is transformed through its eigendecomposition
``M = Q diag(λ) Qᵀ``:

* :func:`robust_eigh` — ``torch.linalg.eigh`` on ``(M + Mᵀ)/2`` that never
  raises: a NaN/Inf input or a solver failure (after one float64 retry) gives
  ``None``; :func:`eigh_many` — the same for many matrices, batched by size.
* :func:`power_qr` / :func:`power_qr_many` — SOAP's warm-started refresh of an
  eigenbasis: one power iteration from the previous basis, sorted by its
  eigenvalue estimates, then a QR decomposition (matrix products and one QR).
* :func:`floor_eigenvalues` — eigenvalues below round-off raised to it.
* :func:`matrix_function` — ``Q diag(fn(λ)) Qᵀ``.
* :func:`matrix_power` / :func:`inverse_root` — ``(M + εI)^q`` and the two
  damping placements of docs/algorithms.md#inverse-root (``ε`` inside or outside the root).
* :class:`SpectralCache` — keeps the last good result of a refresh in a state
  dict, counts failures and reports (:class:`EighFailureError`) after too many
  consecutive ones.

The ``kronecker`` and ``full`` structures decompose through :func:`eigh_many`
and keep their results with :class:`SpectralCache`.

All functions accept batched input ``(..., n, n)``; the batch dimensions are
carried through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from precond.errors import PrecondError
from precond.guard import all_finite

__all__ = [
    "EighResult",
    "EigLike",
    "EighFailureError",
    "SpectralCache",
    "eigh_many",
    "PowerQRResult",
    "power_qr",
    "power_qr_many",
    "floor_eigenvalues",
    "robust_eigh",
    "matrix_function",
    "matrix_power",
    "inverse_root",
    "symmetrize",
]

DampingPosition = Literal["inside", "outside"]


class EighResult(NamedTuple):
    """A symmetric eigendecomposition ``M = Q diag(λ) Qᵀ``.

    ``eigenvalues`` has shape ``(..., n)`` (ascending, as ``torch.linalg.eigh``
    returns them) and ``eigenvectors`` shape ``(..., n, n)`` with the
    eigenvectors in the *columns*.  ``retried`` is True when the float64 retry
    was needed.  Being a tuple, ``vals, vecs, _ = result`` also works.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    retried: bool = False


#: A decomposition: an :class:`EighResult` or a ``(eigenvalues, eigenvectors)`` pair.
EigLike = Union[EighResult, tuple[Tensor, Tensor]]


class EighFailureError(PrecondError, RuntimeError):
    """An eigendecomposition failed too many times in a row."""


def symmetrize(mat: Tensor) -> Tensor:
    """``(M + Mᵀ) / 2`` over the last two dimensions."""
    return 0.5 * (mat + mat.mT)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    # eigh has no half-precision kernels; such inputs are decomposed in float32.
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _try_eigh(mat: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        vals, vecs = torch.linalg.eigh(mat)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        return None
    if not all_finite([vals, vecs]):
        return None
    return vals, vecs


def robust_eigh(mat: Tensor, *, float64_retry: bool = True) -> EighResult | None:
    """Eigendecomposition of the symmetric part of ``mat`` that never raises.

    Args:
        mat: ``(..., n, n)`` real matrix (or batch of matrices); only its
            symmetric part ``(M + Mᵀ)/2`` is decomposed.
        float64_retry: if the solver raises (or returns non-finite values) in
            the input precision, retry once in float64 and cast the result
            back to the input dtype.  No retry is done for float64 input.

    Returns:
        An :class:`EighResult` in the dtype of ``mat``, or ``None`` when the
        input holds NaN/Inf or the decomposition failed.  A batch fails or
        succeeds as a whole.
    """
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"robust_eigh expects (..., n, n) matrices, got shape {tuple(mat.shape)}")
    if not all_finite([mat]):
        return None
    out_dtype = mat.dtype
    work = symmetrize(mat.to(_working_dtype(out_dtype)))
    res = _try_eigh(work)
    retried = False
    if res is None and float64_retry and work.dtype != torch.float64:
        res = _try_eigh(work.to(torch.float64))
        retried = True
    if res is None:
        return None
    vals, vecs = res
    return EighResult(vals.to(out_dtype), vecs.to(out_dtype), retried)


def eigh_many(mats: Sequence[Tensor], float64: bool = False) -> list[EighResult | None]:
    """:func:`robust_eigh` of each matrix, batched over the matrices of equal size.

    One ``eigh`` call per size; a batch that fails is retried matrix by matrix, so a
    bad matrix (NaN/Inf, no convergence also in float64) fails alone: its entry is
    ``None``. ``float64``: decompose in float64 (results in each input's dtype).
    """
    out: list[EighResult | None] = [None] * len(mats)
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    for idx in by_size.values():
        dtype = mats[idx[0]].dtype
        work = torch.stack([mats[i] for i in idx])
        if float64:
            work = work.double()
        res = robust_eigh(work)
        if res is not None:
            for n, i in enumerate(idx):
                out[i] = EighResult(res.eigenvalues[n].to(dtype), res.eigenvectors[n].to(dtype), res.retried)
            continue
        for n, i in enumerate(idx):
            one = robust_eigh(work[n])
            if one is not None:
                out[i] = EighResult(one.eigenvalues.to(dtype), one.eigenvectors.to(dtype), one.retried)
    return out


class PowerQRResult(NamedTuple):
    """One warm-started refresh of an eigenbasis (:func:`power_qr`).

    ``eigenvalues`` ``(..., n)``: the estimates ``diag(Oᵀ M O)`` of the previous basis ``O`` against the
    new matrix, sorted descending; ``eigenvectors`` ``(..., n, n)``: the new basis (columns in that
    order); ``order`` ``(..., n)`` (int64): the permutation of ``O``'s columns that sorted them, which a
    second moment kept in ``O``'s coordinates follows (``index_select`` along that dimension).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    order: Tensor


def _try_power_qr(mat: Tensor, basis: Tensor) -> PowerQRResult | None:
    product = mat @ basis
    estimates = (basis * product).sum(-2)  # diag(Oᵀ M O), without forming Oᵀ M O
    order = torch.argsort(estimates, dim=-1, descending=True)
    try:  # M O[:, order] = (M O)[:, order]: one product in all
        q, _ = torch.linalg.qr(torch.take_along_dim(product, order.unsqueeze(-2), dim=-1))
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        return None
    values = torch.take_along_dim(estimates, order, dim=-1)
    if not all_finite([q, values]):
        return None
    return PowerQRResult(values, q, order)


def power_qr(mat: Tensor, basis: Tensor, *, float64_retry: bool = True) -> PowerQRResult | None:
    """SOAP's refresh of the eigenbasis ``O`` of a symmetric PSD matrix ``M`` that changed a little.

    Sort ``O``'s columns by the eigenvalue estimates ``diag(Oᵀ M O)``, descending, then one step of
    simultaneous (orthogonal) iteration: ``Q = qr(M O_sorted).Q``. The descending order makes
    Gram–Schmidt start from the dominant direction, so the errors of the others contract (an
    ascending order amplifies them). One matrix product and one Householder QR, no eigendecomposition;
    an exact eigenbasis comes back up to the signs of its columns. Batched over ``(..., n, n)``.

    Returns ``None`` when an input holds NaN/Inf or the result is not finite (after one float64 retry
    for other dtypes); results are in ``mat``'s dtype.
    """
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2] or basis.shape != mat.shape:
        raise ValueError(f"power_qr expects (..., n, n) matrices of one shape, got {tuple(mat.shape)} and {tuple(basis.shape)}")
    if not all_finite([mat, basis]):
        return None
    out_dtype = mat.dtype
    work = _working_dtype(out_dtype)
    res = _try_power_qr(symmetrize(mat.to(work)), basis.to(work))
    if res is None and float64_retry and work != torch.float64:
        res = _try_power_qr(symmetrize(mat.double()), basis.double())
    if res is None:
        return None
    return PowerQRResult(res.eigenvalues.to(out_dtype), res.eigenvectors.to(out_dtype), res.order)


def power_qr_many(mats: Sequence[Tensor], bases: Sequence[Tensor], float64: bool = False) -> list[PowerQRResult | None]:
    """:func:`power_qr` of each ``(matrix, previous basis)`` pair, batched over the pairs of equal size; a batch
    that fails is retried pair by pair, so a bad matrix fails alone (``None``). ``float64``: compute in
    float64 (results in each input's dtype)."""
    out: list[PowerQRResult | None] = [None] * len(mats)
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    for idx in by_size.values():
        dtype = mats[idx[0]].dtype
        work = torch.stack([mats[i] for i in idx])
        basis = torch.stack([bases[i].to(work.dtype) for i in idx])
        if float64:
            work, basis = work.double(), basis.double()
        res = power_qr(work, basis)
        if res is not None:
            for n, i in enumerate(idx):
                out[i] = PowerQRResult(res.eigenvalues[n].to(dtype), res.eigenvectors[n].to(dtype), res.order[n])
            continue
        for n, i in enumerate(idx):
            one = power_qr(work[n], basis[n])
            if one is not None:
                out[i] = PowerQRResult(one.eigenvalues.to(dtype), one.eigenvectors.to(dtype), one.order)
    return out


def floor_eigenvalues(eigvals: Tensor) -> Tensor:
    """Eigenvalues below round-off (``λ_max · eps`` of the dtype; negative ones included) raised to it.

    A PSD matrix's eigenvalues that small are noise of the decomposition; left at 0 they make an
    undamped inverse root infinite (e.g. float32 Shampoo factors summed from a tiny ``eps·I``).
    """
    top = eigvals.amax().clamp_min(0.0)
    return eigvals.clamp_min(float(top) * torch.finfo(eigvals.dtype).eps)


def _as_eig(mat_or_eig: Tensor | EigLike) -> tuple[Tensor, Tensor]:
    """Eigenvalues/vectors from a matrix (decomposed now) or a decomposition."""
    if isinstance(mat_or_eig, Tensor):
        res = robust_eigh(mat_or_eig)
        if res is None:
            raise EighFailureError(
                "eigendecomposition failed (input holds NaN/Inf or eigh did not converge, "
                "also in float64)"
            )
        return res.eigenvalues, res.eigenvectors
    vals, vecs = mat_or_eig[0], mat_or_eig[1]
    return vals, vecs


def matrix_function(eigvals: Tensor, eigvecs: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``Q diag(fn(λ)) Qᵀ`` for ``eigvals`` ``(..., n)`` and ``eigvecs`` ``(..., n, n)``.

    ``fn`` is applied elementwise to the eigenvalues and must return a tensor
    of the same shape.
    """
    f = fn(eigvals)
    return (eigvecs * f.unsqueeze(-2)) @ eigvecs.mT


def _clamped(eigvals: Tensor) -> Tensor:
    # A PSD matrix's eigenvalues can come out slightly negative from round-off;
    # a fractional power of those would be NaN.
    return eigvals.clamp_min(0.0)


def matrix_power(
    mat_or_eig: Tensor | EigLike,
    exponent: float,
    damping: float = 0.0,
) -> Tensor:
    """``(M + εI)^exponent`` of a symmetric PSD matrix, ``ε = damping``.

    Negative eigenvalues (round-off) are clamped to 0 before adding ``ε``.
    With ``ε = 0`` and a singular ``M`` a negative exponent gives ``inf``
    entries: damp, or use a positive exponent.
    """
    vals, vecs = _as_eig(mat_or_eig)
    return matrix_function(vals, vecs, lambda lam: (_clamped(lam) + damping).pow(exponent))


def inverse_root(
    mat_or_eig: Tensor | EigLike,
    p: float,
    damping: float = 0.0,
    damping_position: DampingPosition = "inside",
) -> Tensor:
    """Damped inverse ``p``-th root of a symmetric PSD matrix.

    * ``damping_position="inside"``:  ``(M + εI)^(-1/p)``, eigenvalues
      ``λ ↦ (λ + ε)^(-1/p)`` (Shampoo, K-FAC with ``p = 1``).
    * ``damping_position="outside"``: ``(M^(1/p) + εI)^(-1)``, eigenvalues
      ``λ ↦ 1 / (λ^(1/p) + ε)`` (Adam/Adagrad's ``ε`` after the square root).

    The two agree only for ``ε = 0`` (or ``p = 1``).  Eigenvalues below 0
    (round-off) are clamped to 0 before the root.  ``mat_or_eig`` is a matrix
    ``(..., n, n)`` (decomposed with :func:`robust_eigh`; a failure raises
    :class:`EighFailureError`) or a precomputed decomposition.
    """
    if p <= 0:
        raise ValueError(f"inverse_root needs p > 0, got {p}")
    if damping_position == "inside":
        return matrix_power(mat_or_eig, -1.0 / p, damping)
    if damping_position == "outside":
        vals, vecs = _as_eig(mat_or_eig)
        return matrix_function(
            vals, vecs, lambda lam: (_clamped(lam).pow(1.0 / p) + damping).reciprocal()
        )
    raise ValueError(f"damping_position must be 'inside' or 'outside', got {damping_position!r}")


@dataclass(frozen=True)
class SpectralCache:
    """Keep-last-good bookkeeping of a refreshed spectral result, held in a state dict.

    A preconditioner made from an eigendecomposition (the decomposition itself, or
    the bases, scales and roots derived from it) is refreshed now and then, and
    lives in a dict that checkpoints carry (an optimizer's per-parameter state).
    :meth:`refresh` stores a successful result under its own keys, records the
    step (``refreshed``) and resets the consecutive-failure count; a failure
    (``None``: the input held NaN/Inf, ``eigh`` failed also in float64, or what
    was made of it is not finite) leaves the previous result in place — nothing
    before the first success — and counts it under ``failures`` (consecutive) and
    ``total``. :meth:`refresh` says when the consecutive count reaches
    ``max_failures`` (``None``: never); :meth:`error` is the exception to raise.
    """

    failures: str = "failures"  # state key: consecutive failures
    total: str = "failures_total"  # state key: every failure so far
    refreshed: str | None = None  # state key: the step of the last success
    max_failures: int | None = 5

    def refresh(self, state: dict[str, Any], result: Mapping[str, Any] | None, step: int | None = None) -> bool:
        """Keep ``result`` or count its failure; True when ``max_failures`` failures in a row are reached."""
        if result is not None:
            state[self.failures] = 0
            state.update(result)
            if self.refreshed is not None:
                state[self.refreshed] = step
            return False
        state[self.failures] = count = state.get(self.failures, 0) + 1
        state[self.total] = state.get(self.total, 0) + 1
        return self.max_failures is not None and count >= self.max_failures

    def error(self, what: str, why: str) -> EighFailureError:
        """The exception once ``max_failures`` is reached: ``what`` (the statistic) failed so many times
        in a row, and ``why`` (the causes and what to do)."""
        n = self.max_failures
        return EighFailureError(f"{what} failed {n} times in a row (max_failures={n}): {why}")
