"""The typer app behind the ``precond`` console script (typer + rich, from the ``cli`` extra)."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from precond import registry
from precond.cli import missing_extra
from precond.cli.options import (
    DEFAULT_SEEDS,
    DEFAULT_TASK,
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    DType,
    DTypeOption,
    EvalEvery,
    RunOptions,
    Short,
    Task,
    Threads,
    TimeBudget,
    TrainOptions,
    comma_floats,
    comma_ints,
)
from precond.cli.output import EXIT_USAGE, console, console_out, err, fail, show_warning
from precond.cli.recipes import (
    DEFAULT_SET,
    RecipeFactory,
    TorchFactory,
    _load,
    _load_torch,
    _task,
    _unbuildable,
    _unique_label,
    _write_recipe,
    default_set,
    split_scoped_set,
)
from precond.cli.report import _fmt_lr, _target_text, compare_markdown, verdict
from precond.conventions import support
from precond.errors import PrecondError
from precond.recipe import builtin_recipes, load_recipe, parse_set, schema

if TYPE_CHECKING:
    from precond.tasks.base import TaskInstance

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Second-order optimizers declared as recipes.")

SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="override: key=value, e.g. lr=0.01 or structure.beta=0.99")
]


@app.callback()
def _plugins(
    plugin: Annotated[
        Optional[list[str]],
        typer.Option(
            "--plugin", help="import this module first (it registers blocks or tasks); repeatable. Installed "
            "packages are found through the entry-point groups precond.blocks / precond.tasks without it",
        ),
    ] = None,
) -> None:
    """Second-order optimizers declared as recipes."""
    import importlib

    for module in plugin or []:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a user's module: say what failed, no traceback
            err.print(f"[bold red]error:[/] --plugin {module}: {type(exc).__name__}: {exc}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None


@app.command()
def build(
    recipes: Annotated[Optional[list[str]], typer.Argument(help="recipe names or YAML files")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every built-in recipe")] = False,
    set_: SetOption = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="model for memory, time and rules: mlp:IN,HIDDEN,...,OUT or task:NAME (e.g. task:tiny-lm)"
        ),
    ] = "mlp:32,64,10",
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch CPU threads for the timed steps (as `precond train`)")
    ] = 1,
) -> None:
    """Validate and assemble recipes; print each pipeline."""
    from precond.inspect import summarize

    names = list(recipes or [])
    if all_:
        names += list(builtin_recipes())
    if not names:
        fail("name a recipe (precond build adam) or pass --all")
    failed = 0
    for spec in names:
        try:
            overrides = parse_set(set_ or [])
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
        loops = support(recipe)
        console.print(
            f"  loops: forward-only closure {loops.closure}; plain loop {loops.plain}; torch-style closure "
            f"{loops.torch_closure} (docs/loops.md)",
            highlight=False,
        )
        if recipe.rules:  # type: ignore[attr-defined]  # a field recipe_model() adds
            rules = Table(title=f"{recipe.name}: which rule each parameter of {model} follows", title_justify="left")
            for column in ("parameter", "module", "rule"):
                rules.add_column(column)
            for row in summary.assignment:
                rules.add_row(*row)
            console.print(rules)
        if recipe.reference:
            console.print(f"  reference: {recipe.reference}", highlight=False)
    if failed:
        raise typer.Exit(EXIT_USAGE)


@app.command("list")
def list_(json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List built-in recipes and registered blocks."""
    recipes = {}
    for name in builtin_recipes():
        try:
            recipes[name] = load_recipe(name).summary
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
def show(name: Annotated[str, typer.Argument(help="a built-in recipe name or a YAML file")]) -> None:
    """Print a recipe's YAML file verbatim (`precond show kfac > my_kfac.yaml` gives a valid recipe)."""
    table = builtin_recipes()
    path = table.get(name) or Path(name)
    if not path.is_file():
        fail(f"no built-in recipe or file {name!r}{registry.suggest(name, list(table))}; built-in: {', '.join(table)}")
    text = path.read_text(encoding="utf-8")
    if console.is_terminal:  # colour for a reader; never wrapped or cut, so a copied line stays valid YAML
        console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"), soft_wrap=True, crop=False)
    else:  # piped or redirected: the bytes of the file, nothing added
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command("schema")
def schema_(
    out: Annotated[
        Optional[str],
        typer.Option(
            "--out", help="write to this file, or to DIR/recipe.schema.json when it is a folder (`--out .` beside "
            "your recipes, where their `# yaml-language-server: $schema=recipe.schema.json` line finds it)",
        ),
    ] = None,
) -> None:
    """Print the JSON Schema of recipes (for yaml-language-server and editors), plugin blocks included."""
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
        fail(f"cannot write {target}: {exc.strerror}")
    err.print(f"wrote {target}", highlight=False)


