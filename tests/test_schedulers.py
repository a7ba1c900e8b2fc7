"""LR schedulers with precond: OneCycleLR's momentum cycle reaches the momentum block (the param-group value
'momentum', as torch's 'momentum'/'betas[0]'), so precond's adam follows torch.optim.Adam under OneCycleLR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond

D = torch.float64


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 5, generator=gen, dtype=D), torch.randint(0, 3, (64,), generator=gen)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def test_adam_under_one_cycle_equals_torch_adam_under_one_cycle() -> None:
    x, y = data()
    a, b = model(), model()
    ref = torch.optim.Adam(a.parameters(), lr=1e-3)
    opt = precond.build("adam", b)
    assert opt.defaults["momentum"] == 0.9 and all(g["momentum"] == 0.9 for g in opt.param_groups)
    sched_a = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.05, total_steps=30)
    sched_b = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30)
    for _ in range(30):
        for o, m in ((ref, a), (opt, b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        sched_a.step()
        sched_b.step()
        assert opt.param_groups[0]["momentum"] == ref.param_groups[0]["betas"][0]  # the cycle reaches both
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["adam", "kfac", "soap"])
def test_one_cycle_with_its_defaults_trains(name: str) -> None:
    """OneCycleLR's defaults (cycle_momentum=True) need a 'momentum' or 'betas' in the optimizer's defaults."""
    x, y = data(1)
    m = model(1)
    opt = precond.build(name, m, likelihood="categorical")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.defaults["lr"], total_steps=20)

    def closure():
        out = m(x)
        return F.cross_entropy(out, y), out

    first = float(closure()[0].detach())
    seen = set()
    for _ in range(20):
        opt.step(closure)
        sched.step()
        seen.add(round(opt.param_groups[0]["momentum"], 6))
    assert float(closure()[0].detach()) < first and len(seen) > 10  # the momentum moved every step


def test_the_momentum_block_reads_the_group_value() -> None:
    """A momentum of 0 in the group makes heavy-ball SGD plain SGD, whatever the recipe's beta."""
    x, y = data(2)
    a, b = model(2), model(2)
    plain = precond.build("sgd", a, lr=0.1, set={"momentum": {"type": "heavy_ball", "beta": 0.0}})
    cycled = precond.build("sgd", b, lr=0.1, set={"momentum": {"type": "heavy_ball", "beta": 0.9}})
    for g in cycled.param_groups:
        g["momentum"] = 0.0
    for o, m in ((plain, a), (cycled, b)):
        for _ in range(5):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
