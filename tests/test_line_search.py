"""``lbfgs`` and the ``line_search`` step against torch.optim.LBFGS, and the line-search conditions (float64).

Mapping: one ``step()`` of the recipe is one iteration of torch.optim.LBFGS. torch with
``max_iter=1`` per ``step()`` (and ``max_eval >= 26``, so that its line search may use 25 trials
after the first, like ``max_evals: 25`` here) takes the same steps as the recipe; so does one torch
``step()`` with ``max_iter=N`` against N recipe steps (its inner loop reuses the line search's last
gradient, the recipe evaluates the closure again at the start of the next step).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from precond.errors import PipelineError

D = torch.float64


class Rosenbrock(nn.Module):
    def __init__(self, start=(-1.5, 2.0)) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(start, dtype=D))

    def loss(self) -> torch.Tensor:
        x, y = self.xy[0], self.xy[1]
        return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def rosenbrock(z: torch.Tensor) -> torch.Tensor:
    return (1 - z[0]) ** 2 + 100 * (z[1] - z[0] ** 2) ** 2


class Bumpy(nn.Module):
    """Non-convex: some L-BFGS pairs have y's <= 0 and are dropped (torch's 1e-10 rule)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("a", torch.randn(12, 7, generator=g, dtype=D))
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=D))
        self.v = nn.Parameter(torch.randn(3, generator=g, dtype=D))

    def loss(self) -> torch.Tensor:
        x = torch.cat([self.w.reshape(-1), self.v])
        return torch.nn.functional.softplus(self.a @ x).mean() + 0.05 * x @ x + 0.8 * torch.sin(2 * x).sum()


def torch_run(model: nn.Module, steps: int, **options) -> list[torch.Tensor]:
    opt = torch.optim.LBFGS(model.parameters(), **options)
    out = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = model.loss()
            loss.backward()
            return loss

        opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def recipe_run(model: nn.Module, steps: int, **build) -> tuple[list[torch.Tensor], precond.Optimizer]:
    opt = precond.build("lbfgs", model, **build)
    out = []
    for _ in range(steps):
        opt.step(model.loss)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out, opt


@pytest.mark.parametrize("memory", [10, 100])
def test_lbfgs_strong_wolfe_reproduces_torch_iterates_on_rosenbrock(memory) -> None:
    ref = torch_run(Rosenbrock(), 40, lr=1, max_iter=1, max_eval=26, history_size=memory, line_search_fn="strong_wolfe")
    ours, opt = recipe_run(Rosenbrock(), 40, set={"structure.memory": memory})
    for k, (a, b) in enumerate(zip(ref, ours)):
        assert torch.allclose(a, b, atol=1e-8, rtol=0), k
    assert torch.allclose(ours[-1], torch.ones(2, dtype=D), atol=1e-4)  # both stop moving once g^T p > -1e-9
    assert opt.state[opt.param_groups[0]["params"][0]]["step.evaluations"] > 40  # some steps needed several trials


def test_n_recipe_steps_equal_one_torch_step_with_n_inner_iterations() -> None:
    (ref,) = torch_run(Rosenbrock(), 1, lr=1, max_iter=24, max_eval=10_000, history_size=100, line_search_fn="strong_wolfe")
    ours, _ = recipe_run(Rosenbrock(), 24)
    assert torch.allclose(ref, ours[-1], atol=1e-8, rtol=0)


def test_lbfgs_without_line_search_reproduces_torch_default() -> None:
    ref = torch_run(Rosenbrock(), 40, lr=1, max_iter=1, history_size=100)
    ours, _ = recipe_run(Rosenbrock(), 40, set={"step": {"type": "lr"}})
    for k, (a, b) in enumerate(zip(ref, ours)):
        assert torch.allclose(a, b, atol=1e-8, rtol=0), k


def test_first_step_rule_and_curvature_skip_match_torch() -> None:
    """torch's first step is min(1, 1/‖g‖₁)·lr along −g, and pairs with y's <= 1e-10 are dropped."""
    model = Bumpy()
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loss = model.loss()
    g0 = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    ref = torch_run(Bumpy(), 14, lr=0.2, max_iter=1, history_size=4)
    ours, opt = recipe_run(model, 14, lr=0.2, set={"step": {"type": "lr"}, "structure.memory": 4})
    assert torch.allclose(ours[0], x0 - 0.2 * min(1.0, 1.0 / float(g0.abs().sum())) * g0, atol=1e-15, rtol=0)
    for k, (a, b) in enumerate(zip(ref, ours)):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), k
    assert opt.state[model.w]["structure.s"].shape[0] == 4  # full ring; 2 of 13 pairs were dropped


