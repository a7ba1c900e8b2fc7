"""The ``precond`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from precond import registry
from precond.errors import LikelihoodMismatchWarning, PrecondError, RecipeWarning
from precond.recipe import builtin_recipes, load_recipe, parse_set, schema

_default_showwarning = warnings.showwarning
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Second-order optimizers declared as recipes.")
console = Console()
err = Console(stderr=True)


@app.callback()
def _plugins(
    plugin: list[str] = typer.Option(
        [], "--plugin", help="import this module first (it registers blocks or tasks); repeatable. Installed "
        "packages are found through the entry-point groups precond.blocks / precond.tasks without it"
    ),
) -> None:
    """Second-order optimizers declared as recipes."""
    import importlib

    for module in plugin:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a user's module: say what failed, no traceback
            err.print(f"[bold red]error:[/] --plugin {module}: {type(exc).__name__}: {exc}", highlight=False)
            raise typer.Exit(2) from None


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


@app.command()
def build(
    recipes: list[str] = typer.Argument(None, help="recipe names or YAML files"),
    all_: bool = typer.Option(False, "--all", help="every built-in recipe"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value, e.g. lr=0.01 or structure.beta=0.99"),
    model: str = typer.Option(
        "mlp:32,64,10", "--model", help="model for memory, time and rules: mlp:IN,HIDDEN,...,OUT or task:NAME (e.g. task:tiny-lm)"
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads for the timed steps (as `precond train`)"),
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
            summary = summarize(recipe, model, threads=threads)
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
            f"{summary.ms_per_step:.2f} ms/step (median, {summary.threads} thread{'s' if summary.threads != 1 else ''})",
            highlight=False,
        )
        if recipe.rules:  # type: ignore[attr-defined]
            rules = Table(title=f"{recipe.name}: which rule each parameter of {model} follows", title_justify="left")
            for column in ("parameter", "module", "rule"):
                rules.add_column(column)
            for row in summary.assignment:
                rules.add_row(*row)
            console.print(rules)
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
    """Print a recipe's YAML file verbatim (`precond show kfac > my_kfac.yaml` gives a valid recipe)."""
    from pathlib import Path

    table = builtin_recipes()
    path = table.get(name) or Path(name)
    if not path.is_file():
        _fail(ValueError(f"no built-in recipe or file {name!r}{registry.suggest(name, list(table))}; built-in: {', '.join(table)}"))
    text = path.read_text(encoding="utf-8")
    if console.is_terminal:  # colour for a reader; never wrapped or cut, so a copied line stays valid YAML
        console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"), soft_wrap=True, crop=False)
    else:  # piped or redirected: the bytes of the file, nothing added
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command("schema")
def schema_(
    out: Optional[str] = typer.Option(
        None, "--out", help="write to this file, or to DIR/recipe.schema.json when it is a folder (`--out .` beside "
        "your recipes, where their `# yaml-language-server: $schema=recipe.schema.json` line finds it)",
    ),
) -> None:
    """Print the JSON Schema of recipes (for yaml-language-server and editors), plugin blocks included."""
    from pathlib import Path

    text = json.dumps(schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    target = Path(out)
    if target.is_dir():
        target = target / "recipe.schema.json"
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(ValueError(f"cannot write {target}: {exc.strerror}"))
    err.print(f"wrote {target}", highlight=False)


# ---------------------------------------------------------------------------
# train / compare

EXIT_OK = 0
EXIT_USAGE = 2  # invalid recipe, task or option (a located message, no traceback)
EXIT_DIVERGED = 3  # train: the loss became non-finite or exploded; results are still written
EXIT_ERROR = 4  # train: the optimizer or the evaluation raised; traceback in metrics.json
EXIT_INTERRUPTED = 130  # Ctrl-C; results so far are written

DEFAULT_TASK = "digits-autoencoder"
# compared when `precond compare` gets no recipe: whichever of these are built-in recipes right now
DEFAULT_SET = ("adam", "kfac", "shampoo", "sophia_g", "adahessian")
DEFAULT_SEEDS = "0,1"
DTYPES = {"float32": "float32", "float64": "float64"}


class RecipeFactory:
    """``make_optimizer(model, likelihood, seed, lr)`` for :mod:`precond.training`:
    ``precond.build(recipe, model, likelihood=..., seed=..., lr=...)``. ``lr``
    (the attribute) is the resolved learning rate; the runner's ``lr`` keyword
    (``--lr-grid``) overrides it."""

    def __init__(self, recipe, lr: float, label: str, lr_reason: str):
        self.recipe = recipe
        self.lr = float(lr)
        self.label = label
        self.lr_reason = lr_reason

    def __call__(self, model, likelihood, seed: int = 0, lr: Optional[float] = None):
        import precond

        return precond.build(self.recipe, model, likelihood=likelihood, seed=seed, lr=self.lr if lr is None else lr)


def _console_out() -> Console:
    """stdout; wide when it is not a terminal (logs, pipes, tests) so tables do not wrap numbers."""
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, width=max(c.width, 160))


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers such as 0,1, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: give at least one value, e.g. 0,1")
    return values


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers such as 0.3,1,3, got {text!r}") from None
    if not values or any(not (v > 0) or v != v or v == float("inf") for v in values):
        raise ValueError(f"{what}: expected positive finite numbers, got {text!r}")
    return values


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def _task(name: str, seed: int, short: bool, dtype):
    """Build the task once (to check its name and read its learning-rate hints)."""
    from precond.tasks import build_task

    return build_task(name, seed=seed, dtype=dtype, short=short)


