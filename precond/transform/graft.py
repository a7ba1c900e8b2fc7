"""``graft``: the direction of this recipe with each tensor's step norm taken from another method."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from precond.block import DiagonalEstimate, Direction, GroupStep, Served, Transform
from precond.errors import PipelineError
from precond.registry import register
from precond.structure.diagonal import accumulate_
from precond.transform.spectral import diagonal_power, float32_damping


@register("transform", "graft")
class Graft(Transform):
    """Grafting (Agarwal, Anil, Hazan, Koren & Zhang 2020): ``d · ‖u‖ / ‖d‖`` per parameter tensor.

    ``d`` is the direction built so far (e.g. Shampoo's ``L^(-1/4) G R^(-1/4)``);
    ``u`` is the step direction of the grafted method on the same gradient
    ``g`` (after ``l2`` decay), with its own state: ``sgd``: ``u = g``;
    ``adagrad``: ``u = g / (sqrt(Σ g²) + eps)`` (torch.optim.Adagrad, sum from
    ``init``); ``adam``: ``u = g / (sqrt(v / (1 - β₂ᵗ)) + eps)`` with
    ``v = β₂ v + (1-β₂) g²`` (Adam's second moment without its first,
    Distributed Shampoo's ``AdamGraftingConfig``; momentum belongs in the
    recipe's momentum block, after the graft as in google-research's
    scalable Shampoo). Place it after the spectral transform. ``d = 0`` stays 0.

    Before its ``start`` the direction is ``u`` itself: the grafted method runs alone, as before Distributed
    Shampoo's ``start_preconditioning_step`` (its statistic is updated from step 1). The spectral transforms
    of its pipeline must have the same ``start`` (a ``kronecker`` structure preconditions nothing before it).
    """

    linear: ClassVar[bool] = False

    def gathers(self) -> bool:
        return True  # a norm or a matrix function of each whole parameter: under FSDP2 at the parameter's owner

    source: Literal["sgd", "adagrad", "adam"] = Field("adam", description="the method whose per-tensor step norm is used")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="adam: EMA decay of the squared gradient")
    eps: float = Field(1e-8, ge=0.0, description="adagrad/adam: added to the root of the statistic; 0, or a normal float32 (>= 1.2e-38)")
    bias_correction: bool = Field(True, description="adam: divide the second moment by 1 - beta2^t")
    init: float = Field(0.0, ge=0.0, description="adagrad: initial accumulator value")

    @field_validator("eps")
    @classmethod
    def _normal_eps(cls, value: float) -> float:
        return float32_damping(value, "eps")

    def _statistic(self, ctx: GroupStep) -> list[torch.Tensor]:
        key = self.key(f"graft_{self.source}")
        for p, s in zip(ctx.params, ctx.states):
            if key not in s:
                s[key] = torch.full_like(p, self.init if self.source == "adagrad" else 0.0, memory_format=torch.preserve_format)
                s[self.key("graft_steps")] = 0
        for s in ctx.states:
            s[self.key("graft_steps")] += 1
        return ctx.gathered(key)

    def reference(self, ctx: GroupStep) -> list[torch.Tensor]:
        """The grafted method's direction ``u`` for this step (updates its state): the diagonal structure's
        accumulation and inverse square root, on the grafted method's own statistic."""
        grads = ctx.grads
        if self.source == "sgd":
            return list(grads)
        stat = self._statistic(ctx)
        accumulate_(stat, DiagonalEstimate(roots=grads), "sum" if self.source == "adagrad" else "ema", self.beta2)
        divisors = None
        if self.source == "adam" and self.bias_correction:
            divisors = [1.0 - self.beta2 ** s[self.key("graft_steps")] for s in ctx.states]
        return diagonal_power(stat, divisors, Direction(list(grads)), 2.0, self.eps, True).materialize().tensors

    def stage(self, served: Served) -> Graft:
        for i, t in enumerate(served.pipeline.transforms):
            if t.spectral and t.start != self.start:
                raise PipelineError(
                    f"transform 'graft' has start {self.start} and transform {i} '{t.name}' start {t.start}: before the "
                    "start of the preconditioner the grafted method takes the step alone (Distributed Shampoo's "
                    "start_preconditioning_step), so both need the same start"
                )
        return self

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        reference = self.reference(ctx)
        if ctx.step < self.start:  # the grafted method alone
            return Direction(reference, 1.0, self.source != "sgd")  # sgd's u is the gradient itself: not ours
        d = direction.materialize()
        ref = torch._foreach_norm(reference)
        own = torch._foreach_norm(d.tensors)
        factors: list[Any] = [torch.where(n > 0, r / n.clamp_min(torch.finfo(n.dtype).tiny), torch.zeros_like(n)) for r, n in zip(ref, own)]
        torch._foreach_mul_(d.tensors, factors)
        return d
