"""The wheel ships the recipes; the README's set-up commands and .ci/run stay in step."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_opens_with_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.index("```")
    assert text[:first_block].strip() == "# precond"
    main, tests = readme_commands()
    assert "precond compare" in main and "[cli]" in main
    assert "-c constraints.txt" in tests and "[test]" in tests and "pytest" in tests


def test_the_lock_pins_every_package_of_the_test_environment() -> None:
    """constraints.txt pins exact versions (no ranges), torch among them, and nothing of precond itself."""
    lines = [ln for ln in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    names = set()
    for line in lines:
        spec, _, marker = line.partition(";")
        name, sep, version = spec.strip().partition("==")
        assert sep and version and not any(c in version for c in "<>*,+"), line
        names.add(name.lower().replace("_", "-"))
    assert {"torch", "pydantic", "pyyaml", "pytest", "scipy", "numpy"} <= names
    assert "precond" not in names


def test_ci_runs_the_readme_test_command() -> None:
    script = ROOT / ".ci" / "run"
    out = subprocess.run(
        ["bash", "-c", "grep -m2 -A1 '^```bash' README.md | grep -v '^```bash' | grep -v '^--' | sed -n 2p"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == readme_commands()[1]
    assert "README.md" in script.read_text()


def test_wheel_ships_the_recipes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("precond/recipes/")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")} | {"recipe.schema.json"}
    assert "precond/optimizer.py" in names
    # an installed copy finds the recipes inside the package
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "import precond.recipe as r; print(sorted(r.builtin_recipes()), r.recipe_dirs()[0])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert "'adam'" in out.stdout and str(target) in out.stdout
