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

A new form goes here: a class with ``kept``, ``derive``, ``apply`` (and
``supports``, ``prepare`` when it needs them), chosen in :func:`form_of`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from precond.block import GroupStep, Transform
from precond.guard import all_finite
from precond.kron.accumulate import Accumulation
from precond.kron.units import Unit
from precond.linalg.kron import kron_precondition_exact, kron_spectrum, mode_products, pi_adjusted_damping
from precond.linalg.spectral import EighResult, eigh_many, floor_eigenvalues, inverse_root

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

    def prepare(self, ctx: GroupStep, units: list[Unit], source: Source) -> list[Unit]:
        """After the refresh: the units ready to apply."""
        return units


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
    (outside): ``λ_i = λ`` (``per_factor``) or Martens & Grosse's ``π_i λ^(1/k)`` (``factored``)."""

    def __init__(self, adjusted: bool) -> None:
        self.adjusted = adjusted

    def supports(self, transform: Transform) -> bool:
        return transform.kronecker() is not None  # type: ignore[attr-defined]  # Kronecker.supports checked it has one

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        return [(key, (n, n)) for key, n in zip(u.keys.root, u.dims)]

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
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
    ``f(D̂)`` elementwise in the eigenbasis (Adam there with ``inverse_root``, EKFAC's ``1/(D̂ + λ)``)."""

    def __init__(self, beta: float, bias_correction: bool) -> None:
        self.beta = beta
        self.bias_correction = bias_correction

    def kept(self, u: Unit) -> list[tuple[str, tuple[int, ...]]]:
        return [(key, (n, n)) for key, n in zip(u.keys.basis, u.dims)]

    def derive(self, u: Unit, eigs: list[EighResult], transform: Transform) -> list[Tensor] | None:
        return [e.eigenvectors.contiguous() for e in eigs]

    def apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        moment = u.state[u.keys.moment]
        if self.bias_correction:
            moment = moment / (1.0 - self.beta ** u.state[u.keys.moment_updates])
        bases = u.bases()
        return kron_precondition_exact(x.to(bases[0].dtype), bases, transform.fn(moment))  # type: ignore[attr-defined]  # a spectral transform

    def prepare(self, ctx: GroupStep, units: list[Unit], source: Source) -> list[Unit]:
        """``D ← β D + (1-β) D_new`` for the units with statistics of this step, in their current eigenbasis;
        the units with a second moment are ready."""
        fresh = [u for u in units if u.state.get(u.keys.updated_at) == ctx.step]
        if fresh:
            samples = source.moment_samples(ctx, fresh)
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
        return [u for u in units if u.state.get(u.keys.moment_updates, 0) > 0]


def form_of(damping_form: str, spectrum: str, beta: float, bias_correction: bool) -> Form:
    """The form of a ``kronecker`` structure's configuration (the eigenbasis mode ignores the damping form)."""
    if spectrum == "eigenbasis":
        return Eigenbasis(beta, bias_correction)
    return {"exact": Exact, "factored": lambda: Roots(True), "per_factor": lambda: Roots(False)}[damping_form]()


class Refresh:
    """Eigendecomposes units' factors and derives what their form keeps (one result per unit)."""

    def __init__(self, form: Form, accumulation: Accumulation, float64: bool) -> None:
        self.form = form
        self.accumulation = accumulation
        self.float64 = float64

    def __call__(self, units: list[Unit], transform: Transform) -> list[Result]:
        """``(1, tensors in the order of Form.kept)`` per unit, or ``(0, None)`` when it failed."""
        mats = [f for u in units for f in self.accumulation.read(u)]
        eigs = eigh_many(mats, self.float64)
        out: list[Result] = []
        start = 0
        for u in units:
            mine, start = eigs[start : start + len(u.dims)], start + len(u.dims)
            derived = None if any(e is None for e in mine) else self.form.derive(u, mine, transform)  # type: ignore[arg-type]  # no None left
            out.append((0.0, None) if derived is None else (1.0, derived))
        return out
