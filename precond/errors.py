"""Exceptions with messages a user can act on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError


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


_LINE_COLUMN = re.compile(r":(\d+):(\d+)$")


def file_order(problems: list[Problem]) -> list[Problem]:
    """``problems`` sorted by line and column; those without a line and column keep their order, after."""

    def key(item: tuple[int, Problem]) -> tuple[int, int, int, int]:
        i, p = item
        m = _LINE_COLUMN.search(p.where)
        return (0, int(m.group(1)), int(m.group(2)), i) if m else (1, 0, 0, i)

    return [p for _, p in sorted(enumerate(problems), key=key)]


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


class RecipeCombinationError(RecipeError, PipelineError):
    """A RecipeError among whose problems is a pair of blocks that cannot work together and that
    used to be refused as a PipelineError when the optimizer was built (``step 'lm'`` without
    ``inverse`` on ``full``, ``history`` without BFGS pairs, ...). Those are now found when the
    recipe is validated, with their location; the error is also a PipelineError so that code
    catching that keeps working."""


class RecipeWarning(PrecondError, UserWarning):
    """A valid recipe that probably does not do what was meant with this model.

    ``precond.build`` (and ``precond build``) warn, once per pattern, about a rule's
    ``match`` pattern that takes no parameter of the model given:

    * a ``modules`` entry that matches no module *and* is not the name of any
      ``nn.Module`` class (torch.nn's, the model's, or any other defined in the
      program): it can never match, so it is a typo (``BatchNorm2D``, ``Embeding``);
      the warning suggests the closest class name of the model (else of torch.nn).
      A real class that the model simply does not use (``LayerNorm`` in K-FAC's
      fallback rule, on a model without one) is not warned about: recipes name
      the layer types they handle, for any model;
    * a ``names`` pattern that matches no parameter but is close to one of the
      model's parameter names or their ``*``-generalisations (``*.bais`` for
      ``*.bias``); a pattern with nothing close is taken as written for other models;
    * a pattern that matches parameters which all go to earlier rules (first match
      wins): "shadowed by rule X".

    The message starts with where the pattern is written (``file:line:column``) when
    that is known. Turn them into errors with ``-W error::precond.errors.RecipeWarning``
    or ``warnings.simplefilter("error", RecipeWarning)``.
    """


def field_problem(field: str, message: str) -> PydanticCustomError:
    """For a block's model validator: an error located at one of its fields (``field``), not at
    the whole block; the recipe loader reports it at that key's line and column."""
    return PydanticCustomError("precond_field", message, {"field": field})  # pydantic fills only {field}


def field_of(error: dict[str, Any]) -> str | None:
    """The field a :func:`field_problem` error names (None for other errors)."""
    if error.get("type") != "precond_field":
        return None
    return str((error.get("ctx") or {}).get("field") or "") or None


class CheckpointError(PrecondError, ValueError):
    """A state_dict does not fit this optimizer; nothing was changed."""


class LikelihoodMismatchWarning(UserWarning):
    """The closure's loss is visibly not the negative log-likelihood of the ``likelihood`` given to
    precond (see :mod:`precond.likelihood_check` for the exact criterion); the curvature estimates
    that use the likelihood then do not match the loss being minimised."""
