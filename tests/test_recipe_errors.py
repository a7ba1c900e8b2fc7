"""Bad recipes give a clear, located error from the API and the CLI; nothing executes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import precond
from precond.cli import app
from precond.errors import RecipeError

GOOD = """name: mine
lr: 0.01
curvature: {type: empirical_fisher}
structure: {type: diagonal, beta: 0.99}
transform: {type: inverse_root, p: 2, damping: 1.0e-8}
"""

# name -> (yaml text, a regex the message must match, the line:column it must point at)
BAD = {
    "unknown_type": (GOOD.replace("type: diagonal", "type: diagnal"), r"unknown structure type 'diagnal' \(did you mean 'diagonal'\?\)", "4:13"),
    "missing_field": ("lr: 0.1\n", r"name: required field is missing", "1:1"),
    "missing_type": (GOOD.replace("{type: empirical_fisher}", "{every: 2}"), r"missing 'type'; curvature types: empirical_fisher", "3:1"),
    "wrong_type": (GOOD.replace("lr: 0.01", "lr: fast"), r"lr: expected a valid number.*got 'fast'", "2:1"),
    "wrong_block_field_type": (GOOD.replace("beta: 0.99", "beta: [1]"), r"structure.beta: expected a valid number", "4:29"),
    "out_of_range": (GOOD.replace("beta: 0.99", "beta: 1.5"), r"structure.beta: expected less than 1", "4:29"),
    "unknown_key": (GOOD + "momentun: {type: ema}\n", r"unknown key 'momentun' \(did you mean 'momentum'\?\)", "6:1"),
    "unknown_block_key": (GOOD.replace("beta: 0.99", "bta: 0.99"), r"unknown key 'bta' \(did you mean 'beta'\?\)", "4:29"),
    "syntax": ("name: x\nlr: [0.1\n", r"YAML syntax error", "3:1"),
    "not_a_mapping": ("- adam\n- sgd\n", r"a recipe is a mapping.*got list", "1:1"),
    "scalar": ("adam\n", r"a recipe is a mapping.*got str", "1:1"),
    "empty": ("", r"the recipe is empty", None),
    "python_tag": ("name: !!python/object/apply:os.system ['touch {marker}']\n", r"tag .*python/object/apply.* is not allowed", "1:7"),
    "python_scalar_tag": ("name: x\nlr: !!python/name:os.system\n", r"python/name:os.system", "2:5"),
    "nan": ("name: x\nlr: .nan\n", r"lr: expected a finite number", "2:1"),
    "bad_pair": (GOOD.replace("curvature: {type: empirical_fisher}\n", ""), r"structure 'diagonal' needs a curvature block", "3:1"),
    "spectral_without_structure": ("name: x\ntransform: {type: inverse}\n", r"transform 'inverse' is a function of the curvature", "2:1"),
    "nesterov_without_momentum": ("name: x\nmomentum: {type: heavy_ball, beta: 0, nesterov: true}\n", r"nesterov momentum requires beta > 0 and dampening = 0$", "2:1"),
    "duplicate_key": ("name: x\nlr: 1\nlr: 2\n", r"duplicate key", "3:1"),
    "wolfe_order": ("name: x\nstep: {type: line_search, c1: 0.95, c2: 0.1}\n",
                    r"step\.c1: c1 = 0\.95 and c2 = 0\.1: the strong Wolfe conditions need 0 < c1 < c2 < 1", "2:27"),
    "tiny_root": (GOOD.replace("p: 2", "p: 1.0e-320"), r"transform\.p: expected greater than or equal to 0\.25", "5:33"),
    "denormal_damping": (GOOD.replace("damping: 1.0e-8", "damping: 1.0e-320"), r"transform\.damping: damping = .* is below the smallest normal float32", "5:39"),
    "lm_without_full": (GOOD + "step: {type: lm}\n", r"step: step 'lm' adapts the damping of transform 'inverse' on structure 'full'", "6:1"),
    "alias_bomb": (
        "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef")
        ),
        r"expands to more than",
        None,
    ),
}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "executed"


def _write(tmp_path: Path, name: str, marker: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BAD[name][0].replace("{marker}", str(marker)), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(BAD))
def test_api_error_is_located(name: str, tmp_path: Path, marker: Path) -> None:
    path = _write(tmp_path, name, marker)
    _, pattern, where = BAD[name]
    with pytest.raises(RecipeError) as info:
        precond.load_recipe(path)
    text = str(info.value)
    assert re.search(pattern, text), text
    if where:
        assert f"{path}:{where}:" in text, text
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(BAD))
def test_cli_error_exits_nonzero_without_traceback(name: str, tmp_path: Path, marker: Path) -> None:
    path = _write(tmp_path, name, marker)
    result = CliRunner().invoke(app, ["build", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert re.search(BAD[name][1], " ".join(result.output.split())), result.output
    assert not marker.exists()


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        precond.load_recipe(path)


def test_dict_recipe_errors_name_the_path() -> None:
    with pytest.raises(RecipeError, match=r"structure.beta: expected less than 1"):
        precond.build({"name": "x", "curvature": {"type": "empirical_fisher"}, "structure": {"type": "diagonal", "beta": 2}},
                      [__import__("torch").zeros(1, requires_grad=True)])


def test_override_errors_name_the_override() -> None:
    import torch

    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(RecipeError, match=r"--set structure.bta: unknown key 'bta' \(did you mean 'beta'\?\)"):
        precond.build("adam", p, set={"structure.bta": 0.9})
    with pytest.raises(RecipeError, match=r"unknown hyperparameter 'lrr' \(did you mean 'lr'\?\)"):
        precond.build("adam", p, lrr=0.1)
    with pytest.raises(RecipeError, match=r"did you mean 'adam'"):
        precond.build("adm", p)
    with pytest.raises(RecipeError, match=r"--set lr: expected greater than or equal to 0"):
        precond.build("adam", p, set={"lr": -1})


def test_cli_set_and_unknown_recipe() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["build", "adam", "--set", "structure.beta=0.99", "--set", "lr=0.01"])
    assert ok.exit_code == 0, ok.output
    assert "beta=0.99" in ok.output and "0.01" in ok.output
    bad = runner.invoke(app, ["build", "adamm"])
    assert bad.exit_code == 2 and "did you mean 'adam'" in bad.output
    bad = runner.invoke(app, ["build", "adam", "--set", "nonsense"])
    assert bad.exit_code == 2 and "expected key=value" in bad.output
