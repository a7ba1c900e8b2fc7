"""Hutchinson's diagonal estimator ``z ⊙ Hz`` (AdaHessian, Sophia-H)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from precond.autodiff import batched_hvp
from precond.block import Curvature, DiagonalEstimate, GroupStep, Needs
from precond.registry import register


@register("curvature", "hutchinson")
class Hutchinson(Curvature):
    """``diag(H) ≈ mean_s z_s ⊙ H z_s`` with Rademacher or Gaussian probes ``z`` (unbiased).

    ``H`` is the Hessian of the loss the closure returns (double backward, so
    the closure must not call backward). Probes come from the optimizer's
    seeded generator (saved in its ``state_dict``), one tensor per parameter in
    order. AdaHessian's variants: ``abs`` takes ``|z ⊙ Hz|`` (for Rademacher
    probes, the official ``|Hz|``); ``average`` replaces each entry by the mean
    over its convolution kernel (``kernel``: all dims after the first two of a
    tensor with 3+ dims, the official image code) or over consecutive blocks
    of ``block_size`` entries (``block``); ``average_before_abs`` averages the
    signed products first (fairseq). ``square`` hands the structure ``D ⊙ D``
    (AdaHessian's "Hessian RMS": the structure's EMA is of ``D²``).
    """

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal"})

    def shard_problem(self) -> str | None:
        return ("curvature 'hutchinson' differentiates the gradient again (Hessian-vector products), and under "
                "fully_shard the gradient has no graph: FSDP2 reduce-scatters it outside autograd, so "
                "loss.backward(create_graph=True) leaves each shard's .grad without one (torch 2.13)")

    distribution: Literal["rademacher", "gaussian"] = Field("rademacher", description="probe distribution")
    samples: int = Field(1, ge=1, description="probes per refresh (averaged)")
    abs: bool = Field(False, description="use |z * Hz| (AdaHessian)")
    average: Literal["none", "kernel", "block"] = Field("none", description="spatial averaging of the estimate")
    block_size: int = Field(32, ge=1, description="block length for average: block")
    average_before_abs: bool = Field(False, description="average the signed z * Hz, then take |.| (fairseq AdaHessian)")
    square: bool = Field(False, description="accumulate D * D instead of D (AdaHessian)")
    chunk: int = Field(64, ge=1, description="probes per batched backward")

    @model_validator(mode="after")
    def _order_needs_both(self) -> Hutchinson:
        if self.average_before_abs and not (self.abs and self.average != "none"):
            raise ValueError("average_before_abs needs abs: true and an average")
        return self

    def nonnegative(self) -> bool:
        return self.abs or self.square

    def needs(self) -> Needs:
        return Needs(create_graph=True)

    def reduce_estimates(self, fill: str) -> bool:
        return False  # Hz is averaged over the processes before |.| and squares (estimate)

    def draw_probes(self, params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """``samples`` probes per parameter, ``(samples, *param.shape)``, from ``generator`` in parameter order
        (drawn on the generator's device: the optimizer's is on its parameters' device)."""
        sizes = [p.numel() for p in params]
        n, dtype = sum(sizes), params[0].dtype
        if self.distribution == "rademacher":  # one draw for all parameters, then split
            flat = torch.randint(0, 2, (self.samples, n), generator=generator, dtype=dtype, device=generator.device).mul_(2).sub_(1)
        else:
            flat = torch.randn(self.samples, n, generator=generator, dtype=dtype, device=generator.device)
        return [
            z.reshape(self.samples, *p.shape).to(device=p.device, dtype=p.dtype)
            for z, p in zip(torch.split(flat, sizes, dim=1), params)
        ]

    def _average(self, d: torch.Tensor) -> torch.Tensor:
        """Mean over kernels / blocks, broadcast back to ``d``'s shape; ``d`` is ``(S, *shape)``."""
        if self.average == "kernel":
            if d.dim() <= 3:
                return d
            return d.mean(dim=tuple(range(3, d.dim())), keepdim=True).expand_as(d)
        if self.average == "block":
            flat = d.reshape(d.shape[0], -1)
            n, b = flat.shape[1], self.block_size
            pad = (-n) % b
            padded = torch.nn.functional.pad(flat, (0, pad))
            sums = padded.reshape(d.shape[0], -1, b).sum(-1)
            counts = torch.full((sums.shape[1],), float(b), dtype=d.dtype, device=d.device)
            counts[-1] = b - pad
            means = (sums / counts).repeat_interleave(b, dim=1)[:, :n]
            return means.reshape(d.shape)
        return d

    def estimate(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], generator: torch.Generator, mean_: Any = None
    ) -> list[torch.Tensor]:
        """``z ⊙ Hz`` per parameter; ``mean_`` (several processes) averages ``Hz``, linear in the loss,
        over them first: every process draws the same probes from identically seeded generators."""
        probes = self.draw_probes(params, generator)
        hz = batched_hvp(grads, params, probes, self.chunk)
        if mean_ is not None:
            mean_(hz)
        out = []
        for z, h in zip(probes, hz):
            d = h.mul_(z)  # z ⊙ Hz, in place: hz is ours
            if self.average_before_abs:
                d = self._average(d).abs_()
            else:
                d = self._average(d.abs_() if self.abs else d)
            out.append(d[0] if self.samples == 1 else d.mean(0))
        return out

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        def compute(scope: list[torch.Tensor]) -> list[torch.Tensor]:
            graph = ctx.evaluation.graph_grads or {}
            grads = [graph[p] if p in graph else torch.zeros_like(p) for p in scope]
            ev = ctx.evaluation
            return self.estimate(scope, grads, ev.generator, ev.mean_ if ev.distributed else None)

        d = self.shared(ctx, "diagonal", compute)
        return DiagonalEstimate(roots=d) if self.square else DiagonalEstimate(values=d)