def _newton_type(recipe) -> bool:
    """A Newton / natural-gradient / quasi-Newton step: ``inverse`` in the transform chain and no ``clip``.

    Its direction ``C⁻¹g`` carries the loss's own scale, so its lr is a dimensionless step fraction
    (1 = the full step) that transfers from task to task, unlike the step size of a first-order or
    diagonal adaptive method, which is what a task's ``default`` hint is for."""
    names = [t.name for t in getattr(recipe, "transform", [])]
    return "inverse" in names and "clip" not in names


def _lr_for(recipe, task, cli_lr: Optional[float], set_lr: bool) -> tuple[float, str]:
    """The learning rate a run uses and why: ``--lr``, then ``--set lr=``, then the task's hint for
    the recipe's name; without one, the task's ``default`` hint, except for Newton-type recipes
    (see :func:`_newton_type`), which keep their own lr."""
    if cli_lr is not None:
        return float(cli_lr), "from --lr"
    if set_lr:
        return float(recipe.lr), "from --set lr="
    key = recipe.name.lower()
    if key in task.default_lr:
        return float(task.default_lr[key]), f"task {task.name}'s hint for '{recipe.name}'; the recipe says {recipe.lr:g}"
    if _newton_type(recipe):
        return float(recipe.lr), (
            f"the recipe's own lr: task {task.name} has no hint for '{recipe.name}', and a Newton-type step "
            "(transform inverse, no clip) is scale-free"
        )
    hint = task.lr_hint(recipe.name)
    if hint is not None:
        return float(hint), (
            f"task {task.name}'s default hint, it has none for '{recipe.name}'; the recipe says {recipe.lr:g}"
        )
    return float(recipe.lr), f"the recipe's own lr; task {task.name} has no hint"


def _load(spec: str, overrides: dict, task, cli_lr: Optional[float]) -> RecipeFactory:
    from precond.recipe import resolve

    dotted = {k: v for k, v in overrides.items() if "." in k}
    hyper = {k: v for k, v in overrides.items() if "." not in k}
    recipe = load_recipe(spec, set={**dotted, **hyper})
    lr, why = _lr_for(recipe, task, cli_lr, "lr" in hyper)
    recipe = resolve(recipe, hyper={"lr": lr})  # validates the lr too
    return RecipeFactory(recipe, lr, recipe.name, why)


def _unbuildable(factories: dict, instance) -> dict[str, str]:
    """Recipes whose optimizer cannot be built on the task's model (e.g. K-FAC's layer factors on a
    model without Linear layers): label -> the reason. Probed on the throwaway task instance."""
    import torch

    out = {}
    for label, factory in factories.items():
        with torch.random.fork_rng(devices=[]):
            try:
                factory(instance.model, instance.likelihood, seed=instance.seed)
            except PrecondError as exc:
                out[label] = str(exc)
    return out


