"""``python -m precond.cli``: the console script (what torchrun and ``--nproc`` start on every process)."""

from precond.cli import main

main()
