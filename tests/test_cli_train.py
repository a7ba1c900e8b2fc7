"""`precond train` and `precond compare` end to end, on tiny budgets (the task's --short mode)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from precond import cli
from precond.cli import EXIT_DIVERGED, EXIT_ERROR, EXIT_USAGE, app
from precond.recipe import builtin_recipes


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def fmt(value: float) -> str:
    return f"{value:.4g}"  # how the summary tables print numbers


def table_value(output: str, field: str) -> str:
    """The value cell of a row of the `precond train` summary table."""
    m = re.search(rf"│ {re.escape(field)}\s*│\s*(\S+)\s*│", output)
    assert m, f"no row {field!r} in\n{output}"
    return m.group(1)


def read_curve(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", "adam", "--task", "digits-mlp", "--short", "--steps", "30", "--out", str(out))
    assert result.exit_code == 0, result.output
    for name in ("metrics.json", "curve.csv", "curve.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps_done"] == 30 and metrics["task"] == "digits-mlp"
    curve = read_curve(out / "curve.csv")
    assert [int(r["step"]) for r in curve] == list(range(31))  # row 0: the initial evaluation
    assert float(curve[-1]["loss"]) == metrics["final_loss"]
    assert float(curve[-1]["test_accuracy"]) == metrics["final"]["test_accuracy"]

    # the numbers printed are the numbers written
    printed = result.stdout
    assert table_value(printed, "final test_accuracy") == fmt(metrics["final"]["test_accuracy"])
    assert table_value(printed, "final train_loss") == fmt(metrics["final"]["train_loss"])
    assert table_value(printed, "final loss") == fmt(metrics["final_loss"])
    assert table_value(printed, "ms / step (mean)") == fmt(metrics["ms_per_step"])
    if metrics["steps_to_target"] is not None:
        assert table_value(printed, "steps to target") == str(metrics["steps_to_target"])
        assert f"at step {metrics['steps_to_target']}" in printed
    # the learning rate used, and why: the task's hint for adam
    assert metrics["lr"] == 0.01 and metrics["config"]["lr_reason"].startswith("task digits-mlp's hint for 'adam'")
    assert "lr = 0.01: task digits-mlp's hint for 'adam'" in printed
    assert metrics["config"]["recipe"]["name"] == "adam" and metrics["config"]["threads"] == 1
    assert "lr: 0.01" in (out / "recipe.yaml").read_text()


def test_train_lr_sources(tmp_path: Path) -> None:
    res = invoke("train", "adam", "-t", "logistic", "--short", "--steps", "3", "--set", "lr=0.02",
                 "--out", str(tmp_path / "a"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["lr"] == 0.02
    assert "lr = 0.02: from --set lr=" in res.stdout
    res = invoke("train", "adam", "-t", "logistic", "--short", "--steps", "3", "--lr", "0.03",
                 "--set", "lr=0.02", "--out", str(tmp_path / "b"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["lr"] == 0.03  # --lr wins
    assert "from --lr" in res.stdout


def test_lr_rule_hint_default_and_newton_type() -> None:
    from precond.recipe import load_recipe, validate
    from precond.tasks import build_task

    task = build_task("digits-mlp", short=True)
    assert cli._lr_for(load_recipe("adam"), task, None, False)[0] == task.default_lr["adam"]  # its own hint
    diag_newton = {"name": "my_newton", "lr": 1.0, "curvature": {"type": "hessian"}, "structure": {"type": "diagonal"},
                   "transform": {"type": "inverse", "damping": 1.0}}
    lr, why = cli._lr_for(validate(diag_newton), task, None, False)
    assert lr == 1.0 and "Newton-type" in why  # scale-free: keeps the recipe's lr
    clipped = {**diag_newton, "name": "my_sophia", "transform": [diag_newton["transform"], {"type": "clip"}]}
    lr, why = cli._lr_for(validate(clipped), task, None, False)
    assert lr == task.default_lr["default"] and "default hint" in why  # a step size: the task's default
    assert cli._lr_for(validate(clipped), task, 0.5, False) == (0.5, "from --lr")


@pytest.mark.parametrize("override", [["--lr", "1e6"], ["--set", "lr=1e6"]])
def test_diverging_run_exits_3_and_still_writes(tmp_path: Path, override: list[str]) -> None:
    out = tmp_path / "run"
    res = invoke("train", "adam", "--task", "digits-mlp", "--short", "--steps", "30", *override,
                 "--out", str(out), "--no-progress")
    assert res.exit_code == EXIT_DIVERGED == 3, res.output
    message = " ".join(res.stderr.split())
    assert re.search(r"diverged at step \d+: .*last finite loss before divergence [\d.e+-]+ at step \d+", message), message
    assert "exit status 3" in message
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["message"] in message
    assert metrics["steps_done"] < 30
    curve = read_curve(out / "curve.csv")
    assert int(curve[-1]["step"]) == metrics["steps_done"]
    assert (out / "curve.png").is_file()


def test_step_error_exits_4_with_traceback_in_metrics(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny_newton.yaml"  # the exact Hessian refuses a model this size at step 1
    recipe.write_text("name: tiny_newton\ncurvature: {type: hessian, max_params: 10}\nstructure: {type: diagonal}\n"
                      "transform: {type: inverse, damping: 1.0}\n")
    out = tmp_path / "run"
    res = invoke("train", str(recipe), "--task", "digits-mlp", "--short", "--steps", "5", "--out", str(out), "--no-progress")
    assert res.exit_code == EXIT_ERROR == 4, res.output
    assert "error at step 1: PipelineError" in res.stderr and "exit status 4" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "error" and "Traceback" in metrics["traceback"]


def test_invalid_recipe_is_located_exit_2_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncurvature: {type: empirical_fisher}\nstructure: {type: diagnal}\n")
    out = tmp_path / "run"
    for command in (["train", str(bad)], ["compare", "adam", str(bad)]):
        res = invoke(*command, "--out", str(out))
        assert res.exit_code == EXIT_USAGE == 2, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert "Traceback" not in res.output
        assert f"{bad}:3:13: structure.type: unknown structure type 'diagnal' (did you mean 'diagonal'?)" in " ".join(
            res.output.split()
        )
        assert not out.exists()  # nothing ran
    res = invoke("train", "adamm")
    assert res.exit_code == 2 and "did you mean 'adam'" in res.output
    res = invoke("train", "adam", "--task", "digits-mpl")
    assert res.exit_code == 2 and "did you mean 'digits-mlp'" in res.output
    res = invoke("train", "adam", "--set", "structure.bta=0.9")
    assert res.exit_code == 2 and "did you mean 'beta'" in res.output
    res = invoke("compare", "adam", "--seeds", "0,x")
    assert res.exit_code == 2 and "--seeds" in res.output


def _losses(path: Path) -> list[str]:
    return [r["loss"] for r in read_curve(path / "curve.csv")]


@pytest.mark.parametrize("recipe", ["adam", "sophia_g"])
def test_same_seed_same_curve(tmp_path: Path, recipe: str) -> None:
    if recipe not in builtin_recipes():
        pytest.skip(f"no built-in recipe {recipe}")
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        res = invoke("train", recipe, "-t", "digits-autoencoder", "--short", "--steps", "25", "--seed", seed,
                     "--out", str(tmp_path / name), "--no-progress")
        assert res.exit_code == 0, res.output
        runs[name] = _losses(tmp_path / name)
    assert runs["a"] == runs["b"]  # bit for bit (sophia_g samples labels from the seeded generator)
    assert runs["a"] != runs["c"]


def test_compare_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = invoke("compare", "adam", "sgd", "--task", "logistic", "--short", "--steps", "20", "--out", str(out))
    assert res.exit_code == 0, res.output
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png", "recipes/adam.yaml", "recipes/sgd.yaml"):
        assert (out / name).is_file(), name
    for label in ("adam", "sgd"):
        for seed in (0, 1):  # default --seeds 0,1
            assert (out / "runs" / f"{label}-seed{seed}" / "metrics.json").is_file()
            assert (out / "runs" / f"{label}-seed{seed}" / "curve.csv").is_file()

    data = json.loads((out / "compare.json").read_text())
    rows = data["rows"]
    assert data["seeds"] == [0, 1] and data["steps"] == 20 and {r["label"] for r in rows} == {"adam", "sgd"}
    # sorted: steps to target, then wall-clock to target
    keys = [(r["steps_to_target"] if r["steps_to_target"] is not None else math.inf,
             r["time_to_target_s"] if r["time_to_target_s"] is not None else math.inf) for r in rows]
    assert keys == sorted(keys)
    with (out / "compare.csv").open(newline="") as fh:
        assert [r["label"] for r in csv.DictReader(fh)] == [r["label"] for r in rows]
    # the relative-to-adam column
    by = {r["label"]: r for r in rows}
    assert by["adam"]["rel_ms_per_step"] == 1.0
    assert by["sgd"]["rel_ms_per_step"] == pytest.approx(by["sgd"]["ms_per_step"] / by["adam"]["ms_per_step"])

    # the printed table has the same order and numbers
    printed = res.stdout
    assert "×adam" in printed
    lines = {r["label"]: next(line for line in printed.splitlines() if re.match(rf"│ {i} +│ {r['label']} ", line))
             for i, r in enumerate(rows, start=1)}
    for label, line in lines.items():
        cells = [c.strip() for c in line.strip("│").split("│")]
        assert cells[-2] == f"{by[label]['rel_ms_per_step']:.3g}"  # ×adam
        assert cells[5] == fmt(by[label]["final_metric"])
    assert "lr adam = 0.05: task logistic's hint for 'adam'" in printed
    assert re.search(r"fewest steps to test_accuracy >= 0\.95: (adam|sgd)", printed)
    assert data["runs"][0]["config"]["threads"] == 1
    md = (out / "compare.md").read_text()
    assert [line.split("|")[2].strip() for line in md.splitlines() if re.match(r"\| \d", line)] == [
        f"`{r['label']}`" for r in rows
    ]


def test_compare_lr_grid(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    res = invoke("compare", "adam", "--task", "logistic", "--short", "--steps", "10", "--seeds", "0",
                 "--lr-multipliers", "0.5,2", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    assert data["lr_grid"] == [0.5, 2.0] and len(data["all_rows"]) == 2
    assert data["best_lr"]["adam"] in (0.025, 0.1)
    best = data["rows"][0]
    assert f"(×{best['lr_multiplier']:g})" in res.stdout
    assert f"lr adam = best {data['best_lr']['adam']:g} of the grid around 0.05" in res.stdout


def test_default_set_follows_the_builtin_recipes(tmp_path: Path) -> None:
    available = builtin_recipes()
    expected = [n for n in cli.DEFAULT_SET if n in available]
    assert cli.default_set() == expected and expected[0] == "adam"
    assert {"adam", "kfac", "shampoo_grafted", "soap", "sophia_g"} <= set(expected)
    assert ("muon" in expected) == ("muon" in available)  # muon joins once recipes/muon.yaml exists
    out = tmp_path / "dflt"
    res = invoke("compare", "--short", "--steps", "4", "--seeds", "0", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    assert data["task"] == cli.DEFAULT_TASK == "mnist-autoencoder"
    assert data["runs"][0]["config"]["threads"] == data["runs"][0]["config"]["task"]["threads_hint"]
    assert sorted(r["label"] for r in data["rows"]) == sorted(expected)
    assert all(r["status"] == "ok" for r in data["rows"]), data["rows"]


def test_compare_skips_a_recipe_that_cannot_run_on_the_task(tmp_path: Path) -> None:
    if "sophia_g" not in builtin_recipes():
        pytest.skip("no built-in sophia_g recipe")
    out = tmp_path / "rb"
    res = invoke("compare", "adam", "sophia_g", "--task", "rosenbrock", "--short", "--steps", "3", "--seeds", "0",
                 "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "skipped sophia_g: it cannot run on rosenbrock" in " ".join(res.stderr.split())
    data = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["adam"]
    assert "skipped `sophia_g`" in (out / "compare.md").read_text()
    res = invoke("compare", "sophia_g", "--task", "rosenbrock", "--short", "--steps", "3", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "none of the recipes can run on task rosenbrock" in res.output


def test_tasks_command() -> None:
    res = invoke("tasks")
    assert res.exit_code == 0, res.output
    for name in ("digits-mlp", "digits-autoencoder", "logistic", "tiny-lm", "rosenbrock", "mnist-autoencoder",
                 "mnist-cnn", "char-lm"):
        assert name in res.output
