"""History structure: L-BFGS's limited memory of secant pairs and the two-loop recursion (docs/algorithms.md#l-bfgs).

The last ``memory`` pairs ``(s, y)`` with ``yᵀs > curvature_eps`` (1e-10,
torch.optim.LBFGS's constant; others are dropped) are kept oldest first; the
inverse curvature they define, from ``H₀ = (sᵀy / yᵀy) I`` of the newest pair,
is applied by the two-loop recursion (Nocedal & Wright Alg. 7.4). Before the
first stored pair ``H₀ = I``, except on the very first step, where the
``secant`` block's ``first_step`` scale applies (torch's ``min(1, 1/‖g‖₁)``).

The pairs live in the state of the block's first parameter as ``(k, n)``
tensors (a ring buffer once ``memory`` is reached), so checkpoints carry them.
Only the ``inverse`` transform (undamped: the two-loop product is ``H v``)
applies.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from precond.block import Curvature, Direction, Estimate, GroupStep, Structure, Transform
from precond.errors import PipelineError
from precond.linalg.quasi_newton import two_loop
from precond.registry import register
from precond.structure.full import Scope, flat, partition, secant_estimates, unflat


@register("structure", "history")
class History(Structure):
    """L-BFGS: the ``memory`` most recent secant pairs, applied by the two-loop recursion (``H₀ = sᵀy/yᵀy``)."""

    form: ClassVar[str] = "history"

    memory: int = Field(100, ge=1, description="pairs kept (torch.optim.LBFGS's history_size)")
    curvature_eps: float = Field(1e-10, ge=0.0, description="store a pair only if y's > this")
    scope: Scope = Field("model", description="one history per tensor, per layer, or per param group")

    def supports(self, transform: Transform) -> bool:
        return (
            transform.name == "inverse"
            and getattr(transform, "damping", 0.0) == 0.0
            and getattr(transform, "damping_mode", "add") == "add"
            and getattr(transform, "scale", 1.0) == 1.0
        )

    def recipe_problems(self, curvature: Any) -> list[tuple[str, str]]:
        """Validation, with the recipe (``setup`` checks the same when built without it): secant pairs,
        BFGS's. ``(path in the recipe, message)``."""
        if not callable(getattr(curvature, "observe", None)):
            return [("curvature", f"structure 'history' needs secant pairs; curvature '{curvature.name}' has none (use secant)")]
        if getattr(curvature, "update", "bfgs") != "bfgs":
            return [(
                "curvature.update",
                "structure 'history' is limited-memory BFGS (the two-loop recursion); "
                f"secant update '{curvature.update}' needs structure 'full'",
            )]
        return []

    def blocks(self, ctx: GroupStep) -> list[list[int]]:
        return partition(ctx.params, self.scope, ctx.env.info)

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """This step's secant pair ``(s, y)`` per block (none on the first step)."""
        return secant_estimates(curvature, ctx, self.blocks(ctx), "history block")

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        k_s, k_y, k_rho = self.key("s"), self.key("y"), self.key("rho")
        k_head, k_diag, k_first = self.key("head"), self.key("h_diag"), self.key("first_scale")
        for idx in self.blocks(ctx):
            sub = ctx.part(idx)
            st = sub.states[0]
            step = curvature.observe(sub)  # type: ignore[attr-defined]  # secant pairs: the validator checked the curvature has them
            st[k_first] = step.first_scale
            if step.s is None:
                continue
            s, y = step.s, step.y
            ys = torch.dot(y, s)
            if not bool(ys > self.curvature_eps):
                continue
            if k_s not in st or st[k_s].shape[1] != s.numel():
                st[k_s] = s.new_zeros(0, s.numel())
                st[k_y] = s.new_zeros(0, s.numel())
                st[k_rho] = s.new_zeros(0)
                st[k_head] = 0
            if st[k_s].shape[0] < self.memory:
                st[k_s] = torch.cat([st[k_s], s.unsqueeze(0)])
                st[k_y] = torch.cat([st[k_y], y.unsqueeze(0)])
                st[k_rho] = torch.cat([st[k_rho], (1.0 / ys).reshape(1)])
            else:  # full: overwrite the oldest
                h = st[k_head]
                st[k_s][h] = s
                st[k_y][h] = y
                st[k_rho][h] = 1.0 / ys
                st[k_head] = (h + 1) % self.memory
            st[k_diag] = ys / torch.dot(y, y)

    def pairs(self, state: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The stored ``(s, y, rho)``, oldest first."""
        k_s = self.key("s")
        if k_s not in state:
            return [], [], []
        k = state[k_s].shape[0]
        head = state[self.key("head")] if k == self.memory else 0
        order = [(head + i) % k for i in range(k)]
        s, y, rho = state[k_s], state[self.key("y")], state[self.key("rho")]
        return [s[i] for i in order], [y[i] for i in order], [rho[i] for i in order]

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        if direction.denominator is not None:
            direction = direction.materialize()
        out = list(direction.tensors)
        for idx in self.blocks(ctx):
            sub = ctx.part(idx)
            st = sub.states[0]
            v = flat([direction.tensors[i] for i in idx])
            s, y, rho = self.pairs(st)
            h0 = st[self.key("h_diag")] if s else st.get(self.key("first_scale"), 1.0)
            x = two_loop(v.neg(), s, y, rho, h0)  # two_loop returns −H·(its argument)
            for i, t in zip(idx, unflat(x, sub.params)):
                out[i] = t
        return Direction(out, direction.coef, True)
