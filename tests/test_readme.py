"""Every code block of the README runs (or, for data, validates) as written.

The two set-up commands at the top are what CI runs (.ci/run); every other block is checked here: the
Python blocks run in order in one fresh interpreter, in a folder holding ``my_recipe.yaml`` (the README's
first YAML block, which it introduces as that file), except a block that opens with
``# FILE; run with: COMMAND``, which is written to FILE and run with COMMAND (a script for torchrun); YAML blocks validate as recipes (a fragment inside a
minimal recipe); TOML blocks parse; the shell blocks run in order in one shell (slow: CI's slow set).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from precond.recipe import validate

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", flags=re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text(encoding="utf-8")) if kind == lang]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "my_recipe.yaml").write_text(blocks("yaml")[0], encoding="utf-8")
    return tmp_path


def test_the_readme_has_the_blocks_this_test_reads() -> None:
    assert len(blocks("python")) >= 3 and len(blocks("yaml")) >= 2 and len(blocks("bash")) >= 3
    assert len(blocks("toml")) >= 1


RUN_WITH = re.compile(r"^# (\S+\.py); run with: (.+)$", flags=re.M)


def scripts() -> list[tuple[str, str, str]]:
    """(file, command, text) of each Python block that says how it is run."""
    out = []
    for text in blocks("python"):
        m = RUN_WITH.match(text)
        if m:
            out.append((m.group(1), m.group(2), text))
    return out


def test_python_blocks_run_in_order(tmp_path: Path) -> None:
    script = "\n\n".join(b for b in blocks("python") if not RUN_WITH.match(b))
    (tmp_path / "readme.py").write_text(script, encoding="utf-8")
    out = subprocess.run([sys.executable, "readme.py"], cwd=_folder(tmp_path), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"a README Python block failed:\n{out.stderr[-4000:]}"


@pytest.mark.parametrize("name,command,text", scripts(), ids=[s[0] for s in scripts()])
def test_python_scripts_run_as_the_readme_says(tmp_path: Path, name: str, command: str, text: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    out = subprocess.run(["bash", "-c", command], cwd=_folder(tmp_path), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{command} failed:\n{out.stderr[-4000:]}"


def test_yaml_blocks_validate() -> None:
    for text in blocks("yaml"):
        data = yaml.safe_load(text)
        if data is None:  # a comment-only line (the yaml-language-server header)
            assert text.lstrip().startswith("#")
            continue
        assert isinstance(data, dict), text
        recipe = data if "name" in data else {"name": "fragment", **data}
        validate(recipe, source="README.md")


def test_toml_blocks_parse() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    for text in blocks("toml"):
        tomllib.loads(text)


@pytest.mark.slow
def test_shell_blocks_run_in_order(tmp_path: Path) -> None:
    commands = blocks("bash")[2:]  # the first two are the set-up commands CI runs
    script = "set -euo pipefail\n" + "\n".join(commands)
    out = subprocess.run(["bash", "-c", script], cwd=_folder(tmp_path), env=_env(), capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, f"a README shell block failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
