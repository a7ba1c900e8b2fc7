"""The options of ``precond train`` and ``precond compare``: their types, the callbacks that parse them
(a bad value gets the command line's one-line ``error:`` and exit status 2, nothing run) and the
frozen :class:`RunOptions` the commands hand on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from precond.cli.output import fail

if TYPE_CHECKING:
    import torch

EXIT_OK = 0
EXIT_DIVERGED = 3  # train: the loss became non-finite or exploded; results are still written
EXIT_ERROR = 4  # train: the optimizer or the evaluation raised; traceback in metrics.json
EXIT_INTERRUPTED = 130  # Ctrl-C; results so far are written

DEFAULT_TASK = "mnist-autoencoder"
DEFAULT_SEEDS = "0,1"


class DType(str, Enum):
    """``--dtype``: the floating-point type of the task's model and data."""

    float32 = "float32"
    float64 = "float64"

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.value)


def task_name(value: str) -> str:
    """``--task``: a task of the registry (built-in, entry-point plugins and ``--plugin`` modules, which the
    group callback imports before a command's options are parsed); else the registry's "did you mean"."""
    from precond.tasks import get_task

    try:
        get_task(value)
    except ValueError as exc:
        fail(exc)
    return value


def comma_ints(option: str) -> Callable[[Optional[str]], Optional[list[int]]]:
    """A callback parsing ``option``'s comma-separated integers, e.g. ``--seeds 0,1``."""

    def parse(value: Optional[str]) -> Optional[list[int]]:
        if value is None:
            return None
        try:
            values = [int(s) for s in value.replace(" ", "").split(",") if s]
        except ValueError:
            fail(f"{option}: expected comma-separated integers such as 0,1, got {value!r}")
        if not values:
            fail(f"{option}: give at least one value, e.g. 0,1")
        return values

    return parse


def comma_floats(option: str) -> Callable[[Optional[str]], Optional[list[float]]]:
    """A callback parsing ``option``'s comma-separated positive numbers, e.g. ``--lr-multipliers 0.5,1,2``."""

    def parse(value: Optional[str]) -> Optional[list[float]]:
        if value is None:
            return None
        try:
            values = [float(s) for s in value.replace(" ", "").split(",") if s]
        except ValueError:
            fail(f"{option}: expected comma-separated numbers such as 0.3,1,3, got {value!r}")
        if not values or any(not (v > 0) or v != v or v == float("inf") for v in values):
            fail(f"{option}: expected positive finite numbers, got {value!r}")
        return values

    return parse


# the options both commands declare alike
Task = Annotated[
    str,
    typer.Option("--task", "-t", metavar="TASK", callback=task_name, help="built-in task (precond tasks lists them)"),
]
Short = Annotated[bool, typer.Option("--short", help="the task's small, fast variant (the test suite's mode)")]
Threads = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, help="torch CPU threads [default: the task's most useful count (precond tasks), at most "
        "the CPUs idle now (usable CPUs less the load average): 1 for the small tasks]",
    ),
]
TimeBudget = Annotated[
    Optional[float],
    typer.Option(
        "--time-budget", min=0.001, metavar="SECONDS",
        help="stop each run after SECONDS of training (wall-clock as timed, evaluations excluded) instead of after "
        "the task's steps; with --steps, whichever comes first. compare then ranks by the final metric",
    ),
]
EvalEvery = Annotated[
    Optional[int], typer.Option("--eval-every", min=1, help="evaluate every N steps [default: the task's]")
]
DTypeOption = Annotated[DType, typer.Option("--dtype", help="float32 or float64")]


@dataclass(frozen=True)
class RunOptions:
    """What ``precond train`` and ``precond compare`` share: the task, where results go and how each run goes."""

    task: str
    steps: Optional[int]
    out: Optional[str]
    short: bool
    threads: Optional[int]
    eval_every: Optional[int]
    stop_at_target: bool
    dtype: DType
    progress: bool
    time_budget: Optional[float] = None

    def threads_for(self, task: Any) -> int:
        """``--threads``, else the task's most useful count (``TaskInstance.threads``) capped at the CPUs idle now
        (:func:`precond.threads.fastest_threads`)."""
        if self.threads:
            return int(self.threads)
        from precond.threads import fastest_threads

        return fastest_threads(getattr(task, "threads", 1))

    def runner_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`precond.training.train` / :func:`~precond.training.compare` these set."""
        return {
            "steps": self.steps,
            "eval_every": self.eval_every,
            "short": self.short,
            "dtype": self.dtype.torch,
            "stop_at_target": self.stop_at_target,
            "threads": self.threads,
            "progress": self.progress,
            "time_budget": self.time_budget,
        }


@dataclass(frozen=True)
class TrainOptions(RunOptions):
    """``precond train``'s: the run options, the recipe and its seed, overrides and learning rate."""

    recipe: str = ""
    seed: int = 0
    set_: tuple[str, ...] = ()
    lr: Optional[float] = None
    fsdp: bool = False  # several processes: fully_shard the model instead of DistributedDataParallel
