"""AdaHessian, Sophia-G and Sophia-H equal their published update rules, transcribed here (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from precond.curvature.hutchinson import Hutchinson
from precond.errors import PipelineError
from precond.likelihood import Categorical

D = torch.float64


class ConvNet(nn.Module):
    """A conv layer (AdaHessian's kernel averaging) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3).to(D)
        self.head = nn.Linear(3 * 2 * 2, 3).to(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 2, 4, 4, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def closure_for(model, batch):
    def closure():
        out = model(batch[0])
        return F.cross_entropy(out, batch[1]), out

    return closure


class ProbeFeed:
    """Deterministic probes injected into Hutchinson, recorded for the reference."""

    def __init__(self, kind: str) -> None:
        self.gen = torch.Generator().manual_seed(42)
        self.kind = kind
        self.drawn: list[list[torch.Tensor]] = []

    def __call__(self, params, generator):
        if self.kind == "rademacher":
            z = [torch.randint(0, 2, (1, *p.shape), generator=self.gen, dtype=D) * 2 - 1 for p in params]
        else:
            z = [torch.randn(1, *p.shape, generator=self.gen, dtype=D) for p in params]
        self.drawn.append([t[0] for t in z])
        return z


class LabelFeed:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(7)
        self.drawn: list[torch.Tensor] = []

    def __call__(self, outputs, generator, samples=None):
        labels = torch.multinomial(torch.softmax(outputs, -1), 1, generator=self.gen).squeeze(-1)
        self.drawn.append(labels)
        return labels.unsqueeze(0)


def grads_with_graph(model, batch):
    out = model(batch[0])
    loss = F.cross_entropy(out, batch[1])
    return torch.autograd.grad(loss, list(model.parameters()), create_graph=True), out


def test_adahessian_equals_official_equations(monkeypatch) -> None:
    feed = ProbeFeed("rademacher")
    monkeypatch.setattr(Hutchinson, "draw_probes", feed)
    model = ConvNet()
    ref = copy.deepcopy(model)
    lr, b1, b2, eps, wd, k = 0.15, 0.9, 0.999, 1e-4, 0.01, 1.0
    opt = precond.build("adahessian", model, weight_decay=wd)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, batch in enumerate(batches(6), start=1):
        opt.step(closure_for(model, batch))
        z = feed.drawn[-1]
        grads, _ = grads_with_graph(ref, batch)
        hz = torch.autograd.grad(grads, params, grad_outputs=z)
        with torch.no_grad():
            for i, p in enumerate(params):
                d = hz[i].abs()
                if d.dim() == 4:
                    d = d.mean(dim=[2, 3], keepdim=True)
                m[i] = b1 * m[i] + (1 - b1) * grads[i].detach()
                v[i] = b2 * v[i] + (1 - b2) * d * d
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                denom = (v[i].sqrt() ** k) / (bc2**0.5) ** k + eps
                p.sub_(lr * (m[i] / bc1 / denom + wd * p))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert len(feed.drawn) == 6


def test_sophia_g_equals_official_code(monkeypatch) -> None:
    feed = LabelFeed()
    monkeypatch.setattr(Categorical, "sample", feed)
    model = ConvNet()
    ref = copy.deepcopy(model)
    lr, b1, b2, rho, wd, k = 1e-2, 0.965, 0.99, 0.04, 0.1, 10
    opt = precond.build("sophia_g", model, lr=lr, likelihood="categorical")
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    data = batches(25)
    for t, batch in enumerate(data, start=1):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, batch))
        # official loop: after the optimizer step of iteration t-1 (0-based) with t-1 % k == k-1,
        # update_hessian() with labels sampled at the new parameters. Here that refresh happens at the
        # start of step t = k+1, 2k+1, ... on that step's batch, at the same parameters.
        out = ref(batch[0])
        if t > 1 and (t - 1) % k == 0:
            labels = feed.drawn[-1]
            g_hat = torch.autograd.grad(F.cross_entropy(out, labels), params, retain_graph=True)
            for i in range(len(params)):
                h[i] = b2 * h[i] + (1 - b2) * g_hat[i] * g_hat[i]
        g = torch.autograd.grad(F.cross_entropy(out, batch[1]), params)
        bs = out.shape[0]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.mul_(1 - lr * wd)
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                ratio = (m[i].abs() / (rho * bs * h[i] + 1e-15)).clamp(max=1)
                p.add_(m[i].sign() * ratio, alpha=-lr)
        if t <= k:  # before the first refresh: a sign step of length lr (after decay)
            for b, p, mm in zip(before, model.parameters(), m):
                assert torch.allclose(p, b * (1 - lr * wd) - lr * torch.sign(mm), atol=1e-15, rtol=0)
        for b, p in zip(before, model.parameters()):
            assert ((p - b * (1 - lr * wd)).abs() <= lr * (1 + 1e-12)).all()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=0), t
    assert len(feed.drawn) == 2  # refreshed on steps 11 and 21 only


