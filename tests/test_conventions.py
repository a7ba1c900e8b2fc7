"""Every built-in recipe in the three loop conventions: a forward-only closure, the plain loop
(``loss.backward(); opt.step()``) and a torch-style closure (zero, forward, backward, return the loss).

Where :func:`precond.conventions.support` says a recipe runs, it must give the trajectory of the forward-only
closure to round-off (float64, same seed); where it says no, the first step must refuse with a message that
names a convention that works. The README's table must be the one the code derives.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from precond.conventions import CREATE_GRAPH, NO_CLOSURE, NO_GRAPH, YES, support, table
from precond.errors import PipelineError
from precond.recipe import builtin_recipes

ROOT = Path(__file__).resolve().parent.parent
RECIPES = list(builtin_recipes())
STEPS = 3

# Newton-type recipes without damping amplify round-off by the condition number of a tiny network's
# curvature (1e9 and more): compared with damping, which the equality does not depend on
DAMPED = {
    "newton": {"transform.damping": 1e-3},
    "gauss_newton": {"transform.damping": 1e-3},
}
# the plain loop cannot give what these need (a closure to call again, the outputs' graph while the step runs)
PLAIN_REFUSED = {"bfgs", "dfp", "hessian_free", "kbfgs", "lbfgs", "normalized_natural_gradient", "sherman_morrison", "sr1"}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def build(name: str, net: nn.Module) -> precond.Optimizer:
    return precond.build(name, net, likelihood="categorical", set=DAMPED.get(name))


def run(name: str, convention: str, create_graph: bool = False, steps: int = STEPS) -> torch.Tensor:
    x, y = data()
    net = model()
    opt = build(name, net)
    for _ in range(steps):
        if convention == "closure":

            def forward_only() -> tuple[torch.Tensor, torch.Tensor]:
                out = net(x)
                return F.cross_entropy(out, y), out

            opt.step(forward_only)
        elif convention == "plain":
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward(create_graph=create_graph)
            opt.step()
        else:

            def torch_style() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward(create_graph=create_graph)
                return loss

            opt.step(torch_style)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("convention", ["plain", "torch"])
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_or_is_refused(name: str, convention: str) -> None:
    s = support(name)
    verdict = s.plain if convention == "plain" else s.torch_closure
    if verdict in (NO_CLOSURE, NO_GRAPH):
        with pytest.raises(PipelineError, match=r"opt\.step\(closure\)"):
            run(name, convention, steps=1)
        return
    create_graph = verdict == CREATE_GRAPH
    if create_graph:  # without the differentiable gradient: a refusal saying how to give it
        with pytest.raises(PipelineError, match=re.escape("loss.backward(create_graph=True)")):
            run(name, convention, steps=1)
    else:
        assert verdict == YES
    reference = run(name, "closure")
    got = run(name, convention, create_graph=create_graph)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-11)
    assert not torch.equal(reference, run(name, "closure", steps=STEPS - 1)), "the steps must move the parameters"


def test_the_plain_loop_refuses_only_what_needs_a_closure() -> None:
    refused = {name for name in RECIPES if support(name).plain.startswith("no")}
    assert refused == PLAIN_REFUSED
    assert {name for name in RECIPES if support(name).torch_closure.startswith("no")} == {"hessian_free", "normalized_natural_gradient"}


def test_readme_table_is_the_generated_one() -> None:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- conventions:start -->\n(.*?)<!-- conventions:end -->", text, re.S)
    assert found, "README.md must carry the conventions table between <!-- conventions:start/end --> markers"
    assert found.group(1) == table(), "regenerate it: python -m precond.conventions"


def test_outputs_recipes_need_the_module_in_the_plain_loop() -> None:
    x, y = data()
    net = model()
    opt = precond.build("kfac", net, likelihood="categorical")
    params_only = precond.build("sophia_g", list(net.parameters()), likelihood="categorical", set={"curvature.every": 1})
    F.cross_entropy(net(x), y).backward()
    opt.step()
    with pytest.raises(PipelineError, match="pass the nn.Module to precond.build"):
        params_only.step()


def test_set_reaches_rules_by_name_and_a_single_transform() -> None:
    net = model()
    opt = precond.build("kfac", nn.Sequential(net, nn.LayerNorm(3).double()), likelihood="categorical",
                        set={"rules.fallback.recipe.lr": 3e-4, "transform.damping": 5e-3})
    lrs = {g["rule"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"default": 1e-2, "fallback": 3e-4}
    assert opt.recipe.transform[0].damping == 5e-3
    with pytest.raises(precond.RecipeError, match="no such"):
        precond.build("kfac", net, set={"rules.nonexistent.recipe.lr": 1.0})
