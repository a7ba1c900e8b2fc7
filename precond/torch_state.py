"""Moving a running job from torch.optim to precond: ``state_dict`` conversion for the recipes that equal a torch optimizer.

``Optimizer.load_state_dict`` calls :func:`from_torch` for a state_dict without precond's own
``"precond"`` section. It converts the state of

=====================  ===============================  ====================================================
torch.optim            precond recipe                   the torch hyperparameter -> the recipe field
=====================  ===============================  ====================================================
``Adam``               ``adam`` (``decay: l2``)          ``betas`` -> ``momentum.beta``, ``structure.beta``;
``AdamW`` (or ``Adam``  ``adamw`` (``decay: decoupled``)  ``eps`` -> ``transform.0.damping``;
with ``decoupled_                                        ``amsgrad`` -> ``structure.amsgrad``
weight_decay``)
``SGD``                ``sgd``                           ``momentum`` -> ``momentum.beta``, ``dampening`` ->
                                                         ``momentum.dampening``, ``nesterov`` -> ``momentum.nesterov``
``Adagrad``            ``adagrad``                       ``eps`` -> ``transform.0.damping``,
                                                         ``initial_accumulator_value`` -> ``structure.init``,
                                                         ``lr_decay`` -> ``step.lr_decay``
=====================  ===============================  ====================================================

into the recipe whose blocks equal the built-in recipe with those fields (any name; no ``rules``).
``lr`` and ``weight_decay`` are param-group values in both libraries: they, and any other
param-group entry that is not a torch hyperparameter (an LR scheduler's ``initial_lr``), are carried
over per group. The other hyperparameters live in precond's recipe: they must equal it, else the load
is refused with the ``set=`` that would build a matching optimizer; so are ``maximize=True``,
another torch optimizer, a recipe without a torch equivalent, and a precond state_dict that lost its
``"precond"`` section. Every check runs before anything changes.

State: ``exp_avg`` -> ``momentum.avg``, ``exp_avg_sq`` -> ``structure.diag``, ``max_exp_avg_sq`` ->
``structure.max``, ``sum`` -> ``structure.diag``, ``momentum_buffer`` -> ``momentum.buffer``; torch's
per-parameter ``step`` becomes precond's ``step`` and ``structure.updates`` (the bias corrections,
Adagrad's ``lr_decay``), and the largest is the optimizer's ``global_step``. torch.optim.SGD keeps no
step count: its counters start at 0 (SGD uses none). The optimizer's own generator and non-finite
counters are kept as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from precond.errors import CheckpointError, RecipeError

IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}  # how torch computes, not what
TORCH_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad"}
# torch hyperparameters kept in precond's recipe (not carried over per group), per family
RECIPE_HYPER = {
    "adam": {"betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay"},
    "sgd": {"momentum", "dampening", "nesterov", "maximize"},
    "adagrad": {"eps", "initial_accumulator_value", "lr_decay", "maximize"},
}
STATE_KEYS = {
    "adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "sgd": {"momentum_buffer"},
    "adagrad": {"step", "sum"},
}
TORCH_FIELD = {  # recipe field -> the torch hyperparameter it holds
    "momentum.beta": {"adam": "betas[0]", "sgd": "momentum"},
    "structure.beta": {"adam": "betas[1]"},
    "transform.0.damping": {"adam": "eps", "adagrad": "eps"},
    "structure.amsgrad": {"adam": "amsgrad"},
    "momentum.dampening": {"sgd": "dampening"},
    "momentum.nesterov": {"sgd": "nesterov"},
    "structure.init": {"adagrad": "initial_accumulator_value"},
    "step.lr_decay": {"adagrad": "lr_decay"},
}


def family(recipe_kind: str) -> str:
    return "adam" if recipe_kind in ("adam", "adamw") else recipe_kind


def torch_kind(groups: list[dict[str, Any]], state_keys: set[str]) -> str | None:
    """Which convertible torch optimizer wrote these param groups and state keys: adam, sgd, adagrad or None."""
    if not groups:
        return None
    keys = set(groups[0])
    for kind, marks in (("adam", {"betas", "amsgrad", "eps"}), ("sgd", {"momentum", "dampening", "nesterov"}),
                        ("adagrad", {"lr_decay", "initial_accumulator_value", "eps"})):
        if marks <= keys and state_keys <= STATE_KEYS[kind] and all(marks <= set(g) for g in groups):
            others = {k for other, ks in RECIPE_HYPER.items() if other != kind for k in ks} - RECIPE_HYPER[kind] - {"eps"}
            if not keys & (others | {"momentum_decay", "alpha", "rho", "centered"}):
                return kind
    return None


def _templates() -> dict[str, Any]:
    from precond.recipe import load_recipe

    return {name: load_recipe(name) for name in TORCH_NAMES}


def _shape(recipe: Any) -> list[tuple[str, str]]:
    return [(path, block.name) for path, block in recipe.blocks()]


def recipe_kind(recipe: Any) -> str | None:
    """The torch optimizer ``recipe``'s blocks can equal (adam, adamw, sgd, adagrad), or None."""
    shape = _shape(recipe)
    for name, template in _templates().items():
        if _shape(template) == shape:
            return name
    return None


