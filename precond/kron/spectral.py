"""The refresh of Kronecker units and the preconditioner each form derives from it.

On a refresh each due unit's factors (as :class:`~precond.kron.accumulate.Accumulation`
reads them) are eigendecomposed — batched over the factors of equal size,
retried in float64, one bad factor failing alone
(:func:`~precond.linalg.spectral.eigh_many`) — and the unit's form derives what
it keeps until the next refresh; the unit's
:class:`~precond.linalg.spectral.SpectralCache` keeps it (or the previous one,
counting the failure). A form says what a refresh keeps, how to derive it and
how to apply it, through the kernels of :mod:`precond.linalg.kron`:

* :class:`Exact` (``damping_form: exact``): the bases and ``f(λ_C)``
  (:func:`~precond.linalg.kron.kron_spectrum`), applied in the joint eigenbasis
  (:func:`~precond.linalg.kron.kron_precondition_exact`); any transform.
* :class:`Roots` (``per_factor``, ``factored``): one damped root per factor
  (:func:`~precond.linalg.spectral.inverse_root`; ``factored`` splits the
  damping by :func:`~precond.linalg.kron.pi_adjusted_damping`), applied by
  :func:`~precond.linalg.kron.mode_products`; transforms ``(C + λ)^(-1/p)``.
* :class:`Eigenbasis` (``spectrum: eigenbasis``, EKFAC and SOAP): the bases; the
  eigenvalues are an EMA of squared gradients in them, updated on curvature
  steps from the source's samples, ``f`` of it applied like :class:`Exact`.
  ``refresh: power_qr`` refreshes a basis as SOAP does — one power iteration
  from the previous basis and a QR decomposition
  (:func:`~precond.linalg.spectral.power_qr`), the second moment permuted
  as the eigenvalue estimates reorder the columns (:meth:`Form.committed`) —
  and ``eigh`` only for the first basis. ``null_threshold`` and
  ``relative_eps`` keep it from amplifying round-off: the second moment is
  shared along each factor's (numerical) null space and floored relative to
  its largest entry (see :class:`Eigenbasis`). ``first_moment: eigenbasis`` keeps the first moment there too
  (an EMA of the rotated direction, projected into the new basis on a refresh; :meth:`Form.committed`).

A new form goes here: a class with ``kept``, ``derive``, ``apply`` (and
``supports``, ``prepare``, ``decompose``, ``committed`` when it needs them),
chosen in :func:`form_of`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from precond.block import GroupStep, Transform
from precond.errors import PipelineError
from precond.guard import all_finite
from precond.kron.accumulate import Accumulation
from precond.kron.units import Unit
from precond.layers import factor_dtype
from precond.linalg.newton import inverse_roots_many
from precond.linalg.kron import kron_precondition_exact, kron_spectrum, mode_products, pi_adjusted_damping
from precond.linalg.spectral import (
    EighResult,
    PowerQRResult,
    eigh_many,
    floor_eigenvalues,
    inverse_root,
    power_qr,
    symmetrize,
)

if TYPE_CHECKING:
    from precond.kron.sources import Source

Result = tuple[float, "list[Tensor] | None"]


class Form:
    """What a refresh keeps for a unit, how it is made from the factors' eigendecompositions, how it applies."""

    def supports(self, transform: Transform) -> bool:
        return True

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        """The state keys a refresh fills and their shapes, in the order :meth:`derive` returns them."""
        raise NotImplementedError

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
        """What ``u`` keeps until its next refresh; ``None`` when it is not finite (counted as a failure)."""
        raise NotImplementedError

    def apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        """The preconditioned block (``x`` in the factors' dtype)."""
        raise NotImplementedError

    keeps_direction: bool = False  # keeps a state of the direction itself (an EMA): it must arrive materialised

    def prepare(
        self, ctx: GroupStep, units: list[Unit], source: Source, tensors: list[Tensor]
    ) -> tuple[list[Unit], list[Tensor]]:
        """After the refresh, of the units with statistics: those to apply (by default the ones with a
        preconditioner) and their blocks of ``tensors`` (the direction, aligned with ``ctx.params``), as
        :meth:`apply` takes them."""
        live = [u for u in units if u.keys.refreshed in u.state]
        return live, source.cut(ctx, live, tensors)

    def decompose(self, units: list[Unit], mats: list[Tensor], float64: bool, transform: Transform) -> list[Any]:
        """The decompositions of the units' factors (``mats``: each unit's factors in order), ``None`` where
        one failed: ``eigh``, batched over the factors of equal size (:func:`eigh_many`)."""
        return list(eigh_many(mats, float64))

    def before_refresh(self, u: Unit) -> None:
        """Before ``u`` is refreshed, on every process that keeps its state."""

    def committed(self, u: Unit) -> None:
        """After ``u``'s refresh was kept in its state (a failed one is not)."""


