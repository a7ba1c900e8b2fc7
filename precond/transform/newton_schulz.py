"""``newton_schulz``: orthogonalize each matrix of the direction by Newton–Schulz iterations (Muon's step).

For a direction ``U`` viewed as a matrix (a tensor of order > 2 as ``(shape[0], rest)``,
as Muon does for conv kernels) with ``‖U‖_F > 0``::

    X ← U / max(‖U‖_F, eps)           (then σ_max(X) ≤ 1)
    repeat steps times:  S = X Xᵀ;  X ← a X + (b S + c S²) X

with ``X`` the wide orientation (transposed when there are more rows than
columns, so that ``S`` is the small Gram matrix). Each iteration applies the odd
polynomial ``p(σ) = a σ + b σ³ + c σ⁵`` to every singular value and keeps the
singular vectors: with Muon's quintic ``(a, b, c) = (3.4445, −4.7750, 2.0315)`` five
steps map singular values ``σ/‖U‖_F`` from ``[3e-3, 1]`` into ``[0.68, 1.2]``
(the polynomial does not converge to 1 by design; ``(3, −16/5, 6/5)`` would).
Only matrix products: the path that is fast on a GPU, where ``eigh`` and the SVD
are slow and serial. Matrices of the same shape are orthogonalized in one
batched call. ``dtype: bfloat16`` computes as torch.optim.Muon and Keller
Jordan's code do; ``float32``/``float64`` for accuracy; ``auto`` (the default) takes bfloat16 on
accelerators and float32 on the CPU, where bfloat16 products are slow (docs/algorithms.md#newton-schulz).

``scale`` multiplies each result by a factor of its matrix shape ``(A, B)`` (a conv kernel's ``(out, in·kh·kw)``):
``original`` ``sqrt(max(1, A/B))`` (Keller Jordan), ``match_rms_adamw``
``0.2·sqrt(max(A, B))`` (Moonlight: the update RMS of AdamW, so AdamW's lr and
weight decay carry over), ``none`` 1 — as ``adjust_lr_fn`` in torch.optim.Muon.

The parameters it serves must be matrices or of higher order: 1-D ones (biases,
norms' gains) are refused when the optimizer is built, with the rule that routes
them to Adam.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from precond.block import Direction, GroupStep, Served, Transform
from precond.errors import PipelineError
from precond.linalg.newton import newton_schulz
from precond.registry import register

__all__ = ["NewtonSchulz", "newton_schulz", "shape_scale"]  # the kernel lives in precond.linalg.newton

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def shape_scale(shape: torch.Size, scale: str) -> float:
    """The factor of a ``scale`` for a parameter of ``shape``, from the matrix ``(A, B)`` the iteration
    orthogonalizes: ``(shape[0], rest)`` (for a matrix torch.optim.Muon's ``param_shape[:2]``; for a conv
    kernel ``(out, in·kh·kw)``, so that ``match_rms_adamw`` gives it the update RMS 0.2 as well)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if scale == "original":
        return math.sqrt(max(1.0, rows / cols))
    if scale == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


@register("transform", "newton_schulz")
class NewtonSchulz(Transform):
    """Orthogonalize each direction matrix by Newton–Schulz iterations (Muon); matmul only, batched by shape."""

    linear: ClassVar[bool] = False  # normalises: a coefficient does not commute with it

    def gathers(self) -> bool:
        return True  # a norm or a matrix function of each whole parameter: under FSDP2 at the parameter's owner

    coefficients: tuple[float, float, float] = Field(
        (3.4445, -4.7750, 2.0315), description="(a, b, c) of p(x) = a x + b x^3 + c x^5: Muon's quintic; (3, -3.2, 1.2) converges to 1"
    )
    steps: int = Field(5, ge=1, le=100, description="iterations (3 matrix products each)")
    eps: float = Field(1e-7, gt=0.0, description="the Frobenius norm is clamped below at this before dividing")
    dtype: Literal["auto", "bfloat16", "float32", "float64"] = Field(
        "auto",
        description="precision of the iterations; auto: bfloat16 on accelerators (as torch.optim.Muon), float32 on the "
        "CPU, whose bfloat16 matrix products are tens of times slower than float32 ones",
    )
    scale: Literal["original", "match_rms_adamw", "none"] = Field(
        "original", description="shape factor of each result: sqrt(max(1, A/B)), 0.2 sqrt(max(A, B)) (Moonlight), or 1"
    )

    def stage(self, served: Served) -> NewtonSchulz:
        for p in served.params:
            if p.requires_grad and p.dim() < 2:
                info = served.env.info.get(p)
                name = f"parameter '{info.name}'" if info is not None else f"a {p.dim()}-D parameter"
                raise PipelineError(
                    f"transform 'newton_schulz' orthogonalizes matrices; {name} has shape {tuple(p.shape)}. Route "
                    "vectors (biases, norms' gains) to another recipe with a rule, as muon does: rules: "
                    "[{name: vectors, match: {names: ['*.bias']}, recipe: adam}]"
                )
        return self

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        d = direction.materialize()
        work = DTYPES[self.dtype] if self.dtype != "auto" else torch.float32 if d.tensors[0].device.type == "cpu" else torch.bfloat16
        by_shape: dict[tuple[int, ...], list[int]] = {}
        matrices = [t.reshape(t.shape[0], -1) for t in d.tensors]
        for i, m in enumerate(matrices):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        out: list[torch.Tensor] = list(d.tensors)
        for idx in by_shape.values():
            x = matrices[idx[0]] if len(idx) == 1 else torch.stack([matrices[i] for i in idx])
            y = newton_schulz(x, self.coefficients, self.steps, self.eps, work)
            for n, i in enumerate(idx):
                out[i] = (y if len(idx) == 1 else y[n]).reshape(d.tensors[i].shape).to(d.tensors[i].dtype)
        scales = [shape_scale(p.shape, self.scale) for p in ctx.params]
        coef: float | list[float] = scales[0] if all(s == scales[0] for s in scales) else scales
        return Direction(out, coef, True)
