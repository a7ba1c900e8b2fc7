"""What a person sees: the progress bars while runs train, the summary tables (rich) and the loss
curves (matplotlib). rich and matplotlib come with the ``cli`` extra and are imported only here, when
a bar, a table or a plot is made."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from precond.training.results import CompareResult, RunResult


class _Running(Protocol):
    """What a progress bar reads of a run in progress (:class:`precond.training.runner._Run`)."""

    description: str
    steps: int
    losses: list[float]
    elapsed: float
    status: str

    @property
    def step(self) -> int: ...

    @property
    def done(self) -> bool: ...


# ---------------------------------------------------------------------------
# progress


class ProgressBars:
    """One rich progress bar per run (on stderr unless given a console); ``enabled=False``: none, and
    rich is not imported."""

    def __init__(self, enabled: bool, console: Any = None):
        self.enabled = enabled
        self.progress = None
        self.ids: dict[int, Any] = {}
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RichProgress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} steps/s"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console if console is not None else Console(stderr=True),
        )

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def add(self, run: _Running) -> None:
        if self.progress is not None:
            self.ids[id(run)] = self.progress.add_task(run.description, total=run.steps, loss="-", rate="-", status="")

    def update(self, run: _Running) -> None:
        if self.progress is None:
            return
        loss = f"{run.losses[-1]:.4g}" if run.losses else "-"
        rate = f"{run.step / run.elapsed:.1f}" if run.elapsed > 0 else "-"
        status = "" if run.status in ("running", "ok") else run.status
        self.progress.update(
            self.ids[id(run)],
            completed=run.step if not run.done or run.status != "ok" else run.steps,
            loss=loss,
            rate=rate,
            status=status,
        )


# ---------------------------------------------------------------------------
# tables


def fmt(value: Any, digits: int = 4) -> str:
    """A figure for a table: ``digits`` significant digits; ``—`` for none or infinity."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "—"
        return f"{value:.{digits}g}"
    return str(value)


