"""Training and comparison runner behind ``precond train`` and ``precond compare``.

``train(make_optimizer, task_name)`` runs one optimizer on one built-in task
(:mod:`precond.tasks`); ``compare({label: make_optimizer, ...}, task_name)``
runs several on the same task and seeds. Both return dataclasses, write
result files when given ``out_dir`` and can be shown with
:func:`render_table`. No CLI code lives here.

An *optimizer factory* is ``make_optimizer(model, likelihood) ->
torch.optim.Optimizer`` whose ``step(closure)`` accepts a closure that runs
the forward pass only and returns ``(loss, outputs)`` (the precond
contract: the optimizer runs the backward pass itself). A factory that
accepts a keyword ``task`` also receives the :class:`~precond.tasks.TaskInstance`
(for learning-rate hints), one that accepts ``seed`` receives the run seed
(for ``precond.build(..., seed=seed)``); with ``lr_grid`` it must accept a
keyword ``lr``. For example::

    def make(model, likelihood, lr=None, seed=0):
        extra = {} if lr is None else {"lr": lr}
        return precond.build("kfac", model, likelihood=likelihood, seed=seed, **extra)

Conventions
-----------
* Step ``k`` (1-based) is the ``k``-th call of ``optimizer.step``. The loss
  recorded for step ``k`` is the first loss the closure computed in that
  step, i.e. the minibatch loss at the parameters *before* update ``k``
  (line searches may evaluate the closure more often; only the first counts).
  On several processes it is the loss of the global minibatch: the
  processes' first losses, weighted by their rows (an all-reduce after the
  timed step).
* Wall-clock is training time only: fetching the batch plus
  ``optimizer.step``, measured with ``time.perf_counter``; evaluations are
  not timed. ``ms_per_step`` is the mean over all steps (amortised work such
  as periodic eigendecompositions counts), ``ms_per_step_median`` the median.
* Evaluations (``task.evaluate()``) run after 0 updates, every
  ``eval_every`` updates and after the last one. ``steps_to_target`` is the
  first evaluated step whose task metric reaches the task target,
  ``time_to_target_s`` the training wall-clock at that step.
* Divergence: a non-finite loss, or a loss above ``1e6 * max(|initial loss|,
  1e-3)``, stops the run with status ``"diverged"`` and a message naming the
  step and the last finite loss. An exception inside ``step`` stops it with
  status ``"error"`` (the traceback is kept in ``RunResult.traceback``);
  Ctrl-C gives ``"interrupted"``. Result files are written in every case.
* Determinism: the task seeds its model and minibatch order; each run owns
  a torch CPU RNG state seeded with the run seed, swapped in around its own
  work only (optimizer construction, steps, evaluations), so a run's curve
  is the same alone or interleaved in ``compare`` and the caller's global
  RNG is left untouched.

Fair interleaving in ``compare``
--------------------------------
All runs (every label x lr multiplier x seed) are built up front and
advanced in lock-step, round robin, one optimizer step at a time: at global
step ``t`` each unfinished run makes one step, in the label order rotated by
``t`` (so no run is always first after an evaluation or a context switch).
Machine noise (other processes, thermal throttling, allocator state) thus
hits every run alike within a few milliseconds, and the per-step times
stay comparable. Evaluations happen at the same steps for all runs and are
not timed.

Files
-----
``train(..., out_dir=D)`` writes ``D/metrics.json`` (summary, final
evaluation, every evaluation, config), ``D/curve.csv`` (``step,
wall_time_s, loss`` then the evaluation columns, empty where no evaluation
ran; row ``step=0`` holds the initial evaluation and an empty loss) and
``D/curve.png`` (loss vs step and loss vs wall-clock). ``compare(...,
out_dir=D)`` writes ``D/compare.json``, ``D/compare.csv`` (one row per label
and lr multiplier, in table order), ``D/compare.png`` (every curve) and
``D/runs/<label>[-lrx<mult>]-seed<seed>/{metrics.json,curve.csv}``.
Non-finite numbers are ``null`` in JSON and ``nan``/``inf`` in CSV.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import platform
import re
import statistics
import time
import traceback as tb
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from precond.tasks import TaskInstance, build_task

OptimizerFactory = Callable[..., torch.optim.Optimizer]

DIVERGENCE_FACTOR = 1e6
DEFAULT_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
INTERLEAVING = (
    "lock-step round robin: at global step t every unfinished run makes one optimizer step, "
    "in label order rotated by t; evaluations at the same steps, untimed"
)


# ---------------------------------------------------------------------------
# results


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

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "steps": self.steps,
            "seeds": list(self.seeds),
            "lr_grid": self.lr_grid,
            "best_lr": dict(self.best_lr),
            "interleaving": self.interleaving,
            "sort": "failed runs last, then steps to target, wall-clock to target, final metric",
            "rows": [r.to_dict() for r in self.rows],
            "all_rows": [r.to_dict() for r in self.all_rows],
            "runs": [r.to_dict() if curves else r.summary() for r in self.runs],
        }


# ---------------------------------------------------------------------------
# one run, steppable (so that compare can interleave runs)


def _accepts_kw(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _call_factory(factory: OptimizerFactory, task: TaskInstance, lr: float | None) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if lr is not None:
        kwargs["lr"] = lr
    if _accepts_kw(factory, "task"):
        kwargs["task"] = task
    if _accepts_kw(factory, "seed"):
        kwargs["seed"] = task.seed
    return factory(task.model, task.likelihood, **kwargs)


def _first_lr(opt: Any) -> float | None:
    try:
        lr = opt.param_groups[0]["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0].item()) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _Run:
    """A training run advanced one step at a time."""

    def __init__(
        self,
        make_optimizer: OptimizerFactory,
        task_name: str,
        *,
        seed: int,
        steps: int | None,
        eval_every: int | None,
        label: str,
        short: bool,
        dtype: torch.dtype,
        lr: float | None = None,
        lr_multiplier: float | None = None,
        stop_at_target: bool = False,
        config: Mapping[str, Any] | None = None,
        distributed: bool = False,
    ):
        self.label = label
        self.seed = int(seed)
        self.task = build_task(task_name, seed=self.seed, dtype=dtype, short=short)
        self.distributed = distributed
        if distributed:
            _distribute(self.task)
        self.steps = int(steps if steps is not None else self.task.default_steps)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        self.eval_every = max(1, int(eval_every if eval_every is not None else self.task.eval_every))
        self.stop_at_target = stop_at_target
        self.lr_multiplier = lr_multiplier
        self.description = label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.task.model.train()
            self.optimizer = _call_factory(make_optimizer, self.task, lr)
            self.rng_state = torch.get_rng_state()
        self.lr = _first_lr(self.optimizer)
        self.batches = self.task.train_batches()
        self.losses: list[float] = []
        self.wall_times: list[float] = []
        self.step_times: list[float] = []
        self.evals: list[dict[str, float]] = []
        self.status = "running"
        self.message = ""
        self.traceback: str | None = None
        self.steps_to_target: int | None = None
        self.time_to_target_s: float | None = None
        self.elapsed = 0.0
        self.limit: float | None = None
        self.last_finite: tuple[int, float] | None = None
        self.config = {
            "label": label,
            "task": self.task.config(),
            "steps": self.steps,
            "seed": self.seed,
            "eval_every": self.eval_every,
            "stop_at_target": stop_at_target,
            "lr": self.lr,
            "lr_multiplier": lr_multiplier,
            "optimizer": type(self.optimizer).__name__,
            "optimizer_defaults": _jsonable(getattr(self.optimizer, "defaults", {})),
            "divergence_factor": DIVERGENCE_FACTOR,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            **dict(config or {}),
        }
        self._evaluate()
        if self.steps == 0:
            self.status = "ok"

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def step(self) -> int:
        return len(self.losses)

    def _evaluate(self, agree: bool = True) -> None:
        failure: tuple[str, str] | None = None
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            try:
                metrics = {k: float(v) for k, v in self.task.evaluate().items()}
            except Exception as exc:  # noqa: BLE001  (a broken model must not lose the run)
                metrics = {self.task.metric: math.nan}
                failure = (f"evaluation failed after step {self.step}: {type(exc).__name__}: {exc}", tb.format_exc())
        if self.distributed and agree:
            metrics, failure = _agree_on_evaluation(metrics, failure, self.step)
        if failure is not None and self.status == "running":
            self.status = "error"
            self.message, self.traceback = failure
        entry = {"step": self.step, "wall_time_s": self.elapsed, **metrics}
        self.evals.append(entry)
        if self.steps_to_target is None and self.task.reached(metrics.get(self.task.metric, math.nan)):
            self.steps_to_target = self.step
            self.time_to_target_s = self.elapsed

    def advance(self) -> None:
        """Make one optimizer step (and an evaluation when due)."""
        if self.done:
            return
        k = self.step + 1
        first: list[torch.Tensor] = []
        task = self.task

        returned = None
        error: BaseException | None = None
        rows: int | None = 0
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            start = time.perf_counter()
            try:
                batch = next(self.batches)
                if self.distributed:
                    rows = _part_rows(batch)

                def closure():
                    out = task.closure(batch)
                    if not first:
                        loss = out[0] if isinstance(out, (tuple, list)) else out
                        first.append(loss.detach())
                    return out

                with torch.enable_grad():
                    returned = self.optimizer.step(closure)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                error = exc
                self.traceback = tb.format_exc()
            dt = time.perf_counter() - start
            self.rng_state = torch.get_rng_state()

        self.elapsed += dt
        loss: float | None = None
        failure: str | None = None
        if error is not None:
            failure = f"error at step {k}: {type(error).__name__}: {error}"
        else:
            loss = _as_float(first[0]) if first else _as_float(returned)
            if loss is None:
                failure = f"error at step {k}: optimizer.step(closure) neither called the closure nor returned a loss"
        if self.distributed:  # untimed: the global batch's loss and any process's failure, on every process
            loss, failure, self.traceback = _global_loss(loss, rows, failure, self.traceback)
        if failure is not None:
            self.status = "error"
            self.message = failure
            self._finish_evals()
            return
        self.losses.append(loss)
        self.wall_times.append(self.elapsed)
        self.step_times.append(dt)

        if self.limit is None and math.isfinite(loss):
            self.limit = DIVERGENCE_FACTOR * max(abs(loss), 1e-3)
        reason = None
        if not math.isfinite(loss):
            reason = f"loss is {loss}"
        elif self.limit is not None and loss > self.limit:
            reason = f"loss {loss:.6g} exceeds {DIVERGENCE_FACTOR:g} x initial loss {self.losses[0]:.6g}"
        if reason is not None:
            last = (
                f"last finite loss before divergence {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                if self.last_finite
                else "no finite loss before"
            )
            self.status = "diverged"
            self.message = f"diverged at step {k}: {reason}; {last}"
            self._finish_evals()
            return
        self.last_finite = (k, loss)

        if k % self.eval_every == 0 or k == self.steps:
            self._evaluate()
            if self.status == "running" and self.stop_at_target and self.steps_to_target is not None:
                self.status = "ok"
                self.message = f"reached the target at step {self.steps_to_target}"
                return
        if self.status == "running" and k >= self.steps:
            self.status = "ok"

    def _finish_evals(self) -> None:
        # a final evaluation at the stopping point (if not evaluated already)
        if not self.evals or self.evals[-1]["step"] != self.step:
            self._evaluate()

    def interrupt(self) -> None:
        if not self.done:
            self.status = "interrupted"
            self.message = f"interrupted after step {self.step}"
            # no collective here: the processes may have been interrupted at different points
            if not self.evals or self.evals[-1]["step"] != self.step:
                self._evaluate(agree=False)

    def result(self) -> RunResult:
        times = self.step_times
        mean_ms = 1000.0 * sum(times) / len(times) if times else math.nan
        median_ms = 1000.0 * statistics.median(times) if times else math.nan
        final = {k: v for k, v in self.evals[-1].items() if k not in ("step", "wall_time_s")} if self.evals else {}
        message = self.message or f"completed {self.step} steps"
        return RunResult(
            label=self.label,
            task=self.task.name,
            seed=self.seed,
            status=self.status if self.status != "running" else "interrupted",
            message=message,
            steps=self.steps,
            steps_done=self.step,
            losses=list(self.losses),
            wall_times=list(self.wall_times),
            evals=[dict(e) for e in self.evals],
            final=final,
            metric=self.task.metric,
            higher_is_better=self.task.higher_is_better,
            target=self.task.target,
            steps_to_target=self.steps_to_target,
            time_to_target_s=self.time_to_target_s,
            ms_per_step=mean_ms,
            ms_per_step_median=median_ms,
            lr=self.lr,
            lr_multiplier=self.lr_multiplier,
            config=self.config,
            traceback=self.traceback,
        )


# ---------------------------------------------------------------------------
# progress display


def _distribute(task: TaskInstance) -> None:
    """One of several processes: the closure runs the model through DistributedDataParallel and every
    minibatch is cut into near-equal parts along its first dimension, one per process (equal parts
    when the batch size divides by the process count; DDP averages the parts with equal weights)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if task.forward is None:
        raise ValueError(
            f"task '{task.name}' does not run its closure through TaskInstance.forward, so it cannot train on "
            "several processes (DistributedDataParallel must wrap the forward pass)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    task.forward.module = DistributedDataParallel(task.model)
    make = task.train_batches

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.tensor_split(world)[rank]
        if isinstance(value, (tuple, list)):
            return type(value)(part(v) for v in value)
        return value

    task.train_batches = lambda: (part(batch) for batch in make())
    task.info = {**task.info, "processes": world}


def _part_rows(batch: Any) -> int | None:
    """The rows of this process's part of a minibatch (the first dimension of its first tensor that
    :func:`_distribute` splits); None when nothing was split (every process holds the whole batch)."""
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)):
        for value in batch:
            rows = _part_rows(value)
            if rows is not None:
                return rows
    return None


