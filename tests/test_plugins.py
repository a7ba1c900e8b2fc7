"""A block registered through the `precond.blocks` entry point is listed, validated and used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import precond
from precond import registry
from precond.errors import RecipeError

PLUGIN = textwrap.dedent(
    '''
    import torch
    from pydantic import Field
    from precond.block import Direction, Transform
    from precond.registry import register

    @register("transform", "plugin_sign")
    class Sign(Transform):
        """signSGD: the sign of the direction, times `scale`."""
        linear = False
        scale: float = Field(1.0, gt=0)

        def apply(self, ctx, direction):
            return Direction([torch.sign(t) * self.scale for t in direction.tensors], 1.0, True)
    '''
)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "precond_testplugin").mkdir()
    (root / "precond_testplugin" / "__init__.py").write_text(PLUGIN)
    info = root / "precond_testplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: precond-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[precond.blocks]\nsign = precond_testplugin\n")
    sys.path.insert(0, str(root))
    registry.load_plugins(force=True)
    yield root
    sys.path.remove(str(root))


def test_plugin_is_listed_validated_and_used(plugin_path: Path) -> None:
    assert "plugin_sign" in registry.names("transform")
    (row,) = [r for r in registry.describe_all() if r["name"] == "plugin_sign"]
    assert row["kind"] == "transform" and row["doc"].startswith("signSGD")
    assert [p["name"] for p in row["parameters"]] == ["every", "start", "scale"]
    recipe = {"name": "signsgd", "lr": 0.1, "transform": {"type": "plugin_sign", "scale": 2.0}}
    with pytest.raises(RecipeError, match=r"transform.scale: expected greater than 0"):
        precond.build({**recipe, "transform": {"type": "plugin_sign", "scale": -1}}, [torch.zeros(1, requires_grad=True)])
    with pytest.raises(RecipeError, match=r"did you mean 'plugin_sign'"):
        precond.build({**recipe, "transform": {"type": "plugin_sgn"}}, [torch.zeros(1, requires_grad=True)])
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = precond.build(recipe, [w])
    opt.step(lambda: (w * torch.tensor([2.0, -1.0, 0.5])).sum())
    assert torch.equal(w.detach(), torch.tensor([0.8, -1.8, 2.8]))
    assert "plugin_sign" in str(precond.recipe.schema())


def test_plugin_in_cli(plugin_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(Path(__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-m", "precond.cli", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "plugin_sign" in out.stdout and "signSGD" in out.stdout


def test_broken_plugin_warns_and_is_reported(tmp_path: Path) -> None:
    info = tmp_path / "precond_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: precond-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[precond.blocks]\nbroken = precond_no_such_module\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.warns(UserWarning, match="broken"):
            errors = registry.load_plugins(force=True)
        assert "broken" in errors
    finally:
        sys.path.remove(str(tmp_path))
        registry.PLUGIN_ERRORS.pop("broken", None)


def test_register_rejects_wrong_base() -> None:
    from precond.block import Curvature

    with pytest.raises(TypeError, match="must subclass"):
        registry.register("structure", "wrong_base")(type("X", (Curvature,), {"__module__": __name__}))
    with pytest.raises(ValueError, match="unknown block kind"):
        registry.register("nonsense", "x")


def test_cli_plugin_flag(tmp_path: Path) -> None:
    (tmp_path / "precond_flagplugin.py").write_text(PLUGIN.replace("plugin_sign", "flag_sign"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-m", "precond.cli", "--plugin", "precond_flagplugin", "list"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "flag_sign" in out.stdout
    out = subprocess.run([sys.executable, "-m", "precond.cli", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert "flag_sign" not in out.stdout  # not imported unless asked for
    out = subprocess.run([sys.executable, "-m", "precond.cli", "--plugin", "no_such_module_x", "list"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "no_such_module_x" in out.stderr and "Traceback" not in out.stderr