class Exact(Form):
    """``f`` of ``C``'s eigenvalues in the joint eigenbasis: ``(A ⊗ G + λI)⁻¹`` for K-FAC with ``inverse``."""

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        return [*((key, (n, n)) for key, n in zip(u.keys.basis, u.dims)), (u.keys.scale, u.dims)]

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
        scale = transform.fn(kron_spectrum([floor_eigenvalues(e.eigenvalues) for e in eigs], u.share))  # type: ignore[attr-defined]  # a spectral transform
        # one memory layout however the bases were computed or received: identical products everywhere
        out = [e.eigenvectors.contiguous() for e in eigs] + [scale]
        return out if all_finite([scale]) else None

    def apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        bases = u.bases()
        return kron_precondition_exact(x.to(bases[0].dtype), bases, u.state[u.keys.scale])


class Roots(Form):
    """One matrix per factor, ``(F_i + λ_i I)^(-1/(p·s))`` (damping inside) or ``(F_i^(1/(p·s)) + λ_i I)⁻¹``
    (outside): ``λ_i = λ`` (``per_factor``) or Martens & Grosse's ``π_i λ^(1/k)`` (``factored``).

    ``method``: ``eigh`` (through each factor's eigendecomposition) or ``coupled_newton`` (matrix products
    only, :func:`~precond.linalg.newton.inverse_roots_many`: batched over factors of one size and root, float32
    unless ``float64``, retried in float64 where it did not converge; damping inside and an integer
    ``p·s`` only)."""

    def __init__(self, adjusted: bool, method: str = "eigh", max_iter: int = 100, tol: float = 1e-6) -> None:
        self.adjusted = adjusted
        self.method = method
        self.max_iter = max_iter
        self.tol = tol

    def supports(self, transform: Transform) -> bool:
        return transform.kronecker() is not None  # type: ignore[attr-defined]  # Kronecker.supports checked it has one

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        return [(key, (n, n)) for key, n in zip(u.keys.root, u.dims)]

    def decompose(self, units: list[Unit], mats: list[Tensor], float64: bool, transform: Transform) -> list[Any]:
        """``coupled_newton``: the roots themselves, one batched iteration per (size, root)."""
        if self.method == "eigh":
            return super().decompose(units, mats, float64, transform)
        root, damping, outside = transform.kronecker()  # type: ignore[attr-defined,misc]  # supports(): not None
        roots: list[int] = []
        dampings: list[Any] = []
        start = 0
        for u in units:
            mine, start = mats[start : start + len(u.dims)], start + len(u.dims)
            r = root * u.share
            if outside or abs(r - round(r)) > 1e-9:
                raise PipelineError(
                    f"structure kronecker root_method: coupled_newton computes (F + damping)^(-1/r) for an integer r, "
                    f"with the damping inside; a block of {len(u.dims)} factors needs r = p*{u.share} = {r:g}"
                    + (" and the transform puts its damping outside" if outside else "")
                    + ": use root_method: eigh, or p and damping_position that give it"
                )
            roots += [int(round(r))] * len(mine)
            if self.adjusted and damping > 0:
                dampings += [d.to(mine[0].dtype) for d in pi_adjusted_damping(mine, damping)]  # type: ignore[union-attr]  # tracenorm: tensors
            else:
                dampings += [damping] * len(mine)
        return inverse_roots_many(mats, roots, dampings, float64, self.max_iter, self.tol)

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
        if self.method != "eigh":  # decompose made the roots
            out = [r.contiguous() for r in eigs]  # type: ignore[attr-defined]  # tensors, not decompositions
            return out if all_finite(out) else None
        root, damping, outside = transform.kronecker()  # type: ignore[attr-defined,misc]  # supports(): not None
        eig = [(floor_eigenvalues(e.eigenvalues), e.eigenvectors) for e in eigs]
        dampings: list[Any] = [damping] * len(eig)
        if self.adjusted and damping > 0:
            dampings = [float(d) for d in pi_adjusted_damping(eig, damping)]
        position = "outside" if outside else "inside"
        out = [inverse_root(e, root * u.share, d, position) for e, d in zip(eig, dampings)]
        return out if all_finite(out) else None

    def apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        return mode_products(x, [u.state[key] for key in u.keys.root])