def _target_text(result) -> str:
    from precond.training import _fmt

    op = ">=" if result.higher_is_better else "<="
    return f"{result.metric} {op} {_fmt(result.target)}"


def _write_recipe(path, recipe) -> None:
    from pathlib import Path

    Path(path).write_text(f"# the recipe as run (after --set and the learning rate)\n{recipe.to_yaml()}", encoding="utf-8")


@app.command()
def train(
    recipe: str = typer.Argument(..., help="a built-in recipe name or a YAML file"),
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help="built-in task (precond tasks lists them)"),
    steps: Optional[int] = typer.Option(None, "--steps", "-n", min=0, help="optimizer steps [default: the task's]"),
    seed: int = typer.Option(0, "--seed", help="seed of the model, the minibatch order and the optimizer's probes"),
    set_: list[str] = typer.Option([], "--set", help="override: key=value, e.g. lr=0.01 or structure.beta=0.99"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="result folder [default: runs/<recipe>-<task>]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate [default: --set lr=, else the task's hint]"),
    short: bool = typer.Option(False, "--short", help="the task's small, fast variant (the test suite's mode)"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 is fastest for these small models)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="evaluate every N steps [default: the task's]"),
    stop_at_target: bool = typer.Option(False, "--stop-at-target", help="stop at the first evaluation that reaches the target"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="train on N processes (torch.distributed, gloo, DistributedDataParallel; each takes 1/N of every batch); under torchrun the processes exist already"),
) -> None:
    """Train one recipe on a built-in task: progress, summary, metrics.json, curve.csv, curve.png.

    Exit status: 0 ok; 2 invalid recipe, task or option; 3 the run diverged; 4 the optimizer raised; 130 interrupted. Results are written in every case but 2.
    """
    from precond.launch import launch, launched, process_group

    if nproc > 1 and not launched():
        raise typer.Exit(launch(nproc, sys.argv[1:]))
    with process_group() as rank:
        _train_here(recipe, task, steps, seed, set_, out, lr, short, threads, eval_every, stop_at_target, dtype,
                    progress and not rank, rank)


