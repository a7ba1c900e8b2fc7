"""A Kronecker block (:class:`Unit`) and the state keys of its factors and of what a refresh keeps (:class:`Keys`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from precond.layers import Layer
from precond.linalg.spectral import SpectralCache


@dataclass(frozen=True)
class Keys:
    """A unit's state keys, formatted once: rebuilding the strings on every access cost a small model's step dearly."""

    factor: tuple[str, ...]  # one per dimension
    basis: tuple[str, ...]
    values: tuple[str, ...]  # eigenbasis mode: the factors' eigenvalues (or power-QR estimates) at the last refresh
    order: tuple[str, ...]  # power-QR refresh: the permutation of the basis columns, until the second moment follows it
    root: tuple[str, ...]
    scale: str
    moment: str
    first_moment: str  # eigenbasis mode with first_moment: eigenbasis: the EMA of the rotated direction
    refreshed: str
    failures: str
    # per parameter, shared by the units cut from it
    updates: str
    updated_at: str
    moment_updates: str
    first_updates: str
    failures_total: str
    cache: SpectralCache  # keep-last-good of what a refresh derives, counted under failures / failures_total

    def own(self) -> list[str]:
        """Every key that holds this unit's own tensors (dropped by processes that do not own it)."""
        return [
            *self.factor, *self.basis, *self.values, *self.order, *self.root,
            self.scale, self.moment, self.first_moment, self.refreshed, self.failures,
        ]


def make_keys(key: Callable[[str], str], tag: str, k: int, max_failures: int) -> Keys:
    """The keys of unit ``tag`` of a parameter, with ``k`` factors (``key``: the structure's :meth:`Block.key`)."""

    def per_factor(what: str) -> tuple[str, ...]:
        return tuple(key(f"{what}.{tag}.{j}") for j in range(k))

    scale, moment, first, refreshed, failures = (
        key(f"{w}.{tag}") for w in ("scale", "moment", "first_moment", "refreshed", "failures")
    )
    updates, updated_at, moment_updates, first_updates, total = (
        key(w) for w in ("updates", "updated_at", "moment_updates", "first_updates", "failures_total")
    )
    return Keys(
        per_factor("factor"), per_factor("basis"), per_factor("values"), per_factor("order"), per_factor("root"),
        scale, moment, first, refreshed, failures, updates, updated_at, moment_updates, first_updates, total,
        SpectralCache(failures, total, refreshed, max_failures),
    )


@dataclass(eq=False)
class Unit:
    """One block: where its factors live in the state and where it sits in the group's tensors.

    Under torch.distributed each unit has one owner (:class:`precond.distributed.Ownership`).
    """

    holder: Tensor  # the parameter whose state holds the unit (gradient factors: the one it is cut from)
    tag: str  # the unit's index within the holder's state
    dims: tuple[int, ...]  # the block's shape: one factor per dimension
    share: int  # C = (⊗ factors)^(1/share)
    keys: Keys
    layer: Layer | None = None
    where: tuple[Any, ...] = ()  # layer: (weight index, bias index) in ctx.params; gradient: (param index, block index)
    diagonal: bool = False  # no factors, the identity as its basis (gradient factors with precondition_1d: false)
    state: dict[str, Any] = field(default_factory=dict)  # the holder's state, bound on every step

    @property
    def cost(self) -> float:
        """The work of a refresh: one ``dim³`` eigendecomposition per factor (a diagonal unit: its entries)."""
        return float(sum(self.dims)) if self.diagonal else float(sum(d**3 for d in self.dims))

    def bases(self) -> list[Tensor]:
        return [self.state[k] for k in self.keys.basis]
