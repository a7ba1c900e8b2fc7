"""How Kronecker factors accumulate over steps: ``sum`` (Shampoo, from ``init·I``), ``ema`` (K-FAC; read as
``F / (1 - βⁿ)`` with ``bias_correction``) or ``none`` (this step's factors only)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from precond.kron.units import Unit
from precond.layers import factor_dtype


def _ema(factors: list[Tensor], batch: list[Tensor], beta: float) -> None:
    torch._foreach_mul_(factors, beta)
    torch._foreach_add_(factors, batch, alpha=1.0 - beta)


def _sum(factors: list[Tensor], batch: list[Tensor], beta: float) -> None:
    torch._foreach_add_(factors, batch)


def _none(factors: list[Tensor], batch: list[Tensor], beta: float) -> None:
    torch._foreach_copy_(factors, batch)


_COMBINE: dict[str, Callable[[list[Tensor], list[Tensor], float], None]] = {"ema": _ema, "sum": _sum, "none": _none}


class Accumulation:
    """The factors of each unit in its state, from ``init·I``; the per-parameter counters ``updates``
    and ``updated_at`` advance once per curvature step."""

    def __init__(self, accumulate: str, beta: float, bias_correction: bool, init: float) -> None:
        self.combine = _COMBINE[accumulate]
        self.beta = beta
        self.corrected = accumulate == "ema" and bias_correction
        self.init = init

    def add(self, step: int, pairs: list[tuple[Unit, list[Tensor]]], counted: list[Unit]) -> None:
        """Accumulate each unit's fresh factors; advance the counters of every parameter of ``counted``
        (the units that had statistics this step, kept here or, sharded, by their owners)."""
        factors: list[Tensor] = []
        batch: list[Tensor] = []
        for u, fresh in pairs:
            for j, (key, f) in enumerate(zip(u.keys.factor, fresh)):
                if key not in u.state:
                    like = fresh[0]
                    u.state[key] = self.init * torch.eye(u.dims[j], dtype=factor_dtype(like), device=like.device)
                factors.append(u.state[key])
                batch.append(f.to(factors[-1].dtype) if f.dtype != factors[-1].dtype else f)
        if factors:
            self.combine(factors, batch, self.beta)
        touched: dict[int, Unit] = {}
        for u in counted:
            touched.setdefault(id(u.state), u)  # one unit per state dict: the counters advance once
        for u in touched.values():
            u.state[u.keys.updates] = u.state.get(u.keys.updates, 0) + 1
            u.state[u.keys.updated_at] = step

    def read(self, u: Unit) -> list[Tensor]:
        """The unit's factors as the curvature reads them (bias-corrected EMA)."""
        n = u.state.get(u.keys.updates, 0)
        factors = [u.state[key] for key in u.keys.factor]
        if self.corrected and n:
            div = 1.0 - self.beta**n
            return [f / div for f in factors]
        return factors