def _global_loss(
    loss: float | None, rows: int | None, failure: str | None, trace: str | None
) -> tuple[float | None, str | None, str | None]:
    """The step's loss on the global batch and whether any process failed, the same on every process.

    One all-reduce of three float64 numbers per step (outside the timed region): ``rows * loss``,
    ``rows`` and a failure flag, summed. The closures' losses are means over their rows, so the
    row-weighted mean of the processes' losses is the loss one process gets on the whole batch, also
    when ``tensor_split`` cuts unequal parts (``rows`` None: the batch was not split, every process
    has all of it, weight 1). A non-finite loss on any process makes the global one non-finite. On a
    failure (once, then the run stops) every process adopts the message and traceback of the first
    failing process. Returns ``(loss, failure, traceback)``.
    """
    import torch.distributed as dist

    weight = 1.0 if rows is None else float(rows)
    ok = failure is None and loss is not None
    buf = torch.tensor(
        [weight * loss if ok and weight else 0.0, weight if ok else 0.0, 0.0 if ok else 1.0], dtype=torch.float64
    )
    dist.all_reduce(buf)
    total, weights, failed = buf.tolist()
    if not failed:
        return (total / weights if weights else math.nan), None, trace
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (failure, trace))
    rank, (message, trace) = next((r, g) for r, g in enumerate(gathered) if g[0] is not None)
    if rank != dist.get_rank():
        message = f"{message} (on process {rank})"
    return None, message, trace


