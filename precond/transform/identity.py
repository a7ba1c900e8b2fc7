"""``identity``: leave the direction as it is (SGD)."""

from __future__ import annotations

from precond.block import Direction, GroupStep, Transform
from precond.registry import register


@register("transform", "identity")
class Identity(Transform):
    """No preconditioning: the direction is the (momentum) gradient."""

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        return True

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        return direction
