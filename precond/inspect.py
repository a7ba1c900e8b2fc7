"""What a recipe assembles into: blocks, hyperparameters, needs, state memory and step time."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from precond.optimizer import Optimizer
from precond.recipe import Recipe
from precond.threads import torch_threads


def demo_model(spec: str = "mlp:32,64,10", seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``mlp:IN,HIDDEN...,OUT``: a tanh MLP with a random classification batch of 64 (``task:NAME`` is
    handled by :func:`summarize`: a built-in task's model and data)."""
    kind, _, dims_text = spec.partition(":")
    if kind != "mlp" or not dims_text:
        raise ValueError(f"model spec {spec!r}: expected mlp:IN,HIDDEN,...,OUT (e.g. mlp:32,64,10)")
    try:
        dims = [int(d) for d in dims_text.split(",")]
    except ValueError:
        raise ValueError(f"model spec {spec!r}: the sizes must be integers, e.g. mlp:32,64,10") from None
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"model spec {spec!r}: give at least an input and an output size, all positive")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    x = torch.randn(64, dims[0], generator=gen)
    y = torch.randint(0, dims[-1], (64,), generator=gen)
    return model, x, y


@dataclass
class Summary:
    recipe: Recipe
    blocks: list[tuple[str, str, str]]  # (path, block, needs)
    hyper: dict[str, Any]
    needs: list[str]
    params: int
    state_bytes: int
    param_bytes: int
    ms_per_step: float  # median over the timed steps
    threads: int  # torch CPU threads the steps ran with
    assignment: list[tuple[str, str, str]] = field(default_factory=list)  # (parameter, module type, rule)

    @property
    def state_per_param(self) -> float:
        return self.state_bytes / max(self.param_bytes, 1)


def summarize(
    recipe: Recipe, model_spec: str = "mlp:32,64,10", steps: int = 10, threads: int | None = 1, budget_s: float = 1.0
) -> Summary:
    """Assemble ``recipe`` on a demo model, run a few steps, and measure its state and time.

    The time is the median of up to ``steps`` steps (fewer once they took ``budget_s`` seconds: Newton's
    exact Hessian takes seconds per step) after one or two warm-up steps, with ``threads`` torch CPU
    threads (1, as ``precond train`` uses by default; ``None`` keeps torch's setting)."""
    from precond.api import assign_rules

    if model_spec.startswith("task:"):  # a built-in task's model, data and likelihood
        from precond.tasks import build_task

        task = build_task(model_spec.partition(":")[2], short=True)
        model, likelihood, batches = task.model, task.likelihood, task.train_batches()

        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            return task.closure(next(batches))

    else:
        model, x, y = demo_model(model_spec)
        likelihood = "categorical"

        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            out = model(x)
            return F.cross_entropy(out, y), out

    params = assign_rules(model, recipe) if recipe.rules else list(model.parameters())
    opt = Optimizer(params, recipe, model=model, likelihood=likelihood)
    rule_of = {p: g["rule"] for g in opt.param_groups for p in g["params"]}
    assignment = [(info.name, type(info.module).__name__, rule_of[p]) for p, info in opt.param_info.items() if p in rule_of]

    with torch_threads(threads) as used:
        times = []
        warm = 0
        for _ in range(2):  # warm-up: the first step builds state, hooks and caches; a slow recipe gets one
            start = time.perf_counter()
            opt.step(closure)
            warm += 1
            if time.perf_counter() - start > budget_s / 4:
                break
        spent = 0.0
        while len(times) < steps and (spent < budget_s or not times):
            start = time.perf_counter()
            opt.step(closure)
            times.append(time.perf_counter() - start)
            spent += times[-1]
    ms = 1000 * statistics.median(times) if times else float("nan")
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = [(path, block.describe(), ", ".join(block.needs().names()) or "gradients") for path, block in recipe.blocks()]
    hyper = {k: getattr(recipe, k) for k in Recipe.HYPERPARAMETERS}
    return Summary(
        recipe, blocks, hyper, opt.needs.names() or ["gradients only"], sum(p.numel() for p in model.parameters()),
        state_bytes, param_bytes, ms, used, assignment,
    )
