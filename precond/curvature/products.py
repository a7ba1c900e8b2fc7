"""Curvature-vector products from the closure's recorded graph (matrix-free solvers).

The matrix-free form of the ``full`` structure (``solver: cg``) never builds
a matrix: it asks the curvature block for ``C v`` (``matvec(ctx, vectors)``).
The closure hides the model inputs, so the Jacobian products here work from
the graph of the outputs it returned (see :mod:`precond.curvature.common` for
the scaling conventions):

* ``J v`` by the double-backward trick: ``w(u) = Jᵀu`` is built once with
  ``create_graph`` for a dummy ``u``; since ``w`` is linear in ``u``,
  ``∂(vᵀw)/∂u = J v`` for every ``v`` (one backward pass per product);
* ``Jᵀ u`` by a plain backward pass through the outputs.

A GGN-vector product is then ``Jᵀ (H_L (J v)) / M``; a Fisher-type product
with per-sample vectors ``u_mk`` is ``(1/M) Σ_m J_mᵀ Σ_k u_mk (u_mkᵀ J_m v)``.
The linearisation is built once per step and parameter set (``Evaluation.memo``).
"""

from __future__ import annotations

import torch

from precond.autodiff import gauss_newton_product
from precond.curvature.common import outputs_of
from precond.evaluation import Evaluation


class Linearization:
    """``J v`` and ``Jᵀ u`` for the outputs ``out`` with respect to ``params``."""

    def __init__(self, out: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.out = out
        self.params = params
        with torch.enable_grad():
            self.u = torch.zeros_like(out, requires_grad=True)
            jtu = torch.autograd.grad(out, params, self.u, create_graph=True, allow_unused=True)
        self.live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        self.jtu = [jtu[i] for i in self.live]

    def jvp(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """``J v``, shaped like the outputs (zeros if the outputs do not depend on ``params``)."""
        if not self.live:
            return torch.zeros_like(self.out)
        (jv,) = torch.autograd.grad(self.jtu, self.u, [vectors[i] for i in self.live], retain_graph=True)
        return jv.detach()

    def vjp(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        """``Jᵀ u`` for ``u`` shaped like the outputs, one tensor per parameter."""
        grads = torch.autograd.grad(
            self.out, self.params, cotangent, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        return [g.detach() for g in grads]


def linearization(ev: Evaluation, params: list[torch.Tensor], who: str) -> tuple[Linearization, int]:
    """The step's linearisation of the closure outputs in ``params`` (built once), and ``M``."""
    key = ("linearization", tuple(id(p) for p in params))
    if key not in ev.memo:
        out, m = outputs_of(ev, who)
        ev.memo[key] = (Linearization(out, params), m)
    return ev.memo[key]


def graph_ggn_vp(ev: Evaluation, params: list[torch.Tensor], vectors: list[torch.Tensor], who: str) -> list[torch.Tensor]:
    """``(1/M) Σ_m J_mᵀ H_m J_m v`` with ``H_m`` the likelihood's loss Hessian in the outputs, from the step's
    recorded graph (:func:`precond.autodiff.ggn_vp` is the same product from a functional call of the model)."""
    lin, _ = linearization(ev, params, who)
    return gauss_newton_product(lin.out.detach(), lin.jvp(vectors), lin.vjp, ev.require_likelihood(who))


def outer_vp(
    ev: Evaluation, params: list[torch.Tensor], factors: torch.Tensor, vectors: list[torch.Tensor], who: str
) -> list[torch.Tensor]:
    """``(1/M) Σ_m J_mᵀ U_m U_mᵀ J_m v`` for per-sample output vectors ``U`` of shape ``(M, C, K)``."""
    lin, m = linearization(ev, params, who)
    jv = lin.jvp(vectors).reshape(m, -1)  # (M, C)
    coef = torch.einsum("mck,mc->mk", factors, jv)
    w = torch.einsum("mck,mk->mc", factors, coef).reshape(lin.out.shape)
    return lin.vjp(w / m)
