"""Empirical Fisher: outer products of the gradient of the loss at the true labels."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.curvature.common import dense_of_factor, diagonal_of_factor, outputs_of, per_sample_factor
from precond.registry import register


@register("curvature", "empirical_fisher")
class EmpiricalFisher(Curvature):
    """Empirical Fisher: ``g gᵀ`` of the batch gradient, or ``(1/M) Σ ∇ℓ_m ∇ℓ_mᵀ`` per sample.

    ``form: batch`` (Adagrad, Adam, Shampoo): exactly ``g ⊙ g`` (diagonal) or
    ``g gᵀ`` (full) of the batch-mean gradient ``g`` after ``l2`` weight
    decay, no batch-size factor; needs gradients only. ``form: per_sample``:
    ``(1/M) Σ_m ∇ℓ_m ∇ℓ_mᵀ`` over the ``M`` samples of the outputs (see
    :mod:`precond.curvature.common`), from the closure's ``(loss, outputs)``.
    Labels are the true ones: this is not the Fisher information.
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full"})

    form: Literal["batch", "per_sample"] = Field("batch", description="batch gradient g g^T, or per-sample average")
    chunk: int = Field(256, ge=1, description="per-sample products computed per backward (memory bound)")

    def needs(self) -> Needs:
        return Needs(outputs=True) if self.form == "per_sample" else Needs()

    def _per_sample(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        ev = ctx.evaluation
        out, m = outputs_of(ev, "empirical_fisher(form=per_sample)")
        (dl_df,) = torch.autograd.grad(ev.loss_graph, out, retain_graph=True)
        vectors = (dl_df.detach() * m).reshape(m, -1, 1)  # ∇_f ℓ_m, since L = (1/M) Σ ℓ_m
        return per_sample_factor(out, params, vectors, self.chunk), m

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        if self.form == "batch":
            return DiagonalEstimate(roots=ctx.grads)

        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            factor, m = self._per_sample(ctx, scope)
            return diagonal_of_factor(factor, m)

        return DiagonalEstimate(values=self.shared(ctx, "diagonal", compute))

    def full(self, ctx: GroupStep) -> torch.Tensor:
        if self.form == "batch":
            g = torch.cat([t.reshape(-1) for t in ctx.grads])
            return torch.outer(g, g)
        factor, m = self._per_sample(ctx, ctx.params)
        return dense_of_factor(factor, m)
