from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)  # tiny models: threads only add contention


def make_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def make_batches(dtype: torch.dtype = torch.float64, n: int = 50, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch[0])
    return F.cross_entropy(out, batch[1]), out


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture
def mlp_pair():
    m = make_mlp()
    return m, copy.deepcopy(m)


class TorchAdapter:
    """Test-only: gives a torch optimizer the precond ``step(closure)`` contract."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults

    def step(self, closure):
        def backward_closure():
            self.inner.zero_grad()
            out = closure()
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss

        return self.inner.step(backward_closure)
