"""``precond.build`` and ``precond.compose``: from a recipe (or blocks) to an optimizer."""

from __future__ import annotations

import os
import sys
import warnings
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from precond import registry
from precond.block import Block
from precond.errors import RecipeError, RecipeWarning
from precond.interfaces import param_info
from precond.optimizer import DEFAULT_RULE, Optimizer, group_defaults
from precond.recipe import Recipe, location_of, recipe_model, resolve, rule_of, serves_not, validate

ModelLike = nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _params(model: ModelLike, recipe: Recipe) -> tuple[Any, nn.Module | None]:
    rules = recipe.rules
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
    """One param group per rule that takes parameters; the first matching rule wins.

    Warns (:class:`~precond.errors.RecipeWarning`) about match patterns that look like typos for
    this model or that earlier rules shadow."""
    groups: dict[str, list[torch.Tensor]] = {DEFAULT_RULE: []}
    for rule in recipe.rules:
        groups[rule.name] = []
    infos = param_info(model)
    for p, info in infos.items():
        groups[rule_of(recipe, info.name, info.module, info.role, p)].append(p)
    for message in rule_warnings(model, recipe, infos):
        warnings.warn(message, RecipeWarning, stacklevel=_outside_precond())
    if infos and not groups[DEFAULT_RULE] and recipe.structure is not None:
        taken = sorted({r for r, ps in groups.items() if ps})
        warnings.warn(
            f"recipe '{recipe.name}': its own {recipe.structure.name} structure serves none of the model's parameters; "
            f"they all follow rule(s) {', '.join(taken)}", RecipeWarning, stacklevel=_outside_precond(),
        )
    out = []
    for rule in [None, *recipe.rules]:
        name = DEFAULT_RULE if rule is None else rule.name
        if groups[name]:
            sub = recipe if rule is None else rule.recipe
            out.append({"params": groups[name], "rule": name, "lr": sub.lr, "weight_decay": sub.weight_decay, **group_defaults(sub)})
    return out


def rule_warnings(model: nn.Module, recipe: Recipe, infos: Mapping[torch.Tensor, Any] | None = None) -> list[str]:
    """What :class:`~precond.errors.RecipeWarning` says about ``recipe``'s rules on ``model`` (its
    docstring has the rule): one message per pattern that looks like a typo, or that earlier rules shadow."""
    rules = recipe.rules
    if not rules:
        return []
    infos = param_info(model) if infos is None else infos
    params = list(infos.values())
    owner: dict[int, str] = {}  # parameter index -> the rule that takes it
    for j, (p, info) in enumerate(infos.items()):
        for rule in rules:
            if rule.match.matches(info.name, info.module, p) or (rule.match.unserved and serves_not(recipe, info.module, info.role)):
                owner[j] = rule.name
                break
    model_classes = sorted({type(m).__name__ for m in model.modules()})
    owning = sorted({type(info.module).__name__ for info in params})
    known_classes: set[str] = set()  # filled on first need
    out = []
    for i, rule in enumerate(rules):
        earlier = {r.name for r in rules[:i]}
        patterns = [("modules", k, pat) for k, pat in enumerate(rule.match.modules)]
        patterns += [("names", k, pat) for k, pat in enumerate(rule.match.names)]
        for field, k, pattern in patterns:
            if field == "modules":
                hits = [j for j, info in enumerate(params) if type(info.module).__name__ == pattern]
            else:
                hits = [j for j, info in enumerate(params) if fnmatchcase(info.name, pattern)]
            where = location_of(recipe, ("rules", i, "match", field, k)) or f"recipe '{recipe.name}'"
            head = f"{where}: rules.{i}.match.{field}: rule '{rule.name}'"
            if not hits:
                if field == "modules":
                    known_classes = known_classes or _module_class_names()
                    if pattern in known_classes:
                        continue  # a real layer type this model does not use: not a typo
                    hint = registry.suggest(pattern, model_classes) or registry.suggest(pattern, _torch_nn_names())
                    out.append(f"{head}: module type {pattern!r} matches no module of the model{hint}, and no "
                               "nn.Module class has that name; the rule takes nothing through it "
                               f"(the model's modules that own parameters: {', '.join(owning) or 'none'})")
                else:
                    hint = registry.suggest(pattern, _name_patterns([info.name for info in params]), cutoff=NAME_CUTOFF)
                    if hint:  # a pattern with nothing close is taken as written for other models
                        out.append(f"{head}: name pattern {pattern!r} matches no parameter of the model{hint}; "
                                   "the rule takes nothing through it")
            elif all(owner.get(j) in earlier for j in hits):
                by = sorted({owner[j] for j in hits}, key=[r.name for r in rules].index)
                what = f"module type {pattern!r}" if field == "modules" else f"name pattern {pattern!r}"
                out.append(f"{head}: {what} matches only parameters that earlier rules take first (shadowed by "
                           f"rule {' and '.join(repr(b) for b in by)}; the first matching rule wins); "
                           "move the rule up or drop the pattern")
    return out


