"""Generate ``docs/recipes.md`` (and ``recipes/recipe.schema.json``) from the registry.

    python -m precond.docs            # rewrite both files
    python -m precond.docs --check    # exit 1 if either is stale (what tests/test_docs.py asserts)

Everything about blocks comes from the code: the block classes' docstrings,
their pydantic fields (type, default, constraint, description), the
curvature blocks' ``fills`` and the structure blocks' ``form`` class
variables, and the built-in recipe files. Only blocks defined inside precond
are documented (plugin blocks belong to their package's docs), so the output
does not depend on what else is installed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from precond import registry
from precond.block import KINDS
from precond.recipe import builtin_recipes, load_recipe, recipe_model, schema, validate

ROOT = Path(__file__).resolve().parent.parent
RECIPES_MD = ROOT / "docs" / "recipes.md"
SCHEMA_JSON = ROOT / "recipes" / "recipe.schema.json"  # beside the recipes (in the wheel too): `$schema=recipe.schema.json`
REGENERATE = "python -m precond.docs"

# The worked example: a new method composed from existing blocks (tests/test_docs.py builds and trains it).
EXAMPLE_NAME = "adam_clip"
EXAMPLE_YAML = """\
# yaml-language-server: $schema=recipe.schema.json   (precond schema --out recipe.schema.json)
name: adam_clip
summary: Adam's moments with Sophia's per-coordinate clipping of the preconditioned step.
reference: composed from Kingma & Ba 2015 (Adam) and Liu et al. 2024 (Sophia)
lr: 3.0e-3
weight_decay: 0.01
curvature: {type: empirical_fisher}                       # g * g
structure: {type: diagonal, accumulate: ema, beta: 0.999, bias_correction: true}
transform:                                                # applied in order
  - {type: inverse_root, p: 2, damping: 1.0e-8, damping_position: outside}   # m / (sqrt(v) + eps)
  - {type: clip, mode: elementwise, threshold: 1.0}       # each coordinate to [-1, 1]
