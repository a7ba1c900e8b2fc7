"""`precond train --nproc N`: N gloo processes under DistributedDataParallel equal one process (and torchrun works)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["train", "kfac", "--task", "digits-mlp", "--short", "--steps", "12", "--eval-every", "6", "--no-progress"]


def _run(prefix: list[str], out: Path, extra: list[str] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([*prefix, *ARGS, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run([sys.executable, "-m", "precond.cli"], tmp_path_factory.mktemp("one"))


def _same(a: dict, b: dict) -> None:
    assert a["steps_done"] == b["steps_done"] == 12
    for key, value in a["final"].items():
        assert b["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the recorded losses are each process's own half: they differ from the global batch's
    assert a["final_loss"] != b["final_loss"]


def test_nproc_two_equals_one_process(one: dict, tmp_path: Path) -> None:
    two = _run([sys.executable, "-m", "precond.cli"], tmp_path / "two", ["--nproc", "2"])
    _same(one, two)
    assert two["config"]["task"]["processes"] == 2
    assert list((tmp_path / "two").iterdir())  # rank 0 wrote the results


def test_torchrun_runs_the_same_code(one: dict, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    _same(one, _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "precond.cli"], out))


def test_a_transformer_with_fallback_rules_trains_the_same_on_two_processes(tmp_path: Path) -> None:
    """tiny-lm: K-FAC factors over (batch, sequence) rows, LayerNorm and Embedding routed to Adam by rules."""
    args = ["train", "kfac", "--task", "tiny-lm", "--short", "--steps", "8", "--eval-every", "4", "--no-progress"]
    runs = []
    for n in (1, 2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        out = tmp_path / f"lm{n}"
        done = subprocess.run([sys.executable, "-m", "precond.cli", *args, "--nproc", str(n), "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads((out / "metrics.json").read_text())["final"])
    for key, value in runs[0].items():
        assert runs[1][key] == pytest.approx(value, rel=1e-5), key


def test_a_failing_process_stops_the_others(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "precond.cli", "train", "lbfgs", "--task", "logistic", "--short", "--steps", "3", "--nproc", "2",
         "--no-progress", "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "cannot run on 2 processes" in done.stderr
