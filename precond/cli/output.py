"""Where the command line writes: ``console`` (stdout), ``err`` (stderr: errors, warnings, progress) and the
one-line error with exit status 2 that every invalid recipe, task or option gets (:func:`fail`)."""

from __future__ import annotations

import warnings
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from precond.errors import LikelihoodMismatchWarning, RecipeWarning

EXIT_USAGE = 2  # invalid recipe, task or option (a located message, no traceback)

console = Console()
err = Console(stderr=True)
_default_showwarning = warnings.showwarning


def fail(exc: Exception | str) -> NoReturn:
    """``error: <message>`` on stderr, unwrapped, and exit status 2."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def console_out() -> Console:
    """stdout; wide when it is not a terminal (logs, pipes, tests) so tables do not wrap numbers."""
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, width=max(c.width, 160))


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """precond's own warnings (a rule that matches nothing, a likelihood that disagrees with the loss) as one
    located line, like its errors; any other warning as Python shows it."""
    if issubclass(category, (RecipeWarning, LikelihoodMismatchWarning)):
        err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)
