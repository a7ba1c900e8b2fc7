"""``precond.build`` and ``precond.compose``: from a recipe (or blocks) to an optimizer."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from precond.block import Block
from precond.errors import RecipeError
from precond.optimizer import DEFAULT_RULE, Optimizer, param_info
from precond.recipe import Recipe, recipe_model, resolve, validate

ModelLike = nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _params(model: ModelLike, recipe: Recipe) -> tuple[Any, nn.Module | None]:
    rules = recipe.rules  # type: ignore[attr-defined]
    if isinstance(model, nn.Module):
        return (assign_rules(model, recipe) if rules else list(model.parameters())), model
    if rules:
        raise RecipeError(
            f"recipe '{recipe.name}' has rules that route parameters by module type and name: "
            "pass the nn.Module to precond.build, not its parameters"
        )
    params = list(model)
    if not params:
        raise ValueError("the model has no parameters to optimize")
    return params, None


def assign_rules(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """One param group per rule that takes parameters; the first matching rule wins."""
    groups: dict[str, list[torch.Tensor]] = {DEFAULT_RULE: []}
    for rule in recipe.rules:  # type: ignore[attr-defined]
        groups[rule.name] = []
    for p, info in param_info(model).items():
        groups[rule_of(recipe, info.name, info.module)].append(p)
    out = []
    for rule in [None, *recipe.rules]:  # type: ignore[attr-defined]
        name = DEFAULT_RULE if rule is None else rule.name
        if groups[name]:
            sub = recipe if rule is None else rule.recipe
            out.append({"params": groups[name], "rule": name, "lr": sub.lr, "weight_decay": sub.weight_decay})
    return out


def rule_of(recipe: Recipe, name: str, module: nn.Module) -> str:
    for rule in recipe.rules:  # type: ignore[attr-defined]
        if rule.match.matches(name, module):
            return rule.name
    return DEFAULT_RULE


def build(
    recipe: str | Recipe | Mapping[str, Any],
    model: ModelLike,
    *,
    likelihood: str | None = None,
    seed: int = 0,
    set: Mapping[str, Any] | None = None,  # noqa: A002
    distributed: str | None = None,
    **hyper: Any,
) -> Optimizer:
    """Assemble an optimizer from a recipe.

    ``recipe``: a built-in name (``"adam"``), a path to a YAML file, a dict or
    a :class:`Recipe`. ``model``: an ``nn.Module`` (needed by blocks that use
    layer hooks or a functional call), or parameters / param groups as for
    torch.optim. Keyword overrides set top-level hyperparameters (``lr=0.01``);
    ``set={"structure.beta": 0.99}`` sets block fields by dotted path.
    ``likelihood`` (``"categorical"`` or ``"gaussian"``) tells curvature blocks
    what distribution the model predicts. ``seed`` seeds the optimizer's own
    random generator (probes, sampled labels); give every process the same seed.
    ``distributed`` (``"replicated"`` or ``"sharded"``) overrides the recipe's
    ``distributed.mode`` (see docs/distributed.md).
    """
    if distributed is not None:
        set = {**(set or {}), "distributed.mode": distributed}  # noqa: A001
    resolved = resolve(recipe, hyper=hyper, set=set)
    params, module = _params(model, resolved)
    return Optimizer(params, resolved, model=module, likelihood=likelihood, seed=seed)


def compose(
    model: ModelLike,
    *,
    name: str = "composed",
    likelihood: str | None = None,
    seed: int = 0,
    **parts: Any,
) -> Optimizer:
    """Build an optimizer from block objects, without YAML.

    >>> from precond.structure.diagonal import Diagonal
    >>> opt = compose(model, curvature=EmpiricalFisher(), structure=Diagonal(beta=0.999),
    ...               transform=InverseRoot(p=2, damping=1e-8, damping_position="outside"),
    ...               momentum=EMA(beta=0.9), lr=1e-3)

    Keyword arguments are the recipe's fields: blocks for ``curvature``,
    ``structure``, ``transform`` (one or a list), ``momentum``, ``step``,
    ``decay``, and values for ``lr``, ``weight_decay``, ``summary``, ``reference``.
    """
    data: dict[str, Any] = {"name": name}
    for key, value in parts.items():
        if isinstance(value, Block):
            data[key] = value.model_dump()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, Block) for v in value):
            data[key] = [v.model_dump() for v in value]
        else:
            data[key] = value
    recipe = validate(data, source="<compose>")
    return build(recipe, model, likelihood=likelihood, seed=seed)


__all__ = ["build", "compose", "Recipe", "RecipeError", "recipe_model"]
