"""``identity``: leave the direction as it is (SGD)."""

from __future__ import annotations

from typing import ClassVar

from precond.block import Direction, GroupStep, Transform
from precond.registry import register


@register("transform", "identity")
class Identity(Transform):
    """No preconditioning: the direction is the (momentum) gradient."""

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        return True

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        return direction