def _train_here(
    recipe: str, task: str, steps: Optional[int], seed: int, set_: list[str], out: Optional[str], lr: Optional[float],
    short: bool, threads: int, eval_every: Optional[int], stop_at_target: bool, dtype: str, progress: bool, rank: Optional[int],
) -> None:
    """`precond train` in this process; of several (``rank`` not None) rank 0 reports and writes, the others train."""
    from pathlib import Path

    from precond.training import render_table
    from precond.training import train as run_train

    try:
        torch_dtype = _dtype(dtype)
        instance = _task(task, seed, short, torch_dtype)
        factory = _load(recipe, parse_set(set_), instance, lr)
    except (PrecondError, ValueError) as exc:
        _fail(exc)
    out_dir = Path(out) if out else Path("runs") / f"{factory.label}-{instance.name}"
    config = {
        "recipe": factory.recipe.to_dict(),
        "recipe_source": recipe,
        "set": list(set_),
        "lr_reason": factory.lr_reason,
        "short": short,
        "command": "train",
    }
    interrupted = False
    try:
        result = run_train(
            factory, instance.name, steps=steps, seed=seed, out_dir=None if rank else out_dir, progress=progress,
            eval_every=eval_every, label=factory.label, short=short, dtype=torch_dtype,
            stop_at_target=stop_at_target, threads=threads, config=config, console=err, distributed=rank is not None,
        )
    except KeyboardInterrupt:
        interrupted = True
        result = None
    except PrecondError as exc:  # the recipe cannot work on this task (e.g. a likelihood it needs)
        _fail(exc)
    if interrupted:
        err.print(f"[yellow]interrupted[/]; results so far in {escape(str(out_dir))}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if rank:
        raise typer.Exit(EXIT_DIVERGED if result.status == "diverged" else EXIT_ERROR if result.status == "error" else 0)
    _write_recipe(out_dir / "recipe.yaml", factory.recipe)

    con = _console_out()
    con.print(render_table(result))
    change = "" if factory.lr_reason.startswith("from ") else " (--lr to change)"
    con.print(f"lr = {factory.lr:g}: {escape(factory.lr_reason)}{change}")
    if result.reached:
        con.print(
            f"reached the target {_target_text(result)} at step {result.steps_to_target} "
            f"({result.time_to_target_s:.3g} s of training)"
        )
    else:
        con.print(f"did not reach the target {_target_text(result)} in {result.steps_done} steps")
    con.print(f"wrote {escape(str(out_dir))}/: metrics.json, curve.csv, curve.png, recipe.yaml")
    if result.status == "diverged":
        err.print(
            f"[bold red]{escape(result.message)}[/] (results written; exit status {EXIT_DIVERGED})",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(EXIT_DIVERGED)
    if result.status == "error":
        err.print(
            f"[bold red]{escape(result.message)}[/] (traceback in metrics.json; exit status {EXIT_ERROR})",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(EXIT_ERROR)


def default_set() -> list[str]:
    """The recipes `precond compare` runs without arguments: those of DEFAULT_SET that are built in now."""
    available = builtin_recipes()
    return [name for name in DEFAULT_SET if name in available]


def _unique_label(label: str, taken: set[str], spec: str) -> str:
    if label not in taken:
        return label
    from pathlib import Path

    base = f"{label}[{Path(spec).stem}]"
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}#{i}", i + 1
    return candidate


def _meets(value: float, result) -> bool:
    if value != value:  # nan
        return False
    return value >= result.target if result.higher_is_better else value <= result.target


def verdict(result) -> list[str]:
    """Plain sentences: which recipe wins (fewest steps to target, fastest wall-clock) and by how much."""
    from precond.training import _fmt

    rows = [r for r in result.rows if r.status == "ok" or r.reached]
    target = f"{result.metric} {'>=' if result.higher_is_better else '<='} {_fmt(result.target)}"
    by = {r.label: r for r in result.rows}
    reached = [r for r in result.rows if r.steps_to_target is not None]
    lines = []
    if not reached:
        pool = [r for r in rows if r.final_metric == r.final_metric] or list(result.rows)
        if not pool:
            return [f"no recipe reached the target {target}"]
        best = sorted(pool, key=lambda r: -r.final_metric if result.higher_is_better else r.final_metric)[0]
        return [
            f"no recipe reached the target {target} in {result.steps} steps; "
            f"best final {result.metric}: {best.label} ({_fmt(best.final_metric)})"
        ]
    first = reached[0]
    others = [r for r in reached if r.label != first.label]
    text = f"fewest steps to {target}: {first.label}, {_fmt(first.steps_to_target)} steps"
    ref = by.get("adam") if first.label != "adam" else (others[0] if others else None)
    if ref is not None and ref.label != first.label:
        if ref.steps_to_target is not None and ref.steps_to_target == first.steps_to_target:
            text += f", tied with {ref.label} (ahead on wall-clock)"
        elif ref.steps_to_target is not None:
            text += (
                f" vs {ref.label} {_fmt(ref.steps_to_target)} "
                f"({ref.steps_to_target / first.steps_to_target:.2f}x fewer)"
            )
        else:
            text += f"; {ref.label} did not reach it in {result.steps} steps"
    if not _meets(first.final_metric, result):
        text += f", but it ends off the target again, at {result.metric} {_fmt(first.final_metric)}"
    lines.append(text)
    fastest = min(reached, key=lambda r: r.time_to_target_s)
    rest = sorted((r for r in reached if r.label != fastest.label), key=lambda r: r.time_to_target_s)
    text = f"fastest wall-clock to target: {fastest.label}, {fastest.time_to_target_s:.3g} s"
    if rest:
        text += f" vs {rest[0].label} {rest[0].time_to_target_s:.3g} s ({rest[0].time_to_target_s / fastest.time_to_target_s:.2f}x faster)"
    lines.append(text)
    missed = [r.label for r in result.rows if r.steps_to_target is None]
    if missed:
        lines.append(f"did not reach the target (median over seeds) in {result.steps} steps: {', '.join(missed)}")
    return lines


@app.command()
def compare(
    recipes: list[str] = typer.Argument(None, help=f"recipe names or YAML files [default: {', '.join(DEFAULT_SET)}, those built in]"),
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help="built-in task (precond tasks lists them)"),
    steps: Optional[int] = typer.Option(None, "--steps", "-n", min=0, help="optimizer steps per run [default: the task's]"),
    seeds: str = typer.Option(DEFAULT_SEEDS, "--seeds", help="comma-separated seeds; the table takes medians over them"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="result folder [default: runs/compare-<task>]"),
    lr_grid: bool = typer.Option(False, "--lr-grid", help="try each recipe's lr times 0.1, 0.3, 1, 3, 10; keep the best"),
    lr_multipliers: Optional[str] = typer.Option(None, "--lr-multipliers", help="a custom grid, e.g. 0.5,1,2 (implies --lr-grid)"),
    all_: bool = typer.Option(False, "--all", help="every built-in recipe"),
    short: bool = typer.Option(False, "--short", help="the task's small, fast variant (the test suite's mode)"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 is fastest for these small models)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="evaluate every N steps [default: the task's]"),
    stop_at_target: bool = typer.Option(False, "--stop-at-target", help="stop each run at its first evaluation reaching the target"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bars"),
) -> None:
    """Compare recipes on one task and the same seeds, interleaved step by step: a ranked table and one plot.

    Learning rates: the task's hint for each recipe (see precond tasks); --lr-grid searches around it.

    Exit status: 0 when the comparison completes (runs that diverged or failed are rows of the table); 2 invalid recipe, task or option; 130 interrupted.
    """
    from pathlib import Path

    from precond.training import _slug, render_table
    from precond.training import compare as run_compare

    names = list(recipes or [])
    if all_:
        names += [n for n in builtin_recipes() if n not in names]
    default = not names
    if default:
        names = default_set()
    try:
        seed_list = _parse_ints(seeds, "--seeds")
        grid = _parse_floats(lr_multipliers, "--lr-multipliers") if lr_multipliers else (True if lr_grid else None)
        torch_dtype = _dtype(dtype)
        instance = _task(task, seed_list[0], short, torch_dtype)
        factories: dict[str, RecipeFactory] = {}
        for spec in names:
            factory = _load(spec, {}, instance, None)
            factory.label = _unique_label(factory.label, set(factories), spec)
            factories[factory.label] = factory
    except (PrecondError, ValueError) as exc:
        _fail(exc)
    if default:
        err.print(f"comparing the default set on {instance.name}: {', '.join(factories)}", highlight=False)
    skipped = _unbuildable(factories, instance)
    for label, reason in skipped.items():
        del factories[label]
        err.print(f"[yellow]skipped {escape(label)}[/]: it cannot run on {instance.name}: {escape(reason)}",
                  highlight=False, soft_wrap=True)
    if not factories:
        _fail(ValueError(f"none of the recipes can run on task {instance.name}"))
    out_dir = Path(out) if out else Path("runs") / f"compare-{instance.name}"
    config = {
        "command": "compare",
        "default_set": default,
        "recipes": {label: f.recipe.to_dict() for label, f in factories.items()},
        "lr_reasons": {label: f.lr_reason for label, f in factories.items()},
        "skipped": skipped,
        "short": short,
    }
    try:
        result = run_compare(
            factories, instance.name, steps=steps, seeds=seed_list, out_dir=out_dir, lr_grid=grid,
            progress=progress, eval_every=eval_every, short=short, dtype=torch_dtype,
            stop_at_target=stop_at_target, threads=threads, config=config, console=err,
        )
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]; results so far in {escape(str(out_dir))}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PrecondError as exc:
        _fail(exc)
    (out_dir / "recipes").mkdir(parents=True, exist_ok=True)
    for label, factory in factories.items():
        _write_recipe(out_dir / "recipes" / f"{_slug(label)}.yaml", factory.recipe)
    reasons = {label: f"{f.lr:g} ({f.lr_reason})" for label, f in factories.items()}
    (out_dir / "compare.md").write_text(compare_markdown(result, None if grid else reasons, skipped), encoding="utf-8")
    con = _console_out()
    con.print(render_table(result))
    for label, factory in factories.items():
        if result.lr_grid:
            best = result.best_lr.get(label)
            con.print(f"lr {label} = best {_fmt_lr(best)} of the grid around {factory.lr:g}: {escape(factory.lr_reason)}")
        else:
            con.print(f"lr {label} = {factory.lr:g}: {escape(factory.lr_reason)}")
    for line in verdict(result):
        con.print(escape(line))
    for row in result.rows:
        if row.status != "ok" and row.message:
            con.print(f"[red]{escape(row.label)}[/]: {escape(row.message)}")
    for label in skipped:
        con.print(f"[yellow]skipped {escape(label)}[/]: it cannot run on {instance.name} (reason above)")
    con.print(f"wrote {escape(str(out_dir))}/: compare.json, compare.csv, compare.md, compare.png, recipes/, runs/")


