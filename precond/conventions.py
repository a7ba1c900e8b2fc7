"""Which training loops a recipe runs in, derived from what its blocks need (:class:`precond.interfaces.Needs`).

Three loop conventions (docs/loops.md):

* **closure** -- ``opt.step(closure)`` with a closure that runs the forward pass only and returns ``loss`` or
  ``(loss, outputs)``; precond runs the backward pass(es). Every recipe runs in it.
* **plain loop** -- ``loss.backward(); opt.step()`` (Hugging Face ``Trainer``, most training scripts).
* **torch-style closure** -- ``opt.step(closure)`` with a closure that zeroes the gradients, runs forward and
  backward and returns the loss (``torch.optim.LBFGS``; Lightning's automatic optimization).

In the last two precond takes its statistics from the passes the user runs: layer hooks fire in the user's
forward and backward, curvature drawn from the model's outputs is taken while the user's backward passes them,
and Hessian-vector products differentiate the gradient of ``loss.backward(create_graph=True)``. What they
cannot give -- a closure to call again (line searches, the loss at the trial point), the outputs' graph while
the step runs (matrix-free CG) -- is refused at the first step, naming the convention that works.

``python -m precond.conventions`` prints the table of the built-in recipes that the README carries.
"""

from __future__ import annotations

from dataclasses import dataclass

from precond.interfaces import Needs
from precond.recipe import Recipe, builtin_recipes, resolve

__all__ = ["Support", "recipe_needs", "support", "table"]

YES = "yes"
CREATE_GRAPH = "with `loss.backward(create_graph=True)`"
NO_CLOSURE = "no: re-evaluates the loss (a closure to call again)"
NO_GRAPH = "no: needs the outputs' graph during the step (a forward-only closure)"


def recipe_needs(recipe: Recipe) -> Needs:
    """The union of what a recipe's blocks need on some step: its own, its rules' and its step control's."""
    out = recipe.step.needs()
    for r in (recipe, *(rule.recipe for rule in recipe.rules)):
        for block in (r.curvature, r.structure, *r.transform, r.momentum, r.decay):
            if block is not None:
                out = out | block.needs()
    return out


@dataclass(frozen=True)
class Support:
    """How a recipe runs in each loop convention: ``yes``, a requirement, or ``no: why``."""

    closure: str
    plain: str
    torch_closure: str
    model: bool  # whether precond.build needs the nn.Module (hooks, outputs, a functional call)

    @classmethod
    def of(cls, needs: Needs) -> Support:
        if needs.graph_at_step and needs.outputs:
            plain = torch_closure = NO_GRAPH
        elif needs.closure:
            plain = NO_CLOSURE
            torch_closure = CREATE_GRAPH if needs.create_graph else YES
        else:
            plain = torch_closure = CREATE_GRAPH if needs.create_graph else YES
        return cls(YES, plain, torch_closure, needs.outputs or needs.hooks or needs.model)


def support(recipe: str | Recipe) -> Support:
    """How the recipe (a built-in name or a :class:`Recipe`) runs in the three loop conventions."""
    if isinstance(recipe, str):
        recipe = resolve(recipe)
    return Support.of(recipe_needs(recipe))


def table(names: list[str] | None = None) -> str:
    """A Markdown table of the loop conventions for ``names`` (every built-in recipe by default)."""
    if names is None:
        names = list(builtin_recipes())
    rows = [
        "| recipe | forward-only closure | plain loop | torch-style closure | `precond.build` takes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        s = support(name)
        rows.append(f"| {name} | {s.closure} | {s.plain} | {s.torch_closure} | {'the nn.Module' if s.model else 'the module or its parameters'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