# ---------------------------------------------------------------------------
# train / compare


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="a built-in recipe name or a YAML file")],
    task: Task = DEFAULT_TASK,
    steps: Annotated[
        Optional[int], typer.Option("--steps", "-n", min=0, help="optimizer steps [default: the task's]")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="seed of the model, the minibatch order and the optimizer's probes")
    ] = 0,
    set_: SetOption = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="result folder [default: runs/<recipe>-<task>]")
    ] = None,
    lr: Annotated[
        Optional[float], typer.Option("--lr", help="learning rate [default: --set lr=, else the task's hint]")
    ] = None,
    short: Short = False,
    threads: Threads = None,
    eval_every: EvalEvery = None,
    time_budget: TimeBudget = None,
    stop_at_target: Annotated[
        bool, typer.Option("--stop-at-target", help="stop at the first evaluation that reaches the target")
    ] = False,
    dtype: DTypeOption = DType.float32,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show the progress bar")] = True,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1, help="train on N processes (torch.distributed, gloo, DistributedDataParallel; each takes "
            "1/N of every batch; started by torchrun's launcher); under torchrun the processes exist already",
        ),
    ] = 1,
    fsdp: Annotated[
        bool,
        typer.Option(
            "--fsdp", help="with --nproc N (or under torchrun): fully shard the model (FSDP2, fully_shard) instead of "
            "DistributedDataParallel; recipes that cannot run on shards are refused before anything moves",
        ),
    ] = False,
) -> None:
    """Train one recipe on a built-in task: progress, summary, metrics.json, curve.csv, curve.png.

    Exit status: 0 ok; 2 invalid recipe, task or option; 3 the run diverged; 4 the optimizer raised; 130 interrupted. Results are written in every case but 2.
    """
    from precond.launch import launch, launched, process_group

    options = TrainOptions(
        task=task, steps=steps, out=out, short=short, threads=threads, eval_every=eval_every,
        stop_at_target=stop_at_target, dtype=dtype, progress=progress, time_budget=time_budget, recipe=recipe,
        seed=seed, set_=tuple(set_ or ()), lr=lr, fsdp=fsdp,
    )
    if fsdp and nproc < 2 and not launched():
        fail("--fsdp shards the model over several processes: add --nproc N (N >= 2), or start precond under torchrun")
    if nproc > 1 and not launched():
        raise typer.Exit(launch(nproc, sys.argv[1:]))
    with process_group() as rank:
        _train_here(replace(options, progress=progress and not rank), rank)


def _train_here(options: TrainOptions, rank: Optional[int]) -> None:
    """`precond train` in this process; of several (``rank`` not None) rank 0 reports and writes, the others train."""
    from precond.training import render_table
    from precond.training import train as run_train

    try:
        instance = _task(options.task, options.seed, options.short, options.dtype.torch)
        factory = _load(options.recipe, parse_set(list(options.set_)), instance, options.lr)
    except (PrecondError, ValueError) as exc:
        fail(exc)
    out_dir = Path(options.out) if options.out else Path("runs") / f"{factory.label}-{instance.name}"
    config = {
        "recipe": factory.recipe.to_dict(),
        "recipe_source": options.recipe,
        "set": list(options.set_),
        "lr_reason": factory.lr_reason,
        "short": options.short,
        "command": "train",
    }
    try:
        result = run_train(
            factory, instance.name, seed=options.seed, out_dir=None if rank else out_dir, label=factory.label,
            config=config, console=err, distributed=("fsdp" if options.fsdp else True) if rank is not None else False,
            **{**options.runner_kwargs(), "threads": options.threads_for(instance)},
        )
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]; results so far in {escape(str(out_dir))}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PrecondError as exc:  # the recipe cannot work on this task (e.g. a likelihood it needs)
        fail(exc)
    if rank:
        raise typer.Exit(EXIT_DIVERGED if result.status == "diverged" else EXIT_ERROR if result.status == "error" else 0)
    _write_recipe(out_dir / "recipe.yaml", factory.recipe)

    con = console_out()
    con.print(render_table(result))
    change = "" if factory.lr_reason.startswith("from ") else " (--lr to change)"
    con.print(f"lr = {factory.lr:g}: {escape(factory.lr_reason)}{change}")
    if result.reached:
        con.print(
            f"reached the target {_target_text(result)} at step {result.steps_to_target} "
            f"({result.time_to_target_s:.3g} s of training)"
        )
    else:
        con.print(f"did not reach the target {_target_text(result)} in {result.steps_done} steps "
                  f"({result.wall_time_s:.3g} s of training)")
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


