"""Contenders beyond recipes: any ``torch.optim.Optimizer`` (by class, import path or ``lambda params: ...``)
in the same interleaved loop as precond's optimizers, with the plain-loop convention; ``time_budget``
(``--time-budget``); the comparison plot's bands and headline."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import precond
from precond.cli import app
from precond.tasks import build_task
from precond.training import compare, train
from precond.training.factories import PlainLoop, as_factory, torch_optimizer
from precond.training.report import _band, winners


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def adam_recipe(model, likelihood, lr=None, seed=0):
    return precond.build("adam", model, likelihood=likelihood, seed=seed, lr=1e-2 if lr is None else lr)


def test_a_torch_optimizer_follows_the_plain_loop_exactly():
    # the runner's AdamW run equals a hand-written loop: zero_grad(); loss.backward(); opt.step()
    result = train(lambda params: torch.optim.AdamW(params, lr=1e-2), "digits-mlp", steps=15, short=True,
                   progress=False)
    task = build_task("digits-mlp", short=True)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    batches = task.train_batches()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _ = task.closure(next(batches))
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert result.losses == losses
    assert result.config["plain_loop"] is True and result.config["optimizer"] == "AdamW"


def test_recipe_and_torch_optimizer_in_one_interleaved_comparison(tmp_path: Path):
    order: list[str] = []

    class LoggedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            order.append("adamw")
            return super().step(closure)

    def logged_recipe(model, likelihood, lr=None, seed=0):
        opt = adam_recipe(model, likelihood, lr, seed)
        inner = opt.step

        def step(closure):
            order.append("adam")
            return inner(closure)

        opt.step = step
        return opt

    result = compare({"adam": logged_recipe, "adamw": lambda params: LoggedAdamW(params, lr=1e-2)}, "digits-mlp",
                     steps=12, seeds=(0, 1), short=True, out_dir=tmp_path, progress=False)
    # lock-step: every block of four consecutive steps holds each label twice (two seeds)
    assert len(order) == 48
    for t in range(12):
        assert sorted(order[4 * t : 4 * t + 4]) == ["adam", "adam", "adamw", "adamw"]
    assert order[:4] != order[4:8]  # the order rotates with the global step
    assert {r.label for r in result.rows} == {"adam", "adamw"} and len(result.runs) == 4
    assert all(r.status == "ok" and r.steps_done == 12 for r in result.runs)
    by = {r.label: r for r in result.runs}
    assert by["adamw"].config["plain_loop"] and not by["adam"].config["plain_loop"]
    # the same files as for recipes alone
    data = json.loads((tmp_path / "compare.json").read_text())
    assert {r["label"] for r in data["rows"]} == {"adam", "adamw"}
    for name in ("compare.csv", "compare.png", "runs/adamw-seed0/metrics.json", "runs/adamw-seed1/curve.csv",
                 "runs/adam-seed0/metrics.json"):
        assert (tmp_path / name).is_file(), name


def test_lr_grid_scales_a_torch_optimizers_groups():
    result = compare({"sgd": lambda params: torch.optim.SGD(params, lr=0.1)}, "logistic", steps=2, short=True,
                     lr_grid=[0.5, 2.0], progress=False)
    assert sorted(r.lr for r in result.runs) == pytest.approx([0.05, 0.2])


def test_an_optimizer_class_or_import_path_is_a_contender():
    for spec in (torch.optim.Adagrad, "torch.optim.Adagrad"):
        factory = as_factory(spec) if not isinstance(spec, str) else torch_optimizer(spec, lr=0.05)
        task = build_task("logistic", short=True)
        opt = factory(task.model, task.likelihood)
        assert isinstance(opt, PlainLoop) and isinstance(opt.inner, torch.optim.Adagrad)
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        torch_optimizer("precond.tasks.build_task")
    with pytest.raises(ValueError, match="cannot import"):
        torch_optimizer("torch.optim.NoSuchThing")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_gets_the_matrices_and_adamw_the_rest():
    task = build_task("digits-mlp", short=True)
    opt = torch_optimizer("torch.optim.Muon", lr=0.02)(task.model, task.likelihood)
    muon, adamw = opt.inner.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.ndim != 2 for g in adamw.param_groups for p in g["params"])
    assert "only 2-D parameters" in opt.note and "AdamW" in opt.note
    with pytest.raises(ValueError, match="only 2-D parameters.*rest=torch.optim.AdamW"):
        torch_optimizer("torch.optim.Muon", rest=None)(task.model, task.likelihood)
    result = train(torch_optimizer("torch.optim.Muon", lr=0.02), "digits-mlp", steps=5, short=True, progress=False)
    assert result.status == "ok" and "only 2-D" in result.config["parameter_split"]


def test_time_budget_stops_each_run_after_its_seconds(tmp_path: Path):
    budget = 0.4

    def slow_adam(model, likelihood, lr=None, seed=0):  # 20 ms more per step: at most 20 steps in the budget
        opt = adam_recipe(model, likelihood, lr, seed)
        inner = opt.step

        def step(closure):
            time.sleep(0.02)
            return inner(closure)

        opt.step = step
        return opt

    result = compare({"adam": adam_recipe, "slow": slow_adam}, "digits-mlp", short=True, time_budget=budget,
                     seeds=(0,), progress=False, out_dir=tmp_path)
    assert result.time_budget_s == budget
    for run in result.runs:
        assert run.status == "ok" and "time budget" in run.message
        assert run.wall_time_s >= budget and run.wall_times[-2] < budget  # stopped at the first step past it
        assert run.evals[-1]["step"] == run.steps_done == run.steps  # evaluated where it stopped
    by = {r.label: r for r in result.runs}
    assert by["slow"].steps_done <= 20 < by["adam"].steps_done
    # ranked by the final metric: who is best after the budget
    finals = [r.final_metric for r in result.rows]
    assert finals == sorted(finals, reverse=True)  # accuracy: higher is better
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["time_budget_s"] == budget and "time budget" in data["sort"]
    # with steps too, whichever comes first
    short = train(adam_recipe, "digits-mlp", short=True, time_budget=60.0, steps=3, progress=False)
    assert short.steps_done == 3 and short.message == "completed 3 steps"


def test_cli_compare_recipes_and_torch_optimizers(tmp_path: Path):
    out = tmp_path / "cmp"
    res = invoke("compare", "kfac", "torch.optim.AdamW", "torch.optim.Muon", "--set",
                 "torch.optim.AdamW:weight_decay=0.1", "--set", "kfac:curvature.every=2", "--task",
                 "digits-autoencoder", "--short", "--steps", "6", "--seeds", "0", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    runs = {r["label"]: r for r in data["runs"]}
    assert set(runs) == {"kfac", "torch.optim.AdamW", "torch.optim.Muon"}
    assert runs["torch.optim.AdamW"]["config"]["optimizer_defaults"]["weight_decay"] == 0.1
    assert runs["torch.optim.Muon"]["config"]["optimizer"] == "Muon + AdamW"
    assert runs["kfac"]["config"]["recipes"]["kfac"]["curvature"]["every"] == 2
    assert runs["torch.optim.AdamW"]["config"]["torch_optimizers"]["torch.optim.AdamW"]["kwargs"] == {
        "weight_decay": 0.1, "lr": 0.001}
    assert (out / "recipes" / "kfac.yaml").is_file() and not (out / "recipes" / "torch.optim.AdamW.yaml").exists()
    assert "torch.optim.Muon: Muon takes only 2-D parameters" in " ".join(res.stdout.split())
    assert "`torch.optim.AdamW`" in (out / "compare.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nope:lr=1"], "'nope' is none of the contenders"),
        (["--set", "torch.optim.AdamW:betaz=1"], "AdamW takes no keyword 'betaz'"),
        (["torch.optim.NoSuch"], "cannot import the optimizer class"),
    ],
)
def test_cli_compare_bad_contender_or_set_exits_2(tmp_path: Path, args: list[str], message: str):
    res = invoke("compare", "adam", "torch.optim.AdamW", *args, "--task", "logistic", "--short", "--steps", "2",
                 "--out", str(tmp_path / "x"), "--no-progress")
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_cli_time_budget(tmp_path: Path):
    res = invoke("compare", "adam", "sgd", "--task", "logistic", "--short", "--time-budget", "0.3", "--seeds", "0",
                 "--out", str(tmp_path / "c"), "--no-progress")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert data["time_budget_s"] == 0.3
    assert all("time budget of 0.3 s" in r["message"] for r in data["runs"])
    assert "best after 0.3 s of training each" in " ".join(res.stdout.split())
    res = invoke("train", "adam", "--task", "logistic", "--short", "--time-budget", "0.2", "--out",
                 str(tmp_path / "t"), "--no-progress")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["config"]["time_budget_s"] == 0.2 and metrics["wall_time_s"] >= 0.2


def test_plot_band_is_the_seeds_median_and_range():
    x, mid, lo, hi = _band([([0, 10, 20], [3.0, 2.0, 1.0]), ([0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0]),
                            ([0, 20], [4.0, 0.0])])
    assert list(x) == [0, 10, 20]  # up to the shortest curve
    assert list(mid) == [4.0, 2.0, 1.0] and list(lo) == [3.0, 2.0, 0.0] and list(hi) == [5.0, 4.0, 3.0]


def test_plot_headline_names_the_winner(tmp_path: Path):
    result = compare({"adam": adam_recipe, "sgd": lambda params: torch.optim.SGD(params, lr=1e-4)}, "digits-mlp",
                     steps=40, short=True, seeds=(0, 1), progress=False, out_dir=tmp_path)
    lines = winners(result.runs)
    adam = next(r for r in result.rows if r.label == "adam")
    assert adam.reached == 2, "adam should reach the short target in 40 steps"
    assert lines[0].startswith(f"first to the target in wall-clock: adam ({adam.time_to_target_s:.3g} s")
    assert lines[1].startswith("first to the target in steps: adam")
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert not math.isnan(adam.final_metric)


@pytest.mark.slow
def test_the_main_job_full_size(tmp_path: Path):
    """`precond compare` with no arguments, full size (minutes on two cores): every default recipe runs at
    its hint on mnist-autoencoder, two seeds, each run for 120 steps or 15 s of training; tuned Adam reaches
    the target within its 120 steps unless the machine is too slow for them in 15 s."""
    res = invoke("compare", "--out", str(tmp_path / "main"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "120 steps or 15 s of training, whichever first" in " ".join(res.output.split())
    data = json.loads((tmp_path / "main" / "compare.json").read_text())
    assert data["task"] == "mnist-autoencoder" and data["seeds"] == [0, 1]
    assert data["steps"] == 120 and data["time_budget_s"] == 15.0
    rows = {r["label"]: r for r in data["rows"]}
    assert {"adam", "kfac", "shampoo_grafted", "soap", "sophia_g", "muon"} <= set(rows)
    for run in data["runs"]:
        assert run["steps_done"] == 120 or run["message"].startswith("time budget of 15 s spent"), run["message"]
        if run["label"] == "adam" and run["steps_done"] == 120:
            assert run["reached"], run["evals"][-1]
    assert "first to the target" in " ".join(res.stdout.split()) or "fastest wall-clock" in res.stdout


def test_the_verdict_under_a_budget_names_the_fewest_steps_not_the_best_final():
    """Under a time budget the table ranks by the final metric; the verdict's step and wall-clock lines
    still name who reached the target in the fewest steps and the least time (char-lm: soap ended best,
    muon reached the target first)."""
    from precond.cli.report import verdict
    from precond.training.results import CompareResult, CompareRow

    def row(label, steps, seconds, final):
        return CompareRow(label=label, lr=1e-3, lr_multiplier=None, seeds=1, reached=1, steps_done=steps,
                          steps_to_target=steps, time_to_target_s=seconds, final_metric=final, final_train_loss=0.0,
                          final_test_loss=0.0, ms_per_step=1.0, rel_ms_per_step=1.0, status="ok", message="")

    rows = [row("soap", 325, 92.6, 6.32), row("muon", 275, 66.2, 6.60), row("adam", 575, 117.0, 6.94)]
    result = CompareResult(task="char-lm", metric="test_perplexity", higher_is_better=False, target=7.0, steps=1000,
                           seeds=[0], runs=[], rows=rows, all_rows=rows, time_budget_s=420.0)
    lines = verdict(result)
    assert lines[0].startswith("best after 420 s of training each: soap, test_perplexity 6.32")
    assert lines[1] == "fewest steps to test_perplexity <= 7: muon, 275 steps vs adam 575 (2.09x fewer)"
    assert lines[2].startswith("fastest wall-clock to target: muon, 66.2 s vs soap 92.6 s (1.40x faster); adam 117 s")
