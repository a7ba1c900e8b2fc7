"""The training / comparison runner (precond.training).

Plain torch optimizers are wrapped in a test-only adapter that zeroes the
gradients, calls the forward-only closure, backpropagates and steps.
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from conftest import TorchAdapter
from rich.console import Console
from rich.table import Table

from precond.training import CompareResult, RunResult, compare, render_table, train







def adam(model, likelihood, lr=1e-2):
    return TorchAdapter(torch.optim.Adam(model.parameters(), lr=lr))


def sgd(model, likelihood, lr=0.1):
    return TorchAdapter(torch.optim.SGD(model.parameters(), lr=lr))


def slow_sgd(model, likelihood, lr=1e-4):
    return TorchAdapter(torch.optim.SGD(model.parameters(), lr=lr))


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same(a, b):
    """Equality for numbers where JSON has null for non-finite floats."""
    if isinstance(a, float) and not math.isfinite(a):
        return b is None
    return a == b


# ---------------------------------------------------------------------------
# train


def test_train_end_to_end_writes_consistent_files(tmp_path):
    result = train(adam, "digits-mlp", steps=40, short=True, eval_every=10, out_dir=tmp_path, progress=False)
    assert isinstance(result, RunResult)
    assert result.status == "ok" and result.steps_done == 40
    assert len(result.losses) == len(result.wall_times) == 40
    assert all(math.isfinite(v) for v in result.losses)
    assert result.wall_times == sorted(result.wall_times)
    assert [e["step"] for e in result.evals] == [0, 10, 20, 30, 40]
    assert result.steps_to_target is not None and result.steps_to_target % 10 == 0
    assert result.time_to_target_s == result.wall_times[result.steps_to_target - 1]
    assert result.ms_per_step > 0
    assert result.ms_per_step == pytest.approx(1000 * result.wall_times[-1] / 40)
    assert result.lr == 1e-2
    assert result.final == {k: v for k, v in result.evals[-1].items() if k not in ("step", "wall_time_s")}
    assert {"train_loss", "test_loss", "test_accuracy"} <= set(result.final)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("status", "message", "steps_done", "steps_to_target", "time_to_target_s", "ms_per_step", "metric"):
        assert metrics[key] == getattr(result, key), key
    assert metrics["final"] == result.final
    assert metrics["evals"] == result.evals
    assert metrics["config"]["task"]["task"] == "digits-mlp"
    assert metrics["config"]["steps"] == 40 and metrics["config"]["lr"] == 1e-2

    rows = _read_csv(tmp_path / "curve.csv")
    assert list(rows[0])[:3] == ["step", "wall_time_s", "loss"]
    assert rows[0]["step"] == "0" and rows[0]["loss"] == ""
    assert float(rows[0]["test_accuracy"]) == result.evals[0]["test_accuracy"]
    body = rows[1:]
    assert [int(r["step"]) for r in body] == list(range(1, 41))
    assert [float(r["loss"]) for r in body] == result.losses  # exact round trip
    assert [float(r["wall_time_s"]) for r in body] == result.wall_times
    evaluated = {int(r["step"]): float(r["test_loss"]) for r in rows if r["test_loss"] != ""}
    assert evaluated == {e["step"]: e["test_loss"] for e in result.evals}

    png = (tmp_path / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_train_shows_a_progress_bar():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    result = train(adam, "logistic", steps=5, short=True, progress=True, console=console, label="my-adam")
    assert result.status == "ok"
    out = buf.getvalue()
    assert "my-adam" in out and "steps/s" in out and "loss" in out


def test_diverging_run_stops_with_a_message_and_still_writes_files(tmp_path):
    def absurd(model, likelihood):
        return TorchAdapter(torch.optim.SGD(model.parameters(), lr=1e8))

    result = train(absurd, "digits-autoencoder", steps=50, short=True, out_dir=tmp_path, progress=False)
    assert result.status == "diverged"
    assert result.steps_done < 50
    k = result.steps_done
    assert f"diverged at step {k}" in result.message
    assert "last finite loss" in result.message
    last_good = result.losses[k - 2]
    assert f"{last_good:.6g}" in result.message and f"at step {k - 1}" in result.message
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["message"] == result.message
    assert metrics["steps_done"] == k
    rows = _read_csv(tmp_path / "curve.csv")
    assert len(rows) == k + 1  # the step-0 evaluation row plus one per step
    assert (tmp_path / "curve.png").exists()


def test_non_finite_loss_is_divergence(tmp_path):
    calls = {"n": 0}

    class Poison(TorchAdapter):
        def step(self, closure):
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    for p in self.inner.param_groups[0]["params"]:
                        p.fill_(float("nan"))
            return super().step(closure)

    result = train(
        lambda m, lik: Poison(torch.optim.Adam(m.parameters(), lr=1e-2)),
        "logistic",
        steps=10,
        out_dir=tmp_path,
        progress=False,
    )
    assert result.status == "diverged"
    assert result.message.startswith("diverged at step 3: loss is nan")
    assert "at step 2" in result.message
    assert math.isnan(result.losses[-1])
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: nan -> null
    assert metrics["final_loss"] is None


def test_an_exception_in_step_is_recorded(tmp_path):
    class Broken(TorchAdapter):
        def step(self, closure):
            if len(self.inner.state) and next(iter(self.inner.state.values()))["step"] >= 2:
                raise RuntimeError("eigendecomposition failed")
            return super().step(closure)

    result = train(
        lambda m, lik: Broken(torch.optim.Adam(m.parameters())), "logistic", steps=10, out_dir=tmp_path, progress=False
    )
    assert result.status == "error" and result.steps_done == 2
    assert "error at step 3" in result.message and "eigendecomposition failed" in result.message
    assert "RuntimeError" in result.traceback
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "error"


def test_same_seed_gives_identical_curves():
    a = train(adam, "digits-mlp", steps=25, seed=3, short=True, progress=False)
    b = train(adam, "digits-mlp", steps=25, seed=3, short=True, progress=False)
    c = train(adam, "digits-mlp", steps=25, seed=4, short=True, progress=False)
    assert a.losses == b.losses
    assert a.evals[-1]["test_loss"] == b.evals[-1]["test_loss"]
    assert a.losses != c.losses


def test_optimizer_randomness_is_seeded_per_run():
    class Noisy(TorchAdapter):
        # an optimizer that draws random numbers, like sampled-Fisher recipes
        def step(self, closure):
            loss = super().step(closure)
            with torch.no_grad():
                for p in self.inner.param_groups[0]["params"]:
                    p.add_(1e-3 * torch.randn_like(p))
            return loss

    def noisy(model, likelihood):
        return Noisy(torch.optim.SGD(model.parameters(), lr=0.1))

    state = torch.get_rng_state()
    a = train(noisy, "digits-mlp", steps=15, short=True, progress=False)
    torch.manual_seed(12345)  # the caller's global RNG does not matter
    b = train(noisy, "digits-mlp", steps=15, short=True, progress=False)
    assert a.losses == b.losses
    torch.set_rng_state(state)
    train(noisy, "digits-mlp", steps=3, short=True, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # and is left untouched


def test_stop_at_target_and_factory_receives_task():
    seen = {}

    def factory(model, likelihood, task=None):
        seen["task"] = task
        return adam(model, likelihood, lr=task.lr_hint("adam"))

    result = train(factory, "logistic", steps=50, short=True, stop_at_target=True, progress=False)
    assert seen["task"].name == "logistic" and seen["task"].likelihood == "categorical"
    assert result.status == "ok" and result.steps_done == result.steps_to_target < 50


def test_render_table_for_a_run():
    result = train(adam, "logistic", steps=5, short=True, progress=False)
    table = render_table(result)
    assert isinstance(table, Table)
    buf = io.StringIO()
    Console(file=buf, width=100).print(table)
    assert "steps to target" in buf.getvalue() and "ms / step" in buf.getvalue()


# ---------------------------------------------------------------------------
# compare


def _row_key(row, higher_is_better):
    inf = math.inf
    metric = -row.final_metric if higher_is_better else row.final_metric
    return (
        row.status != "ok",
        inf if row.steps_to_target is None else row.steps_to_target,
        inf if row.time_to_target_s is None else row.time_to_target_s,
        metric,
    )


def test_compare_two_optimizers(tmp_path):
    result = compare(
        {"slow-sgd": slow_sgd, "adam": adam},
        "digits-mlp",
        steps=30,
        seeds=(0, 1),
        short=True,
        out_dir=tmp_path,
        progress=False,
    )
    assert isinstance(result, CompareResult)
    assert len(result.runs) == 4 and len(result.rows) == 2
    # sorted by steps to target, then wall-clock to target, then the final metric
    keys = [_row_key(r, result.higher_is_better) for r in result.rows]
    assert keys == sorted(keys)
    assert [r.label for r in result.rows] == ["adam", "slow-sgd"]
    best, worst = result.rows
    assert best.reached == 2 and best.steps_to_target is not None
    assert worst.reached == 0 and worst.steps_to_target is None
    # per-step time relative to the "adam" row
    assert best.rel_ms_per_step == pytest.approx(1.0)
    assert worst.rel_ms_per_step == pytest.approx(worst.ms_per_step / best.ms_per_step)
    # aggregate = mean over seeds
    adam_runs = [r for r in result.runs if r.label == "adam"]
    assert best.final_metric == pytest.approx(sum(r.final_metric for r in adam_runs) / 2)
    assert best.steps_to_target == sum(r.steps_to_target for r in adam_runs) / 2  # median of two

    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["adam", "slow-sgd"]
    assert data["rows"][0]["rel_ms_per_step"] == best.rel_ms_per_step
    assert "round robin" in data["interleaving"]
    assert len(data["runs"]) == 4 and data["runs"][0]["losses"] == result.runs[0].losses
    rows = _read_csv(tmp_path / "compare.csv")
    assert [r["label"] for r in rows] == ["adam", "slow-sgd"]
    assert float(rows[0]["ms_per_step"]) == best.ms_per_step
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "runs" / "adam-seed1" / "metrics.json").exists()
    assert (tmp_path / "runs" / "slow-sgd-seed0" / "curve.csv").exists()

    table = render_table(result)
    assert isinstance(table, Table) and table.row_count == 2
    assert "×adam" in [c.header for c in table.columns]


def test_interleaved_runs_match_solo_runs():
    result = compare({"sgd": sgd, "adam": adam}, "digits-mlp", steps=20, short=True, progress=False)
    solo = train(adam, "digits-mlp", steps=20, short=True, progress=False)
    interleaved = next(r for r in result.runs if r.label == "adam")
    assert interleaved.losses == solo.losses


def test_compare_without_adam_has_no_relative_column():
    result = compare({"sgd": sgd, "slow": slow_sgd}, "logistic", steps=5, short=True, progress=False)
    assert all(r.rel_ms_per_step is None for r in result.rows)
    assert "×adam" not in [c.header for c in render_table(result).columns]


def test_compare_diverged_runs_rank_last(tmp_path):
    def absurd(model, likelihood):
        return TorchAdapter(torch.optim.SGD(model.parameters(), lr=1e8))

    result = compare(
        {"absurd": absurd, "adam": adam}, "logistic", steps=20, short=True, out_dir=tmp_path, progress=False
    )
    assert [r.label for r in result.rows] == ["adam", "absurd"]
    assert result.rows[1].status == "diverged" and "diverged at step" in result.rows[1].message
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][1]["status"] == "diverged"


def test_compare_lr_grid_reports_the_best_per_recipe(tmp_path):
    result = compare(
        {"adam": adam, "sgd": sgd},
        "logistic",
        steps=20,
        short=True,
        lr_grid=(0.1, 1.0, 10.0),
        out_dir=tmp_path,
        progress=False,
    )
    assert len(result.runs) == 6 and len(result.all_rows) == 6 and len(result.rows) == 2
    assert sorted(r.lr for r in result.all_rows if r.label == "adam") == pytest.approx([1e-3, 1e-2, 1e-1])
    assert sorted(r.lr for r in result.all_rows if r.label == "sgd") == pytest.approx([1e-2, 1e-1, 1.0])
    for row in result.rows:
        mine = [r for r in result.all_rows if r.label == row.label]
        assert _row_key(row, True) == min(_row_key(r, True) for r in mine)
        assert result.best_lr[row.label] == row.lr
    keys = [_row_key(r, True) for r in result.all_rows]
    assert keys == sorted(keys)
    assert (tmp_path / "runs" / "adam-lrx10-seed0" / "metrics.json").exists()
    assert len(_read_csv(tmp_path / "compare.csv")) == 6
    assert render_table(result, all_rows=True).row_count == 6


def test_precond_optimizers_plug_in():
    # the real contract: precond.build(...).step(closure) runs the backward pass itself
    precond = pytest.importorskip("precond")
    try:
        build = precond.build
    except (AttributeError, ImportError) as exc:  # the core may not be there yet
        pytest.skip(f"precond.build unavailable: {exc}")

    def recipe(name):
        def make(model, likelihood, lr=None, seed=0, task=None):
            lr = lr if lr is not None else task.lr_hint(name)
            return build(name, model, likelihood=likelihood, seed=seed, lr=lr)

        make.label = name
        return make

    result = compare({"adam": recipe("adam"), "sgd": recipe("sgd")}, "digits-mlp", short=True, progress=False)
    assert all(r.status == "ok" for r in result.runs)
    adam_row = next(r for r in result.rows if r.label == "adam")
    assert adam_row.reached == 1 and adam_row.rel_ms_per_step == pytest.approx(1.0)
    solo = train(recipe("adam"), "digits-mlp", short=True, progress=False)
    assert solo.losses == next(r for r in result.runs if r.label == "adam").losses


def test_threads_are_set_for_the_run_and_restored():
    seen = {}

    def factory(model, likelihood):
        seen["threads"] = torch.get_num_threads()
        return adam(model, likelihood)

    before = torch.get_num_threads()
    result = train(factory, "logistic", steps=2, short=True, progress=False, threads=2)
    assert seen["threads"] == 2 and result.config["threads"] == 2
    assert torch.get_num_threads() == before
