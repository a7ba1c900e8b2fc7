"""Exceptions with messages a user can act on."""

from __future__ import annotations

from dataclasses import dataclass


class PrecondError(Exception):
    """Base class of every error precond raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where, what, and what would work."""

    where: str  # "file.yaml:12:5", "--set structure.beta" or "<dict>"
    path: str  # dotted path inside the recipe ("structure.beta"), "" for the whole recipe
    message: str

    def __str__(self) -> str:
        at = f"{self.where}: " if self.where else ""
        key = f"{self.path}: " if self.path and not self.where.endswith(self.path) else ""
        return f"{at}{key}{self.message}"


class RecipeError(PrecondError, ValueError):
    """A recipe (file, dict, override or block) is not valid.

    ``problems`` lists every issue found, each with its location.
    """

    def __init__(self, problems: list[Problem] | str, source: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(source, "", problems)]
        self.problems = list(problems)
        self.source = source
        lines = [str(p) for p in self.problems]
        head = f"invalid recipe {source}" if source else "invalid recipe"
        if len(lines) == 1:
            text = lines[0] if self.problems[0].where else f"{head}: {lines[0]}"
        else:
            text = head + f" ({len(lines)} problems):\n" + "\n".join("  " + s for s in lines)
        super().__init__(text)


class PipelineError(PrecondError, RuntimeError):
    """The optimizer was called in a way its blocks cannot work with."""


class CheckpointError(PrecondError, ValueError):
    """A state_dict does not fit this optimizer; nothing was changed."""