def test_strong_wolfe_conditions_hold_at_the_accepted_step() -> None:
    model = Bumpy()
    opt = precond.build("bfgs", model, set={"step.c2": 0.5})
    params = list(model.parameters())
    checked = 0
    for _ in range(10):
        x0 = torch.cat([p.detach().reshape(-1) for p in params])
        f0 = model.loss()
        g0 = torch.cat([t.reshape(-1) for t in torch.autograd.grad(f0, params)])
        f0 = f0.detach()
        opt.step(model.loss)
        t = opt.state[model.w]["step.t"]
        if t == 0:
            continue
        x1 = torch.cat([p.detach().reshape(-1) for p in params])
        p = (x1 - x0) / t
        f1 = model.loss()
        g1 = torch.cat([q.reshape(-1) for q in torch.autograd.grad(f1, params)])
        f1 = f1.detach()
        assert float(f1) <= float(f0) + 1e-4 * t * float(g0 @ p) + 1e-15
        assert abs(float(g1 @ p)) <= 0.5 * abs(float(g0 @ p)) + 1e-12
        checked += 1
    assert checked >= 8


def test_armijo_backtracking_takes_the_first_sufficient_step() -> None:
    model = Rosenbrock()
    opt = precond.build("newton", model, set={"step": {"type": "line_search", "method": "armijo", "shrink": 0.5}})
    shrunk = 0
    for _ in range(8):
        x0 = model.xy.detach().clone()
        f0 = model.loss()
        (g0,) = torch.autograd.grad(f0, [model.xy])
        f0 = f0.detach()
        h = torch.autograd.functional.hessian(rosenbrock, x0)
        p = -torch.linalg.solve(h, g0)
        if float(g0 @ p) >= 0:
            p = -g0
        opt.step(model.loss)
        t = opt.state[model.xy]["step.t"]
        f = lambda s: float(rosenbrock(x0 + s * p))  # noqa: E731
        assert torch.allclose(model.xy.detach(), x0 + t * p, atol=1e-12, rtol=0)
        assert f(t) <= float(f0) + 1e-4 * t * float(g0 @ p)
        if t < 1.0:
            shrunk += 1
            assert f(2 * t) > float(f0) + 1e-4 * 2 * t * float(g0 @ p)
    assert shrunk >= 1


def test_non_descent_direction_falls_back_to_the_negative_gradient() -> None:
    """Newton on cos(x) at x = 0.5 (negative curvature) points uphill; the line search goes downhill."""
    x = nn.Parameter(torch.tensor([0.5], dtype=D))
    opt = precond.build("newton", [x], set={"step": {"type": "line_search"}})
    before = float(torch.cos(x.detach()))
    opt.step(lambda: torch.cos(x).sum())
    assert float(x.detach()) > 0.5 and float(torch.cos(x.detach())) < before
    assert math.isclose(float(x.detach()), 0.5 + opt.state[x]["step.t"] * math.sin(0.5), rel_tol=1e-12)


def test_l2_weight_decay_is_part_of_the_searched_objective() -> None:
    """weight_decay with l2 decay gives the same iterates as writing ½·wd·‖θ‖² into the closure."""
    wd = 0.3
    a, b = Bumpy(), Bumpy()
    opt_a = precond.build("bfgs", a, weight_decay=wd)
    opt_b = precond.build("bfgs", b)
    for _ in range(8):
        opt_a.step(a.loss)
        opt_b.step(lambda: b.loss() + 0.5 * wd * sum(p.pow(2).sum() for p in b.parameters()))
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0)


def test_decoupled_weight_decay_is_refused() -> None:
    model = Bumpy()
    opt = precond.build("bfgs", model, weight_decay=0.1, set={"decay": {"type": "decoupled"}})
    with pytest.raises(PipelineError, match="decay: {type: l2}"):
        opt.step(model.loss)


def test_line_search_needs_a_closure() -> None:
    model = Rosenbrock()
    opt = precond.build("lbfgs", model)
    model.loss().backward()
    with pytest.raises(PipelineError, match="closure"):
        opt.step()
