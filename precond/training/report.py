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
            budget = getattr(run, "time_budget", None)  # under a time budget the bar fills with training seconds
            total = round(budget, 1) if budget is not None else run.steps
            self.ids[id(run)] = self.progress.add_task(run.description, total=total, loss="-", rate="-", status="")

    def update(self, run: _Running) -> None:
        if self.progress is None:
            return
        loss = f"{run.losses[-1]:.4g}" if run.losses else "-"
        rate = f"{run.step / run.elapsed:.1f}" if run.elapsed > 0 else "-"
        status = "" if run.status in ("running", "ok") else run.status
        budget = getattr(run, "time_budget", None)
        if budget is not None:
            completed = round(min(run.elapsed, budget), 1) if not run.done or run.status != "ok" else round(budget, 1)
        else:
            completed = run.step if not run.done or run.status != "ok" else run.steps
        self.progress.update(
            self.ids[id(run)],
            completed=completed,
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
    length = (f"{result.time_budget_s:g} s of training each" if getattr(result, "time_budget_s", None) is not None
              else f"{result.steps} steps")
    table = Table(
        title=f"{result.task}: target {result.metric} {better} {fmt(result.target)}, {length}, seeds {result.seeds}"
    )
    grid = result.lr_grid is not None
    has_ref = any(r.rel_ms_per_step is not None for r in rows)
    table.add_column("#", justify="right")
    table.add_column("optimizer")
    if grid:
        table.add_column("lr", justify="right")
    table.add_column("reached", justify="right")
    budget = getattr(result, "time_budget_s", None) is not None
    if budget:
        table.add_column("steps", justify="right")
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
        cells.append(f"{row.reached}/{row.seeds}")
        if budget:
            cells.append(fmt(row.steps_done))
        cells += [
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


def _band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[Any, Any, Any, Any] | None:
    """``(x, median, low, high)`` of curves ``(x, y)`` (one per seed) on the union of their x values, up to
    the shortest curve's end (linear interpolation; NaN gaps kept): the seeds' median and their min-max band."""
    import numpy as np

    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        return None
    end = min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x[x <= end] for x, _ in curves]))
    if grid.size == 0:
        return None
    ys = np.vstack([np.interp(grid, x, y) for x, y in curves])
    for row, (x, y) in zip(ys, curves):  # a non-finite value (divergence) stays a gap
        bad = ~np.isfinite(y)
        if bad.any():
            row[np.isin(grid, x[bad])] = np.nan
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return grid, np.nanmedian(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def _median_or_none(values: list[float | None]) -> float | None:
    """Median counting a missing value (target not reached) as infinite; None when that median is infinite."""
    import statistics

    vals = sorted(math.inf if v is None else float(v) for v in values)
    if not vals:
        return None
    m = statistics.median(vals)
    return m if math.isfinite(m) else None


def winners(runs: Sequence[RunResult]) -> list[str]:
    """Sentences naming who reached the target first in wall-clock and in steps (medians over seeds), or who
    ends best when none reached it: the headline of a plot."""
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    if not groups:
        return []
    first = next(iter(runs))
    times = {k: _median_or_none([r.time_to_target_s for r in g]) for k, g in groups.items()}
    steps = {k: _median_or_none([r.steps_to_target for r in g]) for k, g in groups.items()}
    if len(groups) == 1:  # one run (precond train): whether and when it reached the target
        (k,) = groups
        if steps[k] is None:
            return [f"{k} did not reach the target in {first.steps_done} steps"]
        return [f"{k} reached the target at step {fmt(steps[k])}, after {fmt(times[k], 3)} s of training"]
    lines = []
    for what, table, unit in (("wall-clock", times, "s"), ("steps", steps, "steps")):
        reached = sorted((v, k) for k, v in table.items() if v is not None)
        if not reached:
            continue
        (v, k), rest = reached[0], reached[1:]
        text = f"first to the target in {what}: {k} ({fmt(v, 3)} {unit}"
        if rest:
            v2, k2 = rest[0]
            text += f"; next {k2} {fmt(v2, 3)} {unit}, {v2 / v:.2f}x" if v > 0 else f"; next {k2} {fmt(v2, 3)} {unit}"
        lines.append(text + ")")
    if not lines:
        finals = {k: statistics_mean([r.final_metric for r in g]) for k, g in groups.items()}
        pool = [(v, k) for k, v in finals.items() if math.isfinite(v)]
        if pool:
            v, k = (max if first.higher_is_better else min)(pool)
            lines.append(f"none reached the target; best final {first.metric}: {k} ({fmt(v)})")
    return lines


def statistics_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def plot_runs(runs: Sequence[RunResult], path: str | Path, *, title: str = "") -> None:
    """The task metric (top row) and the training loss (bottom row) against steps (left) and training
    wall-clock (right), the target as a dashed line: one colour per label (in the order of ``runs``, e.g.
    the table's), the median over its seeds as the line and their min-max as a band, a marker where the
    median reaches the target; the headline names who reaches it first (Agg backend, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (m_step, m_time), (l_step, l_time) = fig.subplots(2, 2, height_ratios=(3, 2))
    palette = [f"C{i}" for i in range(10)]
    first = runs[0] if runs else None
    metric_positive, loss_positive, smoothed = True, True, False
    for i, (label, group) in enumerate(groups.items()):
        color = palette[i % len(palette)]
        stt = _median_or_none([r.steps_to_target for r in group])
        ttt = _median_or_none([r.time_to_target_s for r in group])
        final = statistics_mean([r.final_metric for r in group])
        seeds = f", {len(group)} seeds" if len(group) > 1 else ""
        name = (
            f"{label}: target at {fmt(stt)} steps, {fmt(ttt, 3)} s{seeds}" if stt is not None
            else f"{label}: not reached, final {fmt(final)}{seeds}"
        )
        for ax, xkey in ((m_step, "step"), (m_time, "wall_time_s")):
            curves = []
            for r in group:
                evals = [e for e in r.evals if e.get(r.metric) is not None]
                curves.append(([e[xkey] for e in evals], [e[r.metric] for e in evals]))
                metric_positive = metric_positive and all(
                    not math.isfinite(e[r.metric]) or e[r.metric] > 0 for e in evals)
            band = _band(curves)
            if band is None:
                continue
            x, mid, lo, hi = band
            ax.plot(x, mid, color=color, lw=1.6, marker="o", ms=2.5, label=name if ax is m_step else None)
            if len(group) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        if stt is not None and first is not None:
            m_step.plot([stt], [first.target], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=5)
            m_time.plot([ttt], [first.target], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=5)
        for ax, use_time in ((l_step, False), (l_time, True)):
            curves = []
            for r in group:
                losses = [v if math.isfinite(v) else math.nan for v in r.losses]
                if not losses:
                    continue
                loss_positive = loss_positive and all(v > 0 for v in losses if math.isfinite(v))
                window = smoothing_window(len(losses))
                smoothed = smoothed or window > 1
                ys = trailing_mean(losses, window)
                xs = r.wall_times if use_time else list(range(1, len(losses) + 1))
                curves.append((xs, ys))
            band = _band(curves)
            if band is None:
                continue
            x, mid, lo, hi = band
            ax.plot(x, mid, color=color, lw=1.2)
            if len(group) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    if first is not None:
        op = ">=" if first.higher_is_better else "<="
        for ax in (m_step, m_time):
            ax.axhline(first.target, color="black", ls="--", lw=1.0,
                       label=f"target {first.metric} {op} {fmt(first.target)}" if ax is m_step else None)
            ax.set_ylabel(f"{first.metric} (evaluations)")
            if metric_positive and not first.higher_is_better:
                ax.set_yscale("log")
        loss_label = "training loss" + (" (trailing mean)" if smoothed else "")
        for ax in (l_step, l_time):
            ax.set_ylabel(loss_label)
            if loss_positive:
                ax.set_yscale("log")
    for ax in (m_step, l_step):
        ax.set_xlabel("step")
    for ax in (m_time, l_time):
        ax.set_xlabel("wall-clock (s, training only)")
    for ax in (m_step, m_time, l_step, l_time):
        ax.grid(True, alpha=0.3)
    if groups:
        m_step.legend(fontsize=8, loc="best")
    headline = winners(runs)
    text = "\n".join(([title] if title else []) + headline)
    if text:
        fig.suptitle(text, fontsize=10)
    fig.savefig(str(path), dpi=100)
