"""The exact Hessian of the loss, for small models."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from precond.autodiff import batched_hvp, hvp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.errors import PipelineError
from precond.registry import register


@register("curvature", "hessian")
class Hessian(Curvature):
    """The exact Hessian ``∇²L`` of the loss the closure returns (Newton), by double backward.

    One Hessian-vector product per parameter entry (batched), so only for
    small models: above ``max_params`` parameters it refuses with a message
    (use ``hutchinson`` for a diagonal, or a Gauss-Newton / matrix-free form).
    Needs a differentiable gradient (the closure must not call backward).
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full"})

    max_params: int = Field(5000, ge=1, description="refuse models with more parameters than this")
    chunk: int = Field(256, ge=1, description="Hessian-vector products per backward pass")

    def needs(self) -> Needs:
        return Needs(create_graph=True)

    def _dense(self, ctx: GroupStep, params: list[torch.Tensor]) -> torch.Tensor:
        n = sum(p.numel() for p in params)
        if n > self.max_params:
            raise PipelineError(
                f"the exact hessian of {n} parameters needs {n} Hessian-vector products and an {n}x{n} matrix; "
                f"the limit is max_params={self.max_params}. Raise it, or use curvature 'hutchinson' (diagonal) "
                "or 'gauss_newton'"
            )
        graph = ctx.evaluation.graph_grads or {}
        grads = [graph[p] if p in graph else torch.zeros_like(p) for p in params]
        eye = torch.eye(n, dtype=params[0].dtype, device=params[0].device)
        vectors, start = [], 0
        for p in params:
            vectors.append(eye[:, start : start + p.numel()].reshape(n, *p.shape))
            start += p.numel()
        rows = batched_hvp(grads, params, vectors, self.chunk)  # row i: H e_i
        h = torch.cat([r.reshape(n, -1) for r in rows], dim=1)
        return (h + h.T) / 2

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            d = torch.diagonal(self._dense(ctx, scope))
            return [c.reshape(p.shape) for c, p in zip(torch.split(d, [p.numel() for p in scope]), scope)]

        return DiagonalEstimate(values=self.shared(ctx, "diagonal", compute))

    def full(self, ctx: GroupStep) -> torch.Tensor:
        return self._dense(ctx, ctx.params)

    def matvec(self, ctx: GroupStep, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` (the block of ``ctx.params``) by double backward, without forming ``H`` (matrix-free solvers)."""
        graph = ctx.evaluation.graph_grads or {}
        grads = [graph[p] if p in graph else torch.zeros_like(p) for p in ctx.params]
        return hvp(grads, ctx.params, vectors)
