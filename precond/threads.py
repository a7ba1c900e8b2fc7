"""torch's CPU thread count for a block of code (``precond train``, ``compare`` and ``build`` time steps with it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