@app.command()
def compare(
    recipes: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="recipe names, YAML files or torch.optim.Optimizer classes by import path (torch.optim.AdamW, "
            f"stepped by the plain loop) [default: {', '.join(DEFAULT_SET)}, those built in]"
        ),
    ] = None,
    task: Task = DEFAULT_TASK,
    steps: Annotated[
        Optional[int], typer.Option("--steps", "-n", min=0, help="optimizer steps per run [default: the task's]")
    ] = None,
    seeds: Annotated[
        str,  # parsed by the callback: the command gets list[int]
        typer.Option(
            "--seeds", callback=comma_ints("--seeds"), help="comma-separated seeds; the table takes medians over them"
        ),
    ] = DEFAULT_SEEDS,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="result folder [default: runs/compare-<task>]")
    ] = None,
    lr_grid: Annotated[
        bool, typer.Option("--lr-grid", help="try each recipe's lr times 0.1, 0.3, 1, 3, 10; keep the best")
    ] = False,
    lr_multipliers: Annotated[
        Optional[str],  # parsed by the callback: the command gets list[float]
        typer.Option(
            "--lr-multipliers", callback=comma_floats("--lr-multipliers"),
            help="a custom grid, e.g. 0.5,1,2 (implies --lr-grid)",
        ),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="every built-in recipe")] = False,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="override: key=value for every recipe, CONTENDER:key=value for one (e.g. "
            "torch.optim.AdamW:weight_decay=0.1, kfac:curvature.every=5); repeatable",
        ),
    ] = None,
    short: Short = False,
    threads: Threads = None,
    eval_every: EvalEvery = None,
    time_budget: TimeBudget = None,
    stop_at_target: Annotated[
        bool, typer.Option("--stop-at-target", help="stop each run at its first evaluation reaching the target")
    ] = False,
    dtype: DTypeOption = DType.float32,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show the progress bars")] = True,
) -> None:
    """Compare recipes on one task and the same seeds, interleaved step by step: a ranked table and one plot.

    Learning rates: the task's hint for each recipe (see precond tasks); --lr-grid searches around it. A torch
    optimizer class gets --set CLASS:lr=, else the task's hint for its lower-case name, else its own default.

    Exit status: 0 when the comparison completes (runs that diverged or failed are rows of the table); 2 invalid recipe, task or option; 130 interrupted.
    """
    options = RunOptions(
        task=task, steps=steps, out=out, short=short, threads=threads, eval_every=eval_every,
        stop_at_target=stop_at_target, dtype=dtype, progress=progress, time_budget=time_budget,
    )
    seed_list: list[int] = seeds  # type: ignore[assignment]  # comma_ints parsed it
    grid = lr_multipliers if lr_multipliers else (True if lr_grid else None)
    names = list(recipes or [])
    if all_:
        names += [n for n in builtin_recipes() if n not in names]
    _compare_here(names, options, seed_list, grid, list(set_ or []))


