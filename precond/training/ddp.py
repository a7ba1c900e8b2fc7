"""Training on several processes (``train(..., distributed=True)``, ``precond train --nproc N``): the
task's model under DistributedDataParallel with each process's share of every minibatch, and the two
exchanges that make every process take the same decisions: the loss of the global batch after each
step and process 0's evaluations. Both run outside the timed region."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from precond.tasks import TaskInstance


def distribute(task: TaskInstance, sharding: str = "ddp") -> None:
    """One of several processes: the closure runs the model through DistributedDataParallel (``sharding``
    ``"ddp"``) or the model is fully sharded in place (``"fsdp"``: ``torch.distributed.fsdp.fully_shard``,
    every parameter a DTensor cut on its first dimension, so the optimizer built next sees the shards), and
    every minibatch is cut into near-equal parts along its first dimension, one per process (equal parts
    when the batch size divides by the process count; DDP and FSDP average the parts with equal weights)."""
    import torch.distributed as dist

    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding must be 'ddp' or 'fsdp', got {sharding!r}")
    if task.forward is None:
        raise ValueError(
            f"task '{task.name}' does not run its closure through TaskInstance.forward, so it cannot train on "
            "several processes (DistributedDataParallel or fully_shard must wrap the forward pass)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard

        task.forward.module = fully_shard(task.model)
    else:
        from torch.nn.parallel import DistributedDataParallel

        task.forward.module = DistributedDataParallel(task.model)
    make = task.train_batches

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.tensor_split(world)[rank]
        if isinstance(value, (tuple, list)):
            return type(value)(part(v) for v in value)
        return value

    task.train_batches = lambda: (part(batch) for batch in make())
    task.info = {**task.info, "processes": world, **({"sharding": "fsdp"} if sharding == "fsdp" else {})}


def part_rows(batch: Any) -> int | None:
    """The rows of this process's part of a minibatch (the first dimension of its first tensor that
    :func:`distribute` splits); None when nothing was split (every process holds the whole batch)."""
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)):
        for value in batch:
            rows = part_rows(value)
            if rows is not None:
                return rows
    return None


def global_loss(
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


def agree_on_evaluation(
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

