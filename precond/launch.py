"""Several processes for ``precond train --nproc N``: torchrun starts them, :func:`process_group` joins them.

``launch(N, argv)`` is ``torchrun --standalone --nproc-per-node N -m precond.cli <argv>`` run in this
process through torch's own launcher (:mod:`torch.distributed.run`), so ``torchrun --nproc-per-node N
-m precond.cli train ...`` runs the same code. Each worker joins the gloo process group from the
environment torchrun gives it (:func:`process_group`). When a worker fails, torchrun stops the others
(they would wait in a collective forever); :func:`launch` returns the exit status of the first worker
that failed, which is the status of the run: every worker ends on the same decision (2 a refused
recipe, 3 diverged, 4 an error) and leaves only after all have reached the barrier of
:func:`process_group`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch.distributed as dist

EXIT_INTERRUPTED = 130


def launched() -> bool:
    """Whether this process is one of several (started by :func:`launch` or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m precond.cli *argv`` in ``nproc`` processes under torchrun; the exit status of the run."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets this for its workers anyway, with a banner; the runs set their threads themselves (--threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = torchrun.parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "precond.cli"])
    args.training_script_args = list(argv)  # not parsed: torchrun's parser would take --nproc for its own
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        return _exit_status(exc.get_first_failure()[1].exitcode)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SignalException as exc:  # the launcher got SIGINT or SIGTERM; torchrun has stopped the workers
        return 128 + int(exc.sigval)
    return 0


def _exit_status(code: int) -> int:
    """A worker's exit code as a shell reports it: a signal's ``-N`` becomes ``128 + N``."""
    return 128 - code if code < 0 else code


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