NAME_CUTOFF = 0.75  # a name pattern this similar (difflib) to a parameter name or its generalisation is a typo


def _module_class_names() -> set[str]:
    """Names of every nn.Module class defined in the program (torch.nn's, the model's, any other)."""
    seen: set[type] = set()
    stack: list[type] = [nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    return {c.__name__ for c in seen} | {"Module"}


def _torch_nn_names() -> list[str]:
    return sorted(n for n, c in vars(nn).items()
                  if isinstance(c, type) and issubclass(c, nn.Module) and not issubclass(c, nn.modules.loss._Loss))


def _name_patterns(names: list[str]) -> list[str]:
    """The parameter names and their ``*``-generalisations (``0.bias`` -> ``*.bias``, ``0.*``), for suggestions."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            out.add(".".join(parts[:i] + ["*"] + parts[i + 1:]))
        if len(parts) > 1:
            out.add("*." + parts[-1])
    return sorted(out)


def _outside_precond() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside the precond package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
        level += 1
    return level


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def build(
    recipe: str | Recipe | Mapping[str, Any],
    model: ModelLike,
    *,
    likelihood: str | None = None,
    seed: int = 0,
    set: Mapping[str, Any] | None = None,  # noqa: A002
    distributed: str | None = None,
    grad_scaler: Any = None,
    **hyper: Any,
) -> Optimizer:
    """Assemble an optimizer from a recipe.

    ``recipe``: a built-in name (``"adam"``), a path to a YAML file, a dict or
    a :class:`Recipe`. ``model``: an ``nn.Module`` (needed by blocks that use
    layer hooks or a functional call), or parameters / param groups as for
    torch.optim. Keyword overrides set top-level hyperparameters (``lr=0.01``; ``lr`` scales the rules'
    learning rates by the same factor, so kfac's Adam fallback keeps its tenth of K-FAC's);
    ``set={"structure.beta": 0.99}`` sets block fields by dotted path.
    ``likelihood`` (``"categorical"`` or ``"gaussian"``) tells curvature blocks
    what distribution the model predicts. ``seed`` seeds the optimizer's own
    random generator (probes, sampled labels); give every process the same seed.
    ``distributed`` (``"replicated"`` or ``"sharded"``) overrides the recipe's
    ``distributed.mode`` (see docs/distributed.md). ``grad_scaler``: the ``torch.amp.GradScaler`` of a loop
    that calls ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (to clip), so that statistics the hooks took
    from the scaled backward pass are unscaled too (docs/loops.md).
    """
    if distributed is not None:
        set = {**(set or {}), "distributed.mode": distributed}  # noqa: A001
    if "lr" in hyper:
        set = {**_rule_lrs(recipe, float(hyper["lr"]), set or {}), **(set or {})}  # noqa: A001
    resolved = resolve(recipe, hyper=hyper, set=set)
    params, module = _params(model, resolved)
    return Optimizer(params, resolved, model=module, likelihood=likelihood, seed=seed, grad_scaler=grad_scaler)


def _rule_lrs(recipe: Any, lr: float, set: Mapping[str, Any]) -> dict[str, float]:  # noqa: A002
    """``lr=`` given to :func:`build` scales every rule's learning rate by the factor it scales the recipe's
    (kfac: 1e-2 with its Adam fallback at 1e-3; ``lr=2e-2`` gives the fallback 2e-3), so that one number tunes
    the whole optimizer as one torch.optim learning rate would. A rule's lr given by ``set=`` wins."""
    base = resolve(recipe, set={k: v for k, v in set.items() if not k.endswith(".lr") and k != "lr"})
    if not base.rules or base.lr == 0:
        return {}
    return {f"rules.{rule.name}.recipe.lr": rule.recipe.lr * (lr / base.lr) for rule in base.rules}


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
