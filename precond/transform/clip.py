"""``clip``: bound the direction elementwise (Sophia) or by its norm."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from precond.block import Direction, GroupStep, Transform
from precond.registry import register


@register("transform", "clip")
class Clip(Transform):
    """Clip the direction: each entry to ``[-threshold, threshold]`` (``elementwise``), scale it so that its
    L2 norm over the param group is at most ``threshold`` (``norm``), or scale each tensor ``u`` by
    ``min(1, threshold / (RMS(u) + 1e-12))`` (``rms``: PSGD-Kron's bound on the update RMS)."""

    linear: ClassVar[bool] = False

    mode: Literal["elementwise", "norm", "rms"] = Field(
        "elementwise", description="elementwise (Sophia), norm over the group, or rms of each tensor (PSGD-Kron)"
    )
    threshold: float = Field(1.0, gt=0, description="the bound")

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        return True

    def shard_problem(self) -> str | None:
        if self.mode != "norm":
            return None  # elementwise: on the shards; rms: each parameter's own norm, at its owner (gathers)
        return "transform 'clip' with mode: norm needs the norm of the whole param group, whose parameters have different owners"

    def gathers(self) -> bool:
        return self.mode == "rms"

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        d = direction.materialize()
        if self.mode == "elementwise":
            torch._foreach_clamp_min_(d.tensors, -self.threshold)
            torch._foreach_clamp_max_(d.tensors, self.threshold)
            return d
        if self.mode == "rms":
            rms = torch._foreach_div(torch._foreach_norm(d.tensors), [math.sqrt(max(t.numel(), 1)) for t in d.tensors])
            torch._foreach_add_(rms, 1e-12)
            torch._foreach_reciprocal_(rms)
            torch._foreach_mul_(rms, self.threshold)
            torch._foreach_clamp_max_(rms, 1.0)
            torch._foreach_mul_(d.tensors, rms)
            return d
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d.tensors)))
        factor = torch.clamp(self.threshold / norm, max=1.0).nan_to_num(nan=1.0, posinf=1.0)
        torch._foreach_mul_(d.tensors, factor)
        return d
