"""Validation gaps users reported: each is refused (or warned about) when the recipe is validated, located
at the key in the file, through the API and through ``precond build``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import precond
from precond.api import assign_rules
from precond.cli import app
from precond.errors import PipelineError, RecipeError, RecipeWarning
from precond.recipe import builtin_recipes

# --- helpers -----------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, model: nn.Module | None = None) -> RecipeError:
    """The RecipeError of ``path`` from load_recipe, and the same one from build with a model."""
    with pytest.raises(RecipeError) as info:
        precond.load_recipe(path)
    if model is not None:
        with pytest.raises(RecipeError) as again:
            precond.build(str(path), model)
        assert str(again.value) == str(info.value)
    return info.value


def located(error: RecipeError, path: Path, where: str, pattern: str) -> None:
    """One of the error's problems is at ``path:where`` and its text matches ``pattern``."""
    lines = [str(p) for p in error.problems]
    assert any(line.startswith(f"{path}:{where}: ") and re.search(pattern, line) for line in lines), lines


def cli_refuses(path: Path, *patterns: str) -> str:
    result = CliRunner().invoke(app, ["build", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for pattern in patterns:
        assert re.search(pattern, text), result.output
    return text


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


# --- 1. line search constants ------------------------------------------------------------------------

BFGS = """name: wolfe
lr: 1.0
curvature: {type: secant, update: bfgs, form: inverse}
structure: {type: full}
transform: {type: inverse}
step: {type: line_search, c1: 0.95, c2: 0.1}
"""


def test_wolfe_constants_must_be_ordered(tmp_path: Path) -> None:
    path = write(tmp_path, BFGS)
    error = refused(path, mlp())
    assert len(error.problems) == 1
    located(error, path, "6:27", r"^.*step\.c1: c1 = 0\.95 and c2 = 0\.1: the strong Wolfe conditions need 0 < c1 < c2 < 1")
    assert "e.g. c1: 1.0e-4, c2: 0.9" in str(error)
    cli_refuses(path, rf"{re.escape(str(path))}:6:27: step\.c1: c1 = 0\.95 and c2 = 0\.1: .*0 < c1 < c2 < 1")


def test_wolfe_constants_blame_the_key_that_was_written(tmp_path: Path) -> None:
    only_c1 = write(tmp_path, BFGS.replace("c1: 0.95, c2: 0.1", "c1: 0.95"), "c1.yaml")  # c2 defaults to 0.9
    located(refused(only_c1), only_c1, "6:27", r"step\.c1: c1 = 0\.95 and c2 = 0\.9")
    only_c2 = write(tmp_path, BFGS.replace("c1: 0.95, c2: 0.1", "c2: 1.0e-5"), "c2.yaml")  # c1 defaults to 1e-4
    located(refused(only_c2), only_c2, "6:27", r"step\.c2: c1 = 0\.0001 and c2 = 1e-05")
    cli_refuses(only_c2, r"c2\.yaml:6:27: step\.c2:")


def test_armijo_reads_c1_only(tmp_path: Path) -> None:
    path = write(tmp_path, BFGS.replace("c1: 0.95, c2: 0.1", "method: armijo, c1: 0.5, c2: 0.1"))
    assert precond.load_recipe(path).step.c1 == 0.5  # type: ignore[attr-defined]
    equal = write(tmp_path, BFGS.replace("c1: 0.95, c2: 0.1", "c1: 0.5, c2: 0.5"), "equal.yaml")
    located(refused(equal), equal, "6:27", r"0 < c1 < c2 < 1")


def test_lm_thresholds_and_bounds_must_be_ordered(tmp_path: Path) -> None:
    path = write(tmp_path, NEWTON_LM.replace("step: {type: lm}", "step: {type: lm, lower: 0.9, upper: 0.1}"))
    located(refused(path), path, "6:18", r"step\.lower: lower = 0\.9 and upper = 0\.1: .*lower <= upper is required")
    bounds = write(tmp_path, NEWTON_LM.replace("step: {type: lm}", "step: {type: lm, max_damping: 1.0e-3, min_damping: 1}"), "b.yaml")
    located(refused(bounds), bounds, "6:39", r"step\.min_damping: min_damping = 1 and max_damping = 0\.001")
    cli_refuses(bounds, r"b\.yaml:6:39: step\.min_damping:")


# --- 2. rule patterns that match nothing -------------------------------------------------------------

RULES = """name: ruled
lr: 0.1
transform: {type: identity}
rules:
  - name: norms
    match:
      modules: [BatchNorm2D, LayerNorm]
      names: ["*.bais"]
    recipe: adam
  - name: embeddings
    match: {modules: [Embeding]}
    recipe: sgd
  - name: late
    match: {names: ["1.*"]}
    recipe: sgd
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)


def build_warnings(*args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond.build(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]


def test_rule_patterns_that_look_like_typos_warn_with_location(tmp_path: Path) -> None:
    path = write(tmp_path, RULES)
    with pytest.warns(RecipeWarning) as record:
        precond.build(str(path), Net())
    messages = [str(w.message) for w in record if issubclass(w.category, RecipeWarning)]
    assert record[0].filename == __file__  # pointed at the caller, not at precond
    assert len(messages) == 3, messages  # LayerNorm (a real class this model lacks) and '1.*' (no close name) are quiet
    assert messages[0].startswith(f"{path}:7:17: rules.0.match.modules: rule 'norms': module type 'BatchNorm2D' "
                                  "matches no module of the model (did you mean 'BatchNorm2d'?)")
    assert messages[1].startswith(f"{path}:8:15: rules.0.match.names: rule 'norms': name pattern '*.bais' matches "
                                  "no parameter of the model (did you mean '*.bias'")
    assert messages[2].startswith(f"{path}:11:23: rules.1.match.modules: rule 'embeddings': module type 'Embeding' "
                                  "matches no module of the model (did you mean 'Embedding'?)")
    assert issubclass(RecipeWarning, UserWarning)


def test_shadowed_patterns_warn(tmp_path: Path) -> None:
    text = RULES.replace("BatchNorm2D, LayerNorm", "BatchNorm2d").replace('"*.bais"', '"*.bias"').replace("Embeding", "Embedding")
    text += "  - name: bn\n    match: {modules: [BatchNorm2d]}\n    recipe: sgd\n"
    path = write(tmp_path, text)
    messages = build_warnings(str(path), Net())
    assert messages == [f"{path}:17:23: rules.3.match.modules: rule 'bn': module type 'BatchNorm2d' matches only "
                        "parameters that earlier rules take first (shadowed by rule 'norms'; the first matching rule "
                        "wins); move the rule up or drop the pattern"]


def test_dict_recipes_warn_too_and_correct_patterns_are_quiet() -> None:
    recipe = {"name": "x", "transform": {"type": "identity"},
              "rules": [{"name": "r", "match": {"modules": ["Linaer"]}, "recipe": "adam"}]}
    (message,) = build_warnings(recipe, mlp())
    assert message.startswith("<dict>: rules.0.match.modules: rule 'r': module type 'Linaer' matches no module of the "
                              "model (did you mean 'Linear'?)")
    recipe["rules"][0]["match"] = {"modules": ["Linear"], "names": ["*.bias", "missing.*"]}
    assert build_warnings(recipe, mlp()) == []


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 16)


@pytest.mark.parametrize("model", [mlp, Net, TinyTransformer], ids=["mlp", "conv_bn_embedding", "transformer"])
def test_builtin_recipes_do_not_warn_about_absent_layer_types(model) -> None:
    for name in builtin_recipes():
        recipe = precond.load_recipe(name)
        if not recipe.rules:  # type: ignore[attr-defined]
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", RecipeWarning)
            assign_rules(model(), recipe)


def test_cli_build_warns_about_a_typo(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ntransform: {type: identity}\nrules:\n  - {name: r, match: {modules: [Linaer]}, recipe: adam}\n")
    with pytest.warns(RecipeWarning, match=rf"^{re.escape(str(path))}:4:33: .*'Linaer'.*did you mean 'Linear'"):
        result = CliRunner().invoke(app, ["build", str(path)])
    assert result.exit_code == 0, result.output


# --- 3. values that are NaN at run time --------------------------------------------------------------

ADAM = """name: mine
curvature: {type: empirical_fisher}
structure: {type: diagonal, beta: 0.999}
transform: {type: inverse_root, p: 2, damping: 1.0e-8, damping_position: outside}
momentum: {type: ema, beta: 0.9}
"""


def test_a_vanishing_root_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, ADAM.replace("p: 2", "p: 1.0e-320"))
    error = refused(path, mlp())
    located(error, path, "4:33", r"transform\.p: expected greater than or equal to 0\.25 \(got 1e-320\)")
    cli_refuses(path, rf"{re.escape(str(path))}:4:33: transform\.p: expected greater than or equal to 0\.25")
    assert precond.load_recipe(write(tmp_path, ADAM.replace("p: 2", "p: 0.25"), "quarter.yaml"))  # 1/k for 4-D factors
    assert "at least 0.25" in precond.registry.get("transform", "inverse_root").model_fields["p"].description


def test_a_denormal_damping_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, ADAM.replace("damping: 1.0e-8", "damping: 1.0e-320"))
    error = refused(path, mlp())
    located(error, path, "4:39", r"transform\.damping: damping = 9\.99989e-321 is below the smallest normal float32 "
                                 r"number \(1\.18e-38\).* use 0 \(none\) or at least 1\.18e-38, e.g\. 1\.0e-8")
    cli_refuses(path, r"r\.yaml:4:39: transform\.damping: damping = .* is below the smallest normal float32")
    huge = write(tmp_path, "name: s\ncurvature: {type: hutchinson}\nstructure: {type: diagonal}\n"
                 "transform: {type: inverse, scale: 1.0e+300}\n", "huge.yaml")
    located(refused(huge), huge, "4:28", r"transform\.scale: scale = 1e\+300 is above the largest float32 number")
    graft = write(tmp_path, ADAM.replace("damping_position: outside}", "damping_position: outside}\n  - {type: graft, eps: 1.0e-40}")
                  .replace("transform: {", "transform:\n  - {"), "graft.yaml")
    located(refused(graft), graft, "6:19", r"transform\.1\.eps: eps = 1e-40 is below the smallest normal float32")
    kbfgs = write(tmp_path, "name: k\ncurvature: {type: secant}\nstructure: {type: kbfgs, damping: 1.0e-39}\n"
                  "transform: {type: inverse}\n", "kbfgs.yaml")
    located(refused(kbfgs), kbfgs, "3:26", r"structure\.damping: damping = 1e-39 is below .* use at least 1\.18e-38")


def test_keeps_finite_is_honest_in_float32() -> None:
    # the reason for the damping bound: float32 rounds 1e-320 to 0, so 0/0 was NaN in the parameters, the
    # update check skipped because the damping was "positive"; zero damping is allowed and is checked
    inverse_root = precond.registry.get("transform", "inverse_root")
    assert not inverse_root(damping=0.0).keeps_finite("diagonal", True)
    assert inverse_root(damping=1e-8, damping_position="outside", p=0.25).keeps_finite("diagonal", True)
    assert inverse_root(damping=1e-8, p=2).keeps_finite("diagonal", True)
    assert not inverse_root(damping=1e-10, p=0.25).keeps_finite("diagonal", True)  # (1e-10)^-4 = 1e40 > float32 max


# --- 4. cross-block checks with a location, without a model ------------------------------------------

NEWTON_LM = """name: lm
lr: 1.0
curvature: {type: hessian}
structure: {type: full}
transform: {type: inverse, damping: 1.0}
step: {type: lm}
"""


def test_lm_needs_inverse_on_full_located_without_a_model(tmp_path: Path) -> None:
    path = write(tmp_path, NEWTON_LM.replace("structure: {type: full}", "structure: {type: diagonal}"))
    error = refused(path, mlp())
    assert isinstance(error, PipelineError)  # what it was when the optimizer refused it at build time
    located(error, path, "6:1", r"step: step 'lm' adapts the damping of transform 'inverse' on structure 'full'; "
                                r"the recipe has structure 'diagonal' and transform inverse")
    cli_refuses(path, rf"{re.escape(str(path))}:6:1: step: step 'lm' adapts the damping of transform 'inverse'")


def test_lm_damping_and_momentum_are_located(tmp_path: Path) -> None:
    path = write(tmp_path, NEWTON_LM.replace("damping: 1.0", "damping: 0.0") + "momentum: {type: ema}\n")
    error = refused(path)
    assert [p.where for p in error.problems] == [f"{path}:5:28", f"{path}:7:1"]
    located(error, path, "5:28", r"transform\.damping: step 'lm' scales the damping up and down by factors, so it "
                                 r"must start above 0")
    located(error, path, "7:1", r"momentum: step 'lm' compares the loss change .*remove the momentum block")
    cli_refuses(path, r"5:28: transform\.damping: step 'lm' .*start above 0", r"7:1: momentum: step 'lm'")


def test_lm_checks_the_rules_pipelines(tmp_path: Path) -> None:
    path = write(tmp_path, NEWTON_LM + "rules:\n  - {name: norms, match: {modules: [LayerNorm]}, recipe: adam}\n")
    error = refused(path)
    located(error, path, "8:50", r"rules\.0\.recipe: step 'lm' adapts the damping of transform 'inverse' on structure "
                                 r"'full'; rule 'norms' has structure 'diagonal'")
    located(error, path, "8:50", r"rules\.0\.recipe\.momentum: .*remove the momentum block \(rule 'norms'\)")


@pytest.mark.parametrize(
    "text, where, pattern",
    [
        ("name: x\ncurvature: {type: secant, update: sr1}\nstructure: {type: history}\ntransform: {type: inverse}\n",
         "2:27", r"curvature\.update: structure 'history' is limited-memory BFGS .*secant update 'sr1' needs structure 'full'"),
        ("name: x\ncurvature: {type: hessian, every: 2}\nstructure: {type: full, solver: cg}\ntransform: {type: inverse}\n",
         "2:28", r"curvature\.every: structure 'full' with solver: cg needs the curvature on every step"),
        ("name: x\ncurvature: {type: secant}\nstructure: {type: full, solver: cg}\ntransform: {type: inverse}\n",
         "3:25", r"structure\.solver: structure 'full' with solver: cg needs curvature-vector products, which curvature "
                 r"'secant' does not provide"),
        ("name: x\ncurvature: {type: sampled_fisher}\nstructure: {type: kronecker, factors: gradient}\n"
         "transform: {type: inverse_root}\n",
         "3:30", r"structure\.factors: curvature 'sampled_fisher' cannot fill Kronecker factors 'gradient'"),
    ],
    ids=["history_sr1", "cg_every", "cg_matvec", "kronecker_factors"],
)
def test_setup_checks_are_validation_errors(tmp_path: Path, text: str, where: str, pattern: str) -> None:
    path = write(tmp_path, text)
    error = refused(path)
    assert isinstance(error, PipelineError) and len(error.problems) == 1
    located(error, path, where, pattern)
    cli_refuses(path, rf"{re.escape(str(path))}:{where}: " + pattern)


# --- 5. every problem in one pass --------------------------------------------------------------------

MANY = """name: many
curvature: {type: hutchinson}
structure: {type: kronecker}
transform: {type: inverse_root, p: 2}
momentum: {type: emma, beta: 5}
step: {type: line_search, c1: 2}
"""


def test_every_problem_in_one_pass_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, MANY)
    error = refused(path, mlp())
    assert [str(p) for p in error.problems] == [
        f"{path}:3:1: structure: curvature 'hutchinson' cannot fill a 'kronecker' structure; it fills: diagonal. "
        "Curvatures that fill 'kronecker': empirical_fisher, gauss_newton, sampled_fisher",
        f"{path}:5:12: momentum.type: unknown momentum type 'emma' (did you mean 'ema'?); registered momentum "
        "types: ema, heavy_ball",
        f"{path}:6:27: step.c1: expected less than 1 (got 2)",
    ]
    text = cli_refuses(path, r"3 problems")
    assert text.index(":3:1:") < text.index(":5:12:") < text.index(":6:27:")


def test_an_unknown_block_skips_its_later_checks(tmp_path: Path) -> None:
    # structure's type is unknown: neither its beta nor the curvature/structure pairing is checked;
    # the transform's bad field is still reported
    path = write(tmp_path, "name: x\ncurvature: {type: empirical_fisher}\nstructure: {type: diagnal, beta: 5}\n"
                           "transform: [{type: inverse_root, p: 0.1}, {type: idenity}, {type: clip, threshold: 0}]\n")
    error = refused(path)
    assert [(p.where.removeprefix(f"{path}:"), p.path) for p in error.problems] == [
        ("3:13", "structure.type"), ("4:34", "transform.0.p"), ("4:44", "transform.1.type"), ("4:73", "transform.2.threshold"),
    ]


def test_problems_of_a_dict_keep_their_stage_order() -> None:
    with pytest.raises(RecipeError) as info:
        precond.build({"name": "x", "momentum": {"type": "emma"}, "step": {"type": "lm", "increase": 0.5},
                       "structure": {"type": "diagonal"}}, mlp())
    assert [p.path for p in info.value.problems] == ["momentum.type", "step.increase", "structure"]
