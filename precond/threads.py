"""torch's CPU thread count for a block of code (``precond train``, ``compare`` and ``build`` time steps with it),
and how many of the machine's CPUs are free for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def idle_cpus() -> int:
    """The usable CPUs less the machine's load (the one-minute load average, rounded; on a process limited to
    some of the machine's CPUs, their share of it), at least 1.

    torch's intra-op threads busy-wait for each other: on a machine whose cores other work keeps busy, more
    threads than idle cores is slower than one thread, often several times (an MNIST-autoencoder Adam step:
    0.33 s on one thread, 2.9 s on two, on a 2-core machine at load 5; 0.13 s and 0.08 s when it was idle)."""
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return cpus
    total = os.cpu_count() or cpus
    if total > cpus:  # limited to some of the machine's CPUs (a container): their share of the machine's load
        load *= cpus / total
    return max(1, min(cpus, cpus - round(load)))


def fastest_threads(task_threads: int | None) -> int:
    """The thread count to run a task's steps with: the task's most useful count (``TaskInstance.threads``,
    beyond which its matrices are too small to gain) capped at the CPUs idle now."""
    return max(1, min(int(task_threads or 1), idle_cpus()))


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave it), then restore; yields the count used."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        if n:
            torch.set_num_threads(old)