def _same_metrics(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _agree_on_evaluation(
    metrics: dict[str, float], failure: tuple[str, str] | None, step: int
) -> tuple[dict[str, float], tuple[str, str] | None]:
    """Every process evaluates its replica of the model on the task's whole data (the same data on every
    process): the figures must be identical. Every process adopts process 0's figures and the first
    failure, so all take the same decisions (target reached, error); process 0 warns if a replica's
    figures differ (replicas that drifted apart)."""
    import warnings

    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (metrics, failure))
    ref = gathered[0][0]
    if dist.get_rank() == 0:
        differ = [r for r, (m, f) in enumerate(gathered) if f is None and not _same_metrics(m, ref)]
        if differ:
            warnings.warn(
                f"after step {step} the evaluation on process(es) {differ} differs from process 0's "
                f"({[gathered[r][0] for r in differ]} vs {ref}): the model replicas drifted apart; "
                "process 0's figures are used",
                RuntimeWarning,
                stacklevel=2,
            )
    failed = next(((r, f) for r, (_, f) in enumerate(gathered) if f is not None), None)
    if failed is not None and failed[0] != dist.get_rank():
        failure = (f"{failed[1][0]} (on process {failed[0]})", failed[1][1])
    return dict(ref), failure


class _Progress:
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
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
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

    def add(self, run: _Run) -> None:
        if self.progress is not None:
            self.ids[id(run)] = self.progress.add_task(run.description, total=run.steps, loss="-", rate="-", status="")

    def update(self, run: _Run) -> None:
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
# public API


