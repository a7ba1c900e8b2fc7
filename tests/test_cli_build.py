"""``precond build`` times the steps with the thread count ``precond train`` uses (1 by default) and says so."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from precond.cli import app
from precond.inspect import summarize
from precond.optimizer import Optimizer
from precond.recipe import load_recipe


def test_summarize_times_steps_with_the_threads_asked_for(monkeypatch) -> None:
    seen: list[int] = []
    step = Optimizer.step

    def spy(self, closure=None):
        seen.append(torch.get_num_threads())
        return step(self, closure)

    monkeypatch.setattr(Optimizer, "step", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = summarize(load_recipe("adam"), steps=3)
        assert s.threads == 1 and set(seen) == {1} and len(seen) == 5  # two warm-up steps, three timed (fast steps)
        assert torch.get_num_threads() == 2  # restored
        seen.clear()
        assert summarize(load_recipe("adam"), steps=3, threads=2).threads == 2 and set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def test_build_prints_the_thread_count() -> None:
    result = CliRunner().invoke(app, ["build", "adam"])
    assert result.exit_code == 0, result.output
    assert "ms/step (median, 1 thread)" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["build", "adam", "--threads", "2"])
    assert "ms/step (median, 2 threads)" in " ".join(result.output.split())


def test_a_slow_recipe_is_timed_on_few_steps(monkeypatch) -> None:
    """Newton's exact Hessian takes seconds per step on the demo model: one warm-up, one timed step."""
    import time as _time

    seen: list[int] = []
    step = Optimizer.step

    def slow(self, closure=None):
        seen.append(1)
        _time.sleep(0.3)
        return step(self, closure)

    monkeypatch.setattr(Optimizer, "step", slow)
    s = summarize(load_recipe("adam"), steps=10, budget_s=0.5)
    assert len(seen) == 1 + 2 and s.ms_per_step >= 300  # one warm-up (> budget/4), two timed (> budget)


def test_build_says_which_training_loops_the_recipe_runs_in() -> None:
    out = " ".join(CliRunner().invoke(app, ["build", "kfac", "lbfgs"]).output.split())
    assert "loops: forward-only closure yes; plain loop yes; torch-style closure yes" in out
    assert "plain loop no: re-evaluates the loss (a closure to call again); torch-style closure yes" in out
