"""``inverse``: the direction times ``(C + λI)⁻¹`` (Newton, natural gradient, K-FAC, Sophia)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from precond.block import Direction, Transform
from precond.registry import register
from precond.transform.spectral import diagonal_power


@register("transform", "inverse")
class Inverse(Transform):
    """``f(λ) = 1 / (λ + damping)``: the Newton / natural-gradient step."""

    spectral: ClassVar[bool] = True

    damping: float = Field(0.0, ge=0, description="Tikhonov damping λ added to the curvature")

    def fn(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        return 1.0 / (eigenvalues + self.damping)

    def diagonal(self, values: list[torch.Tensor], divisors: list[float] | None, direction: Direction) -> Direction:
        return diagonal_power(values, divisors, direction, 1.0, self.damping, False)
