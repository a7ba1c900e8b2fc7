"""``lr``: the plain learning-rate step, and the update that every step control shares."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from precond.block import Direction, GroupStep, Step, uniform
from precond.registry import register


def apply_update(params: list[torch.Tensor], direction: Direction, lr: float | list[float]) -> None:
    """``θ ← θ - lr · coef · tensors / denominator`` in one fused foreach op where possible."""
    coef = direction.coef
    if isinstance(coef, float) and isinstance(lr, float):
        scale: float | list[float] = -lr * coef
    else:
        n = len(params)
        lrs = lr if isinstance(lr, list) else [lr] * n
        coefs = coef if isinstance(coef, list) else [coef] * n
        scale = [-(a * b) for a, b in zip(lrs, coefs)]
    if direction.denominator is not None:
        torch._foreach_addcdiv_(params, direction.tensors, direction.denominator, scale)
    elif isinstance(scale, float):
        torch._foreach_add_(params, direction.tensors, alpha=scale)
    else:  # one add per distinct scale: θ + s·d rounded as torch's param.add_(d, alpha=s) (no separate product)
        by_scale: dict[float, list[int]] = {}
        for i, s in enumerate(scale):
            by_scale.setdefault(s, []).append(i)
        for s, idx in by_scale.items():
            torch._foreach_add_([params[i] for i in idx], [direction.tensors[i] for i in idx], alpha=s)


@register("step", "lr")
class LR(Step):
    """``θ ← θ - lr_t · d`` with ``lr_t = lr / (1 + (t - 1) · lr_decay)`` (Adagrad's decay; 0 = constant).

    ``lr`` is read from the param group on every step, so LR schedulers work.
    """

    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    lr_decay: float = Field(0.0, ge=0.0, description="Adagrad-style decay: lr / (1 + (t-1) lr_decay)")

    def rate(self, ctx: GroupStep) -> float | list[float]:
        if not self.lr_decay:
            return ctx.lr
        return uniform([ctx.lr / (1.0 + (t - 1) * self.lr_decay) for t in ctx.steps])

    def apply(self, ctxs: list[GroupStep], directions: list[Direction]) -> None:
        for ctx, d in zip(ctxs, directions):
            apply_update(ctx.params, d, self.rate(ctx))
