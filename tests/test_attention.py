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


class Heads(Attention):
    """Two heads, (batch, heads, tokens, d/2): the shape for which CPU picks its fused (flash) kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).reshape(b, t, 2, d // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out(a).mean(1)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", ["adahessian", "sophia_h"])
def test_plain_loop_double_backward_through_sdpa(name: str) -> None:
    """``loss.backward(create_graph=True); opt.step()``: the model given to precond.build runs its forward passes
    with the math kernel, so the user's backward is differentiable again; the same steps as the closure."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=gen)  # float32: the fused CPU kernel's dtype
    y = torch.randint(0, 8, (4,), generator=gen)
    results = []
    for plain in (False, True):
        torch.manual_seed(0)
        model = Heads()
        opt = precond.build(name, model, likelihood="categorical", seed=0)
        for _ in range(3):
            if plain:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward(create_graph=True)
                opt.step()
            else:
                opt.step(lambda: (lambda out: (F.cross_entropy(out, y), out))(model(x)))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert torch.backends.cuda.flash_sdp_enabled()  # the hooks leave the kernel choice as they found it
