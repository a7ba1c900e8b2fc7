"""The ``precond`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from precond import registry
from precond.errors import PrecondError
from precond.recipe import builtin_recipes, load_recipe, parse_set, schema

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Second-order optimizers declared as recipes.")
console = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def build(
    recipes: list[str] = typer.Argument(None, help="recipe names or YAML files"),
    all_: bool = typer.Option(False, "--all", help="every built-in recipe"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value, e.g. lr=0.01 or structure.beta=0.99"),
    model: str = typer.Option("mlp:32,64,10", "--model", help="demo model for memory and time: mlp:IN,HIDDEN,...,OUT"),
) -> None:
    """Validate and assemble recipes; print each pipeline."""
    from precond.inspect import summarize

    names = list(recipes or [])
    if all_:
        names += list(builtin_recipes())
    if not names:
        _fail(ValueError("name a recipe (precond build adam) or pass --all"))
    failed = 0
    for spec in names:
        try:
            overrides = parse_set(set_)
            hyper = {k: v for k, v in overrides.items() if "." not in k}
            dotted = {k: v for k, v in overrides.items() if "." in k}
            recipe = load_recipe(spec, set={**dotted, **hyper})
            summary = summarize(recipe, model)
        except (PrecondError, ValueError) as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            failed += 1
            continue
        table = Table(title=f"{recipe.name}: {recipe.summary}", title_justify="left", show_lines=False)
        table.add_column("block")
        table.add_column("configuration")
        table.add_column("needs")
        for path, desc, needs in summary.blocks:
            table.add_row(path, desc, needs)
        for k, v in summary.hyper.items():
            table.add_row(k, repr(v), "param group")
        console.print(table)
        console.print(
            f"  step needs: {', '.join(summary.needs)}; state on {model} ({summary.params} parameters): "
            f"{summary.state_bytes / 1024:.1f} KiB = {summary.state_per_param:.2f}x the parameters; "
            f"{summary.ms_per_step:.2f} ms/step",
            highlight=False,
        )
        if recipe.reference:
            console.print(f"  reference: {recipe.reference}", highlight=False)
    if failed:
        raise typer.Exit(2)


@app.command("list")
def list_(json_: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List built-in recipes and registered blocks."""
    from precond.recipe import load_recipe as _load

    recipes = {}
    for name in builtin_recipes():
        try:
            recipes[name] = _load(name).summary
        except PrecondError as exc:
            recipes[name] = f"(invalid: {exc})"
    blocks = registry.describe_all()
    if json_:
        console.print_json(json.dumps({"recipes": recipes, "blocks": blocks, "plugin_errors": registry.PLUGIN_ERRORS}, default=str))
        return
    t = Table(title="recipes", title_justify="left")
    t.add_column("name")
    t.add_column("summary")
    for name, summary in recipes.items():
        t.add_row(name, summary)
    console.print(t)
    b = Table(title="blocks", title_justify="left")
    b.add_column("kind")
    b.add_column("type")
    b.add_column("parameters")
    b.add_column("what it does")
    for row in blocks:
        params = ", ".join(f"{p['name']}={p['default']!r}" if not p["required"] else p["name"] for p in row["parameters"])
        b.add_row(row["kind"], row["name"], params, row["doc"])
    console.print(b)
    for name, problem in registry.PLUGIN_ERRORS.items():
        err.print(f"[yellow]plugin {name} failed to load:[/] {problem}", highlight=False)


@app.command()
def show(name: str = typer.Argument(..., help="a built-in recipe name or a YAML file")) -> None:
    """Print a recipe's YAML."""
    from pathlib import Path

    table = builtin_recipes()
    path = table.get(name) or Path(name)
    if not path.is_file():
        _fail(ValueError(f"no built-in recipe or file {name!r}{registry.suggest(name, list(table))}; built-in: {', '.join(table)}"))
    console.print(Syntax(path.read_text(encoding="utf-8"), "yaml", theme="ansi_dark", background_color="default"))


@app.command("schema")
def schema_(out: Optional[str] = typer.Option(None, "--out", help="write to this file instead of stdout")) -> None:
    """Print the JSON Schema of recipes (for yaml-language-server and editors)."""
    text = json.dumps(schema(), indent=2)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def main() -> None:
    try:
        app()
    except PrecondError as exc:  # anything a block raises on purpose: a message, not a traceback
        _fail(exc)


if __name__ == "__main__":
    main()
