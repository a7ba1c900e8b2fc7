"""Matrix functions by matrix products only: no eigendecomposition, no SVD (docs/algorithms.md#matmul-only-roots).

On a GPU ``eigh`` and the SVD are slow and serial while matrix products are
fast; these iterations use products (and additions) only, batched over
matrices of one size:

* :func:`newton_schulz` — the odd-polynomial iteration on the singular values
  of a matrix (Muon's quintic, or the cubic ``(3/2, −1/2, 0)`` that converges
  to the polar factor); :func:`polar` — the orthogonal polar factor ``U Vᵀ`` of
  ``A = U Σ Vᵀ`` by the cubic iteration.
* :func:`coupled_newton` — the inverse ``p``-th root ``(A + εI)^(−1/p)`` of a
  symmetric PSD matrix by the coupled Newton iteration (Guo & Higham 2006), for
  an integer ``p`` (``p = 1``: the inverse); :func:`inverse_roots_many` — many
  matrices, batched by size and root, retried in float64 where float32 did not
  converge.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["newton_schulz", "polar", "NewtonRoot", "coupled_newton", "inverse_roots_many"]

POLAR_CUBIC = (1.5, -0.5, 0.0)  # p(σ) = (3σ − σ³)/2: fixed point 1, quadratic convergence there


def newton_schulz(
    x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype | None
) -> Tensor:
    """``NS_steps(x)`` for a matrix ``(A, B)`` or a batch ``(N, A, B)``, in ``dtype`` (None: ``x``'s); the
    result in ``dtype``. ``X ← X/max(‖X‖_F, eps)``, then ``steps`` times ``S = X Xᵀ``,
    ``X ← a X + (b S + c S²) X`` in the wide orientation. A single matrix runs the same operations in the
    same order as torch.optim.Muon."""
    a, b, c = coefficients
    out = x.to(dtype) if dtype is not None else x.clone()
    wide = x.size(-2) > x.size(-1)
    if wide:
        out = out.mT
    if out.dim() == 2:
        out = out.div(out.norm().clamp(min=eps))
        for _ in range(steps):
            gram = out @ out.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            out = torch.addmm(out, update, out, beta=a)
    else:
        out = out.div(torch.linalg.matrix_norm(out).clamp(min=eps)[:, None, None])
        for _ in range(steps):
            gram = out @ out.mT
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            out = torch.baddbmm(out, update, out, beta=a)
    return out.mT if wide else out


def polar(x: Tensor, steps: int = 30, eps: float = 1e-30) -> Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of ``x = U Σ Vᵀ`` (full rank) by the cubic Newton–Schulz iteration
    (:func:`newton_schulz` with ``(3/2, −1/2, 0)``) after dividing by the Frobenius norm; each step maps every
    singular value ``σ ↦ (3σ − σ³)/2``. Convergence is quadratic near 1 and slow for small ``σ/‖x‖_F``
    (about ``log₁.₅(‖x‖_F/σ_min)`` steps before it): enough steps are the caller's choice."""
    return newton_schulz(x, POLAR_CUBIC, steps, eps, None)


class NewtonRoot(NamedTuple):
    """The result of :func:`coupled_newton`: ``root ≈ (A + εI)^(−1/p)``, the final ``error`` ``max|M − I|``
    per matrix (``M → I`` as the iteration converges) and the number of ``iterations`` run."""

    root: Tensor
    error: Tensor
    iterations: int


def coupled_newton(
    mat: Tensor, p: int, damping: float | Tensor = 0.0, max_iter: int = 100, tol: float = 1e-6
) -> NewtonRoot:
    """``(A + εI)^(−1/p)`` of a symmetric PSD ``A`` ``(..., n, n)``, integer ``p ≥ 1``, by the coupled Newton
    iteration (Guo & Higham 2006, as Distributed Shampoo's ``matrix_inverse_root_newton``)::

        A_ε = A + εI,   z = (p + 1) / (2 ‖A_ε‖_F),   X₀ = z^(1/p) I,   M₀ = z A_ε
        repeat:  T = ((p + 1) I − M) / p;   X ← X T;   M ← T^p M

    ``X_k (z A_ε)^(1/p)`` and ``M_k`` tend to ``I`` (the scaling puts every eigenvalue of ``M₀`` in
    ``(0, 1]``, inside the region of quadratic convergence). Stops when every matrix of the batch has
    ``max|M − I| < tol``, or after ``max_iter`` iterations. Matrix products only: ``p = 1`` is the
    Newton–Schulz inverse, 2 products per iteration (``X T``, ``T M``); ``p = 2`` 3, ``p = 4`` 4 (``T^p`` by
    squaring). ``damping`` is a number or one per
    matrix ``(...)``. Eigenvalues below ``‖A‖_F`` times the dtype's epsilon (round-off, a singular
    ``A`` without damping) are raised by adding that much to the diagonal, as ``eigh``'s floor does.
    """
    if p < 1 or int(p) != p:
        raise ValueError(f"coupled_newton needs an integer root p >= 1, got {p}")
    p = int(p)
    n = mat.shape[-1]
    eye = torch.eye(n, dtype=mat.dtype, device=mat.device)
    norm = torch.linalg.matrix_norm(mat)
    floor = norm * torch.finfo(mat.dtype).eps
    eps = torch.as_tensor(damping, dtype=mat.dtype, device=mat.device) + floor
    a = 0.5 * (mat + mat.mT) + eps[..., None, None] * eye
    z = (p + 1) / (2.0 * torch.linalg.matrix_norm(a))
    x = z[..., None, None].pow(1.0 / p) * eye.expand_as(a)
    m = z[..., None, None] * a
    error = (m - eye).abs().amax((-2, -1))
    it = 0
    while it < max_iter and not bool((error < tol).all()):  # one host sync per iteration
        t = ((p + 1) * eye - m) / p
        x = x @ t
        m = (t if p == 1 else torch.linalg.matrix_power(t, p)) @ m
        error = (m - eye).abs().amax((-2, -1))
        it += 1
    return NewtonRoot(x, error.nan_to_num(float("inf")), it)


def inverse_roots_many(
    mats: Sequence[Tensor],
    roots: Sequence[int],
    dampings: Sequence[float | Tensor],
    float64: bool = False,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> list[Tensor | None]:
    """:func:`coupled_newton` of each ``(matrix, root, damping)``, one batched call per (size, root); results in
    each input's dtype. A matrix that did not converge (NaN/Inf, or ``max|M − I| ≥ tol`` after ``max_iter``)
    is retried in float64, and is ``None`` when that fails too. ``float64``: compute in float64 at once."""
    out: list[Tensor | None] = [None] * len(mats)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (m, r) in enumerate(zip(mats, roots)):
        groups.setdefault((m.shape[-1], int(r)), []).append(i)
    for (_, r), idx in groups.items():
        dtype = mats[idx[0]].dtype
        work = torch.stack([mats[i] for i in idx])
        damp = torch.stack([torch.as_tensor(dampings[i], dtype=torch.float64) for i in idx])
        if float64 or work.dtype in (torch.float16, torch.bfloat16):
            work = work.double() if float64 else work.float()
        left = list(range(len(idx)))
        for attempt in (work, work.double()):
            if not left:
                break
            batch = attempt[left] if len(left) < len(idx) else attempt
            finite = torch.isfinite(batch).flatten(1).all(1)
            res = coupled_newton(batch.nan_to_num(0.0, 0.0, 0.0), r, damp[left].to(attempt.dtype), max_iter, tol)
            good = ((res.error < tol) & finite & torch.isfinite(res.root).flatten(1).all(1)).tolist()
            for n, ok in enumerate(good):
                if ok:
                    out[idx[left[n]]] = res.root[n].to(dtype)
            left = [j for j, ok in zip(left, good) if not ok]
            if attempt.dtype == torch.float64:
                break
    return out
