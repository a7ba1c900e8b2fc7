"""Shared pieces of the curvature estimators: per-sample products from the closure's graph.

Conventions (every estimator's docstring refers here). The closure's loss is
the batch mean ``L = (1/M) Σ_m ℓ(f_m, y_m)`` over the ``M`` samples of the
outputs (all leading dimensions: ``(N, C)`` -> ``M = N``, ``(N, T, C)`` ->
``M = N·T``), as the likelihood defines it (``categorical``:
``F.cross_entropy``; ``gaussian``: ``F.mse_loss``). Every estimate is of the
curvature of ``L``: the Hessian ``∇²L``, the GGN ``(1/M) Σ_m J_mᵀ H_m J_m``, the
Fisher ``(1/M) Σ_m E_ŷ[∇ℓ_m(ŷ) ∇ℓ_m(ŷ)ᵀ]`` (equal to the GGN for these
likelihoods), the empirical Fisher ``(1/M) Σ_m ∇ℓ_m ∇ℓ_mᵀ`` (per-sample form)
or ``∇L ∇Lᵀ`` (batch form). Per-sample forms assume the loss is such a mean
of per-sample terms of the outputs (no parameter penalty inside the closure).
"""

from __future__ import annotations

import torch

from precond.evaluation import Evaluation


def outputs_of(ev: Evaluation, who: str) -> tuple[torch.Tensor, int]:
    """The closure's outputs (with graph) and their sample count ``M``."""
    out = ev.require_outputs(who)
    return out, out.numel() // out.shape[-1]


def sampled_output_grads(ev: Evaluation, who: str, samples: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample ``∇_f ℓ_m(ŷ)`` at labels drawn from the model: ``(M, C, samples)``.

    Also returns the outputs and ``M``. Labels come from the optimizer's
    generator; on several processes each draws the random numbers of the whole
    batch and uses its rows, so the labels do not depend on the process count.
    """
    out, m = outputs_of(ev, who)
    lik = ev.require_likelihood(who)
    f = out.detach().requires_grad_(True)
    rows = ev.rows(m)
    if rows is None:
        labels = lik.sample(f.detach(), ev.generator, samples=samples)  # (samples, *target_shape)
    else:
        labels = lik.sample(f.detach(), ev.generator, samples=samples, rows=rows)
    with torch.enable_grad():
        cols = []
        for s in range(samples):
            loss = lik.per_sample_loss(f, labels[s]).sum()
            (g,) = torch.autograd.grad(loss, f)
            cols.append(g.reshape(m, -1))
    return torch.stack(cols, dim=-1), out, m



def diagonal_of_factor(factor: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """``(1/M) Σ_rows v ⊙ v`` for a factor ``V`` (rows ``J_mᵀ u_mk``)."""
    return [(f * f).sum(0) / m for f in factor]


def dense_of_factor(factor: list[torch.Tensor], m: int) -> torch.Tensor:
    """``(1/M) VᵀV`` over the parameters flattened in order."""
    v = torch.cat([f.reshape(f.shape[0], -1) for f in factor], dim=1)
    return v.T @ v / m


def flat_outer_mean(rows: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``scale · mean_s g_s g_sᵀ`` for stacked gradients ``(S, *param.shape)`` per parameter."""
    v = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
    return scale * (v.T @ v) / v.shape[0]