class Eigenbasis(Form):
    """The factors' eigenbasis with ``C``'s eigenvalues replaced by ``D``, an EMA of squared gradients in it:
    ``f(D̂)`` elementwise in the eigenbasis (Adam there with ``inverse_root``, EKFAC's ``1/(D̂ + λ)``).

    ``refresh``: ``eigh`` decomposes the factors on every refresh; ``power_qr`` (SOAP's
    ``get_orthogonal_matrix_QR``) decomposes them once, then refreshes each basis by one power iteration
    from the previous one (:func:`~precond.linalg.spectral.power_qr`) and permutes ``D`` along that
    dimension as the eigenvalue estimates reorder the columns (descending).

    ``null_threshold`` ``τ > 0``: an index of factor ``i`` whose eigenvalue is below ``τ`` times the factor's
    largest lies in its (numerical) null space, where the basis is decided by round-off and the gradient had
    (almost) nothing so far. Normalising such directions one by one (Adam's ``m/(√v + ε)``) depends on the
    basis that round-off chose. Along each null space the entries of ``D̂`` share their sum instead (one
    factor after the other): the update there is the gradient's projection on that subspace divided by the
    root of its energy, whichever basis of it round-off chose — as one Adam coordinate. ``relative_eps ρ``:
    ``D̂`` is read at least ``ρ² max D̂``, so components that are round-off next to the block's largest (the
    off-diagonal of step 1's ``Q_Lᵀ G Q_R``, the null spaces at first) stay round-off-sized. Both 0: every
    direction its own (the official SOAP, EKFAC).
    """

    def __init__(
        self,
        beta: float,
        bias_correction: bool,
        refresh: str = "eigh",
        null_threshold: float = 0.0,
        relative_eps: float = 0.0,
        first_beta: float | None = None,
        first_bias_correction: bool = True,
    ) -> None:
        self.beta = beta
        self.bias_correction = bias_correction
        self.power_qr = refresh == "power_qr"
        self.null_threshold = null_threshold
        self.relative_eps = relative_eps
        self.first_beta = first_beta  # None: no first moment here (a momentum block keeps it, if any)
        self.first_bias_correction = first_bias_correction
        self.keeps_direction = first_beta is not None
        self._beta1 = first_beta or 0.0  # the first moment's decay at this step (prepare reads the param group's)
        self._previous: dict[int, list[Tensor] | None] = {}  # per unit being refreshed: its bases before
        self._masks: dict[int, tuple[tuple[Tensor, ...], list[Tensor | None]]] = {}  # per unit: _small of its values

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        out = [(key, (n, n)) for key, n in zip(u.keys.basis, u.dims)]
        if self.null_threshold > 0:
            out += [(key, (n,)) for key, n in zip(u.keys.values, u.dims)]
        if self.power_qr:
            out += [(key, (n,)) for key, n in zip(u.keys.order, u.dims)]
        return out

    def decompose(self, units: list[Unit], mats: list[Tensor], float64: bool, transform: Transform) -> list[Any]:
        """``power_qr``: a factor with a basis refreshes it from there, the others (the first basis) by ``eigh``
        with the columns in descending order (as SOAP), their second moment kept as it is; with
        ``null_threshold``, also a factor whose basis has a null space (eigenvalues below the threshold): one
        power iteration keeps the directions that round-off chose there. ``eigh``: every factor by ``eigh``."""
        if not self.power_qr:
            return super().decompose(units, mats, float64, transform)
        warm: list[int] = []
        cold: list[int] = []
        previous: list[Tensor] = []
        start = 0
        candidates: list[tuple[int, Tensor, Tensor | None]] = []
        for u in units:
            idx = list(range(start, start + len(u.dims)))
            start += len(u.dims)
            if all(key in u.state for key in u.keys.basis):
                values = [u.state.get(key) for key in u.keys.values] if self.null_threshold > 0 else [None] * len(idx)
                candidates.extend(zip(idx, u.bases(), values))
            else:
                cold.extend(idx)
        # a basis with a null space is no warm start there (round-off chose it): such a factor is decomposed again
        null = [v is not None and bool(v.numel()) for _, _, v in candidates]
        if any(null):
            flags = torch.stack([
                (v < self.null_threshold * v.amax().clamp_min(0)).any() for (_, _, v), n in zip(candidates, null) if n
            ]).tolist()  # one host sync per refresh
            it = iter(flags)
            null = [n and next(it) for n in null]
        for (i, basis, _), has_null in zip(candidates, null):
            if has_null:
                cold.append(i)
            else:
                warm.append(i)
                previous.append(basis)
        out: list[Any] = [None] * len(mats)
        for i, res in zip(warm, _power_qr_each([mats[i] for i in warm], previous, float64)):
            out[i] = res
        for i, e in zip(cold, eigh_many([mats[i] for i in cold], float64)):
            if e is not None:
                n = e.eigenvalues.shape[-1]
                order = torch.arange(n, device=e.eigenvalues.device)
                out[i] = PowerQRResult(e.eigenvalues.flip(-1), e.eigenvectors.flip(-1), order)
        return out

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
        out = [e.eigenvectors.contiguous() for e in eigs]
        if self.null_threshold > 0:
            out += [e.eigenvalues.contiguous() for e in eigs]
        if self.power_qr:
            out += [e.order.to(e.eigenvalues.dtype) for e in eigs]  # type: ignore[attr-defined]  # decompose made PowerQRResults
        return out

    def committed(self, u: Unit) -> None:
        """``power_qr``: the second moment follows the columns' new order, ``D ← D[…, order_j, …]`` per dimension.
        The first moment (``first_moment: eigenbasis``) is projected from the previous basis (the parameter's
        coordinates before the first) into the new one: ``M ← M ×_j (Q_jᵀ Q_j,old)``, which the new columns'
        order and signs are part of (computed as ``(M ×_j Q_j,old) ×_j Q_jᵀ``, through the parameter's
        coordinates: per dimension two products of the block's size instead of ``Q_jᵀ Q_j,old``, of the factor's
        size cubed, and one of the block's; fewer operations whenever the block is not square)."""
        previous = self._previous.pop(id(u), None)
        first = u.state.get(u.keys.first_moment)
        if first is not None:
            bases = u.bases()
            first = first.to(bases[0].dtype)
            if previous is not None:  # back to the parameter's coordinates: M_old ×_j Q_j,old (fewer products than
                first = mode_products(first, previous)  # forming Q_jᵀ Q_j,old when the dimensions differ)
            u.state[u.keys.first_moment] = mode_products(first, [q.mT for q in bases])
        if not self.power_qr:
            return
        orders = [u.state.pop(key) for key in u.keys.order]
        moment = u.state.get(u.keys.moment)
        if moment is None:
            return
        for j, order in enumerate(orders):
            moment = moment.index_select(j, order.to(device=moment.device, dtype=torch.long))
        u.state[u.keys.moment] = moment

    def _small(self, u: Unit) -> list[Tensor | slice | None] | None:
        """Per factor, its directions in the factor's null space (``null_threshold``; None: no such direction), or
        None without a threshold or with no null space at all. Made once per refresh (the eigenvalues are replaced
        then), with one host synchronisation, so that the factors without a null space cost nothing on the other
        steps. The eigenvalues are sorted, so a null space is a run of indices: a ``slice`` (a boolean mask where
        it is not)."""
        if self.null_threshold <= 0 or any(key not in u.state for key in u.keys.values):
            return None
        values = tuple(u.state[key] for key in u.keys.values)
        cached = self._masks.get(id(u))
        if cached is not None and len(cached[0]) == len(values) and all(a is b for a, b in zip(cached[0], values)):
            return cached[1]
        masks = [v < self.null_threshold * v.amax().clamp_min(0) for v in values]
        flags = torch.cat(masks).tolist()  # one host synchronisation
        out: list[Tensor | slice | None] = []
        start = 0
        for m in masks:
            idx = [i for i, f in enumerate(flags[start : start + m.numel()]) if f]
            start += m.numel()
            if not idx:
                out.append(None)
            elif idx[-1] - idx[0] + 1 == len(idx):
                out.append(slice(idx[0], idx[-1] + 1))
            else:
                out.append(m)
        kept = None if all(m is None for m in out) else out
        self._masks[id(u)] = (values, kept)
        return kept

    @staticmethod
    def _fibres(moment: Tensor, small: list[Tensor | slice | None], mean: bool, fresh: bool = False) -> Tensor:
        """Each entry of ``moment`` with an index in a factor's null space replaced by the sum (``mean``: the
        mean) over that null space of its fibre, one dimension after the other: the entries along a null
        space share the energy of the gradient in it, which no rotation inside it changes. A new tensor, or
        ``moment`` itself changed in place when ``fresh`` (a temporary of the caller's)."""
        k = moment.dim()
        for j, mask in enumerate(small):
            if mask is None:
                continue
            if isinstance(mask, slice):  # a run of indices: its sum, written over it
                count = mask.stop - mask.start
                total = moment.narrow(j, mask.start, count).sum(dim=j, keepdim=True)
                if mean:
                    total = total / count
                if not fresh:
                    moment, fresh = moment.clone(), True
                part = moment.narrow(j, mask.start, count)
                part.copy_(total.expand_as(part))
                continue
            where = mask.reshape(*(1,) * j, -1, *(1,) * (k - j - 1))
            zero = torch.zeros((), dtype=moment.dtype, device=moment.device)
            total = torch.where(where, moment, zero).sum(dim=j, keepdim=True)
            if mean:
                total = total / mask.sum().clamp_min(1)
            moment, fresh = torch.where(where, total, moment), True
        return moment

    def before_refresh(self, u: Unit) -> None:
        """``null_threshold``: the second moment along each null space becomes its mean there; entry by entry it
        belongs to directions that round-off chose, and would otherwise be carried into the refreshed basis."""
        moment = u.state.get(u.keys.moment)
        small = None if moment is None else self._small(u)
        if small is not None:
            u.state[u.keys.moment] = self._fibres(moment, small, mean=True)  # type: ignore[arg-type]  # not None
        if self.first_beta is not None:  # the bases the first moment is in, until committed() turns it
            self._previous[id(u)] = u.bases() if all(key in u.state for key in u.keys.basis) else None

    def scale(self, u: Unit, moment: Tensor, transform: Transform, fresh: bool = False) -> Tensor:
        """``f`` of the second moment, along null spaces shared (``null_threshold``) and floored relative to its
        largest entry (``relative_eps``); a diagonal unit (``precondition_1d: false``) has neither: it is Adam's
        ``f`` entry by entry, as the official SOAP's 1-D tensors. ``fresh``: ``moment`` is the caller's temporary
        (changed in place). The result is a new tensor."""
        if u.diagonal:
            return transform.fn(moment)  # type: ignore[attr-defined]  # a spectral transform
        top = moment.amax() if self.relative_eps > 0 else None
        small = self._small(u)
        if small is not None:
            moment, fresh = self._fibres(moment, small, mean=False, fresh=fresh), True
        if top is not None:  # max(D̂, floor): in place on a temporary (the same numbers as torch.maximum)
            floor = top * self.relative_eps**2
            moment = moment.clamp_min_(floor) if fresh else torch.maximum(moment, floor)
        return transform.fn(moment)  # type: ignore[attr-defined]  # a spectral transform

    def apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        """``x``: the block of the direction, or with ``first_moment: eigenbasis`` the unit's first moment (in its
        eigenbasis, or in the parameter's coordinates before its first basis) as :meth:`prepare` gives it."""
        if self.first_beta is not None:
            return self._apply_first(u, x, transform)
        moment = u.state[u.keys.moment]
        if self.bias_correction:
            moment = moment / (1.0 - self.beta ** u.state[u.keys.moment_updates])
        if u.diagonal:
            return x.to(moment.dtype) * self.scale(u, moment, transform)
        bases = u.bases()
        return kron_precondition_exact(x.to(bases[0].dtype), bases, self.scale(u, moment, transform))

    def _apply_first(self, u: Unit, first: Tensor, transform: Transform) -> Tensor:
        """``Q (M̂ ⊙ f(D̂)) Qᵀ`` from the first moment ``M`` in the eigenbasis: one rotation out (2 products for
        a matrix); ``M̂`` unchanged where the unit has no basis or no second moment yet (it passes unscaled, as
        a momentum block's average would)."""
        coef = 1.0 / (1.0 - self._beta1 ** u.state[u.keys.first_updates]) if self.first_bias_correction else 1.0
        if u.keys.refreshed not in u.state:
            return first * coef
        moment = u.state.get(u.keys.moment)
        if moment is None:
            return first * coef if u.diagonal else mode_products(first * coef, list(u.bases()))
        if self.bias_correction:
            moment = moment / (1.0 - self.beta ** u.state[u.keys.moment_updates])
        scaled = self.scale(u, moment, transform, self.bias_correction).mul_(first)  # a new tensor: scaled in place
        if coef != 1.0:
            scaled.mul_(coef)
        return scaled if u.diagonal else mode_products(scaled, list(u.bases()))

    def prepare(
        self, ctx: GroupStep, units: list[Unit], source: Source, tensors: list[Tensor]
    ) -> tuple[list[Unit], list[Tensor]]:
        """``D ← β D + (1-β) D_new`` for the units with a basis and statistics of this step, in their current
        eigenbasis; the units with a second moment are ready. With ``first_moment: eigenbasis`` also
        ``M ← β₁ M + (1-β₁) Qᵀ X Q`` for every unit with statistics (``X``: its block of the direction; ``M`` in
        the parameter's coordinates before the unit's first basis), whose rotated gradient (when the direction
        is the gradient) is also the second moment's sample: every such unit is returned, with ``M`` as its
        block."""
        live = [u for u in units if u.keys.refreshed in u.state]
        fresh = [u for u in live if u.state.get(u.keys.updated_at) == ctx.step]
        if self.first_beta is None:
            if fresh:
                self._second(fresh, source.moment_samples(ctx, fresh))
            ready = [u for u in live if u.state.get(u.keys.moment_updates, 0) > 0]
            return ready, source.cut(ctx, ready, tensors)
        # this step's decay: the param group's momentum (OneCycleLR cycles it), as a momentum block reads it
        self._beta1 = beta1 = float(ctx.group.get("momentum", self.first_beta))
        rotated = []
        for u, x in zip(units, source.cut(ctx, units, tensors)):
            if u.keys.refreshed in u.state and not u.diagonal:
                bases = u.bases()
                rotated.append(mode_products(x.to(bases[0].dtype), [q.mT for q in bases]))
            else:
                rotated.append(x.to(factor_dtype(x)))
        firsts, counted = [], {}
        for u, r in zip(units, rotated):
            if u.keys.first_moment not in u.state:
                u.state[u.keys.first_moment] = torch.zeros_like(r)
            firsts.append(u.state[u.keys.first_moment])
            counted.setdefault(id(u.state), u)
        torch._foreach_mul_(firsts, beta1)
        torch._foreach_add_(firsts, rotated, alpha=1.0 - beta1)
        for u in counted.values():
            u.state[u.keys.first_updates] = u.state.get(u.keys.first_updates, 0) + 1
        if fresh:
            # the direction is the gradient (no momentum block before): its rotation is the second moment's sample
            gradient = len(tensors) == len(ctx.grads) and all(a is b for a, b in zip(tensors, ctx.grads))
            where = {id(u): i for i, u in enumerate(units)}
            mine = [rotated[where[id(u)]] for u in fresh] if gradient else None
            self._second(fresh, source.moment_samples(ctx, fresh, mine))
        return units, [u.state[u.keys.first_moment] for u in units]

    def _second(self, fresh: list[Unit], samples: list[Tensor]) -> None:
        moments, counted = [], {}
        for u, new in zip(fresh, samples):
            if u.keys.moment not in u.state:
                u.state[u.keys.moment] = torch.zeros_like(new)
            moments.append(u.state[u.keys.moment])
            counted.setdefault(id(u.state), u)  # one count per state dict: the units of a parameter share it
        torch._foreach_mul_(moments, self.beta)
        torch._foreach_add_(moments, samples, alpha=1.0 - self.beta)
        for u in counted.values():
            u.state[u.keys.moment_updates] = u.state.get(u.keys.moment_updates, 0) + 1