def render_table(result: RunResult | CompareResult, *, all_rows: bool = False):
    """A ``rich.table.Table`` for a run (key/value) or a comparison (ranked)."""
    from rich.table import Table

    if isinstance(result, RunResult):
        table = Table(title=f"{result.label} on {result.task} (seed {result.seed})")
        table.add_column("field")
        table.add_column("value", justify="right")
        style = "green" if result.status == "ok" else "red"
        table.add_row("status", f"[{style}]{result.status}[/]")
        message = result.message if len(result.message) <= 90 else result.message[:89] + "…"
        table.add_row("message", message)
        table.add_row("steps", f"{result.steps_done}/{result.steps}")
        table.add_row("lr", fmt(result.lr))
        table.add_row("initial loss", fmt(result.initial_loss))
        table.add_row("final loss", fmt(result.final_loss))
        for k, v in result.final.items():
            table.add_row(f"final {k}", fmt(v))
        better = ">=" if result.higher_is_better else "<="
        table.add_row("target", f"{result.metric} {better} {fmt(result.target)}")
        table.add_row("steps to target", fmt(result.steps_to_target))
        table.add_row("time to target (s)", fmt(result.time_to_target_s))
        table.add_row("ms / step (mean)", fmt(result.ms_per_step))
        table.add_row("ms / step (median)", fmt(result.ms_per_step_median))
        table.add_row("training time (s)", fmt(result.wall_time_s))
        return table

    rows = result.all_rows if all_rows else result.rows
    better = ">=" if result.higher_is_better else "<="
    table = Table(
        title=f"{result.task}: target {result.metric} {better} {fmt(result.target)}, "
        f"{result.steps} steps, seeds {result.seeds}"
    )
    grid = result.lr_grid is not None
    has_ref = any(r.rel_ms_per_step is not None for r in rows)
    table.add_column("#", justify="right")
    table.add_column("optimizer")
    if grid:
        table.add_column("lr", justify="right")
    table.add_column("reached", justify="right")
    table.add_column("steps→target", justify="right")
    table.add_column("time→target (s)", justify="right")
    table.add_column(result.metric, justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("ms/step", justify="right")
    if has_ref:
        table.add_column("×adam", justify="right")
    table.add_column("status")
    for rank, row in enumerate(rows, start=1):
        cells = [str(rank), row.label]
        if grid:
            cells.append(
                f"{fmt(row.lr, 3)} (×{row.lr_multiplier:g})" if row.lr_multiplier is not None else fmt(row.lr)
            )
        cells += [
            f"{row.reached}/{row.seeds}",
            fmt(row.steps_to_target),
            fmt(row.time_to_target_s, 3),
            fmt(row.final_metric),
            fmt(row.final_train_loss),
            fmt(row.ms_per_step, 3),
        ]
        if has_ref:
            cells.append(fmt(row.rel_ms_per_step, 3))
        style = "green" if row.status == "ok" else "red"
        cells.append(f"[{style}]{row.status}[/]")
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------------------
# plots


def smoothing_window(n: int) -> int:
    """Trailing-mean window for plotting ``n`` per-step losses (1: no smoothing)."""
    return 1 if n <= 100 else max(2, n // 50)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` finite values at each step (NaN where the value itself is not finite)."""
    out: list[float] = []
    buf: list[float] = []
    total = 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        buf.append(v)
        total += v
        if len(buf) > window:
            total -= buf.pop(0)
        out.append(total / len(buf))
    return out


def plot_runs(runs: Sequence[RunResult], path: str | Path, *, title: str = "") -> None:
    """Loss vs step and loss vs wall-clock, one colour per label (Agg backend,
    no pyplot state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_step, ax_time = fig.subplots(1, 2)
    colors: dict[str, Any] = {}
    palette = [f"C{i}" for i in range(10)]
    positive = True
    smoothed = False
    for run in runs:
        if not run.losses:
            continue
        key = run.label
        name = None if key in colors else key  # one legend entry per label
        color = colors.setdefault(key, palette[len(colors) % len(palette)])
        steps = list(range(1, len(run.losses) + 1))
        finite = [v if math.isfinite(v) else math.nan for v in run.losses]
        positive = positive and all(v > 0 for v in finite if math.isfinite(v))
        lw = 1.2 if len(runs) < 6 else 0.9
        window = smoothing_window(len(finite))
        if window > 1:  # noisy minibatch losses: faint per-step curve, bold trailing mean
            smooth = trailing_mean(finite, window)
            ax_step.plot(steps, finite, color=color, lw=0.5, alpha=0.15)
            ax_time.plot(run.wall_times, finite, color=color, lw=0.5, alpha=0.15)
            ax_step.plot(steps, smooth, color=color, lw=lw, alpha=0.95, label=name)
            ax_time.plot(run.wall_times, smooth, color=color, lw=lw, alpha=0.95, label=name)
            smoothed = True
        else:
            ax_step.plot(steps, finite, color=color, lw=lw, alpha=0.85, label=name)
            ax_time.plot(run.wall_times, finite, color=color, lw=lw, alpha=0.85, label=name)
        evals = [e for e in run.evals if e.get("test_loss") is not None and e["step"] > 0]
        if evals and len(evals) <= 200:
            ax_step.plot(
                [e["step"] for e in evals], [e["test_loss"] for e in evals], "o", ms=2.5, color=color, alpha=0.6
            )
            ax_time.plot(
                [e["wall_time_s"] for e in evals], [e["test_loss"] for e in evals], "o", ms=2.5, color=color, alpha=0.6
            )
        if run.steps_to_target is not None and run.steps_to_target > 0:
            ax_step.axvline(run.steps_to_target, color=color, ls=":", lw=0.8)
            ax_time.axvline(run.time_to_target_s, color=color, ls=":", lw=0.8)
    for ax, xlabel in ((ax_step, "step"), (ax_time, "wall-clock (s, training only)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            "training loss (line: trailing mean, faint: per step;\ndots: test loss)" if smoothed
            else "training loss (dots: test loss)"
        )
        if positive:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if colors:
        ax_step.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(str(path), dpi=110)

