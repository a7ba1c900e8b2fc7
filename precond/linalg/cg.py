"""Conjugate gradients for damped Newton / Hessian-free steps (docs/algorithms.md#matrix-free-cg).

Vectors
-------
:func:`cg` works on *parameter-shaped vectors*: ``b`` is either one tensor
(any shape, e.g. a flat vector) or a list of tensors (one per parameter).
``matvec``, the optional ``preconditioner`` and the returned ``x`` use the
same form as ``b``; a list is handled with ``torch._foreach_*`` kernels, so
no flattening/copying of the parameters is needed.  Inner products sum over
all tensors of the list.

Solves ``A x = b`` for a symmetric ``A`` given only as ``matvec(v) = A v``
(positive definite for the convergence guarantees; ``pᵀAp <= 0`` is detected
and stops the iteration).  The step sizes and stopping tests are host
scalars (one device sync per iteration, inherent to data-dependent stopping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Union

import torch
from torch import Tensor

__all__ = [
    "CGResult",
    "cg",
    "lm_damping_update",
]

Vec = Union[Tensor, list[Tensor]]


@dataclass
class CGResult:
    """Outcome of :func:`cg`.

    Attributes:
        x: the last iterate (same form as ``b``).
        iterations: number of CG iterations performed (matvecs after the
            initial residual).
        residuals: ``‖b − A x_i‖₂`` for ``i = 0 … iterations`` (recursively
            updated residuals, as in every CG implementation).
        negative_curvature_flag: a search direction with ``pᵀAp <= 0`` was
            met; ``x`` is the iterate before that direction.
        objective_values: ``φ_i = ½ x_iᵀ A x_i − bᵀ x_i`` for ``i = 0 …
            iterations``.  With ``A = H + λI`` and ``b = −g`` this is the
            quadratic model ``q(x_i) − q(0)`` used for the LM reduction ratio.
        stop_reason: ``"residual"``, ``"martens"``, ``"max_iter"``,
            ``"negative_curvature"`` or ``"non_finite"``.
    """

    x: Vec
    iterations: int
    residuals: list[float]
    negative_curvature_flag: bool = False
    objective_values: list[float] = field(default_factory=list)
    stop_reason: str = "max_iter"


# --------------------------------------------------------------------------- list helpers


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    prods = torch._foreach_mul(a, b)
    return float(torch.stack([p.sum() for p in prods]).sum()) if prods else 0.0


def _norm(a: list[Tensor]) -> float:
    if not a:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a))))


def _axpy_(alpha: float, x: list[Tensor], y: list[Tensor]) -> None:
    """``y ← y + alpha·x`` in place."""
    torch._foreach_add_(y, x, alpha=alpha)


def _clone(a: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in a]


def cg(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    x0: Vec | None = None,
    *,
    max_iter: int,
    tol: float = 1e-5,
    atol: float = 0.0,
    stop: Literal["residual", "martens"] = "residual",
    martens_eps: float = 5e-4,
    preconditioner: Callable[[Vec], Vec] | None = None,
) -> CGResult:
    """(Preconditioned) conjugate gradients for ``A x = b``.

    Args:
        matvec: ``v ↦ A v`` with ``A`` symmetric (include any damping, e.g.
            ``Hv + λv``).
        b: right-hand side, a tensor or a list of tensors.
        x0: warm start (e.g. ``0.95 · previous solution``); default zeros.
            It is not modified.
        max_iter: maximum number of iterations.
        tol: relative residual tolerance: stop when
            ``‖r_i‖ <= max(tol·‖b‖, atol)`` (scipy's ``rtol``/``atol``).
            Applies with both ``stop`` rules; pass ``tol=0`` to disable it.
        stop: ``"residual"`` (only the test above) or ``"martens"``: also the
            relative-progress test of Martens (2010) on
            ``φ_i = ½ x_iᵀAx_i − bᵀx_i``: with ``k = max(10, ceil(0.1·i))``,
            stop when ``i > k``, ``φ_i < 0`` and
            ``(φ_i − φ_{i−k}) / φ_i < k·martens_eps``.
        martens_eps: ``eps`` of the Martens test (5e-4 in init2winit).
        preconditioner: ``r ↦ M⁻¹ r`` for a symmetric positive definite ``M``.

    A direction with ``pᵀAp <= 0`` stops the iteration without using it and
    sets ``negative_curvature_flag`` (at the first iteration ``x = x0``).
    """
    if stop not in ("residual", "martens"):
        raise ValueError(f"stop must be 'residual' or 'martens', got {stop!r}")
    single = isinstance(b, Tensor)

    def to_list(v: Vec) -> list[Tensor]:
        return [v] if isinstance(v, Tensor) else list(v)

    def to_user(v: list[Tensor]) -> Vec:
        return v[0] if single else v

    def apply(op: Callable[[Vec], Vec], v: list[Tensor]) -> list[Tensor]:
        return to_list(op(to_user(v)))

    bl = to_list(b)
    if x0 is None:
        x = [torch.zeros_like(t) for t in bl]
        r = _clone(bl)
    else:
        x = _clone(to_list(x0))
        r = torch._foreach_sub(bl, apply(matvec, x))

    def phi() -> float:  # ½xᵀAx − bᵀx = −½ xᵀ(r + b) with r = b − Ax
        return -0.5 * _dot(x, torch._foreach_add(r, bl))

    threshold = max(tol * _norm(bl), atol)
    residuals = [_norm(r)]
    phis = [phi() if x0 is not None else 0.0]
    result = CGResult(to_user(x), 0, residuals, False, phis, "max_iter")

    if residuals[0] <= threshold:
        result.stop_reason = "residual"
        return result

    z = r if preconditioner is None else apply(preconditioner, r)
    p = _clone(z)
    rz = _dot(r, z)
    i = 0
    while i < max_iter:
        ap = apply(matvec, p)
        pap = _dot(p, ap)
        if math.isnan(pap) or math.isnan(rz):
            result.stop_reason = "non_finite"
            break
        if pap <= 0.0:
            result.negative_curvature_flag = True
            result.stop_reason = "negative_curvature"
            break
        alpha = rz / pap
        _axpy_(alpha, p, x)
        _axpy_(-alpha, ap, r)
        i += 1
        residuals.append(_norm(r))
        phis.append(phi())
        if residuals[-1] <= threshold:
            result.stop_reason = "residual"
            break
        if stop == "martens":
            k = max(10, math.ceil(0.1 * i))
            if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * martens_eps:
                result.stop_reason = "martens"
                break
        if i == max_iter:
            break
        z = r if preconditioner is None else apply(preconditioner, r)
        rz_new = _dot(r, z)
        beta = rz_new / rz
        rz = rz_new
        torch._foreach_mul_(p, beta)
        torch._foreach_add_(p, z)

    result.iterations = i
    result.x = to_user(x)
    return result


def lm_damping_update(
    damping: float,
    rho: float,
    lower: float = 0.25,
    upper: float = 0.75,
    increase: float = 1.5,
    decrease: float = 2.0 / 3.0,
    *,
    min_damping: float = 0.0,
    max_damping: float = math.inf,
) -> float:
    """Levenberg–Marquardt damping rule (Martens 2010; Martens & Sutskever 2012 §20.8.5).

    ``rho = (L(θ + p) − L(θ)) / (q(p) − q(0))`` is the reduction ratio.
    ``rho < lower``: ``λ·increase``; ``rho > upper``: ``λ·decrease``; else
    unchanged.  A NaN ``rho`` (diverged loss) counts as bad and increases
    ``λ``.  The result is clamped to ``[min_damping, max_damping]``.
    """
    if math.isnan(rho) or rho < lower:
        damping = damping * increase
    elif rho > upper:
        damping = damping * decrease
    return min(max(damping, min_damping), max_damping)
