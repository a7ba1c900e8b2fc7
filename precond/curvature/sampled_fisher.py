"""Sampled (true) Fisher: backprop of the loss at labels drawn from the model's own prediction."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from precond.autodiff import batched_vjp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.curvature.common import dense_of_factor, diagonal_of_factor, flat_outer_mean, per_sample_factor, sampled_output_grads
from precond.registry import register


@register("curvature", "sampled_fisher")
class SampledFisher(Curvature):
    """The Fisher information, from labels ``ŷ`` sampled from the model (Sophia-G, K-FAC, NGD).

    ``form: batch`` (Sophia's Gauss-Newton-Bartlett estimator): for each of
    ``samples`` draws, ``ĝ = ∇ L(f, ŷ)`` is the gradient of the batch-mean
    loss at the sampled labels, and the estimate is ``B · ĝ ⊙ ĝ`` (full:
    ``B · ĝ ĝᵀ``) averaged over the draws, with ``B = M`` the number of
    samples in the outputs when ``batch_scale`` (so that its expectation is
    the GGN / Fisher of the mean loss), else ``B = 1``. ``form: per_sample``:
    ``(1/M) Σ_m ∇ℓ_m(ŷ_m) ∇ℓ_m(ŷ_m)ᵀ`` averaged over the draws (unbiased,
    lower variance, ``M`` backward products). Labels come from the
    optimizer's seeded generator; needs ``(loss, outputs)`` and a likelihood.
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full"})

    samples: int = Field(1, ge=1, description="label draws per refresh")
    form: Literal["batch", "per_sample"] = Field("batch", description="batch gradient at sampled labels, or per sample")
    batch_scale: bool = Field(True, description="batch form: multiply by M (Sophia's B); unbiased for the GGN")
    chunk: int = Field(256, ge=1, description="per-sample products computed per backward (memory bound)")

    def needs(self) -> Needs:
        return Needs(outputs=True)

    def _batch_grads(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        grads, out, m = sampled_output_grads(ctx.evaluation, "sampled_fisher", self.samples)  # (M, C, S)
        cot = (grads / m).permute(2, 0, 1).reshape(self.samples, *out.shape)  # ∂L(f, ŷ_s)/∂f
        return batched_vjp(out, params, lambda a, b: cot[a:b], self.samples, self.chunk), m

    def _per_sample(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        grads, out, m = sampled_output_grads(ctx.evaluation, "sampled_fisher", self.samples)
        factor = per_sample_factor(out, params, grads / self.samples**0.5, self.chunk)
        return factor, m

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            if self.form == "per_sample":
                factor, m = self._per_sample(ctx, scope)
                return diagonal_of_factor(factor, m)
            rows, m = self._batch_grads(ctx, scope)
            scale = m if self.batch_scale else 1.0
            return [scale * (r * r).mean(0) for r in rows]

        return DiagonalEstimate(values=self.shared(ctx, "diagonal", compute))

    def full(self, ctx: GroupStep) -> torch.Tensor:
        if self.form == "per_sample":
            factor, m = self._per_sample(ctx, ctx.params)
            return dense_of_factor(factor, m)
        rows, m = self._batch_grads(ctx, ctx.params)
        return flat_outer_mean(rows, m if self.batch_scale else 1.0)
