"""``inverse_root``: the direction times ``C^(-1/p)`` (Adagrad, Adam, Shampoo: p = 2)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from precond.block import Direction, GroupStep, Transform
from precond.registry import register
from precond.transform.spectral import diagonal_power


@register("transform", "inverse_root")
class InverseRoot(Transform):
    """``f(λ) = (λ + ε)^(-1/p)`` (damping inside) or ``1 / (λ^(1/p) + ε)`` (outside, as Adam and Adagrad)."""

    spectral: ClassVar[bool] = True

    p: float = Field(2.0, gt=0, description="the root: f(C) = C^(-1/p); 2 for Adam/Adagrad/Shampoo")
    damping: float = Field(0.0, ge=0, description="epsilon added to the curvature (inside) or to its root (outside)")
    damping_position: Literal["inside", "outside"] = Field(
        "inside", description="inside: (C + eps)^(-1/p); outside: (C^(1/p) + eps)^(-1) (Adam's eps)"
    )

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        # (v + eps)^(-1/p) and 1/(v^(1/p) + eps) are finite for finite v >= 0 and eps > 0
        return form == "diagonal" and nonnegative and self.damping > 0

    def fn(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        """The spectral function on eigenvalues."""
        if self.damping_position == "outside":
            return 1.0 / (eigenvalues.clamp_min(0) ** (1.0 / self.p) + self.damping)
        return (eigenvalues.clamp_min(0) + self.damping) ** (-1.0 / self.p)

    def kronecker(self) -> tuple[float, float, bool]:
        """``(p, damping, outside)`` for per-factor damping on a Kronecker structure."""
        return self.p, self.damping, self.damping_position == "outside"

    def diagonal(self, values: list[torch.Tensor], divisors: list[float] | None, direction: Direction) -> Direction:
        return diagonal_power(values, divisors, direction, self.p, self.damping, self.damping_position == "outside")

    def full(self, ctx: GroupStep, operator: Any, vector: torch.Tensor) -> torch.Tensor:
        """Full form: ``f(C) v`` through the eigendecomposition the ``full`` structure keeps."""
        return operator.function(self.fn, vector)
