"""Entry-point plugins, one loader for every group precond reads (``precond.blocks``, ``precond.tasks``).

A plugin that fails to import is reported -- a warning and an entry in the
returned errors -- never fatal: a broken package must not break precond.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of ``group``, each once (a package on ``sys.path`` twice lists them twice)."""
    try:
        found = importlib.metadata.entry_points(group=group)
    except Exception as exc:  # noqa: BLE001  (broken metadata on sys.path)
        warnings.warn(f"precond: could not read entry points {group!r}: {exc}", stacklevel=3)
        return []
    seen: set[tuple[str, str]] = set()
    out = []
    for ep in found:
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


def load(
    ep: importlib.metadata.EntryPoint, what: str, errors: dict[str, str], undo: Callable[[], None] | None = None
) -> Any:
    """``ep.load()``; on failure: ``undo()`` (forget what it registered before failing), a warning naming the
    plugin, the error in ``errors[ep.name]``, and ``None``."""
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001  (a broken plugin must not break precond)
        if undo is not None:
            undo()
        errors[ep.name] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"precond: could not load {what} plugin {ep.name!r} ({ep.value}): {errors[ep.name]}", stacklevel=3)
        return None
