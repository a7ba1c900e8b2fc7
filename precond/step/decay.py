"""Weight decay: ``l2`` adds ``wd·θ`` to the gradient; ``decoupled`` shrinks ``θ`` (AdamW)."""

from __future__ import annotations

from typing import ClassVar

import torch

from precond.block import Decay, GroupStep
from precond.registry import register


@register("decay", "l2")
class L2(Decay):
    """``g ← g + wd·θ`` before anything else sees the gradient (torch.optim's ``weight_decay``)."""

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    def gradient(self, ctx: GroupStep) -> None:
        wd = ctx.group["weight_decay"]
        if wd:
            ctx.grads = list(torch._foreach_add(ctx.grads, ctx.params, alpha=wd))

    def objective_l2(self, weight_decay: float) -> float | None:
        return float(weight_decay)  # the gradient is that of loss + ½·wd·‖θ‖²


@register("decay", "decoupled")
class Decoupled(Decay):
    """``θ ← θ·(1 - lr·wd)`` right before the update (AdamW, AdaHessian, Sophia)."""

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    def parameters(self, ctx: GroupStep) -> None:
        wd = ctx.group["weight_decay"]
        if wd:
            torch._foreach_mul_(ctx.params, 1.0 - ctx.lr * wd)