def _power_qr_each(mats: list[Tensor], bases: list[Tensor], float64: bool) -> list[PowerQRResult | None]:
    """:func:`~precond.linalg.spectral.power_qr` of each ``(factor, previous basis)`` pair, one pair at a time: on a
    CPU a loop of 2-D products and QRs takes about a quarter less than stacking the pairs of one size into a batch
    (the stacks' copies, the batched QR, the columns permuted by a gather of ``n²`` indices); the same numbers as
    the batched form (the columns are permuted by ``index_select``). A pair that is not finite, or whose QR fails,
    goes through :func:`~precond.linalg.spectral.power_qr` (its float64 retry); ``float64``: computed in float64,
    results in each factor's dtype."""
    out: list[PowerQRResult | None] = []
    for mat, basis in zip(mats, bases):
        dtype = mat.dtype
        work, old = (mat.double(), basis.double()) if float64 else (mat, basis.to(mat.dtype))
        res = None
        if work.dtype in (torch.float32, torch.float64) and all_finite([work, old]):
            product = symmetrize(work) @ old
            estimates = (old * product).sum(-2)  # diag(Oᵀ M O)
            order = torch.argsort(estimates, dim=-1, descending=True)
            try:
                q = torch.linalg.qr(product.index_select(-1, order)).Q
            except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
                q = None
            values = estimates.index_select(-1, order)
            if q is not None and all_finite([q, values]):
                res = PowerQRResult(values, q, order)
        if res is None:
            res = power_qr(work, old)
        out.append(None if res is None else PowerQRResult(res.eigenvalues.to(dtype), res.eigenvectors.to(dtype), res.order))
    return out


