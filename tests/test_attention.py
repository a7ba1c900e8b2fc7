"""Recipes that differentiate the gradient again (Hessian-vector products) on a model with
F.scaled_dot_product_attention, whose fused kernels have no double backward: precond runs that forward pass
with the math kernel, so the step works and equals the step of the same model written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond

D = torch.float64


class Attention(nn.Module):
    def __init__(self, d: int = 8, explicit: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.explicit = explicit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.explicit:  # softmax(q kᵀ / √d) v, differentiable twice by construction
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a).mean(1)


@pytest.mark.parametrize("name", ["adahessian", "sophia_h"])
def test_hessian_vector_products_through_sdpa(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=gen, dtype=D)
    y = torch.randint(0, 8, (4,), generator=gen)
    models = []
    for explicit in (False, True):
        torch.manual_seed(0)
        model = Attention(explicit=explicit).to(D)
        opt = precond.build(name, model, likelihood="categorical", seed=0)

        def closure(model=model):
            out = model(x)
            return F.cross_entropy(out, y), out

        for _ in range(3):
            opt.step(closure)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        # the two attentions round differently (the math kernel scales q and k, not their product); Sophia-H's
        # division by a small curvature magnifies that to ~1e-8 after 3 steps
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
