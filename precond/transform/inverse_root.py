"""``inverse_root``: the direction times ``C^(-1/p)`` (Adagrad, Adam, Shampoo: p = 2)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from precond.block import Direction, GroupStep, Transform
from precond.registry import register
from precond.transform.spectral import MIN_ROOT, diagonal_power, finite_power, float32_damping


@register("transform", "inverse_root")
class InverseRoot(Transform):
    """``f(λ) = (λ + ε)^(-1/p)`` (damping inside) or ``1 / (λ^(1/p) + ε)`` (outside, as Adam and Adagrad)."""

    spectral: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    p: float = Field(
        2.0,
        ge=MIN_ROOT,
        description="the root: f(C) = C^(-1/p); 2 for Adam/Adagrad/Shampoo, 1 for the inverse, 2/k for AdaHessian's "
        "Hessian power k; at least 0.25: f is then at most C^-4, finite in float32 down to eigenvalues of 1e-9 "
        "(on Shampoo's gradient factors of a k-dimensional tensor, p = 1/k inverts each factor)",
    )
    damping: float = Field(
        0.0, ge=0, description="epsilon added to the curvature (inside) or to its root (outside); 0, or a normal float32 (>= 1.2e-38)"
    )
    damping_position: Literal["inside", "outside"] = Field(
        "inside", description="inside: (C + eps)^(-1/p); outside: (C^(1/p) + eps)^(-1) (Adam's eps)"
    )

    @field_validator("damping")
    @classmethod
    def _normal_damping(cls, value: float) -> float:
        return float32_damping(value, "damping")

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        # finite v >= 0 and eps > 0: 1/(v^(1/p) + eps) <= 1/eps, finite; (v + eps)^(-1/p) <= eps^(-1/p),
        # finite in float32 unless p is small and eps tiny (p = 0.25, eps = 1e-10: 1e40)
        if form != "diagonal" or not nonnegative or not self.damping > 0:
            return False
        return self.damping_position == "outside" or finite_power(self.damping, -1.0 / self.p)

    def fn(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        """The spectral function on eigenvalues (a new tensor: ``clamp_min`` makes it, the rest is in place, the same
        numbers as ``1 / (λ^(1/p) + ε)`` and ``(λ + ε)^(-1/p)`` in one pass less each)."""
        out = eigenvalues.clamp_min(0)
        if self.damping_position == "outside":
            out = out.sqrt_() if self.p == 2 else out.pow_(1.0 / self.p)
            return out.add_(self.damping).reciprocal_()
        return out.add_(self.damping).pow_(-1.0 / self.p)

    def kronecker(self) -> tuple[float, float, bool]:
        """``(p, damping, outside)`` for per-factor damping on a Kronecker structure."""
        return self.p, self.damping, self.damping_position == "outside"

    def diagonal(self, values: list[torch.Tensor], divisors: list[float] | None, direction: Direction) -> Direction:
        return diagonal_power(values, divisors, direction, self.p, self.damping, self.damping_position == "outside")

    def full(self, ctx: GroupStep, operator: Any, vector: torch.Tensor) -> torch.Tensor:
        """Full form: ``f(C) v`` through the eigendecomposition the ``full`` structure keeps."""
        return operator.function(self.fn, vector)