def form_of(
    damping_form: str,
    spectrum: str,
    beta: float,
    bias_correction: bool,
    refresh: str = "eigh",
    null_threshold: float = 0.0,
    relative_eps: float = 0.0,
    root_method: str = "eigh",
    max_iter: int = 100,
    tol: float = 1e-6,
    first_beta: float | None = None,
    first_bias_correction: bool = True,
) -> Form:
    """The form of a ``kronecker`` structure's configuration (the eigenbasis mode ignores the damping form;
    ``first_beta``: the eigenbasis mode keeps the first moment too)."""
    if spectrum == "eigenbasis":
        return Eigenbasis(
            beta, bias_correction, refresh, null_threshold, relative_eps, first_beta, first_bias_correction
        )
    if damping_form == "exact":
        return Exact()
    return Roots(damping_form == "factored", root_method, max_iter, tol)


class Refresh:
    """Decomposes units' factors (as their form says: ``eigh``, or SOAP's power iteration) and derives what
    their form keeps (one result per unit)."""

    def __init__(self, form: Form, accumulation: Accumulation, float64: bool) -> None:
        self.form = form
        self.accumulation = accumulation
        self.float64 = float64

    def __call__(self, units: list[Unit], transform: Transform) -> list[Result]:
        """``(1, tensors in the order of Form.kept)`` per unit, or ``(0, None)`` when it failed."""
        mats = [f for u in units for f in self.accumulation.read(u)]
        eigs = self.form.decompose(units, mats, self.float64, transform)
        out: list[Result] = []
        start = 0
        for u in units:
            mine, start = eigs[start : start + len(u.dims)], start + len(u.dims)
            derived = None if any(e is None for e in mine) else self.form.derive(u, mine, transform)  # type: ignore[arg-type]  # no None left
            out.append((0.0, None) if derived is None else (1.0, derived))
        return out