def describe(groups: list[dict[str, Any]], state: dict[Any, Any]) -> str:
    """``a torch.optim state_dict (torch.optim.Adam) with per-parameter keys ... and param-group entries ...``."""
    state_keys = sorted({str(k) for v in state.values() if isinstance(v, dict) for k in v})
    group_keys = sorted({str(k) for g in groups for k in g if k not in ("params", "param_names")})
    kind = torch_kind(groups, set(state_keys))
    if kind == "adam":
        decoupled = groups[0].get("decoupled_weight_decay")
        name = "torch.optim.AdamW" if decoupled else "torch.optim.Adam" if decoupled is False else "torch.optim.Adam or AdamW"
    else:
        name = f"torch.optim.{TORCH_NAMES[kind]}" if kind else ""
    head = f"a torch.optim state_dict ({name})" if name else "a torch.optim state_dict"
    keys = ", ".join(state_keys) if state_keys else "none (no state yet)"
    return f"{head} with per-parameter keys {keys} and param-group entries {', '.join(group_keys) or 'none'}"


def _overrides(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    if kind == "adam":
        b1, b2 = group["betas"]
        return {"momentum.beta": float(b1), "structure.beta": float(b2), "transform.0.damping": float(group["eps"]),
                "structure.amsgrad": bool(group["amsgrad"])}
    if kind == "sgd":
        return {"momentum.beta": float(group["momentum"]), "momentum.dampening": float(group["dampening"]),
                "momentum.nesterov": bool(group["nesterov"])}
    return {"transform.0.damping": float(group["eps"]), "structure.init": float(group["initial_accumulator_value"]),
            "step.lr_decay": float(group["lr_decay"])}


def _field(recipe: Any, path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def hyper_problems(kind: str, mine: str, recipe: Any, group: dict[str, Any], index: int) -> tuple[list[str], dict[str, Any]]:
    """What in param group ``index`` the recipe cannot represent, and the ``set=`` that would match it."""
    where = f"param group {index}"
    problems: list[str] = []
    if group.get("maximize"):
        problems.append(f"{where}: maximize=True (precond minimises the loss: negate it instead)")
    decoupled = group.get("decoupled_weight_decay")
    if kind == "adam" and decoupled is not None and bool(decoupled) != (mine == "adamw") and group.get("weight_decay"):
        torch_form = "decoupled (AdamW)" if decoupled else "L2, added to the gradient (Adam)"
        problems.append(
            f"{where}: weight decay {group['weight_decay']} is {torch_form}; recipe '{recipe.name}' decays "
            f"{'decoupled' if mine == 'adamw' else 'by L2'}: build precond.build('{'adamw' if decoupled else 'adam'}', ...)"
        )
    overrides = _overrides(kind, group)
    from precond.recipe import load_recipe

    try:
        expected = load_recipe(mine, set=overrides)
    except RecipeError as exc:
        return problems + [f"{where}: precond cannot represent these hyperparameters: {exc}"], {}
    fix: dict[str, Any] = {}
    for (path, theirs), (_, ours) in zip(expected.blocks(), recipe.blocks()):
        a, b = theirs.model_dump(), ours.model_dump()
        for name in sorted(set(a) | set(b)):
            if a.get(name) == b.get(name):
                continue
            dotted = f"{path}.{name}"
            torch_name = TORCH_FIELD.get(dotted, {}).get(family(kind))
            if torch_name is not None:
                problems.append(f"{where}: {torch_name}={a.get(name)!r}, recipe '{recipe.name}' has {dotted}={b.get(name)!r}")
                fix[dotted] = a.get(name)
            else:
                problems.append(
                    f"{where}: recipe '{recipe.name}' has {dotted}={b.get(name)!r}, which torch.optim.{TORCH_NAMES[mine]} "
                    f"cannot have (its equivalent is {a.get(name)!r})"
                )
    return problems, fix


def _steps(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def convert_state(kind: str, recipe: Any, entry: dict[str, Any], param: torch.Tensor, where: str) -> dict[str, Any]:
    """One parameter's torch state as precond's."""
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{where}: the checkpoint's {key} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")

    def need(key: str) -> torch.Tensor:
        if not isinstance(entry.get(key), torch.Tensor):
            raise CheckpointError(f"{where}: the torch.optim state lacks '{key}' (it has {', '.join(sorted(entry)) or 'nothing'})")
        return entry[key]

    if kind == "adam":
        n = _steps(entry.get("step", 0))
        out = {"step": n, "structure.diag": need("exp_avg_sq"), "structure.updates": n, "momentum.avg": need("exp_avg")}
        if recipe.structure.amsgrad:
            out["structure.max"] = need("max_exp_avg_sq")
        return out
    if kind == "adagrad":
        n = _steps(entry.get("step", 0))
        return {"step": n, "structure.diag": need("sum"), "structure.updates": n}
    out = {"step": 0}
    if entry.get("momentum_buffer") is not None:
        out["momentum.buffer"] = need("momentum_buffer")
    return out


def from_torch(optimizer: Any, state_dict: dict[str, Any]) -> tuple[dict[Any, Any], list[dict[str, Any]], int]:
    """``(state, param_groups, global_step)`` in precond's form from a torch.optim state_dict; raises
    :class:`CheckpointError` (before anything changes) for what cannot be converted."""
    groups: list[dict[str, Any]] = state_dict["param_groups"]
    state: dict[Any, Any] = state_dict["state"]
    recipe = optimizer.recipe
    state_keys = {str(k) for v in state.values() if isinstance(v, dict) for k in v}
    what = describe(groups, state)
    expected = _expected(optimizer)
    if any("rule" in g for g in groups) or any("." in k for k in state_keys):
        raise CheckpointError(
            f"the checkpoint is a precond state_dict without its 'precond' section (param-group entries "
            f"{', '.join(sorted({str(k) for g in groups for k in g if k != 'params'}))}; per-parameter keys "
            f"{', '.join(sorted(state_keys)) or 'none'}), which says what recipe wrote it: load the whole "
            f"opt.state_dict(). {expected}"
        )
    kind = torch_kind(groups, state_keys)
    mine = recipe_kind(recipe)
    if kind is None:
        raise CheckpointError(
            f"the checkpoint is {what}, which precond cannot convert (it converts the state of torch.optim.Adam, "
            f"AdamW, SGD and Adagrad into the recipes that equal them: adam, adamw, sgd, adagrad). {expected}"
        )
    if mine is None:
        raise CheckpointError(f"the checkpoint is {what}; recipe '{recipe.name}' has no torch.optim equivalent. {expected}")
    if family(mine) != kind:
        raise CheckpointError(
            f"the checkpoint is {what}; recipe '{recipe.name}' equals torch.optim.{TORCH_NAMES[mine]}, not "
            f"{'Adam/AdamW' if kind == 'adam' else TORCH_NAMES[kind]}: build the optimizer with the recipe "
            f"{'adam or adamw' if kind == 'adam' else kind}. {expected}"
        )
    problems: list[str] = []
    fix: dict[str, Any] = {}
    for i, g in enumerate(groups):
        found, wanted = hyper_problems(kind, mine, recipe, g, i)
        problems += found
        for k, v in wanted.items():
            fix.setdefault(k, v)
    if problems:
        hint = f" Build the optimizer to match, e.g. precond.build('{mine}', model, set={fix!r})." if fix else ""
        raise CheckpointError(
            f"the checkpoint is {what}; its hyperparameters differ from this optimizer's in what precond keeps in "
            f"the recipe (not in the param groups, which carry lr and weight_decay over): " + "; ".join(problems) + "." + hint
        )
    params = {saved: p for g, sg in zip(optimizer.param_groups, groups) for saved, p in zip(sg["params"], g["params"])}
    out: dict[Any, Any] = {}
    steps = [0]
    for key, entry in state.items():
        if key not in params:
            raise CheckpointError(f"the checkpoint holds state for parameter id {key!r}, which no param group lists")
        if not isinstance(entry, dict) or not entry:
            continue
        converted = convert_state(kind, recipe, entry, params[key], f"parameter id {key!r}")
        out[key] = converted
        steps.append(converted["step"])
    new_groups = []
    for g, sg in zip(optimizer.param_groups, groups):
        carried = {k: v for k, v in sg.items() if k not in RECIPE_HYPER[kind] | IMPLEMENTATION}
        carried["rule"] = g["rule"]
        new_groups.append(carried)
    return out, new_groups, max(steps)


def _expected(optimizer: Any) -> str:
    """What this optimizer loads, for messages."""
    recipe = optimizer.recipe
    keys = sorted({k for s in optimizer.state.values() for k in s})
    if not keys:
        pipe = next(iter(optimizer.pipelines.values()))
        p = next((p for g in optimizer.param_groups for p in g["params"]), None)
        st: dict[str, Any] = {"step": 0}
        if p is not None:
            pipe.init_state(p, st)
        keys = sorted(st)
    mine = recipe_kind(recipe)
    torch_too = f", or a torch.optim.{TORCH_NAMES[mine]} state_dict with the same hyperparameters" if mine else ""
    return (
        f"This optimizer (recipe '{recipe.name}') expects a precond state_dict of that recipe, with its 'precond' "
        f"section and per-parameter keys such as {', '.join(keys)}{torch_too}; nothing was changed"
    )
