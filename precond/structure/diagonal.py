"""Diagonal structure: one curvature number per parameter entry."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from precond.block import Curvature, DiagonalEstimate, Direction, Estimate, GroupStep, Structure, Transform, per_parameter
from precond.registry import register


def accumulate_(diag: list[torch.Tensor], est: DiagonalEstimate, accumulate: str, beta: float) -> None:
    """``D ← D + s·d`` (``sum``) or ``D ← β D + (1-β)·s·d`` (``ema``) in place, with ``d`` the estimate's values
    or the squares of its roots and ``s`` its scale (Adagrad's and Adam's second moment; also grafting's)."""
    weight = est.scale
    if accumulate == "ema":
        torch._foreach_mul_(diag, beta)
        weight *= 1.0 - beta
    if est.roots is not None:
        torch._foreach_addcmul_(diag, est.roots, est.roots, value=weight)
    else:
        assert est.values is not None
        torch._foreach_add_(diag, est.values, alpha=weight)


@register("structure", "diagonal")
class Diagonal(Structure):
    """A diagonal curvature, accumulated by sum (Adagrad) or EMA (Adam, AdaHessian, Sophia).

    ``sum``: ``D ← D + d`` from ``D₀ = init``. ``ema``: ``D ← β D + (1-β) d``
    from ``D₀ = init``, read as ``D / (1-βⁿ)`` after ``n`` updates when
    ``bias_correction`` is on. ``amsgrad`` keeps and uses the running maximum.
    """

    form: ClassVar[str] = "diagonal"
    elementwise: ClassVar[bool] = True  # entry by entry: runs on FSDP2 shards

    accumulate: Literal["sum", "ema"] = Field("ema", description="sum (Adagrad) or exponential moving average (Adam)")
    beta: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay (ema only)")
    bias_correction: bool = Field(True, description="divide the EMA by 1-beta^n (ema only)")
    init: float = Field(0.0, ge=0.0, description="initial value of the statistic (Adagrad's initial_accumulator_value)")
    amsgrad: bool = Field(False, description="use the running maximum of the statistic (AMSGrad)")

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        state[self.key("diag")] = torch.full_like(param, self.init, memory_format=torch.preserve_format)
        state[self.key("updates")] = 0
        if self.amsgrad:
            state[self.key("max")] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        diag = ctx.gathered(self.key("diag"))
        accumulate_(diag, curvature.diagonal(ctx), self.accumulate, self.beta)
        key = self.key("updates")
        for s in ctx.states:
            s[key] += 1
        if self.amsgrad:
            torch._foreach_maximum_(ctx.gathered(self.key("max")), diag)

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        est = curvature.diagonal(ctx)
        if est.roots is not None:
            return [] if est.roots is ctx.grads else per_parameter(est.roots)  # the gradients were checked
        return per_parameter(est.values or [])

    def statistic(self, ctx: GroupStep) -> tuple[list[torch.Tensor], list[float] | None]:
        """The stored tensors and per-tensor divisors (bias correction) or None."""
        values = ctx.gathered(self.key("max") if self.amsgrad else self.key("diag"))
        if self.accumulate == "ema" and self.bias_correction:
            key = self.key("updates")
            divisors = [1.0 - self.beta ** s[key] if s[key] else 1.0 for s in ctx.states]
            return values, divisors
        return values, None

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        values, divisors = self.statistic(ctx)
        if transform.every == 1 and transform.start == 1:
            return transform.diagonal(values, divisors, direction)  # type: ignore[attr-defined]  # per-form method: Structure.supports checked it
        # amortised: cache the elementwise multiplier f(D) and refresh it when due
        key = self.key("multiplier")
        if transform.due(ctx.step) or any(key not in s for s in ctx.states):
            ones = Direction([torch.ones_like(v) for v in values], 1.0, True)
            multipliers = transform.diagonal(values, divisors, ones).materialize().tensors  # type: ignore[attr-defined]  # per-form method
            for s, m in zip(ctx.states, multipliers):
                s[key] = m
        if direction.denominator is not None:
            direction = direction.materialize()
        return Direction(list(torch._foreach_mul(direction.tensors, ctx.gathered(key))), direction.coef, True)
