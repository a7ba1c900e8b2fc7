"""The architecture as built (docs/design.md): blocks see typed interfaces, never the optimizer; modules form no
dependency circle; facts that blocks pass to each other are declared and checked; a new block is one file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from pydantic import Field

import precond
from precond import recipe as recipe_module
from precond import registry
from precond.block import Direction, Transform
from precond.errors import RecipeError
from precond.interfaces import FACTS, Facts

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "precond"
BLOCK_PACKAGES = ("curvature", "structure", "transform", "step")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every precond module ``name`` imports anywhere in its file (type-checking and function-local ones too)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in known and t != name and not name.startswith(t + "."):  # a submodule needs its package anyway
                out.add(t)
    return out


def test_no_block_module_imports_the_optimizer() -> None:
    known = modules()
    for name, path in known.items():
        if name.split(".")[1:2] and name.split(".")[1] in BLOCK_PACKAGES:
            assert "precond.optimizer" not in imports(name, path, known), name
    for name in ("precond.block", "precond.interfaces", "precond.evaluation", "precond.estimate"):
        assert "precond.optimizer" not in imports(name, known[name], known), name


def test_no_dependency_circle_among_the_modules() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_blocks_use_typed_interfaces_and_every_type_ignore_says_why() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "ctx.optimizer" not in text and "ctx.extra" not in text, path
        for line in text.splitlines():
            if "type: ignore" in line:
                reason = line.split("type: ignore", 1)[1]
                assert re.search(r"\]\s*#\s*\S", reason), f"{path}: a type: ignore without its reason: {line.strip()}"


def test_facts_are_the_typed_fields_blocks_declare() -> None:
    assert set(FACTS) == {"damping", "quadratic"} == set(Facts.__dataclass_fields__)
    for kind in ("curvature", "structure", "transform", "momentum", "step", "decay"):
        for name, cls in registry.blocks(kind).items():
            for what in ("produces", "consumes", "requires"):
                assert set(getattr(cls, what)) <= set(FACTS), (kind, name, what)
    assert "damping" in registry.get("step", "lm").produces and "damping" in registry.get("transform", "inverse").consumes
    assert "quadratic" in registry.get("structure", "full").produces and "quadratic" in registry.get("step", "lm").requires


@pytest.fixture()
def needs_a_fact():
    """A transform that requires the quadratic model, registered for one test."""

    @registry.register("transform", "test_needs_quadratic")
    class NeedsQuadratic(Transform):
        """Reads ctx.facts.quadratic."""

        requires = frozenset({"quadratic"})
        weight: float = Field(1.0)

        def apply(self, ctx, direction: Direction) -> Direction:
            return direction

    yield "test_needs_quadratic"
    registry._BLOCKS["transform"].pop("test_needs_quadratic")
    recipe_module._reset()


def test_a_required_fact_nobody_produces_is_refused_at_validation(needs_a_fact: str) -> None:
    bad = {"name": "r", "curvature": {"type": "empirical_fisher"}, "structure": {"type": "diagonal"},
           "transform": [{"type": "inverse_root", "damping": 1e-8}, {"type": needs_a_fact}]}
    with pytest.raises(RecipeError, match=r"transform.1: transform 'test_needs_quadratic' needs the quadratic that "
                                          r"structure 'full' produces, and the recipe has none of them"):
        precond.build(bad, [torch.zeros(2, requires_grad=True)])
    good = {"name": "r", "curvature": {"type": "hessian"}, "structure": {"type": "full"},
            "transform": [{"type": "inverse", "damping": 1.0}, {"type": needs_a_fact}]}
    precond.build(good, [torch.zeros(2, requires_grad=True)])


def test_builtin_blocks_are_found_without_a_list() -> None:
    """Every module of the block packages is imported by the registry: a new block is one file."""
    names = set(registry.builtin_modules())
    for package in BLOCK_PACKAGES:
        for path in (PACKAGE / package).glob("*.py"):
            if path.stem != "__init__":
                assert f"precond.{package}.{path.stem}" in names
    assert "newton_schulz" in registry.names("transform")
