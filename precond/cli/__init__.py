"""The ``precond`` command line: ``precond train``, ``compare``, ``tasks``, ``build``, ``list``, ``show``, ``schema``.

It needs the ``cli`` extra (``pip install 'precond[cli]'``: typer, rich, scikit-learn, matplotlib, mlxtend); the
library does not. This module holds only the console script's entry point, :func:`main`, so that it
imports without the extra and says what to install. The commands live in
:mod:`precond.cli.commands` (the typer app), with their options in :mod:`~precond.cli.options`, the
recipes and learning rates they run in :mod:`~precond.cli.recipes` and the comparison's verdict in
:mod:`~precond.cli.report`; their names (``app``, ``EXIT_DIVERGED``, ...) are also reachable here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

# what `pip install 'precond[cli]'` adds (click: typer's, in the typer versions that do not bundle it)
EXTRA_MODULES = ("typer", "rich", "click", "sklearn", "matplotlib", "numpy", "mlxtend")
INSTALL_HINT = "the precond command line needs its extra: pip install 'precond[cli]'"
EXIT_MISSING_EXTRA = 1

_SUBMODULES = ("options", "output", "recipes", "report", "commands")


def missing_extra(exc: ModuleNotFoundError) -> NoReturn:
    """Say what to install, in one line, and exit 1, when ``exc`` is a module of the ``cli`` extra; else re-raise."""
    if (exc.name or "").partition(".")[0] not in EXTRA_MODULES:
        raise exc
    sys.stderr.write(f"error: {INSTALL_HINT} (no module {exc.name!r})\n")
    raise SystemExit(EXIT_MISSING_EXTRA) from None


def main() -> None:
    """The console script ``precond``."""
    try:
        from precond.cli.commands import run
    except ModuleNotFoundError as exc:
        missing_extra(exc)
    run()


def __getattr__(name: str) -> Any:
    """``precond.cli.app``, ``precond.cli.EXIT_USAGE``, ...: the names of the submodules, imported when asked for."""
    if not name.startswith("__"):
        for submodule in _SUBMODULES:
            module = importlib.import_module(f"{__name__}.{submodule}")
            if name in vars(module):
                return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