def train(
    make_optimizer: OptimizerFactory,
    task_name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    eval_every: int | None = None,
    label: str | None = None,
    short: bool = False,
    dtype: torch.dtype = torch.float32,
    stop_at_target: bool = False,
    threads: int | None = None,
    config: Mapping[str, Any] | None = None,
    console: Any = None,
    distributed: bool = False,
) -> RunResult:
    """Train one optimizer on a built-in task and return a :class:`RunResult`.

    ``distributed``: this process is one of several in an initialised
    ``torch.distributed`` process group; the model trains under
    ``DistributedDataParallel`` and each process takes its share of every
    minibatch (``precond train --nproc N``). Every process records the
    loss of the global batch (the processes' losses weighted by their rows,
    one untimed all-reduce per step) and process 0's evaluations, so all
    take the same decisions (divergence, target, errors) and every figure
    but the timings equals the one-process run's to round-off.

    ``steps``/``eval_every`` default to the task's hints; ``short`` builds the
    task's tiny test-mode variant; ``threads`` sets ``torch.set_num_threads``
    for the run (restored after); ``config`` is merged into the recorded
    config (e.g. the recipe); ``stop_at_target`` ends the run at the first
    evaluation reaching the target. Result files go to ``out_dir``.
    """
    with _threads(threads):
        run = _Run(
            make_optimizer,
            task_name,
            seed=seed,
            steps=steps,
            eval_every=eval_every,
            label=label or _factory_label(make_optimizer),
            short=short,
            dtype=dtype,
            stop_at_target=stop_at_target,
            config=config,
            distributed=distributed,
        )
        interrupted = False
        with _Progress(progress, console) as bar:
            bar.add(run)
            try:
                while not run.done:
                    run.advance()
                    bar.update(run)
            except KeyboardInterrupt:
                run.interrupt()
                interrupted = True
            bar.update(run)
    result = run.result()
    if out_dir is not None:
        write_run(result, out_dir)
    if interrupted:
        raise KeyboardInterrupt
    return result


