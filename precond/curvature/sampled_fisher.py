"""Sampled (true) Fisher: backprop of the loss at labels drawn from the model's own prediction."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from precond.autodiff import batched_vjp, per_sample_vjp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.errors import PipelineError
from precond.curvature.common import dense_of_factor, diagonal_of_factor, flat_outer_mean, sampled_output_grads
from precond.curvature.products import outer_vp
from precond.layers import KroneckerEstimate, Recorder, fill_output_grads, filled_output_grads, output_grads_by_backprop
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

    ``kronecker`` (K-FAC): ``δ`` for every recorded layer from one extra
    backward of the loss at the sampled labels, from the outputs to the layer
    outputs (one pass per draw), ``G`` averaged over the draws; ``form`` and
    ``batch_scale`` do not apply (the scaling is in :mod:`precond.layers`).
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal", "full", "kronecker"})
    kronecker_factors: ClassVar[frozenset[str]] = frozenset({"layer"})

    def shard_problem(self) -> str | None:
        if self.form == "batch":
            return None  # the sampled-label backward runs as an FSDP pass: ĝ reduce-scattered, squared on the rows
        return ("curvature 'sampled_fisher' with form: per_sample differentiates each sample's loss through the model, "
                "whose parameters fully_shard gathers only for backward passes of the whole batch")

    samples: int = Field(1, ge=1, description="label draws per refresh")
    form: Literal["batch", "per_sample"] = Field("batch", description="batch gradient at sampled labels, or per sample")
    batch_scale: bool = Field(True, description="batch form: multiply by M (Sophia's B); unbiased for the GGN")
    chunk: int = Field(256, ge=1, description="per-sample products computed per backward (memory bound)")

    def nonnegative(self) -> bool:
        return True

    def needs(self) -> Needs:
        return Needs(outputs=True, likelihood=True)  # labels are sampled from the likelihood

    def reduce_estimates(self, fill: str) -> bool:
        return self.form == "per_sample" or fill.startswith("kronecker")  # the batch form averages ĝ itself

    def _batch_grads(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """``ĝ_s`` per draw, ``(S, *param.shape)``, and ``M``; on several processes ``ĝ`` of the global
        batch (averaged before it is squared) and the global ``M``."""
        ev = ctx.evaluation
        grads, out, m = sampled_output_grads(ev, "sampled_fisher", self.samples)  # (M, C, S)
        cot = (grads / m).permute(2, 0, 1).reshape(self.samples, *out.shape)  # ∂L(f, ŷ_s)/∂f
        if ctx.env.comm.fully_sharded:  # backward passes through FSDP: each process its rows of the global ĝ
            model = [q for q in ctx.env.model.parameters() if q.requires_grad] if ctx.env.model is not None else []
            everyone = list(dict.fromkeys([*ev.params, *model]))  # every .grad the pass writes, put back after
            rows = _fsdp_vjp(out, params, cot, everyone, ctx.env.param_of)
            total = ev.rows(m)
            return rows, m if total is None else total[1]
        rows = batched_vjp(out, params, lambda a, b: cot[a:b], self.samples, self.chunk)
        if ev.distributed:
            ev.mean_(rows)
            rows_total = ev.rows(m)
            assert rows_total is not None  # several processes
            m = rows_total[1]
        return rows, m

    def _per_sample(self, ctx: GroupStep, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        grads, out, m = sampled_output_grads(ctx.evaluation, "sampled_fisher", self.samples)
        factor = per_sample_vjp(out, params, grads / self.samples**0.5, self.chunk)
        return factor, m

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        def compute(scope: list[torch.Tensor]) -> list[tuple[torch.Tensor, float | None]]:
            if self.form == "per_sample":
                factor, m = self._per_sample(ctx, scope)
                return [(v, None) for v in diagonal_of_factor(factor, m)]
            return self._squares(*self._batch_grads(ctx, scope))

        return _estimate(self.shared(ctx, "diagonal", compute))

    def _squares(self, rows: list[torch.Tensor], m: int) -> list[tuple[torch.Tensor, float | None]]:
        """The batch form per parameter, ``B · mean_s ĝ_s ⊙ ĝ_s`` (``B = M`` when ``batch_scale``), as ``(value,
        None)``; of one draw ``(ĝ, B)``, its root and scale, which the diagonal structure accumulates with one
        fused ``addcmul`` and no temporary."""
        scale = float(m) if self.batch_scale else 1.0
        if self.samples == 1:
            return [(r[0], scale) for r in rows]
        return [(scale * (r * r).mean(0), None) for r in rows]

    def micro_batch(self, what: str, ctx: GroupStep) -> Any:
        """The batch form squares the batch gradient ``ĝ``: a micro-batch contributes its ``ĝ`` (linear)."""
        if self.form != "batch":
            return super().micro_batch(what, ctx)
        return self._batch_grads(ctx, ctx.params)  # (ĝ, M): on several processes both global

    def combine(self, what: str, parts: list[tuple[int, Any]]) -> Any:
        """``ĝ`` of the step, the sample-weighted mean of the micro-batches', then squared as :meth:`diagonal`
        and :meth:`full` square it."""
        if self.form != "batch":
            return super().combine(what, parts)
        m = sum(mb for _, (_, mb) in parts)
        if len(parts) == 1:  # one forward pass: its ĝ as it is
            rows = parts[0][1][0]
        else:
            rows = [sum(r[i] * (mb / m) for _, (r, mb) in parts) for i in range(len(parts[0][1][0]))]
        if what == "diagonal":
            return _estimate(self._squares(rows, m))
        return flat_outer_mean(rows, m if self.batch_scale else 1.0)

    def kronecker(self, ctx: GroupStep, recorder: Recorder | None) -> KroneckerEstimate:
        if recorder is None:
            raise PipelineError("sampled_fisher fills Kronecker layer factors only; Shampoo's gradient factors come from empirical_fisher")
        filled = filled_output_grads(recorder)  # taken during the user's backward passes (plain loop)
        if filled is not None:
            return filled
        ev = ctx.evaluation
        key = (id(self), "kronecker")
        if key not in ev.memo:  # one extra backward serves every layer of every param group
            out, cot, weight = self._sampled_cotangents(ev)
            ev.memo[key] = KroneckerEstimate(output_grads_by_backprop(recorder, out, cot, self.chunk), weight=weight)
        return ev.memo[key]

    def _sampled_cotangents(self, ev: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The outputs, ``∂L(f, ŷ_s)/∂f`` per draw ``(S, *outputs.shape)``, and the weight of ``G``."""
        grads, out, m = sampled_output_grads(ev, "sampled_fisher", self.samples)  # (M, C, S)
        return out, (grads / m).permute(2, 0, 1).reshape(self.samples, *out.shape), m / self.samples

    def record_output_grads(self, ctx: GroupStep, recorder: Recorder) -> None:
        """During a backward pass the user runs: the sampled-label output gradients of this forward pass's layer
        calls, kept in ``recorder`` for :meth:`kronecker` (the plain loop, a torch-style closure)."""
        out, cot, weight = self._sampled_cotangents(ctx.evaluation)
        fill_output_grads(recorder, out, cot, out.numel() // out.shape[-1], weight, self.chunk)

    def full(self, ctx: GroupStep) -> torch.Tensor:
        if self.form == "per_sample":
            factor, m = self._per_sample(ctx, ctx.params)
            return dense_of_factor(factor, m)
        rows, m = self._batch_grads(ctx, ctx.params)
        return flat_outer_mean(rows, m if self.batch_scale else 1.0)

    def matvec(self, ctx: GroupStep, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``F v`` without forming ``F`` (matrix-free solvers); labels are drawn once per step.

        ``per_sample``: ``(1/M) Σ_m J_mᵀ ĝ_m ĝ_mᵀ J_m v`` (``J v`` by double backward);
        ``batch``: ``B · mean_s ĝ_s (ĝ_sᵀ v)`` from the batch gradients at the sampled labels.
        """
        ev = ctx.evaluation
        key = (id(self), "matvec", tuple(id(p) for p in ctx.params))
        if key not in ev.memo:
            if self.form == "per_sample":
                ev.memo[key] = sampled_output_grads(ev, "sampled_fisher", self.samples)[0] / self.samples**0.5
            else:
                rows, m = self._batch_grads(ctx, ctx.params)
                ev.memo[key] = (torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1), m if self.batch_scale else 1.0)
        if self.form == "per_sample":
            return outer_vp(ev, ctx.params, ev.memo[key], vectors, "sampled_fisher")
        rows, scale = ev.memo[key]
        flat = torch.cat([v.reshape(-1) for v in vectors])
        out = scale * (rows.T @ (rows @ flat)) / rows.shape[0]
        return [c.view_as(p) for c, p in zip(torch.split(out, [p.numel() for p in ctx.params]), ctx.params)]


def _fsdp_vjp(
    out: torch.Tensor, shards: list[torch.Tensor], cot: torch.Tensor, everyone: list[torch.Tensor], param_of: Any
) -> list[torch.Tensor]:
    """Under FSDP2: ``ĝ_s`` per draw as this process's rows ``(S, *shard.shape)``, each from one backward pass of
    the cotangent through the model's retained graph. FSDP gathers the parameters for it and reduce-scatters its
    gradients like the main pass's (the mean over the processes: the global ``ĝ``, nothing left to average);
    the main pass's gradients are put back afterwards."""
    from precond.distributed import local
    from precond.evaluation import own_backward

    params = [param_of(s) for s in shards]
    saved = [p.grad for p in everyone]
    draws: list[list[torch.Tensor]] = []
    try:
        for s in range(cot.shape[0]):
            for p in everyone:
                p.grad = None
            with torch.enable_grad(), own_backward():
                out.backward(cot[s], retain_graph=True)
            draws.append([local(p.grad).detach().clone() if p.grad is not None else torch.zeros_like(x)
                          for p, x in zip(params, shards)])
    finally:
        for p, g in zip(everyone, saved):
            p.grad = g
    return [torch.stack([d[i] for d in draws]) for i in range(len(shards))]


def _estimate(parts: list[tuple[torch.Tensor, float | None]]) -> DiagonalEstimate:
    """Per-parameter ``(value, None)`` or ``(root, scale)`` (:meth:`SampledFisher._squares`) as one estimate."""
    if parts and parts[0][1] is not None:
        return DiagonalEstimate(roots=[r for r, _ in parts], scale=float(parts[0][1]))
    return DiagonalEstimate(values=[v for v, _ in parts])
