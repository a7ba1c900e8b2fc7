"""Param groups and rules as torch users expect: ``lr=`` reaches the rules, ``extends:`` changes a built-in recipe
without copying it (rules appended or replaced), ``add_param_group`` follows the rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond

D = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def rules_of(opt: precond.Optimizer) -> dict[str, str]:
    return {opt.param_info[p].name: g["rule"] for g in opt.param_groups for p in g["params"]}


def lrs(opt: precond.Optimizer) -> dict[str, float]:
    return {g["rule"]: g["lr"] for g in opt.param_groups}


def test_lr_scales_the_rules_by_the_same_factor() -> None:
    assert lrs(precond.build("kfac", net(), likelihood="categorical")) == {"default": 1e-2, "fallback": 1e-3}
    assert lrs(precond.build("kfac", net(), likelihood="categorical", lr=0.03)) == pytest.approx({"default": 0.03, "fallback": 3e-3})
    # a rule's own lr given by set= wins over the scaling
    opt = precond.build("kfac", net(), likelihood="categorical", lr=0.03, set={"rules.fallback.recipe.lr": 5e-4})
    assert lrs(opt) == pytest.approx({"default": 0.03, "fallback": 5e-4})


def test_extends_changes_fields_and_appends_or_replaces_rules(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: kfac\n"
        "name: mine\n"
        "structure: {beta: 0.9}\n"  # no type: the base's kronecker structure with one field changed
        "rules:\n"
        "  - {name: head, match: {names: ['3.*']}, recipe: sgd}\n"  # new: before the base's rules
        "  - {name: fallback, match: {unserved: true}, recipe: adamw}\n"  # the base's rule of that name, replaced
    )
    recipe = precond.load_recipe(path)
    base = precond.load_recipe("kfac")
    assert recipe.name == "mine" and recipe.structure.beta == 0.9
    assert recipe.structure.model_dump(exclude={"beta"}) == base.structure.model_dump(exclude={"beta"})
    assert [r.name for r in recipe.rules] == ["head", "fallback"]
    assert recipe.rules[1].recipe.name == "adamw"
    opt = precond.build(recipe, net(), likelihood="categorical")
    assert rules_of(opt) == {"0.weight": "default", "0.bias": "default", "1.weight": "fallback", "1.bias": "fallback",
                             "3.weight": "head", "3.bias": "head"}
    # the same from Python, and a block of another type replaces the base's
    other = precond.build({"extends": "adam", "name": "adam_sgdm", "momentum": {"type": "heavy_ball", "beta": 0.8}}, net())
    assert type(other.recipe.momentum).__name__ == "HeavyBall" and other.recipe.structure == precond.load_recipe("adam").structure


def test_extends_reports_a_bad_base() -> None:
    with pytest.raises(precond.RecipeError, match="no built-in recipe named 'kfca'.*did you mean 'kfac'"):
        precond.build({"extends": "kfca"}, net())
    with pytest.raises(precond.RecipeError, match="extends: expected a built-in recipe name or a path"):
        precond.build({"extends": 3}, net())


def test_add_param_group_follows_the_rules_and_hooks_new_layers() -> None:
    model = net()
    opt = precond.build("kfac", model, likelihood="categorical")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g, dtype=D), torch.randint(0, 3, (32,), generator=g)

    def step() -> float:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()
    model.append(nn.Tanh())
    model.append(nn.Linear(3, 3).double())
    model.append(nn.LayerNorm(3).double())
    opt.add_param_group({"params": [*model[5].parameters(), *model[6].parameters()]})
    assert [(g["rule"], g["lr"]) for g in opt.param_groups[2:]] == [("default", 1e-2), ("fallback", 1e-3)]
    first = step()
    for _ in range(8):
        last = step()
    assert last < first
    state = opt.state[model[5].weight]
    assert any(k.startswith("structure.factor") for k in state)  # the new Linear layer has Kronecker factors
    assert not any(k.startswith("structure.factor") for k in opt.state[model[6].weight])
    with pytest.raises(precond.PipelineError, match="names rule 'nope'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rule": "nope"})


def test_a_recipe_whose_structure_serves_nothing_says_so() -> None:
    with pytest.warns(precond.errors.RecipeWarning, match="kronecker structure serves none.*rule\\(s\\) fallback"):
        precond.build("kfac", nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)), likelihood="categorical")
