"""Per-parameter rules: every parameter covered by exactly one rule, each rule its own pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import precond
from conftest import loss_of, make_batches, make_mlp, max_diff
from precond.errors import RecipeError

RULED = {
    "name": "adam_with_sgd_biases",
    "lr": 1e-2,
    "curvature": {"type": "empirical_fisher"},
    "structure": {"type": "diagonal", "beta": 0.999},
    "transform": {"type": "inverse_root", "damping": 1e-8, "damping_position": "outside"},
    "momentum": {"type": "ema", "beta": 0.9},
    "rules": [{"name": "biases", "match": {"names": ["*.bias"]}, "recipe": {"lr": 0.05, "transform": {"type": "identity"}}}],
}


def test_rules_route_parameters_and_match_separate_torch_optimizers() -> None:
    a = make_mlp()
    b = copy.deepcopy(a)
    opt = precond.build(RULED, a)
    assert [g["rule"] for g in opt.param_groups] == ["default", "biases"]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    weights = [p for n, p in b.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in b.named_parameters() if n.endswith("bias")]
    adam = torch.optim.Adam(weights, lr=1e-2)
    sgd = torch.optim.SGD(biases, lr=0.05)
    for batch in make_batches(n=20):
        opt.step(lambda: loss_of(a, batch))
        adam.zero_grad()
        sgd.zero_grad()
        loss_of(b, batch)[0].backward()
        adam.step()
        sgd.step()
    assert max_diff(a, b) <= 1e-12


def test_rules_by_module_type_and_builtin_recipe() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    recipe = {"name": "x", "lr": 0.1, "transform": {"type": "identity"},
              "rules": [{"name": "norms", "match": {"modules": ["LayerNorm"]}, "recipe": "adam"}]}
    opt = precond.build(recipe, model)
    by_rule = {g["rule"]: g for g in opt.param_groups}
    assert set(map(id, by_rule["norms"]["params"])) == {id(model[1].weight), id(model[1].bias)}
    assert by_rule["norms"]["lr"] == 1e-3 and by_rule["default"]["lr"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_rule_errors() -> None:
    model = make_mlp()
    bad_step = copy.deepcopy(RULED)
    bad_step["rules"][0]["recipe"]["step"] = {"type": "lr", "lr_decay": 0.1}
    with pytest.raises(RecipeError, match="cannot change the step control"):
        precond.build(bad_step, model)
    bad_name = copy.deepcopy(RULED)
    bad_name["rules"][0]["name"] = "default"
    with pytest.raises(RecipeError, match="'default' is the name"):
        precond.build(bad_name, model)
    with pytest.raises(RecipeError, match="pass the nn.Module"):
        precond.build(RULED, list(model.parameters()))
    typo = copy.deepcopy(RULED)
    typo["rules"][0]["match"] = {"name": ["*.bias"]}
    with pytest.raises(RecipeError, match="unknown key 'name'"):
        precond.build(typo, model)


def test_rules_checkpoint_fingerprint() -> None:
    model = make_mlp()
    opt = precond.build(RULED, model)
    opt.step(lambda: loss_of(model, make_batches(n=1)[0]))
    other = copy.deepcopy(RULED)
    other["rules"][0]["recipe"] = "adam"
    opt2 = precond.build(other, make_mlp())
    with pytest.raises(precond.errors.CheckpointError, match="blocks"):
        opt2.load_state_dict(opt.state_dict())


def test_build_shows_which_rule_each_parameter_got(tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from precond.cli import app

    path = tmp_path / "ruled.yaml"
    path.write_text(yaml.safe_dump(RULED))
    out = CliRunner().invoke(app, ["build", str(path), "--model", "mlp:5,7,3"])
    assert out.exit_code == 0, out.output
    lines = [" ".join(line.split()) for line in out.output.splitlines()]
    assert any("0.weight" in line and "Linear" in line and "default" in line for line in lines)
    assert any("2.bias" in line and "biases" in line for line in lines)
    out = CliRunner().invoke(app, ["build", "adam", "--model", "task:logistic"])
    assert out.exit_code == 0, out.output
