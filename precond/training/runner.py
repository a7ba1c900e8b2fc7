"""The run loop: :class:`_Run` (one run, advanced a step at a time), :func:`train` (one run) and
:func:`compare` (every label x lr multiplier x seed, in lock-step). Conventions: the package docstring
(:mod:`precond.training`)."""

from __future__ import annotations

import math
import platform
import statistics
import time
import traceback as tb
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precond.tasks import TaskInstance, build_task
from precond.threads import torch_threads
from precond.training import ddp
from precond.training.factories import (
    OptimizerFactory,
    PlainLoop,
    as_factory,
    base_lr,
    call_factory,
    factory_label,
    first_lr,
)
from precond.training.files import jsonable, write_compare, write_run
from precond.training.report import ProgressBars
from precond.training.results import (
    CompareResult,
    RunResult,
    best_rows,
    compare_rows,
    set_relative_times,
)

DIVERGENCE_FACTOR = 1e6
DEFAULT_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
MAX_STEPS = 10**9  # the step cap of a run under a time budget without --steps


def _optimizer_name(opt: Any) -> str:
    if isinstance(opt, PlainLoop):
        return opt.name
    return type(opt).__name__


# ---------------------------------------------------------------------------
# the parts of a step


class _Divergence:
    """Whether the losses diverged: one is non-finite, or above ``DIVERGENCE_FACTOR * max(|initial loss|, 1e-3)``."""

    def __init__(self) -> None:
        self.initial: float | None = None
        self.limit: float | None = None
        self.last_finite: tuple[int, float] | None = None

    def check(self, step: int, loss: float) -> str | None:
        """The message when ``loss``, the loss of ``step``, diverged; None when it did not."""
        if self.limit is None and math.isfinite(loss):
            self.initial, self.limit = loss, DIVERGENCE_FACTOR * max(abs(loss), 1e-3)
        if not math.isfinite(loss):
            reason = f"loss is {loss}"
        elif self.limit is not None and loss > self.limit:
            reason = f"loss {loss:.6g} exceeds {DIVERGENCE_FACTOR:g} x initial loss {self.initial:.6g}"
        else:
            self.last_finite = (step, loss)
            return None
        last = (
            f"last finite loss before divergence {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
            if self.last_finite
            else "no finite loss before"
        )
        return f"diverged at step {step}: {reason}; {last}"


@dataclass
class _Step:
    """One timed optimizer step: its training seconds (fetching the batch plus ``optimizer.step``), the
    first loss its closure computed (else the loss ``step`` returned), or the exception it raised."""

    seconds: float
    loss: float | None = None
    error: str | None = None  # "TypeName: message"
    traceback: str | None = None
    rows: int | None = 0  # this process's rows of the minibatch (ddp.part_rows), with split=True

    def failure(self, k: int) -> str | None:
        if self.error is not None:
            return f"error at step {k}: {self.error}"
        if self.loss is None:
            return f"error at step {k}: optimizer.step(closure) neither called the closure nor returned a loss"
        return None


def _timed_step(optimizer: torch.optim.Optimizer, task: TaskInstance, batches: Iterator[Any], split: bool) -> _Step:
    """Fetch the next minibatch and make one optimizer step; ``split``: count this process's rows of it."""
    first: list[torch.Tensor] = []
    returned = None
    rows: int | None = 0
    start = time.perf_counter()
    try:
        batch = next(batches)
        if split:
            rows = ddp.part_rows(batch)

        def closure():
            out = task.closure(batch)
            if not first:
                loss = out[0] if isinstance(out, (tuple, list)) else out
                first.append(loss.detach())
            return out

        with torch.enable_grad():
            returned = optimizer.step(closure)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001  (the run records it and stops)
        return _Step(time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}", traceback=tb.format_exc(),
                     rows=rows)
    seconds = time.perf_counter() - start
    return _Step(seconds, loss=_as_float(first[0]) if first else _as_float(returned), rows=rows)


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


