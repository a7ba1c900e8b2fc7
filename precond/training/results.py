"""What runs return: :class:`RunResult` (one run), :class:`CompareRow` and :class:`CompareResult` (a
comparison), and the ranking of a comparison's runs into rows (medians and means over seeds, failed
runs last). Conventions: the package docstring (:mod:`precond.training`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

INTERLEAVING = (
    "lock-step round robin: at global step t every unfinished run makes one optimizer step, "
    "in label order rotated by t; evaluations at the same steps, untimed"
)


@dataclass
class RunResult:
    """The outcome of one training run (see the module docstring for conventions)."""

    label: str
    task: str
    seed: int
    status: str  # "ok" | "diverged" | "error" | "interrupted"
    message: str
    steps: int  # requested
    steps_done: int
    losses: list[float]  # losses[k-1]: loss of step k
    wall_times: list[float]  # wall_times[k-1]: cumulative training seconds after step k
    evals: list[dict[str, float]]  # {"step", "wall_time_s", **task metrics}
    final: dict[str, float]  # the last evaluation's metrics
    metric: str
    higher_is_better: bool
    target: float
    steps_to_target: int | None
    time_to_target_s: float | None
    ms_per_step: float
    ms_per_step_median: float
    lr: float | None = None
    lr_multiplier: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None
    traceback: str | None = None

    @property
    def reached(self) -> bool:
        return self.steps_to_target is not None

    @property
    def final_metric(self) -> float:
        return float(self.final.get(self.metric, math.nan))

    @property
    def initial_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def wall_time_s(self) -> float:
        return self.wall_times[-1] if self.wall_times else 0.0

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step curve (what ``metrics.json`` holds)."""
        return {
            "label": self.label,
            "task": self.task,
            "seed": self.seed,
            "status": self.status,
            "message": self.message,
            "steps": self.steps,
            "steps_done": self.steps_done,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "reached": self.reached,
            "steps_to_target": self.steps_to_target,
            "time_to_target_s": self.time_to_target_s,
            "ms_per_step": self.ms_per_step,
            "ms_per_step_median": self.ms_per_step_median,
            "wall_time_s": self.wall_time_s,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "final": dict(self.final),
            "lr": self.lr,
            "lr_multiplier": self.lr_multiplier,
            "evals": [dict(e) for e in self.evals],
            "config": self.config,
            "traceback": self.traceback,
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the per-step curve."""
        out = self.summary()
        out["losses"] = list(self.losses)
        out["wall_times"] = list(self.wall_times)
        return out


@dataclass
class CompareRow:
    """One line of the comparison table: a label (and lr multiplier),
    aggregated over seeds. ``steps_to_target`` / ``time_to_target_s`` are
    medians over seeds counting unreached seeds as infinite (``None`` when
    the median is not reached); ``final_metric`` etc. are means over seeds."""

    label: str
    lr: float | None
    lr_multiplier: float | None
    seeds: int
    reached: int
    steps_done: float  # median over seeds (differs between rows under a time budget)
    steps_to_target: float | None
    time_to_target_s: float | None
    final_metric: float
    final_train_loss: float
    final_test_loss: float
    ms_per_step: float
    rel_ms_per_step: float | None  # ms_per_step / the "adam" row's; None without one
    status: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompareResult:
    """All runs of a comparison plus the table. ``rows`` has one row per
    label (with ``lr_grid``: the best multiplier per label), sorted;
    ``all_rows`` has every label x multiplier, sorted."""

    task: str
    metric: str
    higher_is_better: bool
    target: float
    steps: int
    seeds: list[int]
    runs: list[RunResult]
    rows: list[CompareRow]
    all_rows: list[CompareRow]
    lr_grid: list[float] | None = None
    best_lr: dict[str, float | None] = field(default_factory=dict)
    interleaving: str = INTERLEAVING
    out_dir: str | None = None
    time_budget_s: float | None = None  # each run's training seconds, when the comparison had a budget

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "steps": self.steps,
            "time_budget_s": self.time_budget_s,
            "seeds": list(self.seeds),
            "lr_grid": self.lr_grid,
            "best_lr": dict(self.best_lr),
            "interleaving": self.interleaving,
            "sort": "failed runs last, then final metric (a time budget: who is best after that time)"
            if self.time_budget_s is not None
            else "failed runs last, then steps to target, wall-clock to target, final metric",
            "rows": [r.to_dict() for r in self.rows],
            "all_rows": [r.to_dict() for r in self.all_rows],
            "runs": [r.to_dict() if curves else r.summary() for r in self.runs],
        }

# ---------------------------------------------------------------------------
# the table of a comparison


def _median_inf(values: list[float]) -> float:
    return statistics.median(values) if values else math.inf


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def compare_rows(
    results: list[RunResult], higher_is_better: bool, metric: str, *, by_metric: bool = False
) -> list[CompareRow]:
    """One row per label and lr multiplier, aggregated over its seeds, sorted (:func:`sort_rows`)."""
    groups: dict[tuple[str, float | None], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.label, r.lr_multiplier), []).append(r)
    rows = []
    for (label, mult), group in groups.items():
        stt = _median_inf([float(r.steps_to_target) if r.reached else math.inf for r in group])
        ttt = _median_inf([float(r.time_to_target_s) if r.reached else math.inf for r in group])
        failed = [r for r in group if r.status != "ok"]
        if failed:
            kinds = sorted({r.status for r in failed})
            status = f"{'/'.join(kinds)} ({len(failed)}/{len(group)})" if len(group) > 1 else kinds[0]
            message = failed[0].message
        else:
            status, message = "ok", ""
        rows.append(
            CompareRow(
                label=label,
                lr=group[0].lr,
                lr_multiplier=mult,
                seeds=len(group),
                reached=sum(r.reached for r in group),
                steps_done=statistics.median([r.steps_done for r in group]),
                steps_to_target=stt if math.isfinite(stt) else None,
                time_to_target_s=ttt if math.isfinite(ttt) else None,
                final_metric=_mean([r.final.get(metric, math.nan) for r in group]),
                final_train_loss=_mean([r.final.get("train_loss", math.nan) for r in group]),
                final_test_loss=_mean([r.final.get("test_loss", math.nan) for r in group]),
                ms_per_step=_mean([r.ms_per_step for r in group]),
                rel_ms_per_step=None,
                status=status,
                message=message,
            )
        )
    return sort_rows(rows, higher_is_better, by_metric=by_metric)


def _nan_last(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def sort_rows(rows: list[CompareRow], higher_is_better: bool, *, by_metric: bool = False) -> list[CompareRow]:
    """Failed rows last, then by steps to target, wall-clock to target, final metric, label; ``by_metric``
    (a comparison under a time budget: who is best after that time): failed rows last, then by final
    metric, wall-clock to target, label."""

    def key(row: CompareRow):
        metric = row.final_metric
        metric_key = _nan_last(-metric if higher_is_better else metric)
        if by_metric:
            return (row.status != "ok", metric_key, _nan_last(row.time_to_target_s), row.label)
        return (
            row.status != "ok",
            _nan_last(row.steps_to_target),
            _nan_last(row.time_to_target_s),
            metric_key,
            row.label,
        )

    return sorted(rows, key=key)


def best_rows(
    all_rows: list[CompareRow], higher_is_better: bool, *, by_metric: bool = False
) -> tuple[list[CompareRow], dict[str, float | None]]:
    """With an lr grid: each label's best row (the first of its rows in ``all_rows``, which is sorted), sorted,
    and each label's best lr."""
    best: dict[str, CompareRow] = {}
    for row in all_rows:
        best.setdefault(row.label, row)
    return (sort_rows(list(best.values()), higher_is_better, by_metric=by_metric),
            {label: row.lr for label, row in best.items()})


def set_relative_times(rows: list[CompareRow], all_rows: list[CompareRow]) -> None:
    """``rel_ms_per_step``: each row's ms/step over the ``adam`` row's (left None without one)."""
    ref = next((r for r in rows if r.label.lower() == "adam"), None)
    if ref is None or not (ref.ms_per_step > 0):
        return
    for row in {id(r): r for r in [*rows, *all_rows]}.values():
        row.rel_ms_per_step = row.ms_per_step / ref.ms_per_step
