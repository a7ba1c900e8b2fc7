"""The reliability matrix: every recipe on the cases that break optimizers.

Each case is a small model, data and a learning rate built to produce bad
numbers: NaN injected in the loss, exactly zero gradients, a dead ReLU layer,
rank-deficient curvature, huge activations, and two real workloads (a wide
MLP and a deep autoencoder on the digits) at a learning rate 10x too large.
A recipe passes a case when it finishes (possibly skipping steps) or stops
with one of precond's own documented errors; any other exception is a bug.

``python -m precond.reliability`` prints the table; ``bench/reliability.py``
writes it to ``docs/reliability.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from precond.errors import PrecondError


@dataclass
class Case:
    name: str
    description: str
    make: Callable[[], tuple[nn.Module, Callable[[int], Callable[[], Any]], str]]  # model, closure(step), likelihood
    steps: int = 30
    lr_scale: float = 1.0  # multiplies the recipe's own lr


@dataclass
class Outcome:
    recipe: str
    case: str
    status: str  # "finished", "skipped", "stopped", "refused", "crashed"
    detail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status != "crashed"

    def cell(self) -> str:
        if self.status == "finished":
            return "finished"
        if self.status == "skipped":
            return f"finished, {self.detail}"
        detail = self.detail
        if "consecutive steps skipped" in detail and "the last: " in detail:
            count = detail.split(" consecutive", 1)[0]
            detail = f"{count} bad steps in a row, the last at " + detail.split("the last: ", 1)[1]
        short = detail.split(". ")[0]
        return f"{self.status}: {short[:140]}"


def _mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _classification(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: Callable[[int], bool] = lambda t: False):
    def closure_for(step: int) -> Callable[[], Any]:
        def closure():
            out = model(x)
            loss = F.cross_entropy(out, y)
            return (loss * float("nan") if poison(step) else loss), out

        return closure

    return closure_for


def _data(n: int = 32, d: int = 8, c: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def case_nan_injection():
    model = _mlp([8, 16, 4])
    x, y = _data()
    return model, _classification(model, x, y, poison=lambda t: t in (5, 6, 20)), "categorical"


def case_zero_gradient():
    model = _mlp([8, 16, 4])
    x, _ = _data()

    def closure_for(step: int):
        def closure():
            out = model(x)
            return (out * 0.0).sum(), out  # gradients exactly zero

        return closure

    return model, closure_for, "categorical"


def case_dead_layer():
    model = _mlp([8, 16, 16, 4], act=nn.ReLU)
    with torch.no_grad():
        model[2].bias.fill_(-1e3)  # the second hidden layer never activates
    x, y = _data()
    return model, _classification(model, x, y), "categorical"


def case_rank_deficient():
    model = _mlp([8, 16, 4])
    x, y = _data(n=2)
    x = torch.cat([x[:, :4], x[:, :4]], dim=1)  # duplicated features, batch of 2
    return model, _classification(model, x, y), "categorical"


def case_huge_activations():
    model = _mlp([8, 16, 4], act=nn.ReLU)
    x, y = _data()
    return model, _classification(model, x * 1e6, y), "categorical"


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from precond.tasks.digits import digits_arrays

    x_train, _, y_train, _ = digits_arrays()
    return torch.tensor(x_train[:256], dtype=torch.float32), torch.tensor(y_train[:256], dtype=torch.long)


def case_wide_mlp_10x():
    x, y = _digits()
    model = _mlp([64, 1024, 1024, 10])
    return model, _classification(model, x, y), "categorical"


def case_autoencoder_10x():
    x, _ = _digits()
    model = _mlp([64, 48, 32, 16, 32, 48, 64])

    def closure_for(step: int):
        def closure():
            out = model(x)
            return F.mse_loss(out, x), out

        return closure

    return model, closure_for, "gaussian"


CASES = [
    Case("nan-injection", "NaN loss on steps 5, 6 and 20", case_nan_injection),
    Case("zero-gradient", "every gradient exactly zero", case_zero_gradient),
    Case("dead-layer", "a ReLU layer that never activates", case_dead_layer),
    Case("rank-deficient", "batch of 2, duplicated input features", case_rank_deficient),
    Case("huge-activations", "inputs scaled by 1e6", case_huge_activations),
    Case("wide-mlp-10x-lr", "64-1024-1024-10 on digits, lr 10x the recipe's", case_wide_mlp_10x, steps=20, lr_scale=10.0),
    Case("autoencoder-10x-lr", "deep tanh autoencoder on digits, lr 10x", case_autoencoder_10x, steps=30, lr_scale=10.0),
]


def run_case(recipe: str, case: Case) -> Outcome:
    """Run ``recipe`` on ``case``; never raises."""
    import precond

    start = time.perf_counter()
    try:
        model, closure_for, likelihood = case.make()
        base = precond.load_recipe(recipe)
        opt = precond.build(base, model, likelihood=likelihood, lr=base.lr * case.lr_scale)
        for step in range(case.steps):
            opt.step(closure_for(step))
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        if not finite:
            return Outcome(recipe, case.name, "crashed", "non-finite parameters after training", time.perf_counter() - start)
        skipped = opt.guard.skipped
        status = "skipped" if skipped else "finished"
        return Outcome(recipe, case.name, status, f"skipped {skipped} step(s)" if skipped else "", time.perf_counter() - start)
    except PrecondError as exc:
        status = "refused" if "limit" in str(exc) or "max_params" in str(exc) else "stopped"
        return Outcome(recipe, case.name, status, str(exc).replace("\n", " "), time.perf_counter() - start)
    except Exception as exc:  # the failure this matrix exists to catch
        return Outcome(recipe, case.name, "crashed", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)


def matrix(recipes: list[str] | None = None, cases: list[Case] | None = None) -> list[Outcome]:
    from precond.recipe import builtin_recipes

    torch.set_num_threads(1)
    return [run_case(r, c) for r in (recipes or list(builtin_recipes())) for c in (cases or CASES)]


def markdown(outcomes: list[Outcome]) -> str:
    cases = list(dict.fromkeys(o.case for o in outcomes))
    recipes = list(dict.fromkeys(o.recipe for o in outcomes))
    cell = {(o.recipe, o.case): o.cell() for o in outcomes}
    lines = ["| recipe | " + " | ".join(cases) + " |", "| --- " * (len(cases) + 1) + "|"]
    for r in recipes:
        lines.append(f"| {r} | " + " | ".join(cell[(r, c)].replace("|", "/") for c in cases) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(matrix()))