def test_sophia_h_equals_paper_algorithm(monkeypatch) -> None:
    feed = ProbeFeed("gaussian")
    monkeypatch.setattr(Hutchinson, "draw_probes", feed)
    model = ConvNet()
    ref = copy.deepcopy(model)
    lr, b1, b2, gamma, eps, wd, k = 1e-2, 0.965, 0.99, 0.01, 1e-12, 0.1, 10
    opt = precond.build("sophia_h", model, lr=lr)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for t, batch in enumerate(batches(22), start=1):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, batch))
        grads, _ = grads_with_graph(ref, batch)
        if t % k == 1:
            z = feed.drawn[-1]
            hz = torch.autograd.grad(grads, params, grad_outputs=z)
            for i in range(len(params)):
                h[i] = b2 * h[i] + (1 - b2) * z[i] * hz[i]
        with torch.no_grad():
            for i, p in enumerate(params):
                m[i] = b1 * m[i] + (1 - b1) * grads[i].detach()
                m_hat = m[i] / (1 - b1**t)
                p.mul_(1 - lr * wd)
                p.sub_(lr * torch.clamp(m_hat / torch.clamp(gamma * h[i], min=eps), -1, 1))
        for b, p in zip(before, model.parameters()):
            assert ((p - b * (1 - lr * wd)).abs() <= lr * (1 + 1e-12)).all()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert len(feed.drawn) == 3  # steps 1, 11, 21


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", ["adahessian", "sophia_h"])
def test_plain_loop_asks_for_a_differentiable_gradient(name: str) -> None:
    model = ConvNet()
    opt = precond.build(name, model, likelihood="categorical")
    batch = batches(1)[0]
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    with pytest.raises(PipelineError, match=r"loss\.backward\(create_graph=True\)"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward(create_graph=True)
    opt.step()  # as torch-optimizer's AdaHessian
    opt.step(closure_for(model, batch))  # (loss, outputs) works


def test_extra_passes_only_on_refresh_steps(monkeypatch) -> None:
    """Sophia's k = 10: the differentiable gradient / sampled labels are requested on refresh steps only."""
    import precond.optimizer as optimizer_module

    seen = []
    real = optimizer_module.evaluate

    def spy(closure, params, needs, who, *args, **kwargs):
        seen.append((needs.create_graph, needs.outputs))
        return real(closure, params, needs, who, *args, **kwargs)

    monkeypatch.setattr(optimizer_module, "evaluate", spy)
    model = ConvNet()
    h_opt = precond.build("sophia_h", model)
    for batch in batches(12):
        h_opt.step(closure_for(model, batch))
    assert [i + 1 for i, s in enumerate(seen) if s[0]] == [1, 11]
    seen.clear()
    g_opt = precond.build("sophia_g", model, likelihood="categorical")
    for batch in batches(12):
        g_opt.step(closure_for(model, batch))
    assert [i + 1 for i, s in enumerate(seen) if s[1]] == [11]


def test_hutchinson_generator_is_checkpointed() -> None:
    """Probes come from the optimizer's generator, saved in state_dict: a resumed run draws the same probes."""
    data = batches(6)
    a = ConvNet()
    b = copy.deepcopy(a)
    oa = precond.build("adahessian", a, seed=3)
    for batch in data:
        oa.step(closure_for(a, batch))
    ob = precond.build("adahessian", b, seed=3)
    for batch in data[:3]:
        ob.step(closure_for(b, batch))
    sd = copy.deepcopy(ob.state_dict())
    c = copy.deepcopy(b)
    oc = precond.build("adahessian", c, seed=999)
    oc.load_state_dict(sd)
    for batch in data[3:]:
        oc.step(closure_for(c, batch))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
