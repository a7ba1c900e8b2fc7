"""``kl_clip``: K-FAC's KL clipping of the natural-gradient step, then the learning-rate step
(docs/algorithms.md#kl-clipping)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr

from precond.block import Direction, GroupStep, Served
from precond.linalg.kron import kl_clip_scale
from precond.registry import register
from precond.step.lr import LR


@register("step", "kl_clip")
class KLClip(LR):
    """Shrink the preconditioned direction ``v = f(C) g`` by ``ν = min(1, sqrt(c / (Σ lr² ⟨v, g⟩)))``, then step with ``lr``.

    Ba, Grosse & Martens 2017 §5 as tf-kfac, kfac-pytorch, alecwangcq's
    KFAC-Pytorch and baselines implement it: ``c = max_kl`` is used directly
    (no factor 2), ``⟨v, g⟩ = vᵀ(C + λI)v`` for an exact damped solve, so
    after clipping the predicted squared Fisher norm of the step ``lr·ν·v`` is
    exactly ``c`` when ``ν < 1``. ``ν`` is computed over every param group of
    the recipe's own rule (``scope: default``; parameters routed by rules to
    fallback recipes step with their plain ``lr``, as kfac-pytorch leaves
    unregistered layers to the wrapped SGD) or over all groups (``scope: all``),
    before momentum ``post`` (K-FAC's momentum averages clipped natural
    gradients). ``ν = 1`` when ``Σ lr²⟨v, g⟩ <= 0``. The last ``ν`` is kept in
    the first such parameter's state as ``step.kl_scale`` (fully sharded: in
    each measured group's first parameter's, so that the state's keys do not
    depend on the number of processes; each process sums the terms of its rows
    and of the parameters it owns, then one all-reduce).
    """

    elementwise: ClassVar[bool] = False  # (not LR's) ν is one inner product over every parameter of its groups
    _comm: Any = PrivateAttr(None)  # fully sharded: the processes over which the inner product is summed

    def shard_problem(self) -> str | None:
        return None  # fully sharded: each process sums its rows' and its owned parameters' terms, then one all-reduce

    def stage(self, served: Served) -> KLClip:
        if not served.env.comm.fully_sharded:
            return self
        out = self.model_copy()
        out._comm = served.env.comm
        return out

    max_kl: float = Field(1e-3, gt=0.0, description="the bound c on lr^2 * sum <f(C) g, g> (K-FAC's kl_clip)")
    scope: Literal["default", "all"] = Field("default", description="param groups the clip measures and scales: the recipe's own rule, or all")

    def scale(self, ctxs: list[GroupStep], directions: list[Direction]) -> list[Direction]:
        chosen = [i for i, ctx in enumerate(ctxs) if self.scope == "all" or ctx.group.get("rule", "default") == "default"]
        if not chosen and self._comm is None:
            return directions
        directions = list(directions)
        total = 0.0
        for i in chosen:
            ctx, d = ctxs[i], directions[i].materialize()
            directions[i] = d
            rate = self.rate(ctx)
            rates = rate if isinstance(rate, list) else [rate] * len(ctx.params)
            dots = torch.stack([(v * g).sum() for v, g in zip(d.tensors, ctx.grads)]).tolist()  # one sync, not one per tensor
            total += sum(r * r * dot for r, dot in zip(rates, dots))
        if self._comm is not None:  # fully sharded: every process the same ν (one that owns nothing too)
            total = self._comm.total(total)
        nu = float(kl_clip_scale(total, 1.0, self.max_kl))
        if self._comm is None and chosen:
            ctxs[chosen[0]].states[0][self.key("kl_scale")] = nu
        for i in chosen if self._comm is not None else ():  # at each group's first parameter, wherever its owner is:
            ctx = ctxs[i]  # the state's keys do not depend on the number of processes (a checkpoint reshards)
            if ctx.env.param_of(ctx.params[0]) is ctx.group["params"][0]:
                ctx.states[0][self.key("kl_scale")] = nu
        return [d.scaled(nu) if i in chosen else d for i, d in enumerate(directions)]
