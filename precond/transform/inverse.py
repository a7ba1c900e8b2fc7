"""``inverse``: the direction times ``(C + λI)⁻¹`` (Newton, natural gradient, K-FAC, Sophia)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from precond.block import Direction, GroupStep, Transform
from precond.registry import register
from precond.transform.spectral import diagonal_power, float32_damping


@register("transform", "inverse")
class Inverse(Transform):
    """``f(λ) = 1 / (scale·λ + damping)`` (``add``) or ``1 / max(scale·λ, damping)`` (``max``).

    ``add`` is Tikhonov damping (the Newton / natural-gradient step); ``max``
    is a floor, as in Sophia's ``m / max(γ·h, ε)``. ``scale`` multiplies the
    curvature (Sophia's γ or ρ).
    """

    spectral: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards
    solves: ClassVar[bool] = True
    consumes: ClassVar[frozenset[str]] = frozenset({"damping"})  # step 'lm''s adapted damping takes the field's place

    damping: float = Field(
        0.0, ge=0, description="Tikhonov damping added to the curvature, or its floor (max); 0, or a normal float32 (>= 1.2e-38)"
    )
    damping_mode: Literal["add", "max"] = Field("add", description="add: 1/(scale*C + damping); max: 1/max(scale*C, damping)")
    scale: float = Field(
        1.0, gt=0, description="multiplies the curvature before damping (Sophia's gamma); a normal float32 (1.2e-38 to 3.4e38)"
    )

    @field_validator("damping")
    @classmethod
    def _normal_damping(cls, value: float) -> float:
        return float32_damping(value, "damping", example="1.0e-3")

    @field_validator("scale")
    @classmethod
    def _normal_scale(cls, value: float) -> float:
        return float32_damping(value, "scale", zero=False, example="1.0")

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        # max(scale*v, eps) >= eps > 0 always; scale*v + eps > 0 for v >= 0
        return form == "diagonal" and self.damping > 0 and (self.damping_mode == "max" or nonnegative)

    def fn(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        scaled = self.scale * eigenvalues
        return 1.0 / (scaled.clamp_min(self.damping) if self.damping_mode == "max" else scaled + self.damping)

    def kronecker(self) -> tuple[float, float, bool] | None:
        """``(p, damping, outside)`` with ``f(C) = (C + damping)^(-1/p)``, for per-factor damping on a
        Kronecker structure; ``None`` when ``scale`` or ``damping_mode: max`` make ``f`` another
        function (then only the structure's exact damping, which applies :meth:`fn`, serves)."""
        if self.scale != 1.0 or self.damping_mode != "add":
            return None
        return 1.0, self.damping, False

    def diagonal(self, values: list[torch.Tensor], divisors: list[float] | None, direction: Direction) -> Direction:
        if self.damping_mode == "add" and self.scale == 1.0:
            return diagonal_power(values, divisors, direction, 1.0, self.damping, False)
        denom = list(torch._foreach_mul(values, self.scale))
        if divisors is not None:
            torch._foreach_div_(denom, divisors)
        if self.damping_mode == "max":
            torch._foreach_clamp_min_(denom, self.damping)
        elif self.damping:
            torch._foreach_add_(denom, self.damping)
        if direction.denominator is not None:
            direction = direction.materialize()
        return Direction(direction.tensors, direction.coef, direction.owned, denom,
                         nonzero=self.damping_mode == "max" and self.damping > 0)

    def full(self, ctx: GroupStep, operator: Any, vector: torch.Tensor) -> torch.Tensor:
        """Full form: ``(scale·C + damping·I)⁻¹ v`` (``add``: a solve) or the spectral function (``max``).

        ``operator`` is the ``full`` structure's view of ``C`` (a dense matrix, its inverse, or
        products for CG). The damping a step control adapts (``lm``: ``ctx.facts.damping``), when
        there is one, takes the place of the field.
        """
        damping = self.damping if ctx.facts.damping is None else ctx.facts.damping
        if self.damping_mode == "add":
            return operator.solve(vector, self.scale, damping)
        return operator.function(lambda lam: 1.0 / (self.scale * lam).clamp_min(damping), vector)