def compare_markdown(result, lr_reasons: Optional[dict] = None, skipped: Optional[dict] = None) -> str:
    """The comparison as Markdown (what `compare.md` holds): the ranked table, then the verdict."""
    from precond.training import _fmt

    op = ">=" if result.higher_is_better else "<="
    grid = result.lr_grid is not None
    has_ref = any(r.rel_ms_per_step is not None for r in result.rows)
    head = ["#", "recipe", "lr", "reached", "steps to target", "time to target (s)", f"final {result.metric}",
            "final train loss", "ms/step"]
    if has_ref:
        head.append("× adam ms/step")
    head.append("status")
    lines = [
        f"`{result.task}`: target {result.metric} {op} {_fmt(result.target)}, {result.steps} steps, "
        f"seeds {', '.join(map(str, result.seeds))}" + (f", lr grid × {', '.join(f'{m:g}' for m in result.lr_grid)}" if grid else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for rank, row in enumerate(result.rows, start=1):
        lr = _fmt_lr(row.lr) + (f" (×{row.lr_multiplier:g})" if grid and row.lr_multiplier is not None else "")
        cells = [str(rank), f"`{row.label}`", lr, f"{row.reached}/{row.seeds}", _fmt(row.steps_to_target),
                 _fmt(row.time_to_target_s, 3), _fmt(row.final_metric), _fmt(row.final_train_loss), _fmt(row.ms_per_step, 3)]
        if has_ref:
            cells.append(_fmt(row.rel_ms_per_step, 3))
        cells.append(row.status if row.status == "ok" else f"{row.status}: {row.message}".replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {line}" for line in verdict(result)]
    for label, reason in (skipped or {}).items():
        lines.append(f"- skipped `{label}`: it cannot run on this task: {reason}")
    if lr_reasons:
        lines.append("- learning rates: " + "; ".join(f"`{k}` {v}" for k, v in lr_reasons.items()))
    return "\n".join(lines) + "\n"


def _fmt_lr(value) -> str:
    return "—" if value is None else f"{value:g}"


@app.command()
def tasks() -> None:
    """List the built-in (and plugin) training tasks for train and compare."""
    from precond.tasks import build_task, task_description, task_names

    t = Table(title="tasks (precond train RECIPE --task NAME)", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("target (--short)")
    t.add_column("steps (--short)", justify="right")
    t.add_column("likelihood")
    t.add_column("lr hints")
    t.add_column("what it is")
    for name in task_names():
        try:
            full, small = build_task(name), build_task(name, short=True)
            op = ">=" if full.higher_is_better else "<="
            target = f"{full.metric} {op} {full.target:g} ({small.target:g})"
            steps = f"{full.default_steps} ({small.default_steps})"
            likelihood = str(full.likelihood)
            hints = ", ".join(f"{k} {v:g}" for k, v in full.default_lr.items())
        except Exception as exc:  # noqa: BLE001  (a broken plugin task is listed, not fatal)
            target, steps, likelihood, hints = f"(failed: {type(exc).__name__}: {exc})", "—", "—", "—"
        t.add_row(name, target, steps, likelihood, hints, task_description(name))
    _console_out().print(t)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """precond's own warnings (a rule that matches nothing, a likelihood that disagrees with the loss) as one
    located line, like its errors; any other warning as Python shows it."""
    if issubclass(category, (RecipeWarning, LikelihoodMismatchWarning)):
        err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except PrecondError as exc:  # anything a block raises on purpose: a message, not a traceback
        _fail(exc)


if __name__ == "__main__":
    main()
