"""Quasi-Newton curvature from secant pairs ``s = θ₊ − θ``, ``y = g₊ − g``
(docs/algorithms.md#quasi-newton-updates).

The block remembers the previous parameters and gradient (per-parameter
state) and, on each refresh, forms the pair of the last move. It does not
estimate a matrix from one step: it *refines* the one the structure keeps.

* ``full``: ``full_update(ctx, matrix)`` applies ``update`` to the stored
  matrix: ``bfgs``, ``dfp``, ``sr1`` or ``sherman_morrison`` (the inverse SR1,
  Sherman–Morrison of the direct SR1), on the direct matrix ``B ≈ ∇²L`` or the
  inverse ``H ≈ (∇²L)⁻¹`` as the method defines it (``form: auto``: BFGS, DFP
  and Sherman–Morrison keep ``H``, SR1 keeps ``B``), with the curvature
  guards of scipy's ``HessianUpdateStrategy`` (``skip``, or ``powell``
  damping) and the first-update scaling ``init_scale`` (``auto``: Nocedal &
  Wright (6.20), the matrix is reset to ``(yᵀy/|yᵀs|) I`` or ``(|yᵀs|/yᵀy) I``
  before the first update; a number ``c``: ``c I``).
* ``history`` (L-BFGS): ``observe(ctx)`` hands the pair to the structure.
* ``kbfgs``: the structure forms secant pairs of each layer's pre-activations
  from its hooks (K-BFGS); this block only names the method.

Before the first pair the matrix is ``c₀ I`` (inverse; ``I / c₀`` direct) with
``c₀ = min(1, 1/‖g‖₁)`` (``first_step: l1``, torch.optim.LBFGS's first step)
or ``c₀ = 1`` (``first_step: unit``). The gradient is the one the pipeline
sees, after ``l2`` weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import torch
from pydantic import Field, model_validator

from precond.block import Curvature, GroupStep
from precond.errors import PipelineError
from precond.linalg.quasi_newton import (
    QNUpdate,
    bfgs_direct_update,
    bfgs_inverse_update,
    dfp_direct_update,
    dfp_inverse_update,
    initial_scale,
    sherman_morrison_update,
    sr1_direct_update,
    sr1_inverse_update,
)
from precond.registry import register

INVERSE_BY_DEFAULT = {"bfgs": True, "dfp": True, "sr1": False, "sherman_morrison": True}


@dataclass
class SecantStep:
    """What one step adds: the pair (``None`` on the first step) and the first-step scale ``c₀``."""

    s: torch.Tensor | None
    y: torch.Tensor | None
    first_scale: float  # the inverse-curvature scale to use while no pair exists (1 after the first step)


@register("curvature", "secant")
class Secant(Curvature):
    """Quasi-Newton curvature from successive parameters and gradients (BFGS, DFP, SR1, Sherman–Morrison, L-BFGS).

    Needs gradients only. The ``update``, ``form``, guard and scaling fields
    apply to the ``full`` structure; ``history`` (L-BFGS) uses the pairs with
    its own two-loop recursion (BFGS); ``kbfgs`` forms per-layer pairs of the
    pre-activations itself (K-BFGS).
    """

    fills: ClassVar[frozenset[str]] = frozenset({"full", "history", "kbfgs"})

    update: Literal["bfgs", "dfp", "sr1", "sherman_morrison"] = Field("bfgs", description="the secant update")
    form: Literal["auto", "direct", "inverse"] = Field(
        "auto", description="update the Hessian approximation B (direct) or its inverse H; auto: as the method defines it"
    )
    guard: Literal["skip", "powell", "none"] = Field(
        "skip", description="bfgs/dfp: skip the update when the curvature condition fails, or Powell-damp the pair"
    )
    min_curvature: Union[float, None] = Field(
        None, ge=0.0, description="bfgs/dfp guard threshold (None: 1e-8 for skip, 0.2 for powell)"
    )
    min_denominator: float = Field(1e-8, ge=0.0, description="sr1/sherman_morrison: skip when the denominator is this small")
    init_scale: Union[Literal["auto"], float] = Field(
        "auto", description="matrix before the first update: auto (Nocedal & Wright 6.20) or c (c times I)"
    )
    first_step: Literal["l1", "unit"] = Field(
        "l1", description="before any pair: H = min(1, 1/||g||_1) I (torch.optim.LBFGS) or I"
    )

    @model_validator(mode="after")
    def _check(self) -> Secant:
        if self.update == "sherman_morrison" and self.form == "direct":
            raise ValueError("sherman_morrison is the inverse SR1 update; for the direct SR1 use update: sr1")
        if isinstance(self.init_scale, float) and self.init_scale <= 0:
            raise ValueError("init_scale must be 'auto' or a positive number")
        return self

    @property
    def inverse(self) -> bool:
        """Whether the matrix is the inverse approximation ``H`` (else the direct ``B``)."""
        return INVERSE_BY_DEFAULT[self.update] if self.form == "auto" else self.form == "inverse"

    # --- pairs --------------------------------------------------------------------------

    def reduce_estimates(self, fill: str) -> bool:
        return False  # the pairs come from the parameters and the (DDP-averaged) gradients: the same everywhere

    def pair(self, ctx: GroupStep) -> SecantStep:
        """The pair since the last refresh over ``ctx.params`` (flattened), changing nothing.

        Computed once per step and parameter list (the non-finite check and the update see the same
        tensors); :meth:`observe` also remembers this point.
        """
        return ctx.memo(self, f"pair{tuple(map(id, ctx.params))}", lambda: self._pair(ctx))

    def _pair(self, ctx: GroupStep) -> SecantStep:
        k_param, k_grad = self.key("prev_param"), self.key("prev_grad")
        first = any(k_param not in s for s in ctx.states)
        g = torch.cat([t.reshape(-1) for t in ctx.grads])
        if first:
            s = y = None
            scale = 1.0
            if self.first_step == "l1":
                l1 = float(g.abs().sum())
                scale = min(1.0, 1.0 / l1) if l1 > 0 else 1.0
        else:
            s = torch.cat([(p - st[k_param]).reshape(-1) for p, st in zip(ctx.params, ctx.states)])
            y = g - torch.cat([st[k_grad].reshape(-1) for st in ctx.states])
            scale = 1.0
        return SecantStep(s, y, scale)

    def observe(self, ctx: GroupStep) -> SecantStep:
        """The pair since the last refresh over ``ctx.params`` (flattened), and remember this point."""
        k_param, k_grad = self.key("prev_param"), self.key("prev_grad")
        step = self.pair(ctx)
        for p, grad, st in zip(ctx.params, ctx.grads, ctx.states):
            st[k_param] = p.detach().clone()
            st[k_grad] = grad.detach().clone()
        return step

    # --- full ---------------------------------------------------------------------------

    def full_update(self, ctx: GroupStep, matrix: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """The stored matrix after this step's pair, and whether it is the inverse ``H``."""
        step = self.observe(ctx)
        st = ctx.states[0]
        if matrix is None:
            p = ctx.params[0]
            n = sum(q.numel() for q in ctx.params)
            c0 = step.first_scale if self.inverse else 1.0 / step.first_scale
            matrix = c0 * torch.eye(n, dtype=p.dtype, device=p.device)
        if step.s is None:
            return matrix, self.inverse
        s, y = step.s, step.y
        assert y is not None
        k_count, k_skipped, k_scaled = self.key("updates"), self.key("skipped"), self.key("scaled")
        if not st.get(k_scaled, False) and bool(s.any()) and bool(y.any()):  # scipy: at the first nonzero pair
            form = "inverse" if self.inverse else "direct"
            c = initial_scale(s, y, form) if self.init_scale == "auto" else float(self.init_scale)
            matrix = c * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
            st[k_scaled] = True
        result = self._apply(matrix, s, y)
        if result.status == "skipped":
            st[k_skipped] = st.get(k_skipped, 0) + 1
        else:
            st[k_count] = st.get(k_count, 0) + 1
        return result.matrix, self.inverse

    def _apply(self, matrix: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> QNUpdate:
        if self.update in ("sr1", "sherman_morrison"):
            fn = sr1_inverse_update if self.inverse else sr1_direct_update
            if self.update == "sherman_morrison":
                fn = sherman_morrison_update
            return fn(matrix, s, y, self.min_denominator)
        table = {
            ("bfgs", False): bfgs_direct_update,
            ("bfgs", True): bfgs_inverse_update,
            ("dfp", False): dfp_direct_update,
            ("dfp", True): dfp_inverse_update,
        }
        return table[(self.update, self.inverse)](matrix, s, y, guard=self.guard, min_curvature=self.min_curvature)

    def full(self, ctx: GroupStep) -> torch.Tensor:
        raise PipelineError(
            "curvature 'secant' builds its matrix from successive optimizer steps; it has no one-step "
            "estimate (use it in an optimizer with structure 'full' or 'history')"
        )
