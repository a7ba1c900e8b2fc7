"""Generalized Gauss-Newton ``Jᵀ H_L J``: exact, or Monte-Carlo from sampled labels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from precond.autodiff import per_sample_vjp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.errors import PipelineError
from precond.curvature.common import dense_of_factor, diagonal_of_factor, outputs_of, sampled_output_grads
from precond.curvature.products import graph_ggn_vp, outer_vp
from precond.layers import KroneckerEstimate, Recorder, fill_output_grads, filled_output_grads, output_grads_by_backprop
from precond.registry import register


@register("curvature", "gauss_newton")
class GaussNewton(Curvature):
    """The GGN of the batch-mean loss, ``(1/M) Σ_m J_mᵀ H_m J_m`` (``H_m``: the loss Hessian in the outputs).

    Exact (``mc_samples: 0``, default): ``H_m = S_m S_mᵀ`` from the
    likelihood's square-root factor, one backward product per sample and
    column of ``S`` (``M·C`` products, batched): exact diagonals and dense
    matrices for small models. Monte-Carlo (``mc_samples: k``): ``S_m``
    replaced by ``k`` gradients ``∇_f ℓ_m(ŷ)`` at sampled labels, scaled by
    ``1/√k`` (unbiased). Needs ``(loss, outputs)`` and a likelihood.

    ``kronecker`` (KFLR, Botev et al. 2017): ``G`` from backpropagating each
    column of ``S`` (or each sampled gradient) from the outputs to the
    recorded layer outputs; exact for the layer block of a deep linear network.
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full", "kronecker"})
    kronecker_factors: ClassVar[frozenset[str]] = frozenset({"layer"})

    mc_samples: int = Field(0, ge=0, description="0: exact; k > 0: Monte-Carlo with k sampled labels per sample")
    chunk: int = Field(256, ge=1, description="backward products computed per pass (memory bound)")

    def nonnegative(self) -> bool:
        return True

    def needs(self) -> Needs:
        return Needs(outputs=True, likelihood=True)  # the likelihood's Hessian in the outputs (or sampled labels)

    def _factor(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        ev = ctx.evaluation
        if self.mc_samples:
            grads, out, m = sampled_output_grads(ev, "gauss_newton", self.mc_samples)
            return per_sample_vjp(out, params, grads / self.mc_samples**0.5, self.chunk), m
        out, m = outputs_of(ev, "gauss_newton")
        sqrt = ev.require_likelihood("gauss_newton").hessian_sqrt(out.detach())  # (..., C, K)
        return per_sample_vjp(out, params, sqrt.reshape(m, out.shape[-1], -1), self.chunk), m

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            factor, m = self._factor(ctx, scope)
            return diagonal_of_factor(factor, m)

        return DiagonalEstimate(values=self.shared(ctx, "diagonal", compute))

    def kronecker(self, ctx: GroupStep, recorder: Recorder | None) -> KroneckerEstimate:
        if recorder is None:
            raise PipelineError("gauss_newton fills Kronecker layer factors only (KFLR); Shampoo's gradient factors come from empirical_fisher")
        filled = filled_output_grads(recorder)  # taken during the user's backward passes (plain loop)
        if filled is not None:
            return filled
        ev = ctx.evaluation
        key = (id(self), "kronecker")
        if key not in ev.memo:  # one batched backward per column serves every layer of every param group
            out, cot, weight = self._cotangents(ev)
            ev.memo[key] = KroneckerEstimate(output_grads_by_backprop(recorder, out, cot, self.chunk), weight=weight)
        return ev.memo[key]

    def _cotangents(self, ev: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The outputs, the columns ``S_m/M`` of the likelihood's Hessian root (or sampled-label gradients), and
        the weight of ``G``."""
        if self.mc_samples:
            grads, out, m = sampled_output_grads(ev, "gauss_newton", self.mc_samples)  # (M, C, k)
            return out, (grads / m).permute(2, 0, 1).reshape(self.mc_samples, *out.shape), m / self.mc_samples
        out, m = outputs_of(ev, "gauss_newton")
        sqrt = ev.require_likelihood("gauss_newton").hessian_sqrt(out.detach())  # (..., C, K)
        return out, (sqrt / m).movedim(-1, 0), float(m)

    def record_output_grads(self, ctx: GroupStep, recorder: Recorder) -> None:
        """During a backward pass the user runs: this forward pass's KFLR output gradients, kept in ``recorder``."""
        out, cot, weight = self._cotangents(ctx.evaluation)
        fill_output_grads(recorder, out, cot, out.numel() // out.shape[-1], weight, self.chunk)

    def full(self, ctx: GroupStep) -> torch.Tensor:
        factor, m = self._factor(ctx, ctx.params)
        return dense_of_factor(factor, m)

    def matvec(self, ctx: GroupStep, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``G v`` without forming ``G`` (matrix-free solvers): ``J v`` by double backward through the
        closure's outputs, the likelihood's ``hessian_vp`` (exact) or the sampled output gradients
        (Monte-Carlo, drawn once per step), then ``Jᵀ``."""
        ev = ctx.evaluation
        if not self.mc_samples:
            return graph_ggn_vp(ev, ctx.params, vectors, "gauss_newton")
        key = (id(self), "matvec.samples")
        if key not in ev.memo:
            ev.memo[key] = sampled_output_grads(ev, "gauss_newton", self.mc_samples)[0] / self.mc_samples**0.5
        return outer_vp(ev, ctx.params, ev.memo[key], vectors, "gauss_newton")