def _compare_here(
    names: list[str], options: RunOptions, seeds: list[int], grid: Optional[list[float] | bool],
    set_: Optional[list[str]] = None,
) -> None:
    """`precond compare`: the contenders ``names`` (none: the default set) on the same task and seeds."""
    from precond.training import render_table
    from precond.training import compare as run_compare
    from precond.training.factories import is_optimizer_path
    from precond.training.files import slug

    default = not names
    if default:
        names = default_set()
    try:
        instance = _task(options.task, seeds[0], options.short, options.dtype.torch)
        common, scoped = split_scoped_set(list(set_ or []), names)
        factories: dict[str, RecipeFactory | TorchFactory] = {}
        for spec in names:
            if is_optimizer_path(spec) and spec not in builtin_recipes():
                factory = _load_torch(spec, parse_set(scoped.get(spec, [])), instance)
            else:
                factory = _load(spec, parse_set(common + scoped.get(spec, [])), instance, None)
            factory.label = _unique_label(factory.label, set(factories), spec)
            factories[factory.label] = factory
    except (PrecondError, ValueError) as exc:
        fail(exc)
    if default:
        err.print(f"comparing the default set on {instance.name}: {', '.join(factories)}", highlight=False)
    options = _task_budget(options, instance)
    try:
        skipped = _unbuildable(factories, instance)
    except ValueError as exc:  # a torch optimizer that refuses the model's parameters, with the reason
        fail(exc)
    for label, reason in skipped.items():
        del factories[label]
        err.print(f"[yellow]skipped {escape(label)}[/]: it cannot run on {instance.name}: {escape(reason)}",
                  highlight=False, soft_wrap=True)
    if not factories:
        fail(f"none of the recipes can run on task {instance.name}")
    out_dir = Path(options.out) if options.out else Path("runs") / f"compare-{instance.name}"
    config = {
        "command": "compare",
        "default_set": default,
        "recipes": {label: f.recipe.to_dict() for label, f in factories.items() if f.recipe is not None},
        "torch_optimizers": {label: f.describe() for label, f in factories.items() if isinstance(f, TorchFactory)},
        "set": list(set_ or []),
        "lr_reasons": {label: f.lr_reason for label, f in factories.items()},
        "skipped": skipped,
        "short": options.short,
    }
    threads = options.threads_for(instance)
    if default or options.threads is None:
        err.print(f"threads: {threads} ({'--threads' if options.threads else 'the task' + chr(39) + 's fastest'})",
                  highlight=False)
    try:
        result = run_compare(
            factories, instance.name, seeds=seeds, out_dir=out_dir, lr_grid=grid, config=config, console=err,
            **{**options.runner_kwargs(), "threads": threads},
        )
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]; results so far in {escape(str(out_dir))}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except PrecondError as exc:
        fail(exc)
    (out_dir / "recipes").mkdir(parents=True, exist_ok=True)
    for label, factory in factories.items():
        if factory.recipe is not None:
            _write_recipe(out_dir / "recipes" / f"{slug(label)}.yaml", factory.recipe)
    reasons = {label: f"{f.lr:g} ({f.lr_reason})" for label, f in factories.items()}
    (out_dir / "compare.md").write_text(compare_markdown(result, None if grid else reasons, skipped), encoding="utf-8")
    con = console_out()
    con.print(render_table(result))
    for label, factory in factories.items():
        if result.lr_grid:
            best = result.best_lr.get(label)
            con.print(f"lr {label} = best {_fmt_lr(best)} of the grid around {factory.lr:g}: {escape(factory.lr_reason)}")
        else:
            con.print(f"lr {label} = {factory.lr:g}: {escape(factory.lr_reason)}")
    notes = {r.label: r.config.get("parameter_split") for r in result.runs if r.config.get("parameter_split")}
    for label, note in notes.items():
        con.print(f"{escape(label)}: {escape(note)}")
    for line in verdict(result):
        con.print(escape(line))
    for row in result.rows:
        if row.status != "ok" and row.message:
            con.print(f"[red]{escape(row.label)}[/]: {escape(row.message)}")
    for label in skipped:
        con.print(f"[yellow]skipped {escape(label)}[/]: it cannot run on {instance.name} (reason above)")
    con.print(f"wrote {escape(str(out_dir))}/: compare.json, compare.csv, compare.md, compare.png, recipes/, runs/")


def _task_budget(options: RunOptions, instance: TaskInstance) -> RunOptions:
    """``compare`` on a task with a per-run budget (``TaskInstance.compare_budget_s``) and neither ``--steps`` nor
    ``--time-budget``: each run stops after the task's steps or the budget of training, whichever first."""
    budget = getattr(instance, "compare_budget_s", None)
    if budget is None or options.steps is not None or options.time_budget is not None:
        return options
    err.print(
        f"each run: {instance.default_steps} steps or {budget:g} s of training, whichever first (the task's "
        "default; --steps N alone runs every step, --time-budget sets another budget)", highlight=False,
    )
    return replace(options, steps=instance.default_steps, time_budget=float(budget))


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
            budget = f", compare: or {full.compare_budget_s:g} s" if full.compare_budget_s is not None else ""
            steps = f"{full.default_steps} ({small.default_steps}){budget}"
            likelihood = str(full.likelihood)
            hints = ", ".join(f"{k} {v:g}" for k, v in full.default_lr.items())
        except Exception as exc:  # noqa: BLE001  (a broken plugin task is listed, not fatal)
            target, steps, likelihood, hints = f"(failed: {type(exc).__name__}: {exc})", "—", "—", "—"
        t.add_row(name, target, steps, likelihood, hints, task_description(name))
    console_out().print(t)


def run() -> None:
    """Run the app on ``sys.argv`` (what :func:`precond.cli.main` calls)."""
    warnings.showwarning = show_warning
    try:
        app()
    except PrecondError as exc:  # anything a block raises on purpose: a message, not a traceback
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_USAGE) from None
    except ModuleNotFoundError as exc:  # a part of the extra missing (scikit-learn for a task, matplotlib for a plot)
        missing_extra(exc)
