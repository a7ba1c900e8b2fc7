"""Secant (quasi-Newton) updates on dense matrices (docs/algorithms.md#quasi-newton-updates,
docs/algorithms.md#l-bfgs, docs/algorithms.md#k-bfgs).

Notation: ``s = x_{k+1} − x_k``, ``y = ∇f(x_{k+1}) − ∇f(x_k)``.  A *direct*
matrix ``B`` approximates the Hessian (secant ``B₊ s = y``), an *inverse*
matrix ``H`` its inverse (secant ``H₊ y = s``).  Vectors are 1-D, matrices
``(n, n)`` and symmetric; everything works in float32 and float64 (use float64
for anything ill-conditioned).

Every update returns a :class:`QNUpdate` ``(matrix, status, reset)`` with
``status`` one of ``"updated"``, ``"skipped"``, ``"damped"``.

Guards follow scipy's ``HessianUpdateStrategy`` with ``(w, z) = (s, y)`` for
direct and ``(w, z) = (y, s)`` for inverse matrices ``M``:

* ``guard="skip"`` (default, ``min_curvature=1e-8``): no update when
  ``wᵀz <= min_curvature · wᵀMw``;
* ``guard="powell"`` (``min_curvature=0.2``): Powell damping
  ``z ← f z + (1 − f) M w`` with ``f = (1 − min_curvature) / (1 − wᵀz/wᵀMw)``,
  after which ``wᵀz = min_curvature · wᵀMw`` exactly;
* ``guard="none"``: the bare formula.

A zero ``s`` or ``y`` is always skipped (as scipy does).  If round-off made
``wᵀMw <= 0``, ``M`` is re-initialised to ``initial_scale(s, y, form)·I``
first (scipy's behaviour; ``reset=True`` reports it).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "QNUpdate",
    "initial_scale",
    "bfgs_direct_update",
    "bfgs_inverse_update",
    "dfp_direct_update",
    "dfp_inverse_update",
    "sr1_direct_update",
    "sr1_inverse_update",
    "sherman_morrison_update",
    "two_loop",
    "DampedPair",
    "powell_damping",
    "lm_damping_pair",
    "double_damping",
]

Guard = Literal["skip", "powell", "none"]
Form = Literal["direct", "inverse"]


class QNUpdate(NamedTuple):
    """Result of a secant update: the new matrix and what happened."""

    matrix: Tensor
    status: str  # "updated" | "skipped" | "damped"
    reset: bool = False


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b))


def initial_scale(s: Tensor, y: Tensor, form: Form) -> float:
    """First-update scaling of Nocedal & Wright (6.20) (scipy ``init_scale='auto'``).

    ``form="direct"``: ``yᵀy / |yᵀs|`` (for ``B₀ = scale·I``);
    ``form="inverse"``: ``|yᵀs| / yᵀy`` (for ``H₀ = scale·I``).
    Returns 1 when ``yᵀs``, ``yᵀy`` or ``sᵀs`` is 0.  Use it as
    ``M = initial_scale(s, y, form) * M`` just before the first update.
    """
    ss, yy, ys = _dot(s, s), _dot(y, y), abs(_dot(y, s))
    if ys == 0.0 or yy == 0.0 or ss == 0.0:
        return 1.0
    return yy / ys if form == "direct" else ys / yy


def _rank_two(m: Tensor, z: Tensor, mw: Tensor, wmw: float, wz: float) -> Tensor:
    """``M − (Mw)(Mw)ᵀ / wᵀMw + z zᵀ / wᵀz`` (BFGS direct, DFP inverse)."""
    return m - torch.outer(mw, mw) / wmw + torch.outer(z, z) / wz


def _product_form(m: Tensor, z: Tensor, mw: Tensor, wmw: float, wz: float) -> Tensor:
    """``(I − ρ z wᵀ) M (I − ρ w zᵀ) + ρ z zᵀ``, ``ρ = 1/wᵀz`` (BFGS inverse, DFP direct).

    Expanded as ``M + (wᵀMw + wᵀz)/(wᵀz)² z zᵀ − (Mw zᵀ + z (Mw)ᵀ)/wᵀz``.
    """
    cross = torch.outer(mw, z)
    return m + ((wmw + wz) / wz**2) * torch.outer(z, z) - (cross + cross.T) / wz


def _secant_update(
    m: Tensor,
    s: Tensor,
    y: Tensor,
    form: Form,
    kind: Literal["rank_two", "product"],
    guard: Guard,
    min_curvature: float | None,
    reset_on_indefinite: bool,
) -> QNUpdate:
    if guard not in ("skip", "powell", "none"):
        raise ValueError(f"guard must be 'skip', 'powell' or 'none', got {guard!r}")
    if not bool(s.any()) or not bool(y.any()):
        return QNUpdate(m, "skipped")
    w, z = (s, y) if form == "direct" else (y, s)
    if min_curvature is None:
        min_curvature = 0.2 if guard == "powell" else 1e-8
    mw = m @ w
    wmw = _dot(w, mw)
    reset = False
    if wmw <= 0.0:
        if not reset_on_indefinite:
            return QNUpdate(m, "skipped")
        m = initial_scale(s, y, form) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        mw = m @ w
        wmw = _dot(w, mw)
        reset = True
    wz = _dot(w, z)
    status = "updated"
    if guard != "none" and wz <= min_curvature * wmw:
        if guard == "skip":
            return QNUpdate(m, "skipped", reset)
        f = (1.0 - min_curvature) / (1.0 - wz / wmw)
        z = f * z + (1.0 - f) * mw
        wz = _dot(w, z)
        status = "damped"
    fn = _rank_two if kind == "rank_two" else _product_form
    return QNUpdate(fn(m, z, mw, wmw, wz), status, reset)


def bfgs_direct_update(
    B: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    guard: Guard = "skip",
    min_curvature: float | None = None,
    reset_on_indefinite: bool = True,
) -> QNUpdate:
    """BFGS on the Hessian approximation: ``B₊ = B − (Bs)(Bs)ᵀ/(sᵀBs) + y yᵀ/(yᵀs)``.

    Guard on ``sᵀy <= min_curvature · sᵀBs`` (Powell: ``y ← f y + (1−f) B s``).
    Equals scipy ``BFGS(...).initialize(n, 'hess'); update(s, y)``.
    """
    return _secant_update(B, s, y, "direct", "rank_two", guard, min_curvature, reset_on_indefinite)


def bfgs_inverse_update(
    H: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    guard: Guard = "skip",
    min_curvature: float | None = None,
    reset_on_indefinite: bool = True,
) -> QNUpdate:
    """BFGS on the inverse: ``H₊ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``, ``ρ = 1/(yᵀs)``.

    Guard on ``yᵀs <= min_curvature · yᵀHy`` (Powell: ``s ← f s + (1−f) H y``,
    the K-BFGS Powell damping, docs/algorithms.md#k-bfgs, with ``mu1 = min_curvature``).
    Equals scipy ``BFGS(...).initialize(n, 'inv_hess'); update(s, y)``.
    """
    return _secant_update(H, s, y, "inverse", "product", guard, min_curvature, reset_on_indefinite)


def dfp_direct_update(
    B: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    guard: Guard = "skip",
    min_curvature: float | None = None,
    reset_on_indefinite: bool = True,
) -> QNUpdate:
    """DFP on the Hessian approximation: ``B₊ = (I − ρ y sᵀ) B (I − ρ s yᵀ) + ρ y yᵀ``.

    The dual of the BFGS inverse update (``s ↔ y``).  Guard on
    ``sᵀy <= min_curvature · sᵀBs``.
    """
    return _secant_update(B, s, y, "direct", "product", guard, min_curvature, reset_on_indefinite)


def dfp_inverse_update(
    H: Tensor,
    s: Tensor,
    y: Tensor,
    *,
    guard: Guard = "skip",
    min_curvature: float | None = None,
    reset_on_indefinite: bool = True,
) -> QNUpdate:
    """DFP on the inverse: ``H₊ = H − (Hy)(Hy)ᵀ/(yᵀHy) + s sᵀ/(yᵀs)``.

    The dual of the BFGS direct update; equals scipy
    ``BFGS(...).initialize(n, 'hess'); update(y, s)`` (arguments swapped).
    Guard on ``yᵀs <= min_curvature · yᵀHy``.
    """
    return _secant_update(H, s, y, "inverse", "rank_two", guard, min_curvature, reset_on_indefinite)


def _sr1(m: Tensor, w: Tensor, z: Tensor, min_denominator: float) -> QNUpdate:
    if not bool(w.any()) or not bool(z.any()):
        return QNUpdate(m, "skipped")
    u = z - m @ w
    den = _dot(w, u)
    if abs(den) <= min_denominator * float(torch.linalg.vector_norm(w)) * float(
        torch.linalg.vector_norm(u)
    ):
        return QNUpdate(m, "skipped")
    return QNUpdate(m + torch.outer(u, u) / den, "updated")


def sr1_direct_update(B: Tensor, s: Tensor, y: Tensor, min_denominator: float = 1e-8) -> QNUpdate:
    """Symmetric rank one: ``B₊ = B + (y − Bs)(y − Bs)ᵀ / ((y − Bs)ᵀ s)``.

    Skipped when ``|sᵀ(y − Bs)| <= min_denominator · ‖s‖ · ‖y − Bs‖``
    (scipy ``SR1`` 'hess').  SR1 has no curvature guard: ``B₊`` may be
    indefinite.
    """
    return _sr1(B, s, y, min_denominator)


def sr1_inverse_update(H: Tensor, s: Tensor, y: Tensor, min_denominator: float = 1e-8) -> QNUpdate:
    """Inverse SR1 (= Sherman–Morrison of :func:`sr1_direct_update`).

    ``H₊ = H + (s − Hy)(s − Hy)ᵀ / ((s − Hy)ᵀ y)``; skipped when
    ``|yᵀ(s − Hy)| <= min_denominator · ‖y‖ · ‖s − Hy‖`` (scipy ``SR1``
    'inv_hess').  If ``H = B⁻¹`` then ``H₊ = (B₊)⁻¹``.
    """
    return _sr1(H, y, s, min_denominator)


#: The "sherman_morrison" secant update (docs/algorithms.md#quasi-newton-updates) is the inverse SR1 update.
sherman_morrison_update = sr1_inverse_update


# --------------------------------------------------------------------------- L-BFGS


def two_loop(
    g: Tensor,
    s_list: Sequence[Tensor],
    y_list: Sequence[Tensor],
    rho_list: Sequence[Tensor | float] | None = None,
    h_diag: Tensor | float | None = None,
) -> Tensor:
    """L-BFGS search direction ``d = −H g`` by the two-loop recursion.

    Nocedal & Wright Alg. 7.4 as torch.optim.LBFGS runs it (docs/algorithms.md#l-bfgs)::

        q = −g
        for i = m−1 … 0:  α_i = ρ_i s_iᵀ q ;  q −= α_i y_i
        r = h_diag · q
        for i = 0 … m−1:  β_i = ρ_i y_iᵀ r ;  r += s_i (α_i − β_i)
        d = r

    ``s_list``/``y_list`` are ordered oldest first, flat 1-D tensors;
    ``ρ_i = 1/(y_iᵀ s_i)`` unless given; ``h_diag`` defaults to
    ``s_lastᵀ y_last / y_lastᵀ y_last`` (1 without pairs).  ``d`` equals
    ``−H g`` with ``H`` the BFGS inverse built from ``h_diag·I`` by the same
    pairs in order.  No host synchronisation.
    """
    m = len(s_list)
    if len(y_list) != m:
        raise ValueError(f"s_list and y_list lengths differ: {m} vs {len(y_list)}")
    if rho_list is None:
        rho_list = [1.0 / torch.dot(y, s) for s, y in zip(s_list, y_list)]
    if h_diag is None:
        h_diag = torch.dot(s_list[-1], y_list[-1]) / torch.dot(y_list[-1], y_list[-1]) if m else 1.0
    q = g.neg()
    alphas: list[Tensor] = [None] * m  # type: ignore[list-item]  # each is set before it is read
    for i in range(m - 1, -1, -1):
        alphas[i] = rho_list[i] * torch.dot(s_list[i], q)
        q = q - alphas[i] * y_list[i]
    r = q * h_diag
    for i in range(m):
        beta = rho_list[i] * torch.dot(y_list[i], r)
        r = r + (alphas[i] - beta) * s_list[i]
    return r


# --------------------------------------------------------------------------- K-BFGS


class DampedPair(NamedTuple):
    """A curvature pair after damping; ``damped`` says whether it changed."""

    s: Tensor
    y: Tensor
    damped: bool


def powell_damping(s: Tensor, y: Tensor, H: Tensor, mu1: float = 0.2) -> DampedPair:
    """K-BFGS Powell damping of ``s`` with the current inverse ``H`` (docs/algorithms.md#k-bfgs).

    If ``sᵀy < mu1 · yᵀHy``:
    ``θ = (1 − mu1) yᵀHy / (yᵀHy − sᵀy)``, ``s ← θ s + (1 − θ) H y``, after
    which ``sᵀy = mu1 · yᵀHy`` exactly.  Otherwise (or if ``yᵀHy <= 0``, where
    the ratio is undefined) the pair is returned unchanged.
    """
    hy = H @ y
    yhy = _dot(y, hy)
    sy = _dot(s, y)
    if yhy <= 0.0 or not sy < mu1 * yhy:
        return DampedPair(s, y, False)
    theta = (1.0 - mu1) * yhy / (yhy - sy)
    return DampedPair(theta * s + (1.0 - theta) * hy, y, True)


def lm_damping_pair(s: Tensor, y: Tensor, mu2: float) -> DampedPair:
    """K-BFGS Levenberg–Marquardt-type damping of ``y`` (docs/algorithms.md#k-bfgs, ``mu2 = √λ``).

    If ``sᵀy < mu2 · sᵀs``:
    ``θ = (1 − mu2) sᵀs / (sᵀs − sᵀy)``, ``y ← θ y + (1 − θ) s``, after which
    ``sᵀy = mu2 · sᵀs`` exactly.  (The degenerate ``sᵀy = sᵀs`` with
    ``mu2 > 1`` uses ``y ← y + (mu2 − 1) s``, which gives the same equality.)
    Unchanged when the inequality holds or ``s = 0``.
    """
    ss = _dot(s, s)
    sy = _dot(s, y)
    if ss <= 0.0 or not sy < mu2 * ss:
        return DampedPair(s, y, False)
    if ss == sy:
        return DampedPair(s, y + (mu2 - 1.0) * s, True)
    theta = (1.0 - mu2) * ss / (ss - sy)
    return DampedPair(s, theta * y + (1.0 - theta) * s, True)


def double_damping(s: Tensor, y: Tensor, H: Tensor, mu1: float = 0.2, *, mu2: float) -> DampedPair:
    """K-BFGS double damping: :func:`powell_damping` then :func:`lm_damping_pair`.

    The order is the official code's.  The LM step can move ``sᵀy`` away
    from the Powell bound again; only the last inequality is guaranteed.
    """
    p = powell_damping(s, y, H, mu1)
    q = lm_damping_pair(p.s, p.y, mu2)
    return DampedPair(q.s, q.y, p.damped or q.damped)
