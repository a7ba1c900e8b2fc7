"""``line_search``: choose the step length by re-evaluating the closure (strong Wolfe, or Armijo backtracking).

The objective is the loss the closure returns plus ``½·wd·‖θ‖²`` for param
groups whose weight decay is ``l2`` (the gradient the pipeline sees is then
its exact gradient). The search moves along ``p = −d`` (``d`` the final
direction of every param group, joined) from the current parameters.

Strong Wolfe (Nocedal & Wright 2006, Algorithms 3.5 and 3.6, with the cubic
interpolation and safeguards of Schmidt's minFunc, as torch.optim.LBFGS uses
them; docs/algorithms.md#line-search): the trial steps ``t`` grow from ``lr`` (each next
trial the minimiser of the cubic through the last two points, kept within
``[t + 0.01(t − t_prev), 10 t]``) until the sufficient-decrease condition
``f(t) <= f(0) + c1·t·f'(0)`` fails, the function stops decreasing, or the
slope turns non-negative -- which brackets a step -- or the curvature
condition ``|f'(t)| <= c2·|f'(0)|`` holds; then the bracket is shrunk by
cubic interpolation (a trial closer than 10% of the bracket to its ends is
moved there) until both conditions hold, the bracket is shorter than
``tolerance_change`` (in the max-norm of ``p``) or ``max_evals`` evaluations
are spent. Armijo: ``t = lr, shrink·lr, ...`` until sufficient decrease.

If ``d`` is not a descent direction (``gᵀp >= 0``, e.g. an indefinite SR1
matrix) the search runs along the negative gradient instead; if
``gᵀp > −tolerance_change`` the parameters are not moved (torch's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from precond.block import Direction, GroupStep, Needs, Step
from precond.errors import PipelineError, field_problem
from precond.evaluation import evaluate
from precond.registry import register


# --- the objective along a line -------------------------------------------------------------


def l2_coefficients(ctxs: list[GroupStep], who: str = "a step control that evaluates the loss") -> list[float]:
    """Per parameter: the weight-decay coefficient that is part of the objective (``l2``; 0 if none).

    Decoupled weight decay moves the parameters outside the objective, so the
    loss at the start of the step would not be the loss where the search starts:
    refused.
    """
    out = []
    for ctx in ctxs:
        if ctx.objective_l2 is None:
            raise PipelineError(
                f"{who} compares losses of one objective; decoupled weight decay changes the parameters outside "
                "it: use decay: {type: l2} (the penalty ½·wd·‖θ‖² becomes part of the objective)"
            )
        out.extend([ctx.objective_l2] * len(ctx.params))
    return out


def objective(loss: float, params: list[torch.Tensor], l2: list[float]) -> float:
    """``loss + Σ ½·wd·‖θ‖²`` over the parameters with an ``l2`` coefficient."""
    extra = sum(0.5 * wd * float(p.pow(2).sum()) for p, wd in zip(params, l2) if wd)
    return loss + extra if extra else loss


def loss_at_current(ctxs: list[GroupStep], who: str) -> float:
    """The objective at the current parameters, from a forward pass of the closure."""
    closure = ctxs[0].evaluation.closure
    if closure is None:
        raise PipelineError(f"{who} needs a closure to re-evaluate the loss: call opt.step(closure)")
    with torch.no_grad():
        result = closure()
    loss = result[0] if isinstance(result, (tuple, list)) else result
    params = [p for c in ctxs for p in c.params]
    return objective(float(loss), params, l2_coefficients(ctxs, who))


class Line:
    """``θ(t) = θ₀ + t·p`` over every parameter of ``ctxs``; ``self(t)`` evaluates ``(f, f'(t), ∇f)`` there."""

    def __init__(self, ctxs: list[GroupStep], directions: list[Direction], who: str) -> None:
        ev = ctxs[0].evaluation
        if ev.closure is None:
            raise PipelineError(f"{who} needs a closure to re-evaluate the loss: call opt.step(closure)")
        self.who = who
        self.closure = ev.closure
        self.all_params = ev.params
        self.params = [p for c in ctxs for p in c.params]
        self.l2 = l2_coefficients(ctxs, who)
        self.x0 = [p.detach().clone() for p in self.params]
        lr0 = ctxs[0].lr
        parts = []
        for ctx, d in zip(ctxs, directions):
            d = d.materialize() if not d.plain else d
            ratio = ctx.lr / lr0 if lr0 else 1.0
            parts.extend((t.reshape(-1).neg() if ratio == 1.0 else t.reshape(-1) * -ratio) for t in d.tensors)
        self.p = torch.cat(parts)
        self.g0 = torch.cat([g.reshape(-1) for c in ctxs for g in c.grads])
        self.f0 = objective(float(ev.loss), self.params, self.l2)
        self.t0 = lr0
        self.evaluations = 0

    def use_gradient(self) -> None:
        self.p = self.g0.neg()

    def views(self) -> list[torch.Tensor]:
        return [c.view_as(p) for c, p in zip(torch.split(self.p, [p.numel() for p in self.params]), self.params)]

    def move(self, t: float) -> None:
        for p, x, d in zip(self.params, self.x0, self.views()):
            p.copy_(x)
            p.add_(d, alpha=t)

    def __call__(self, t: float) -> tuple[float, float, torch.Tensor]:
        self.move(t)
        ev = evaluate(self.closure, self.all_params, Needs(), self.who)
        self.evaluations += 1
        grads = []
        for p, wd in zip(self.params, self.l2):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append((g + wd * p if wd else g).reshape(-1))
        g = torch.cat(grads)
        return objective(float(ev.loss), self.params, self.l2), float(g @ self.p), g


# --- strong Wolfe -----------------------------------------------------------------------------


@dataclass
class Point:
    t: float
    f: float
    slope: float  # f'(t) = ∇f(θ(t))ᵀp


def cubic_minimizer(a: Point, b: Point, bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic with the values and slopes of ``a`` and ``b``, clamped to ``bounds``
    (default: between the two points); the middle of the bounds when the cubic has no minimiser."""
    lo, hi = (a, b) if a.t <= b.t else (b, a)
    left, right = bounds if bounds is not None else (lo.t, hi.t)
    d1 = lo.slope + hi.slope - 3.0 * (lo.f - hi.f) / (lo.t - hi.t)
    disc = d1 * d1 - lo.slope * hi.slope
    if disc < 0:
        return (left + right) / 2.0
    d2 = math.sqrt(disc)
    t = hi.t - (hi.t - lo.t) * ((hi.slope + d2 - d1) / (hi.slope - lo.slope + 2.0 * d2))
    return min(max(t, left), right)


def strong_wolfe(
    phi: Callable[[float], tuple[float, float]],
    t: float,
    f0: float,
    slope0: float,
    *,
    c1: float,
    c2: float,
    tolerance_change: float,
    max_evals: int,
    p_norm: float,
) -> Point:
    """A step satisfying the strong Wolfe conditions (or the best point found), see the module docstring.

    ``phi(t) -> (f(t), f'(t))``; ``slope0 = f'(0) < 0``; ``p_norm = max|p|``.
    """
    origin = Point(0.0, f0, slope0)

    def sufficient(q: Point) -> bool:
        return q.f <= f0 + c1 * q.t * slope0

    def flat_enough(q: Point) -> bool:
        return abs(q.slope) <= -c2 * slope0

    prev, cur = origin, Point(t, *phi(t))
    trials = 0  # interpolated trials after the first one
    bracket: list[Point] | None = None
    while trials < max_evals:
        if not sufficient(cur) or (trials > 1 and cur.f >= prev.f) or (not flat_enough(cur) and cur.slope >= 0):
            bracket = [prev, cur]
            break
        if flat_enough(cur):
            return cur
        nxt = cubic_minimizer(prev, cur, (cur.t + 0.01 * (cur.t - prev.t), 10.0 * cur.t))
        prev, cur = cur, Point(nxt, *phi(nxt))
        trials += 1
    if bracket is None:  # out of evaluations while the function kept decreasing
        return origin if f0 <= cur.f else cur

    def best() -> tuple[int, int]:
        return (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)

    low, high = best()
    stuck = False
    while trials < max_evals:
        a, b = min(bracket[0].t, bracket[1].t), max(bracket[0].t, bracket[1].t)
        if (b - a) * p_norm < tolerance_change:
            break
        t = cubic_minimizer(bracket[0], bracket[1])
        margin = 0.1 * (b - a)
        if min(b - t, t - a) < margin:  # too close to an end of the bracket
            if stuck or t >= b or t <= a:
                t = b - margin if abs(t - b) < abs(t - a) else a + margin
                stuck = False
            else:
                stuck = True
        else:
            stuck = False
        new = Point(t, *phi(t))
        trials += 1
        if not sufficient(new) or new.f >= bracket[low].f:
            bracket[high] = new
            low, high = best()
        else:
            if flat_enough(new):
                return new
            if new.slope * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new
    return bracket[low]


def armijo(
    phi: Callable[[float], float], t: float, f0: float, slope0: float, *, c1: float, shrink: float, max_evals: int
) -> Point | None:
    """The first ``t·shrinkᵏ`` with ``f <= f0 + c1·t·f'(0)``; ``None`` if none of ``max_evals`` trials has it."""
    for _ in range(max_evals):
        f = phi(t)
        if f <= f0 + c1 * t * slope0:
            return Point(t, f, float("nan"))
        t *= shrink
    return None


@register("step", "line_search")
class LineSearch(Step):
    """Step length by a line search on the closure: strong Wolfe (as torch.optim.LBFGS) or Armijo backtracking.

    The first trial step is the param group's ``lr`` (1 for Newton and quasi-Newton
    methods). Each trial is one forward and backward pass of the closure.
    """

    method: Literal["strong_wolfe", "armijo"] = Field("strong_wolfe", description="strong Wolfe conditions or Armijo backtracking")
    c1: float = Field(1e-4, gt=0.0, lt=1.0, description="sufficient-decrease constant, 0 < c1 < 1 (strong_wolfe: c1 < c2)")
    c2: float = Field(0.9, gt=0.0, lt=1.0, description="strong Wolfe curvature constant, c1 < c2 < 1 (unused by armijo)")
    max_evals: int = Field(25, ge=1, description="trials after the first one, at most (torch's max_ls)")
    tolerance_change: float = Field(1e-9, ge=0.0, description="stop when the bracket, in max-norm of the step, is shorter")
    shrink: float = Field(0.5, gt=0.0, lt=1.0, description="armijo: step reduction factor")

    @model_validator(mode="after")
    def _wolfe_constants(self) -> LineSearch:
        # strong Wolfe: with c1 >= c2 the two conditions can exclude every step (Nocedal & Wright 2006,
        # Lemma 3.1 needs 0 < c1 < c2 < 1); armijo reads c1 only
        if self.method == "strong_wolfe" and self.c1 >= self.c2:
            blame = "c2" if "c2" in self.model_fields_set and "c1" not in self.model_fields_set else "c1"
            raise field_problem(
                blame,
                f"c1 = {self.c1:g} and c2 = {self.c2:g}: the strong Wolfe conditions need 0 < c1 < c2 < 1 "
                "(sufficient decrease c1, curvature c2), else no step may satisfy both; "
                "e.g. c1: 1.0e-4, c2: 0.9 (torch.optim.LBFGS; c2: 0.1 for nonlinear CG), or method: armijo",
            )
        return self

    def needs(self) -> Needs:
        return Needs(closure=True)

    def distributed_problem(self) -> str | None:
        return "step 'line_search' accepts or rejects trial points on this process's loss (not averaged over the processes)"

    def apply(self, ctxs: list[GroupStep], directions: list[Direction]) -> None:
        if not ctxs:
            return
        line = Line(ctxs, directions, "step 'line_search'")
        slope0 = float(line.g0 @ line.p)
        if slope0 >= 0:  # not a descent direction (indefinite curvature): steepest descent
            line.use_gradient()
            slope0 = float(line.g0 @ line.p)
        state = ctxs[0].states[0]
        if slope0 > -self.tolerance_change:
            state[self.key("t")] = 0.0
            return
        if self.method == "strong_wolfe":
            point = strong_wolfe(
                lambda t: line(t)[:2],
                line.t0,
                line.f0,
                slope0,
                c1=self.c1,
                c2=self.c2,
                tolerance_change=self.tolerance_change,
                max_evals=self.max_evals,
                p_norm=float(line.p.abs().max()),
            )
        else:
            point = armijo(
                lambda t: line(t)[0], line.t0, line.f0, slope0, c1=self.c1, shrink=self.shrink, max_evals=self.max_evals
            )
        t = point.t if point is not None else 0.0
        line.move(t)
        state[self.key("t")] = t
        state[self.key("evaluations")] = state.get(self.key("evaluations"), 0) + line.evaluations
