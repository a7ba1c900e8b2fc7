"""K-BFGS / K-BFGS(L): a transcription of the algorithm (docs/algorithms.md#k-bfgs, Goldfarb, Ren & Bahamou 2020),
the secant equations and the damping inequalities (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from precond.errors import PipelineError

D = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=D)
    return x, torch.randint(0, 3, (n,), generator=g)


def closure_for(model, x, y):
    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    return closure


def bfgs_inverse(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rho = 1.0 / (s @ y)
    eye = torch.eye(len(s), dtype=D)
    return (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)


def reference(model: nn.Module, x, y, steps: int, lr=0.3, lam=0.3, beta=0.9, decay=0.9, tau=1e-5, mu1=0.2):
    """K-BFGS written from the equations for Linear-Tanh-Linear: returns the parameters after each step."""
    w = [p.detach().clone() for p in model.parameters()]  # W1, b1, W2, b2
    n = len(x)
    root = math.sqrt(lam)
    layer_state = [dict(), dict()]
    momentum = [torch.zeros_like(t) for t in w]
    out = []

    def forward(params):
        ps = [p.clone().requires_grad_(True) for p in params]
        a1 = x @ ps[0].T + ps[1]
        h1 = torch.tanh(a1)
        a2 = h1 @ ps[2].T + ps[3]
        loss = F.cross_entropy(a2, y)
        grads = torch.autograd.grad(loss, ps + [a1, a2])
        return [x, h1.detach()], [a1.detach(), a2.detach()], [g.detach() for g in grads]

    for k in range(steps):
        inputs, pre, grads = forward(w)
        new = [t.clone() for t in w]
        for layer in range(2):
            st = layer_state[layer]
            h = torch.cat([inputs[layer], torch.ones(n, 1, dtype=D)], dim=1)
            hh = h.T @ h / n
            eye = torch.eye(hh.shape[0], dtype=D)
            if k == 0:
                st["A"] = hh
                st["Ha"] = torch.linalg.inv(hh + root * eye)
                st["Hg"] = torch.eye(pre[layer].shape[1], dtype=D)
            else:
                st["A"] = beta * st["A"] + (1 - beta) * hh
                s_a = st["Ha"] @ h.mean(0)
                st["Ha"] = bfgs_inverse(st["Ha"], s_a, (st["A"] + root * eye) @ s_a)
            wi, bi = 2 * layer, 2 * layer + 1
            g = torch.cat([grads[wi] + tau * w[wi], (grads[bi] + tau * w[bi]).unsqueeze(1)], dim=1)
            momentum[wi] = 0.9 * momentum[wi] + 0.1 * g[:, :-1]
            momentum[bi] = 0.9 * momentum[bi] + 0.1 * g[:, -1]
            m = torch.cat([momentum[wi], momentum[bi].unsqueeze(1)], dim=1)
            p = st["Hg"] @ m @ st["Ha"]
            new[wi] = w[wi] - lr * p[:, :-1]
            new[bi] = w[bi] - lr * p[:, -1]
        _, pre_new, grads_new = forward(new)
        for layer in range(2):
            st = layer_state[layer]
            s = pre_new[layer].mean(0) - pre[layer].mean(0)
            yy = n * (grads_new[4 + layer].mean(0) - grads[4 + layer].mean(0))
            if "s" in st:
                s, yy = decay * st["s"] + (1 - decay) * s, decay * st["y"] + (1 - decay) * yy
            st["s"], st["y"] = s, yy
            hy = st["Hg"] @ yy
            if s @ yy < mu1 * (yy @ hy):  # Powell
                theta = (1 - mu1) * (yy @ hy) / (yy @ hy - s @ yy)
                s = theta * s + (1 - theta) * hy
            if s @ yy < root * (s @ s):  # Levenberg-Marquardt
                theta = (1 - root) * (s @ s) / (s @ s - s @ yy)
                yy = theta * yy + (1 - theta) * s
            st["Hg"] = bfgs_inverse(st["Hg"], s, yy)
        w = new
        out.append([t.clone() for t in w])
    return out


def test_kbfgs_equals_the_transcribed_algorithm() -> None:
    model, (x, y) = mlp(), data()
    ref = reference(model, x, y, steps=8)
    opt = precond.build("kbfgs", model)
    for k in range(8):
        opt.step(closure_for(model, x, y))
        for p, q in zip(model.parameters(), ref[k]):
            assert torch.allclose(p, q, atol=1e-10, rtol=0), k


def test_secant_equations_and_tight_damping() -> None:
    model, (x, y) = mlp(seed=0), data(seed=1)
    lam = 0.3
    mu1, mu2 = 0.2, math.sqrt(lam)
    opt = precond.build("kbfgs", model, lr=3.0, set={"structure.damping": lam})  # large steps: Powell damping acts too
    powell = lm = 0
    for k in range(12):
        before = {i: {key: v.clone() for key, v in opt.state[model[i].weight].items() if torch.is_tensor(v)} for i in (0, 2)}
        opt.step(closure_for(model, x, y))
        for i in (0, 2):
            st = opt.state[model[i].weight]
            if k == 0:
                continue
            # activation side: the Hessian-action pair satisfies H_a y_a = s_a
            h = torch.cat([x if i == 0 else torch.tanh(model[0](x)).detach(), torch.ones(len(x), 1, dtype=D)], dim=1)
            if i == 0:
                s_a = before[i]["structure.H_a"] @ h.mean(0)
                y_a = (st["structure.A"] + mu2 * torch.eye(5, dtype=D)) @ s_a
                assert torch.allclose(st["structure.H_a"] @ y_a, s_a, atol=1e-10, rtol=0)
            # pre-activation side: the damped pair, from the averaged pair and the previous H_g
            s, yv = st["structure.s_g"], st["structure.y_g"]
            h_prev = before[i]["structure.H_g"]
            hy = h_prev @ yv
            if s @ yv < mu1 * (yv @ hy):
                theta = (1 - mu1) * (yv @ hy) / (yv @ hy - s @ yv)
                s = theta * s + (1 - theta) * hy
                assert float(s @ yv) == pytest.approx(mu1 * float(yv @ hy), rel=1e-10)  # tight
                powell += 1
            if s @ yv < mu2 * (s @ s):
                theta = (1 - mu2) * (s @ s) / (s @ s - s @ yv)
                yv = theta * yv + (1 - theta) * s
                assert float(s @ yv) == pytest.approx(mu2 * float(s @ s), rel=1e-10)  # tight
                lm += 1
            assert float(s @ yv) >= mu2 * float(s @ s) * (1 - 1e-12)
            assert torch.allclose(st["structure.damped_s"], s, atol=1e-12, rtol=0)
            assert torch.allclose(st["structure.damped_y"], yv, atol=1e-12, rtol=0)
            assert torch.allclose(st["structure.H_g"] @ yv, s, atol=1e-10, rtol=0)  # secant
            assert torch.allclose(st["structure.H_g"], bfgs_inverse(h_prev, s, yv), atol=1e-10, rtol=0)
    assert powell >= 1 and lm >= 1


def test_limited_memory_variant() -> None:
    """K-BFGS(L) with H₀ = I and every pair kept equals K-BFGS; with 2 pairs it differs."""
    x, y = data()
    runs = {}
    for name, sets in {"full": {}, "l": {"structure.g_update": "lbfgs"}, "l2": {"structure.g_update": "lbfgs", "structure.memory": 2}}.items():
        model = mlp()
        opt = precond.build("kbfgs", model, set=sets)
        for _ in range(6):
            opt.step(closure_for(model, x, y))
        runs[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if name == "l2":
            assert opt.state[model[0].weight]["structure.mem_s"].shape[0] == 2
    assert torch.allclose(runs["full"], runs["l"], atol=1e-10, rtol=0)
    assert not torch.allclose(runs["full"], runs["l2"], atol=1e-6, rtol=0)


def test_kbfgs_leaves_the_gradients_of_the_step() -> None:
    """The extra pass at the new parameters does not leave its gradients in .grad."""
    model, (x, y) = mlp(), data()
    opt = precond.build("kbfgs", model)
    closure = closure_for(model, x, y)
    ref = mlp()
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    opt.step(closure)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-14, rtol=0)


def test_kbfgs_needs_layers_and_the_module() -> None:
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).to(D)
            self.scale = nn.Parameter(torch.ones(3, dtype=D))

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(PipelineError, match="rule"):
        precond.build("kbfgs", WithScale())
    with pytest.raises(PipelineError, match="nn.Module"):
        precond.build("kbfgs", list(mlp().parameters()))
    model = WithScale()
    opt = precond.build(
        {**precond.load_recipe("kbfgs").to_dict(), "rules": [{"name": "rest", "match": {"names": ["scale"]}, "recipe": "adam"}]}, model
    )
    x, y = data()
    opt.step(lambda: (F.cross_entropy(model(x), y), model(x)))
    assert "structure.H_g" in opt.state[model.lin.weight]
