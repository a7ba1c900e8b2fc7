"""Momentum: heavy ball (torch.optim.SGD) and EMA (Adam's first moment).

``position: pre`` averages the gradient before preconditioning (Adam,
Sophia); ``post`` averages the preconditioned direction (K-FAC).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from precond.block import Direction, GroupStep, Momentum, uniform
from precond.registry import register

@register("momentum", "heavy_ball")
class HeavyBall(Momentum):
    """``b ← μ b + (1 - dampening) d`` (``b₁ = d``); the direction is ``b``, or ``d + μ b`` with Nesterov.

    Exactly torch.optim.SGD's momentum; ``beta: 0`` keeps no state at all.
    """

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    beta: float = Field(0.9, ge=0.0, description="momentum factor μ; the param-group value 'momentum' (schedulers such as OneCycleLR change it)")
    dampening: float = Field(0.0, ge=0.0, le=1.0, description="dampening for momentum")
    nesterov: bool = Field(False, description="Nesterov momentum: d + μ b")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> HeavyBall:
        if self.nesterov and (self.beta <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires beta > 0 and dampening = 0")
        return self

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        beta = self.factor(ctx)
        if beta == 0:
            return direction
        if not direction.plain:
            direction = direction.materialize()
        key = self.key("buffer")
        fresh = [i for i, s in enumerate(ctx.states) if key not in s]
        for i in fresh:
            ctx.states[i][key] = direction.tensors[i].detach().clone()
        old = [i for i, s in enumerate(ctx.states) if i not in fresh] if fresh else range(len(ctx.states))
        if old:
            bufs = [ctx.states[i][key] for i in old]
            torch._foreach_mul_(bufs, beta)
            torch._foreach_add_(bufs, [direction.tensors[i] for i in old], alpha=1.0 - self.dampening)
        bufs = ctx.gathered(key)
        if self.nesterov:
            return Direction(list(torch._foreach_add(direction.tensors, bufs, alpha=beta)), 1.0, True)
        return Direction(bufs, 1.0, False)


@register("momentum", "ema")
class EMA(Momentum):
    """``m ← β m + (1 - β) d`` from ``m₀ = 0``, read as ``m / (1 - βᵗ)`` with bias correction (Adam).

    ``nesterov``: the output is ``(1 - β) d + β m`` instead (``d.lerp(m, β)``: torch.optim.Muon's and
    Keller Jordan's Nesterov form), with ``m/(1 - βᵗ)`` in place of ``m`` when ``bias_correction`` is on.
    """

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    beta: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay β₁; the param-group value 'momentum' (schedulers such as OneCycleLR change it)")
    bias_correction: bool = Field(True, description="divide by 1 - β^t")
    nesterov: bool = Field(False, description="Nesterov form (Muon): (1 - β) d + β m, the current direction averaged once more")

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        state[self.key("avg")] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        if not direction.plain:
            direction = direction.materialize()
        beta = self.factor(ctx)
        avg = ctx.gathered(self.key("avg"))
        torch._foreach_lerp_(avg, direction.tensors, 1.0 - beta)
        if self.nesterov:
            if self.bias_correction:  # (1 - β) d + β m/(1 - βᵗ)
                avg = list(torch._foreach_div(avg, [1.0 - beta**t for t in ctx.steps]))
            return Direction(list(torch._foreach_lerp(direction.tensors, avg, beta)), 1.0, True)
        if not self.bias_correction:
            return Direction(avg, 1.0, False)
        return Direction(avg, uniform([1.0 / (1.0 - beta**t) for t in ctx.steps]), False)
