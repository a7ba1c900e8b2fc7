"""``lm``: Levenberg–Marquardt adaptation of the damping from the reduction ratio
(docs/algorithms.md#levenberg-marquardt).

After the step ``p = −lr·d`` the closure is evaluated once more (forward only) and

    ρ = (L(θ + p) − L(θ)) / (q(p) − q(0)),   q(p) − q(0) = gᵀp + ½ pᵀ(C + λI)p

compares the actual change of the loss with the change the damped quadratic
model predicted (Martens 2010). ``ρ < lower``: ``λ ← increase·λ``;
``ρ > upper``: ``λ ← decrease·λ``; otherwise ``λ`` is kept (defaults 1/4,
3/4, 3/2, 2/3: Martens & Sutskever 2012 §8.5). ``pᵀ(C + λI)p`` comes from the
``full`` structure (exact for a CG solve: from its objective value); for an
exact solve it equals ``gᵀd``.

The damping is a param-group value, ``group["damping"]``, initialised from the
``inverse`` transform's ``damping`` field, so checkpoints and per-group settings
carry it like ``lr``; on every step it reaches the transform as a declared fact
(``ctx.facts.damping``, :class:`precond.interfaces.Facts`), and the quadratic
model comes back the same way (``ctx.facts.quadratic``, from structure ``full``). The loss is
that of the closure plus ``½·wd·‖θ‖²`` for ``l2`` weight decay.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Union

from pydantic import Field, model_validator

from precond.block import Direction, GroupStep, Needs, Served, Step
from precond.errors import field_problem
from precond.linalg.cg import lm_damping_update
from precond.registry import register
from precond.step.line_search import l2_coefficients, loss_at_current, objective
from precond.step.lr import apply_update


@register("step", "lm")
class LevenbergMarquardt(Step):
    """``θ ← θ − lr·d``, then adapt the damping ``λ`` of ``inverse`` from the reduction ratio ρ (one extra forward pass)."""

    produces: ClassVar[frozenset[str]] = frozenset({"damping"})  # read by transform 'inverse' (ctx.facts.damping)
    requires: ClassVar[frozenset[str]] = frozenset({"quadratic"})  # pᵀ(C + λI)p of the step, from structure 'full'

    lower: float = Field(0.25, description="rho below this: increase the damping (lower <= upper)")
    upper: float = Field(0.75, description="rho above this: decrease the damping")
    increase: float = Field(1.5, gt=1.0, description="damping factor when rho < lower")
    decrease: float = Field(2.0 / 3.0, gt=0.0, lt=1.0, description="damping factor when rho > upper")
    every: int = Field(1, ge=1, description="adapt on every k-th step only (the extra forward pass too)")
    min_damping: float = Field(0.0, ge=0.0, description="lower bound of the damping")
    max_damping: Union[float, None] = Field(None, gt=0.0, description="upper bound of the damping (None: no bound)")

    @model_validator(mode="after")
    def _ordered(self) -> LevenbergMarquardt:
        if self.lower > self.upper:
            blame = "upper" if "upper" in self.model_fields_set and "lower" not in self.model_fields_set else "lower"
            raise field_problem(
                blame,
                f"lower = {self.lower:g} and upper = {self.upper:g}: the damping rises for rho < lower and falls for "
                "rho > upper, so lower <= upper is required; e.g. lower: 0.25, upper: 0.75 (Martens & Sutskever 2012)",
            )
        if self.max_damping is not None and self.min_damping > self.max_damping:
            blame = "max_damping" if "min_damping" not in self.model_fields_set else "min_damping"
            raise field_problem(
                blame,
                f"min_damping = {self.min_damping:g} and max_damping = {self.max_damping:g}: the damping is clamped to "
                "[min_damping, max_damping], so min_damping <= max_damping is required (max_damping: null for no bound)",
            )
        return self

    def recipe_problems(self, pipeline: Any) -> list[tuple[str, str]]:
        """What every pipeline must be for the reduction ratio (see :mod:`precond.recipe`'s cross-block
        checks): an ``inverse`` transform on a ``full`` structure whose damping starts above 0, and no
        momentum. ``(path in the pipeline, message)`` for each problem."""
        out = []
        inverse = [(i, t) for i, t in enumerate(pipeline.transforms) if "damping" in t.consumes]  # transform 'inverse'
        structure = pipeline.structure
        if not inverse or structure is None or "quadratic" not in structure.produces:  # structure 'full'
            has = f"structure '{structure.name}'" if structure is not None else "no structure"
            names = ", ".join(t.name for t in pipeline.transforms)
            has += f" and transform {names}" if names else " and no transform"
            out.append((
                "step" if not pipeline.path else "",
                "step 'lm' adapts the damping of transform 'inverse' on structure 'full'; "
                f"{pipeline.label} has {has}: use structure: {{type: full}}, transform: {{type: inverse, damping: 1.0}}",
            ))
        elif not inverse[0][1].damping > 0:
            i = inverse[0][0]
            out.append((
                f"transform.{i}.damping",
                f"step 'lm' scales the damping up and down by factors, so it must start above 0 ({pipeline.label} "
                "starts it at 0): set the inverse transform's damping (e.g. 1.0)",
            ))
        if pipeline.momentum is not None:
            out.append((
                "momentum",
                "step 'lm' compares the loss change with the model's prediction for d itself: remove the momentum block"
                + (f" ({pipeline.label})" if pipeline.path else ""),
            ))
        return out

    def needs(self) -> Needs:
        return Needs(closure=True)

    def distributed_problem(self) -> str | None:
        return "step 'lm' adapts its damping from this process's loss at the trial point (not averaged over the processes)"

    def stage(self, served: Served) -> LevenbergMarquardt:
        """Start each param group's damping (a param-group value, like ``lr``) from its ``inverse``
        transform's (the recipe validator checked that every pipeline has one, above 0)."""
        for group in served.groups:
            if "damping" not in group:
                pipeline = served.pipelines[group["rule"]]
                group["damping"] = float(next(t.damping for t in pipeline.transforms if "damping" in t.consumes))
        return self

    def prepare(self, ctxs: list[GroupStep]) -> None:
        for ctx in ctxs:
            ctx.facts.damping = float(ctx.group["damping"])

    def apply(self, ctxs: list[GroupStep], directions: list[Direction]) -> None:
        if not ctxs:
            return
        directions = [d.materialize() for d in directions]
        params = [p for c in ctxs for p in c.params]
        l2 = l2_coefficients(ctxs, "step 'lm'")
        f0 = objective(float(ctxs[0].evaluation.loss), params, l2)
        predicted = 0.0
        for ctx, d in zip(ctxs, directions):
            gd = sum(float((g * t).sum()) for g, t in zip(ctx.grads, d.tensors))
            quad = ctx.facts.quadratic
            dad = quad[1] * (gd / quad[0]) ** 2 if quad is not None and quad[0] else gd
            predicted += -ctx.lr * gd + 0.5 * ctx.lr**2 * dad
            apply_update(ctx.params, d, ctx.lr)
        if (ctxs[0].step - 1) % self.every:
            return
        f1 = loss_at_current(ctxs, "step 'lm'")
        rho = (f1 - f0) / predicted if predicted < 0 else math.nan
        top = math.inf if self.max_damping is None else self.max_damping
        for ctx in ctxs:
            ctx.group["damping"] = lm_damping_update(
                float(ctx.group["damping"]), rho, self.lower, self.upper, self.increase, self.decrease,
                min_damping=self.min_damping, max_damping=top,
            )
        ctxs[0].states[0][self.key("rho")] = rho
