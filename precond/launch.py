"""Several processes for ``precond train --nproc N``: a torchrun-compatible launcher and the process group.

``launch(N, argv)`` starts ``python -m precond.cli <argv>`` N times with the
environment torchrun gives its workers (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so
``torchrun --nproc-per-node N -m precond.cli train ...`` runs the same code.
Each worker joins the gloo process group from that environment
(:func:`process_group`). If a worker fails, the others are stopped (they
would wait in a collective forever) and its exit status is returned.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch.distributed as dist


GRACE_S = 30.0  # after one process fails, how long the others may take to finish before they are stopped


def launched() -> bool:
    """Whether this process is one of several (started by :func:`launch` or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m precond.cli *argv`` in ``nproc`` processes; rank 0's exit status (or a failure's)."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "RANK": str(rank), "LOCAL_RANK": str(rank),
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "precond.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c is not None for c in codes):
                break
            time.sleep(0.05)
        # a process that stopped with a status of its own (a diverged run: 3) may be ahead of process 0,
        # which is still writing the results: give the others a moment to finish before stopping them
        deadline = time.monotonic() + GRACE_S
        while failed and any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    codes = [p.wait() for p in procs]
    return failed[0] if failed else codes[0]


@contextmanager
def process_group() -> Iterator[int | None]:
    """Join the gloo process group described by the environment; yields the rank (None: one process)."""
    if not launched():
        yield None
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method="env://")
    try:
        yield dist.get_rank()
    except BaseException as exc:
        # an exit with a status (SystemExit, typer's Exit): every process ends on the same decision, so wait
        # until all are here and none leaves while another still exchanges; a crash does not wait
        if created and (isinstance(exc, SystemExit) or hasattr(exc, "exit_code")):
            dist.barrier()
        raise
    else:
        if created:
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