def compare(
    make_optimizers: Mapping[str, OptimizerFactory],
    task_name: str,
    *,
    steps: int | None = None,
    seeds: Iterable[int] = (0,),
    out_dir: str | Path | None = None,
    lr_grid: Sequence[float] | bool | None = None,
    progress: bool = True,
    eval_every: int | None = None,
    short: bool = False,
    dtype: torch.dtype = torch.float32,
    stop_at_target: bool = False,
    threads: int | None = None,
    config: Mapping[str, Any] | None = None,
    console: Any = None,
) -> CompareResult:
    """Run every optimizer on the same task and seeds, interleaved fairly.

    ``lr_grid``: multipliers of each factory's learning rate (``True`` for
    ``DEFAULT_LR_GRID``); the base lr is the factory's ``lr`` attribute if it
    has one, else ``param_groups[0]["lr"]`` of an optimizer built on a
    throwaway copy of the task; factories are then called with ``lr=base *
    multiplier``. The table (``rows``) keeps the best multiplier per label.
    """
    if not make_optimizers:
        raise ValueError("compare needs at least one optimizer")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("compare needs at least one seed")
    grid: list[float] | None
    if lr_grid is True:
        grid = list(DEFAULT_LR_GRID)
    elif lr_grid:
        grid = [float(m) for m in lr_grid]
    else:
        grid = None

    with _threads(threads):
        runs: list[_Run] = []
        for label, factory in make_optimizers.items():
            base_lr = _base_lr(factory, task_name, seeds[0], short, dtype) if grid else None
            for mult in grid or [None]:
                lr = base_lr * mult if (mult is not None and base_lr is not None) else None
                for seed in seeds:
                    runs.append(
                        _Run(
                            factory,
                            task_name,
                            seed=seed,
                            steps=steps,
                            eval_every=eval_every,
                            label=str(label),
                            short=short,
                            dtype=dtype,
                            lr=lr,
                            lr_multiplier=mult,
                            stop_at_target=stop_at_target,
                            config={**dict(config or {}), "compare": True},
                        )
                    )
                    desc = str(label)
                    if mult is not None:
                        desc += f" ×{mult:g}"
                    if len(seeds) > 1:
                        desc += f" s{seed}"
                    runs[-1].description = desc
        interrupted = False
        with _Progress(progress, console) as bar:
            for run in runs:
                bar.add(run)
            t = 0
            try:
                while not all(r.done for r in runs):
                    n = len(runs)
                    order = runs[t % n :] + runs[: t % n]
                    for run in order:
                        if not run.done:
                            run.advance()
                            bar.update(run)
                    t += 1
            except KeyboardInterrupt:
                for run in runs:
                    run.interrupt()
                interrupted = True
            for run in runs:
                bar.update(run)

    results = [r.result() for r in runs]
    first = results[0]
    all_rows = _rows(results, first.higher_is_better, first.metric)
    if grid:
        best: dict[str, CompareRow] = {}
        for row in all_rows:  # sorted: the first row of a label is its best
            best.setdefault(row.label, row)
        rows = _sort_rows(list(best.values()), first.higher_is_better)
        best_lr = {label: row.lr for label, row in best.items()}
    else:
        rows = list(all_rows)
        best_lr = {}
    _relative_times(rows, all_rows)
    result = CompareResult(
        task=first.task,
        metric=first.metric,
        higher_is_better=first.higher_is_better,
        target=first.target,
        steps=max(r.steps for r in results),
        seeds=seeds,
        runs=results,
        rows=rows,
        all_rows=all_rows,
        lr_grid=grid,
        best_lr=best_lr,
    )
    if out_dir is not None:
        write_compare(result, out_dir)
    if interrupted:
        raise KeyboardInterrupt
    return result


