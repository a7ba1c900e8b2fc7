"""``normalized``: the normalised natural gradient, ``θ ← θ − sqrt(2δ / gᵀF⁻¹g) · F⁻¹g``
(docs/algorithms.md#normalized-natural-gradient)."""

from __future__ import annotations

import math

from pydantic import Field

from precond.block import Direction, GroupStep, Step
from precond.registry import register
from precond.step.lr import apply_update


@register("step", "normalized")
class Normalized(Step):
    """Scale the preconditioned direction ``v`` so that the step ``s`` has ``½ sᵀF s = δ`` (a KL trust region).

    ``v = f(C) g`` over every param group; the scale is ``sqrt(2δ / gᵀv)``
    (``gᵀv = vᵀ(F + λI)v`` for an exact damped solve, so the damped metric is
    the one normalised, as TRPO does), applied before momentum ``post``; the
    param group's ``lr`` multiplies the result (1 for the exact trust-region
    step). No step is taken when ``gᵀv <= 0``.
    """

    delta: float = Field(1e-3, gt=0.0, description="the trust-region radius: 1/2 s^T F s = delta (TRPO's max_kl)")

    def scale(self, ctxs: list[GroupStep], directions: list[Direction]) -> list[Direction]:
        directions = [d.materialize() for d in directions]
        gv = 0.0
        for ctx, d in zip(ctxs, directions):
            gv += sum(float((g * t).sum()) for g, t in zip(ctx.grads, d.tensors))
        factor = math.sqrt(2.0 * self.delta / gv) if gv > 0 and math.isfinite(gv) else 0.0
        for ctx in ctxs[:1]:
            ctx.states[0][self.key("scale")] = factor
        return [d.scaled(factor) for d in directions]

    def apply(self, ctxs: list[GroupStep], directions: list[Direction]) -> None:
        for ctx, d in zip(ctxs, directions):
            apply_update(ctx.params, d, ctx.lr)