def _evaluate_task(task: TaskInstance, step: int) -> tuple[dict[str, float], tuple[str, str] | None]:
    """The task's metrics, or NaN and ``(message, traceback)`` when the evaluation raised."""
    try:
        return {k: float(v) for k, v in task.evaluate().items()}, None
    except Exception as exc:  # noqa: BLE001  (a broken model must not lose the run)
        failure = (f"evaluation failed after step {step}: {type(exc).__name__}: {exc}", tb.format_exc())
        return {task.metric: math.nan}, failure


# ---------------------------------------------------------------------------
# one run, steppable (so that compare can interleave runs)


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
        distributed: bool | str = False,
        time_budget: float | None = None,
    ):
        self.label = self.description = label
        self.seed = int(seed)
        self.task = build_task(task_name, seed=self.seed, dtype=dtype, short=short)
        self.distributed = bool(distributed)
        if distributed:
            ddp.distribute(self.task, "fsdp" if distributed == "fsdp" else "ddp")
        if time_budget is not None and not (time_budget > 0 and math.isfinite(time_budget)):
            raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget}")
        self.time_budget = None if time_budget is None else float(time_budget)
        # with a time budget and no steps: as many steps as the budget allows
        default = MAX_STEPS if self.time_budget is not None else self.task.default_steps
        self.steps = int(steps if steps is not None else default)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        self.eval_every = max(1, int(eval_every if eval_every is not None else self.task.eval_every))
        self.stop_at_target = stop_at_target
        self.lr_multiplier = lr_multiplier
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.rng_state = torch.get_rng_state()
        with self._own_rng():
            self.task.model.train()
            self.optimizer = call_factory(make_optimizer, self.task, lr)
        self.lr = first_lr(self.optimizer)
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
        self.divergence = _Divergence()
        self.config = {**self._config(), **dict(config or {})}
        self._evaluate()
        if self.steps == 0:
            self.status = "ok"

    def _config(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "task": self.task.config(),
            "steps": self.steps,
            "seed": self.seed,
            "eval_every": self.eval_every,
            "stop_at_target": self.stop_at_target,
            "lr": self.lr,
            "lr_multiplier": self.lr_multiplier,
            "time_budget_s": self.time_budget,
            "optimizer": _optimizer_name(self.optimizer),
            "plain_loop": isinstance(self.optimizer, PlainLoop),
            **({"parameter_split": self.optimizer.note} if getattr(self.optimizer, "note", "") else {}),
            "optimizer_defaults": jsonable(getattr(self.optimizer, "defaults", {})),
            "divergence_factor": DIVERGENCE_FACTOR,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }

    @contextmanager
    def _own_rng(self, keep: bool = True) -> Iterator[None]:
        """This run's torch CPU RNG state swapped in around its own work (the caller's is left untouched);
        ``keep``: what the work drew counts (steps, construction), else not (evaluations)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            yield
            if keep:
                self.rng_state = torch.get_rng_state()

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def step(self) -> int:
        return len(self.losses)

    def _evaluate(self, agree: bool = True) -> None:
        with self._own_rng(keep=False):
            metrics, failure = _evaluate_task(self.task, self.step)
        if self.distributed and agree:
            metrics, failure = ddp.agree_on_evaluation(metrics, failure, self.step)
        if failure is not None and self.status == "running":
            self.status = "error"
            self.message, self.traceback = failure
        self.evals.append({"step": self.step, "wall_time_s": self.elapsed, **metrics})
        if self.steps_to_target is None and self.task.reached(metrics.get(self.task.metric, math.nan)):
            self.steps_to_target = self.step
            self.time_to_target_s = self.elapsed

    def advance(self) -> None:
        """Make one optimizer step (and an evaluation when due)."""
        if self.done:
            return
        k = self.step + 1
        with self._own_rng():
            step = _timed_step(self.optimizer, self.task, self.batches, split=self.distributed)
        self.elapsed += step.seconds
        loss, failure = step.loss, step.failure(k)
        if step.traceback is not None:
            self.traceback = step.traceback
        if self.distributed:  # untimed: the global batch's loss and any process's failure, on every process
            loss, failure, self.traceback = ddp.global_loss(loss, step.rows, failure, self.traceback)
        if failure is not None:
            self._stop("error", failure)
            return
        self.losses.append(loss)
        self.wall_times.append(self.elapsed)
        self.step_times.append(step.seconds)
        diverged = self.divergence.check(k, loss)
        if diverged is not None:
            self._stop("diverged", diverged)
            return
        out_of_time = self.time_budget is not None and self.elapsed >= self.time_budget
        if k % self.eval_every == 0 or k == self.steps or out_of_time:
            self._evaluate()
            if self.status == "running" and self.stop_at_target and self.steps_to_target is not None:
                self.status = "ok"
                self.message = f"reached the target at step {self.steps_to_target}"
                return
        if self.status == "running" and out_of_time:
            self.status = "ok"
            self.message = f"time budget of {self.time_budget:g} s spent after {k} steps"
        elif self.status == "running" and k >= self.steps:
            self.status = "ok"

    def _stop(self, status: str, message: str) -> None:
        self.status, self.message = status, message
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
        final = {k: v for k, v in self.evals[-1].items() if k not in ("step", "wall_time_s")} if self.evals else {}
        return RunResult(
            label=self.label,
            task=self.task.name,
            seed=self.seed,
            status=self.status if self.status != "running" else "interrupted",
            message=self.message or f"completed {self.step} steps",
            steps=self.steps if self.steps != MAX_STEPS else self.step,
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
            ms_per_step=1000.0 * sum(times) / len(times) if times else math.nan,
            ms_per_step_median=1000.0 * statistics.median(times) if times else math.nan,
            lr=self.lr,
            lr_multiplier=self.lr_multiplier,
            config=self.config,
            traceback=self.traceback,
        )


def _lockstep(runs: list[_Run], bars: ProgressBars) -> bool:
    """Advance the runs until all are done, one step each in turn, in the order rotated by the global
    step; Ctrl-C interrupts every run. Returns whether it was interrupted."""
    interrupted = False
    try:
        t = 0
        while not all(r.done for r in runs):
            n = len(runs)
            for run in runs[t % n :] + runs[: t % n]:
                if not run.done:
                    run.advance()
                    bars.update(run)
            t += 1
    except KeyboardInterrupt:
        for run in runs:
            run.interrupt()
        interrupted = True
    for run in runs:
        bars.update(run)
    return interrupted


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
    distributed: bool | str = False,
    time_budget: float | None = None,
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
    ``distributed="fsdp"`` (``precond train --nproc N --fsdp``) fully shards the
    model instead (``fully_shard``: each process holds its rows of every
    parameter and the optimizer works on them, docs/distributed.md).

    ``steps``/``eval_every`` default to the task's hints; ``short`` builds the
    task's tiny test-mode variant; ``threads`` sets ``torch.set_num_threads``
    for the run (restored after); ``config`` is merged into the recorded
    config (e.g. the recipe); ``stop_at_target`` ends the run at the first
    evaluation reaching the target. Result files go to ``out_dir``.

    ``make_optimizer`` may also be a plain torch optimizer: a ``torch.optim.Optimizer`` subclass or
    ``lambda params: torch.optim.AdamW(params, lr=1e-3)`` (see :func:`~precond.training.factories.as_factory`).
    ``time_budget``: stop after that many seconds of training (wall-clock as timed, evaluations excluded)
    instead of after ``steps`` (both given: whichever comes first).
    """
    make_optimizer = as_factory(make_optimizer)
    with torch_threads(threads):
        run = _Run(
            make_optimizer,
            task_name,
            seed=seed,
            steps=steps,
            eval_every=eval_every,
            label=label or factory_label(make_optimizer),
            short=short,
            dtype=dtype,
            stop_at_target=stop_at_target,
            config=config,
            distributed=distributed,
            time_budget=time_budget,
        )
        with ProgressBars(progress, console) as bars:
            bars.add(run)
            interrupted = _lockstep([run], bars)
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
    time_budget: float | None = None,
) -> CompareResult:
    """Run every optimizer on the same task and seeds, interleaved fairly.

    ``lr_grid``: multipliers of each factory's learning rate (``True`` for
    ``DEFAULT_LR_GRID``); the base lr is the factory's ``lr`` attribute if it
    has one, else ``param_groups[0]["lr"]`` of an optimizer built on a
    throwaway copy of the task; factories are then called with ``lr=base *
    multiplier``. The table (``rows``) keeps the best multiplier per label.

    Contenders may mix precond factories and plain torch optimizers (a ``torch.optim.Optimizer``
    subclass, ``lambda params: torch.optim.AdamW(params, lr=1e-3)`` or
    :func:`~precond.training.factories.torch_optimizer`), stepped by the plain-loop convention in the
    same interleaved loop. ``time_budget``: each run stops after that many seconds of its own training
    (steps capped by ``steps`` when given too); the table then ranks by the final metric, who is best
    after that time.
    """
    if not make_optimizers:
        raise ValueError("compare needs at least one optimizer")
    make_optimizers = {label: as_factory(f) for label, f in make_optimizers.items()}
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("compare needs at least one seed")
    grid = list(DEFAULT_LR_GRID) if lr_grid is True else [float(m) for m in lr_grid] if lr_grid else None
    with torch_threads(threads):
        runs = [
            _Run(factory, task_name, seed=seed, steps=steps, eval_every=eval_every, label=str(label), short=short,
                 dtype=dtype, lr=lr, lr_multiplier=mult, stop_at_target=stop_at_target,
                 config={**dict(config or {}), "compare": True}, time_budget=time_budget)
            for label, factory, lr, mult, seed in _grid(make_optimizers, task_name, grid, seeds, short, dtype)
        ]
        for run in runs:
            mult = f" ×{run.lr_multiplier:g}" if run.lr_multiplier is not None else ""
            run.description = f"{run.label}{mult}" + (f" s{run.seed}" if len(seeds) > 1 else "")
        with ProgressBars(progress, console) as bars:
            for run in runs:
                bars.add(run)
            interrupted = _lockstep(runs, bars)
    result = _compare_result([r.result() for r in runs], seeds, grid, time_budget)
    if out_dir is not None:
        write_compare(result, out_dir)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _grid(
    make_optimizers: Mapping[str, OptimizerFactory], task_name: str, grid: list[float] | None, seeds: list[int],
    short: bool, dtype: torch.dtype,
) -> Iterator[tuple[str, OptimizerFactory, float | None, float | None, int]]:
    """``(label, factory, lr, lr multiplier, seed)`` of every run of a comparison, in table order (the
    factories' order, then multipliers, then seeds); without a grid lr and multiplier are None."""
    for label, factory in make_optimizers.items():
        base = base_lr(factory, task_name, seeds[0], short, dtype) if grid else None
        for mult in grid or [None]:
            lr = base * mult if (mult is not None and base is not None) else None
            for seed in seeds:
                yield label, factory, lr, mult, seed


def _compare_result(
    results: list[RunResult], seeds: list[int], grid: list[float] | None, time_budget: float | None = None
) -> CompareResult:
    first = results[0]
    by_metric = time_budget is not None
    all_rows = compare_rows(results, first.higher_is_better, first.metric, by_metric=by_metric)
    rows, best_lr = best_rows(all_rows, first.higher_is_better, by_metric=by_metric) if grid else (list(all_rows), {})
    set_relative_times(rows, all_rows)
    return CompareResult(
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
        time_budget_s=time_budget,
    )
