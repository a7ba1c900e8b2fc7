"""docs/recipes.md and recipes/recipe.schema.json are generated from the registry and must not drift;
the worked example in docs/recipes.md builds and trains."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from typer.testing import CliRunner

import precond
from precond import docs, registry
from precond.cli import app
from precond.training import train

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_md_is_generated_from_the_registry() -> None:
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == docs.recipes_markdown(), "docs/recipes.md is stale: run `python -m precond.docs`"


def test_schema_json_is_generated_from_the_registry() -> None:
    committed = (ROOT / "recipes" / "recipe.schema.json").read_text(encoding="utf-8")
    assert committed == docs.schema_json(), "recipes/recipe.schema.json is stale: run `python -m precond.docs`"


def test_recipes_md_covers_every_block_and_recipe() -> None:
    text = docs.recipes_markdown()
    assert "python -m precond.docs" in text.split("\n## ")[0]  # the header says how to regenerate
    for row in registry.describe_all():
        if row["module"].startswith("precond."):
            assert f"#### `{row['kind']}: {row['name']}`" in text
            for p in row["parameters"]:
                assert f"| `{p['name']}` |" in text
    for name in precond.recipe.builtin_recipes():
        assert f"| `{name}` |" in text
    # the estimator x structure table has a row per curvature and a column per structure
    table = text.split("## Which curvature fills which structure")[1].split("\n## ")[0]
    header = next(line for line in table.splitlines() if line.startswith("| curvature"))
    for name in registry.names("structure"):
        if registry.get("structure", name).__module__.startswith("precond."):
            assert f"`{name}`" in header
    for name, cls in registry.blocks("curvature").items():
        if cls.__module__.startswith("precond."):
            assert f"| `{name}` (fills" in table


def test_generation_ignores_blocks_from_outside_precond() -> None:
    # tests and plugins register blocks in this process; the generated files must not see them,
    # and the registry must be intact afterwards
    before = {kind: registry.names(kind) for kind in ("curvature", "structure", "transform")}
    docs.recipes_markdown()
    docs.schema_json()
    assert {kind: registry.names(kind) for kind in before} == before


def test_check_mode(tmp_path: Path, monkeypatch) -> None:
    assert docs.main(["--check"]) == 0
    stale = tmp_path / "recipes.md"
    stale.write_text("old\n")
    monkeypatch.setattr(docs, "RECIPES_MD", stale)
    assert docs.main(["--check"]) == 1
    assert stale.read_text() == "old\n"
    assert docs.main([]) == 0 and stale.read_text() == docs.recipes_markdown()


def _example_yaml_from_docs() -> str:
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## Worked example")[1]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[:1]
    return block


def test_worked_example_builds_and_trains(tmp_path: Path) -> None:
    yaml_text = _example_yaml_from_docs()
    assert yaml_text == docs.EXAMPLE_YAML
    recipe = docs.example_recipe()
    assert [t.name for t in recipe.transform] == ["inverse_root", "clip"]

    def make(model, likelihood, seed=0):
        return precond.build(recipe, model, likelihood=likelihood, seed=seed)

    result = train(make, "digits-mlp", short=True, steps=60, progress=False, threads=1)
    assert result.status == "ok", result.message
    assert result.reached, result.final  # the short task's target accuracy
    assert result.final_loss < 0.5 * result.initial_loss

    # the same file through the CLI (precond build / train), as the doc tells the reader to do
    path = tmp_path / "adam_clip.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    runner = CliRunner()
    out = runner.invoke(app, ["build", str(path)])
    assert out.exit_code == 0, out.output
    assert "clip" in out.output
    out = runner.invoke(app, ["train", str(path), "--task", "digits-mlp", "--short", "--steps", "40",
                              "--out", str(tmp_path / "run"), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_worked_example_python_form_equals_the_yaml() -> None:
    from precond.curvature.empirical_fisher import EmpiricalFisher
    from precond.step.decay import Decoupled
    from precond.step.momentum import EMA
    from precond.structure.diagonal import Diagonal
    from precond.transform.clip import Clip
    from precond.transform.inverse_root import InverseRoot

    model = torch.nn.Linear(3, 2)
    opt = precond.compose(model, name="adam_clip", curvature=EmpiricalFisher(), structure=Diagonal(beta=0.999),
                          transform=[InverseRoot(p=2, damping=1e-8, damping_position="outside"),
                                     Clip(mode="elementwise", threshold=1.0)],
                          momentum=EMA(beta=0.9), decay=Decoupled(), lr=3e-3, weight_decay=0.01)
    composed = opt.recipe.to_dict()
    from_yaml = docs.example_recipe().to_dict()
    for key in ("summary", "reference"):
        composed.pop(key)
        from_yaml.pop(key)
    assert composed == from_yaml
