"""``precond show`` prints a recipe verbatim (show -> file -> build round-trips for every built-in recipe) and
the recipe JSON Schema ships beside the recipes, where their ``$schema`` line points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from precond.cli import app
from precond.recipe import builtin_recipes, load_recipe, recipe_dirs, schema

runner = CliRunner()


@pytest.mark.parametrize("name", list(builtin_recipes()))
def test_show_round_trips_every_builtin_recipe(tmp_path: Path, name: str) -> None:
    result = runner.invoke(app, ["show", name])
    assert result.exit_code == 0, result.output
    assert result.stdout == builtin_recipes()[name].read_text(encoding="utf-8")  # verbatim, comments included
    path = tmp_path / f"{name}.yaml"
    path.write_text(result.stdout, encoding="utf-8")
    assert load_recipe(path).to_dict() == load_recipe(name).to_dict()


def test_show_piped_is_not_cut_at_the_terminal_width(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "40", "TERM": "xterm-256color"}
    out = subprocess.run([sys.executable, "-m", "precond.cli", "show", "kfac"], capture_output=True, text=True,
                         env=env, check=True)
    text = builtin_recipes()["kfac"].read_text(encoding="utf-8")
    assert max(len(line) for line in text.splitlines()) > 40  # the check below would be vacuous otherwise
    assert out.stdout == text


def test_every_builtin_recipe_points_at_the_schema_beside_it() -> None:
    for name, path in builtin_recipes().items():
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=recipe.schema.json", name
        assert (path.parent / "recipe.schema.json").is_file(), path.parent
    assert json.loads((recipe_dirs()[0] / "recipe.schema.json").read_text(encoding="utf-8"))["title"] == "precond recipe"


def test_schema_out_a_folder_writes_recipe_schema_json_there(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "recipe.schema.json").read_text(encoding="utf-8")) == schema()
    result = runner.invoke(app, ["schema", "--out", str(tmp_path / "other.json")])
    assert json.loads((tmp_path / "other.json").read_text(encoding="utf-8")) == schema()
    result = runner.invoke(app, ["schema", "--out", str(tmp_path / "missing" / "x.json")])
    assert result.exit_code == 2 and "cannot write" in result.output