# ---------------------------------------------------------------------------
# helpers for compare


class _threads:
    def __init__(self, n: int | None):
        self.n = n
        self.old: int | None = None

    def __enter__(self):
        if self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)
        return False


def _factory_label(factory: Any) -> str:
    name = getattr(factory, "label", None) or getattr(factory, "__name__", None) or type(factory).__name__
    return str(name)


def _base_lr(factory: OptimizerFactory, task_name: str, seed: int, short: bool, dtype: torch.dtype) -> float:
    lr = getattr(factory, "lr", None)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    probe = build_task(task_name, seed=seed, dtype=dtype, short=short)
    with torch.random.fork_rng(devices=[]):
        opt = _call_factory(factory, probe, None)
    lr = _first_lr(opt)
    if lr is None:
        raise ValueError("lr_grid needs factories whose optimizer has param_groups[0]['lr'] (or an `lr` attribute)")
    return lr


def _median_inf(values: list[float]) -> float:
    return statistics.median(values) if values else math.inf


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _rows(results: list[RunResult], higher_is_better: bool, metric: str) -> list[CompareRow]:
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
    return _sort_rows(rows, higher_is_better)


def _nan_last(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def _sort_rows(rows: list[CompareRow], higher_is_better: bool) -> list[CompareRow]:
    def key(row: CompareRow):
        metric = row.final_metric
        metric_key = _nan_last(-metric if higher_is_better else metric)
        return (
            row.status != "ok",
            _nan_last(row.steps_to_target),
            _nan_last(row.time_to_target_s),
            metric_key,
            row.label,
        )

    return sorted(rows, key=key)


def _relative_times(rows: list[CompareRow], all_rows: list[CompareRow]) -> None:
    ref = next((r for r in rows if r.label.lower() == "adam"), None)
    if ref is None or not (ref.ms_per_step > 0):
        return
    for row in {id(r): r for r in [*rows, *all_rows]}.values():
        row.rel_ms_per_step = row.ms_per_step / ref.ms_per_step


# ---------------------------------------------------------------------------
# files


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item())
        except Exception:  # noqa: BLE001, S110
            pass
    return repr(value)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _curve_rows(result: RunResult) -> tuple[list[str], list[list[Any]]]:
    eval_keys: list[str] = []
    for e in result.evals:
        for k in e:
            if k not in ("step", "wall_time_s") and k not in eval_keys:
                eval_keys.append(k)
    header = ["step", "wall_time_s", "loss", *eval_keys]
    by_step: dict[int, dict[str, float]] = {}
    for e in result.evals:
        by_step[int(e["step"])] = e
    rows = []
    if 0 in by_step:
        rows.append([0, 0.0, "", *[by_step[0].get(k, "") for k in eval_keys]])
    for k, (loss, wall) in enumerate(zip(result.losses, result.wall_times), start=1):
        e = by_step.get(k)
        rows.append([k, wall, loss, *[e.get(k2, "") if e else "" for k2 in eval_keys]])
    return header, rows