momentum: {type: ema, beta: 0.9, bias_correction: true, position: pre}
step: {type: lr}
decay: {type: decoupled}                                  # AdamW-style weight decay
"""

KIND_INTRO = {
    "curvature": "Estimates the curvature `C` from the step's gradient, outputs or a functional call of the model. "
    "`fills` says which structure forms it can estimate; `every`/`start` amortise the work.",
    "structure": "Stores and accumulates the curvature (`sum` or `ema`) in a form (`diagonal`, Kronecker factors, "
    "dense, a secant history, PSGD's Kronecker factors fitted to probe pairs) and applies spectral transforms to directions.",
    "transform": "Functions of the curvature applied to the direction (`inverse`, `inverse_root`, spectral: they "
    "act through the structure) or maps of the direction (`clip`, `identity`); a list applies in order.",
    "momentum": "Momentum before (`position: pre`, Adam, Sophia) or after (`position: post`, K-FAC) the "
    "preconditioner.",
    "step": "Chooses the step length and moves the parameters (`lr` is the default).",
    "decay": "How the recipe's `weight_decay` applies: `l2` (added to the gradient) or `decoupled` (AdamW).",
}


# ---------------------------------------------------------------------------
# formatting helpers


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _scalar(value: Any) -> str:
    """A default value as it would be written in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return repr(value)


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{_scalar(a)}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_text(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_text(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if inner else "list"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _constraints(metadata: list[Any]) -> str:
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    parts = []
    for m in metadata:
        for attr, sym in symbols.items():
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {_scalar(v)}")
    return ", ".join(parts)


def _is_builtin(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "precond"


def _builtin_blocks(kind: str) -> dict[str, type]:
    return {n: c for n, c in sorted(registry.blocks(kind).items()) if _is_builtin(c)}


def _needs(cls: type) -> str:
    try:
        needs = cls().needs()
    except Exception:  # noqa: BLE001  (a block with required fields)
        return ""
    names = needs.names()
    return ", ".join(names) if names else "gradients only"


# ---------------------------------------------------------------------------
# sections


def _header() -> list[str]:
    return [
        "# Recipes and blocks",
        "",
        f"<!-- Generated by `{REGENERATE}` from the block registry and recipes/. Do not edit by hand:",
        "     change a block's docstring or Field descriptions (or a recipe file), then run",
        f"     `{REGENERATE}`. tests/test_docs.py fails while this file is stale. -->",
        "",
        f"*Generated from the code by `{REGENERATE}` (which also writes `recipes/recipe.schema.json`); "
        "regenerate after adding or changing a block or a built-in recipe.*",
        "",
        "An optimizer in precond is a *recipe*: a YAML file (or a dict, or blocks composed in Python) that names a "
        "few blocks. Every step is",
        "",
        "    update = - lr * step_control( momentum( f(C) · g ) )",
        "",
        "with `g` the gradient of the loss your closure returns, `C` a curvature *estimated* by a `curvature` block "
        "and *stored* in a `structure`, `f` the `transform` chain, then `momentum`, the `step` control and weight "
        "`decay`. The README has the overview and the command line.",
        "",
        "Contents: [writing a recipe](#writing-a-recipe) · [which curvature fills which structure]"
        "(#which-curvature-fills-which-structure) · [blocks](#blocks) · [built-in recipes](#built-in-recipes) · "
        "[worked example: a new method from existing blocks](#worked-example-a-new-method-from-existing-blocks)",
        "",
    ]


def _writing() -> list[str]:
    model = recipe_model()
    lines = [
        "## Writing a recipe",
        "",
        "A recipe is a mapping with these keys (every block entry is `{type: NAME, ...fields}`; unknown keys are "
        "errors, with the file, line and column and a did-you-mean):",
        "",
        "| key | default | what it is |",
        "| --- | --- | --- |",
    ]
    for fname, info in model.model_fields.items():
        if info.is_required():
            default = "required"
        else:
            value = info.get_default(call_default_factory=True)
            if hasattr(value, "name") and hasattr(value, "kind"):
                default = f"`{{type: {value.name}}}`"
            elif value == [] or value is None:
                default = "none"
            elif value == "":
                default = '`""`'
            else:
                default = f"`{_scalar(value)}`"
        kinds = f" — types: {', '.join(f'`{n}`' for n in _builtin_blocks(fname))}" if fname in KINDS else ""
        lines.append(f"| `{fname}` | {default} | {_cell(info.description or '')}{kinds} |")
    adam = builtin_recipes().get("adam")
    lines += [
        "",
        "`lr` and `weight_decay` become param-group values, so LR schedulers and per-group settings work as in "
        "torch. A built-in recipe, `recipes/adam.yaml`:",
        "",
        "```yaml",
        (adam.read_text(encoding="utf-8").rstrip() if adam else "# (recipes/adam.yaml is missing)"),
        "```",
        "",
        "Check a recipe, see its pipeline, state memory and cost per step, and run it:",
        "",
        "```bash",
        "precond build my_recipe.yaml                      # validate and assemble; errors are located",
        "precond build adam --set structure.beta=0.99      # override any field by its dotted path",
        "precond train my_recipe.yaml --task digits-mlp    # does it train? (exit 3 if it diverges)",
        "precond compare adam my_recipe.yaml               # against Adam, same seeds, interleaved",
        "```",
        "",
        "`--set key=value` (repeatable) sets a top-level hyperparameter (`--set lr=0.01`) or a block field by its "
        "dotted path (`--set structure.beta=0.99`, `--set transform.1.threshold=0.5` for the second transform of "
        "a list); values are YAML scalars. In Python the same is "
        "`precond.build(\"adam\", model, lr=0.01, set={\"structure.beta\": 0.99})`.",
        "",
        *_rules(),
        "Editors: `precond schema` prints the JSON Schema of recipes, generated from the registry (plugin blocks "
        "included); the package ships a copy for the built-in blocks beside its recipes (`recipes/recipe.schema.json` "
        "in a checkout), which is what the first line of every built-in recipe points at. With the YAML language "
        "server (VS Code's YAML extension, and others) that line gives completion, hover docs and validation as "
        "you type. For your own recipes, write the schema into their folder once:",
        "",
        "```bash",
        "precond show kfac > my_kfac.yaml          # a built-in recipe, verbatim, to start from",
        "precond schema --out .                    # writes ./recipe.schema.json (plugin blocks included)",
        "```",
        "",
        "```yaml",
        "# yaml-language-server: $schema=recipe.schema.json",
        "```",
        "",
    ]
    return lines


RULES_EXAMPLE = """\
rules:                                   # first match wins; unmatched parameters use the recipe itself
  - name: norms_and_biases
    match: {modules: [LayerNorm, Embedding], names: ["*.bias"]}
    recipe: adamw                        # a built-in name, a path, or an inline recipe mapping
"""


def _rules() -> list[str]:
    """The `rules` key, documented from the Rule / Match models (when the recipe schema has them)."""
    from precond import recipe as recipe_module

    rule, match = getattr(recipe_module, "Rule", None), getattr(recipe_module, "Match", None)
    if rule is None or match is None or "rules" not in recipe_model().model_fields:
        return []
    import yaml

    data = {"name": "example", **yaml.safe_load(EXAMPLE_YAML.split("\n", 1)[1]), **yaml.safe_load(RULES_EXAMPLE)}
    validate(data, source="rules example")  # the example below must stay valid
    lines = [
        "`rules` send some parameters to another recipe — per-layer treatment such as Adam for the biases, "
        "norms and embeddings of a K-FAC or Shampoo model. Each rule has:",
        "",
        "| key | what it is |",
        "| --- | --- |",
    ]
    for fname, info in rule.model_fields.items():
        lines.append(f"| `{fname}` | {_cell(info.description or (inspect.getdoc(match) if fname == 'match' else ''))} |")
    for fname, info in match.model_fields.items():
        lines.append(f"| `match.{fname}` | {_cell(info.description or '')} |")
    lines += ["", "```yaml", RULES_EXAMPLE.rstrip(), "```", ""]
    return lines


def _recipe_pairs() -> dict[tuple[str, str], list[str]]:
    """(curvature, structure) -> built-in recipes using the pair."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for name in builtin_recipes():
        try:
            r = load_recipe(name)
        except Exception:  # noqa: BLE001, S112
            continue
        c, s = getattr(r, "curvature", None), getattr(r, "structure", None)
        if c is not None and s is not None:
            pairs.setdefault((c.name, s.name), []).append(name)
    return pairs


def _table() -> list[str]:
    curvatures = _builtin_blocks("curvature")
    structures = _builtin_blocks("structure")
    pairs = _recipe_pairs()
    lines = [
        "## Which curvature fills which structure",
        "",
        "Built from each curvature block's `fills` and each structure block's `form`: ✓ the pair is allowed (with "
        "the built-in recipes that use it), — `precond build` refuses it and names the curvatures that would "
        "fill that structure.",
        "",
        "| curvature \\ structure | " + " | ".join(f"`{n}` (form `{c.form}`)" for n, c in structures.items()) + " |",
        "| --- |" + " --- |" * len(structures),
    ]
    for cname, ccls in curvatures.items():
        cells = []
        for sname, scls in structures.items():
            if scls.form in ccls.fills:
                used = pairs.get((cname, sname), [])
                cells.append("✓" + (" " + ", ".join(f"`{u}`" for u in used) if used else ""))
            else:
                cells.append("—")
        lines.append(f"| `{cname}` (fills {', '.join(sorted(ccls.fills)) or 'nothing'}) | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _blocks() -> list[str]:
    lines = ["## Blocks", ""]
    for kind in KINDS:
        table = _builtin_blocks(kind)
        lines += [f"### {kind}", "", KIND_INTRO.get(kind, ""), ""]
        for name, cls in table.items():
            lines += [f"#### `{kind}: {name}`", ""]
            facts = [f"class `{cls.__module__}.{cls.__qualname__}`"]
            if kind == "curvature":
                facts.append(f"fills: {', '.join(sorted(cls.fills)) or 'nothing'}")
            if kind == "structure":
                facts.append(f"form: `{cls.form}`")
            needs = _needs(cls)
            if needs:
                facts.append(f"needs: {needs}")
            lines += [" · ".join(facts), ""]
            doc = inspect.getdoc(cls) or ""
            if doc:
                lines += [doc, ""]
            params = [(f, i) for f, i in cls.model_fields.items() if f != "type"]
            if params:
                lines += ["| field | type | default | constraint | description |", "| --- | --- | --- | --- | --- |"]
                for fname, info in params:
                    default = "required" if info.is_required() else f"`{_scalar(info.get_default(call_default_factory=True))}`"
                    lines.append(
                        f"| `{fname}` | {_type_text(info.annotation)} | {default} | {_constraints(info.metadata)} | "
                        f"{_cell(info.description or '')} |"
                    )
                lines.append("")
            else:
                lines += ["No fields.", ""]
    return lines


def _pipeline_text(recipe: Any) -> str:
    parts = []
    for path, block in recipe.blocks():
        parts.append(f"{path}: {block.name}")
    return " → ".join(parts)


def _recipes() -> list[str]:
    lines = [
        "## Built-in recipes",
        "",
        "Run `precond show NAME` for the YAML and `precond build NAME` for the assembled pipeline.",
        "",
        "| recipe | summary | reference | blocks |",
        "| --- | --- | --- | --- |",
    ]
    for name in builtin_recipes():
        try:
            r = load_recipe(name)
        except Exception as exc:  # noqa: BLE001
            lines.append(f"| `{name}` | (invalid: {_cell(exc)}) | | |")
            continue
        lines.append(
            f"| `{name}` | {_cell(r.summary)} | {_cell(r.reference)} | {_cell(_pipeline_text(r))}; lr {_scalar(r.lr)} |"
        )
    lines.append("")
    return lines


def _example() -> list[str]:
    recipe = example_recipe()
    return [
        "## Worked example: a new method from existing blocks",
        "",
        "Adam's step `m̂ / (√v̂ + ε)` is usually below 1 per coordinate, but not always: a coordinate whose "
        "gradient suddenly grows after a quiet stretch, or one seen rarely (embeddings), gets a step of many "
        "`lr`s. Sophia bounds every coordinate of its step by clipping the preconditioned direction to "
        "`[-1, 1]`, so no coordinate ever moves more than `lr`. Both pieces are blocks, so the new method is a "
        "recipe, not code: Adam's curvature, structure and momentum, with Sophia's `clip` appended to the "
        "transform chain (transforms apply in order, to `f(C)·g`). Save it as `adam_clip.yaml`:",
        "",
        "```yaml",
        EXAMPLE_YAML.rstrip(),
        "```",
        "",
        "```bash",
        "precond build adam_clip.yaml                                 # the pipeline, memory, cost per step",
        "precond train adam_clip.yaml --task digits-mlp               # trains to the target",
        "precond compare adam adamw adam_clip.yaml --task tiny-lm     # against its parents",
        "```",
        "",
        "The same in Python, without YAML:",
        "",
        "```python",
        "import precond",
        "from precond.curvature.empirical_fisher import EmpiricalFisher",
        "from precond.structure.diagonal import Diagonal",
        "from precond.transform.inverse_root import InverseRoot",
        "from precond.transform.clip import Clip",
        "from precond.step.momentum import EMA",
        "from precond.step.decay import Decoupled",
        "",
        "opt = precond.compose(model, name=\"adam_clip\", curvature=EmpiricalFisher(), structure=Diagonal(beta=0.999),",
        "                      transform=[InverseRoot(p=2, damping=1e-8, damping_position=\"outside\"),",
        "                                 Clip(mode=\"elementwise\", threshold=1.0)],",
        "                      momentum=EMA(beta=0.9), decay=Decoupled(), lr=3e-3, weight_decay=0.01)",
        "```",
        "",
        f"Its pipeline: {_pipeline_text(recipe)}. The test suite builds this recipe and trains it on "
        "`digits-mlp` to the task's target (tests/test_docs.py), so the example cannot rot.",
        "",
    ]


def example_recipe():
    """The worked example, validated."""
    import yaml

    return validate(yaml.safe_load(EXAMPLE_YAML), source=f"{EXAMPLE_NAME}.yaml")


@contextmanager
def builtin_blocks_only() -> Iterator[None]:
    """Hide blocks registered from outside precond (plugins, tests) and sort the rest by name while
    generating, so that the output depends on precond's code only (not on what is installed or on
    import order); restores the registry afterwards."""
    from precond import recipe as recipe_module

    registry.blocks("curvature")  # built-ins and plugins loaded
    table = registry._BLOCKS  # noqa: SLF001
    saved = {kind: dict(blocks) for kind, blocks in table.items()}
    try:
        for kind, blocks in table.items():  # built-ins only, sorted: independent of import order
            kept = sorted((n, c) for n, c in saved[kind].items() if _is_builtin(c))
            blocks.clear()
            blocks.update(kept)
        recipe_module._reset()  # noqa: SLF001  (the recipe model is cached per registry state)
        yield
    finally:
        for kind, blocks in saved.items():
            table[kind].clear()
            table[kind].update(blocks)
        recipe_module._reset()  # noqa: SLF001


def recipes_markdown() -> str:
    """The full text of ``docs/recipes.md``."""
    with builtin_blocks_only():
        lines = _header() + _writing() + _table() + _blocks() + _recipes() + _example()
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def schema_json() -> str:
    """``recipes/recipe.schema.json``: the recipe JSON Schema for the built-in blocks."""
    with builtin_blocks_only():
        return json.dumps(schema(), indent=2) + "\n"


def outputs() -> dict[Path, str]:
    return {RECIPES_MD: recipes_markdown(), SCHEMA_JSON: schema_json()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precond.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale; write nothing")
    parser.add_argument("--docs-dir", type=Path, default=None, help="where to write [default: the checkout's docs/]")
    args = parser.parse_args(argv)
    files = outputs()
    if args.docs_dir is not None:
        files = {args.docs_dir / path.name: text for path, text in files.items()}
    elif not (ROOT / "pyproject.toml").is_file():
        print(f"{ROOT} is not a source checkout of precond; pass --docs-dir DIR", file=sys.stderr)
        return 2
    stale = []
    for path, text in files.items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    rel = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in stale]
    if args.check:
        if stale:
            print(f"stale: {', '.join(rel)}; run `{REGENERATE}`", file=sys.stderr)
            return 1
        print("docs are up to date")
        return 0
    print(f"wrote {', '.join(rel)}" if rel else "docs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
