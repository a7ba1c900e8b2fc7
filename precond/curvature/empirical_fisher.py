"""Empirical Fisher: outer products of the gradient of the loss at the true labels."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from precond.autodiff import per_sample_vjp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.curvature.common import dense_of_factor, diagonal_of_factor, outputs_of
from precond.curvature.products import outer_vp
from precond.layers import KroneckerEstimate, Recorder, captured_output_grads
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

    ``kronecker``: layer factors take ``δ`` from the main backward (tensor
    hooks on the recorded layer outputs; tf-kfac's "empirical" mode), scaled
    by the sample count of the closure's outputs; gradient factors (Shampoo)
    are Gram matrices of the batch gradient. ``form`` does not apply.

    ``probe`` (PSGD-Kron): ``h = g``, the batch gradient, of the probe pair
    ``(v, h)`` whose ``E[h hᵀ]`` the structure whitens (it draws ``v``).
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full", "kronecker", "probe"})
    kronecker_factors: ClassVar[frozenset[str]] = frozenset({"layer", "gradient"})
    capture_output_grads: ClassVar[bool] = True  # δ comes from the main backward

    form: Literal["batch", "per_sample"] = Field("batch", description="batch gradient g g^T, or per-sample average")
    chunk: int = Field(256, ge=1, description="per-sample products computed per backward (memory bound)")

    def nonnegative(self) -> bool:
        return True

    def needs(self) -> Needs:
        return Needs(outputs=True) if self.form == "per_sample" else Needs()

    def shard_problem(self) -> str | None:
        if self.form == "batch":
            return None  # g ⊙ g of each shard of the (reduce-scattered, global) gradient
        return "curvature 'empirical_fisher' with form: per_sample differentiates each sample's loss through the model"

    def reduce_estimates(self, fill: str) -> bool:
        # g g^T and Shampoo's Gram matrices come from the (DDP-averaged) gradients; per-sample
        # products and K-FAC's layer factors from this process's batch
        return fill == "kronecker.layer" or (fill not in ("kronecker.gradient", "probe") and self.form == "per_sample")

    def _per_sample(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        ev = ctx.evaluation
        out, m = outputs_of(ev, "empirical_fisher(form=per_sample)")
        dl_df = ev.loss_output_grad("empirical_fisher(form=per_sample)")
        vectors = (dl_df.detach() * m).reshape(m, -1, 1)  # ∇_f ℓ_m, since L = (1/M) Σ ℓ_m
        return per_sample_vjp(out, params, vectors, self.chunk), m

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        if self.form == "batch":
            return DiagonalEstimate(roots=ctx.grads)

        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            factor, m = self._per_sample(ctx, scope)
            return diagonal_of_factor(factor, m)

        return DiagonalEstimate(values=self.shared(ctx, "diagonal", compute))

    def probe(self, ctx: GroupStep) -> list[torch.Tensor]:
        """``h`` of PSGD's probe pair: the batch gradient (after ``l2`` decay), whatever ``form`` says."""
        return ctx.grads

    def kronecker(self, ctx: GroupStep, recorder: Recorder | None) -> KroneckerEstimate:
        if recorder is None:
            return KroneckerEstimate(gradients=ctx.grads)
        ev = ctx.evaluation
        m = ev.samples("empirical_fisher (Kronecker layer factors)")
        scale = ev.grad_scale or 1.0  # the captured gradients are of the loss GradScaler scaled
        return KroneckerEstimate(captured_output_grads(recorder), weight=float(m) / scale**2)

    def full(self, ctx: GroupStep) -> torch.Tensor:
        if self.form == "batch":
            g = torch.cat([t.reshape(-1) for t in ctx.grads])
            return torch.outer(g, g)
        factor, m = self._per_sample(ctx, ctx.params)
        return dense_of_factor(factor, m)

    def matvec(self, ctx: GroupStep, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``C v`` without forming ``C`` (matrix-free solvers): ``g (gᵀv)`` (batch), or
        ``(1/M) Σ_m J_mᵀ ∇_f ℓ_m ∇_f ℓ_mᵀ J_m v`` (per sample, ``J v`` by double backward)."""
        if self.form == "batch":
            gv = sum((g * v).sum() for g, v in zip(ctx.grads, vectors))
            return [g * gv for g in ctx.grads]
        ev = ctx.evaluation
        key = (id(self), "matvec.output_grads")
        if key not in ev.memo:
            out, m = outputs_of(ev, "empirical_fisher(form=per_sample)")
            dl_df = ev.loss_output_grad("empirical_fisher(form=per_sample)")
            ev.memo[key] = (dl_df.detach() * m).reshape(m, -1, 1)
        return outer_vp(ev, ctx.params, ev.memo[key], vectors, "empirical_fisher(form=per_sample)")