def _write_curve_csv(path: Path, result: RunResult) -> None:
    header, rows = _curve_rows(result)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([[_csv_value(v) for v in row] for row in rows])


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else v


def write_run(result: RunResult, out_dir: str | Path, *, plot: bool = True) -> Path:
    """Write ``metrics.json``, ``curve.csv`` and (``plot``) ``curve.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir = str(out)
    _write_json(out / "metrics.json", result.summary())
    _write_curve_csv(out / "curve.csv", result)
    if plot:
        plot_runs([result], out / "curve.png", title=f"{result.label} on {result.task} (seed {result.seed})")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_compare(result: CompareResult, out_dir: str | Path) -> Path:
    """Write ``compare.json``, ``compare.csv``, ``compare.png`` and per-run files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.out_dir = str(out)
    for run in result.runs:
        name = _slug(run.label)
        if run.lr_multiplier is not None:
            name += f"-lrx{run.lr_multiplier:g}"
        write_run(run, out / "runs" / f"{name}-seed{run.seed}", plot=False)
    _write_json(out / "compare.json", result.to_dict())
    fields = list(CompareRow.__dataclass_fields__)
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", *fields])
        for rank, row in enumerate(result.all_rows, start=1):
            d = row.to_dict()
            writer.writerow([rank, *[_csv_value(d[f]) for f in fields]])
    shown = {(r.label, r.lr_multiplier) for r in result.rows}
    plot_runs(
        [r for r in result.runs if (r.label, r.lr_multiplier) in shown],
        out / "compare.png",
        title=f"{result.task}: {len(result.rows)} optimizers, seeds {result.seeds}",
    )
    return out


def _smoothing_window(n: int) -> int:
    """Trailing-mean window for plotting ``n`` per-step losses (1: no smoothing)."""
    return 1 if n <= 100 else max(2, n // 50)


def _trailing_mean(values: Sequence[float], window: int) -> list[float]:
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
        window = _smoothing_window(len(finite))
        if window > 1:  # noisy minibatch losses: faint per-step curve, bold trailing mean
            smooth = _trailing_mean(finite, window)
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


# ---------------------------------------------------------------------------
# tables


def _fmt(value: Any, digits: int = 4) -> str:
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
        table.add_row("lr", _fmt(result.lr))
        table.add_row("initial loss", _fmt(result.initial_loss))
        table.add_row("final loss", _fmt(result.final_loss))
        for k, v in result.final.items():
            table.add_row(f"final {k}", _fmt(v))
        better = ">=" if result.higher_is_better else "<="
        table.add_row("target", f"{result.metric} {better} {_fmt(result.target)}")
        table.add_row("steps to target", _fmt(result.steps_to_target))
        table.add_row("time to target (s)", _fmt(result.time_to_target_s))
        table.add_row("ms / step (mean)", _fmt(result.ms_per_step))
        table.add_row("ms / step (median)", _fmt(result.ms_per_step_median))
        table.add_row("training time (s)", _fmt(result.wall_time_s))
        return table

    rows = result.all_rows if all_rows else result.rows
    better = ">=" if result.higher_is_better else "<="
    table = Table(
        title=f"{result.task}: target {result.metric} {better} {_fmt(result.target)}, "
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
                f"{_fmt(row.lr, 3)} (×{row.lr_multiplier:g})" if row.lr_multiplier is not None else _fmt(row.lr)
            )
        cells += [
            f"{row.reached}/{row.seeds}",
            _fmt(row.steps_to_target),
            _fmt(row.time_to_target_s, 3),
            _fmt(row.final_metric),
            _fmt(row.final_train_loss),
            _fmt(row.ms_per_step, 3),
        ]
        if has_ref:
            cells.append(_fmt(row.rel_ms_per_step, 3))
        style = "green" if row.status == "ok" else "red"
        cells.append(f"[{style}]{row.status}[/]")
        table.add_row(*cells)
    return table


__all__ = [
    "DEFAULT_LR_GRID",
    "CompareResult",
    "CompareRow",
    "RunResult",
    "compare",
    "plot_runs",
    "render_table",
    "train",
    "write_compare",
    "write_run",
]
