"""Empirical Fisher: outer products of the gradient of the loss at the true labels."""

from __future__ import annotations

from typing import ClassVar

from precond.block import Curvature, DiagonalEstimate, GroupStep
from precond.registry import register


@register("curvature", "empirical_fisher")
class EmpiricalFisher(Curvature):
    """Empirical Fisher from the batch gradient: ``g gᵀ`` (diagonal ``g ⊙ g``).

    ``g`` is the gradient of the loss the closure returns (after ``l2`` weight
    decay, as in torch.optim's Adam and Adagrad). This is *not* the Fisher
    information (labels are not sampled from the model); it is what
    Adagrad, Adam and Shampoo accumulate. Scaling: exactly ``g ⊙ g`` of the
    batch-mean gradient, no batch-size factor.
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal"})

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        return DiagonalEstimate(roots=ctx.grads)
