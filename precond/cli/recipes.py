"""The recipes ``precond train`` and ``precond compare`` run: loaded with the overrides, each with the
learning rate it gets on the task and why (:func:`_lr_for`), as an optimizer factory for
:mod:`precond.training` (:class:`RecipeFactory`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from precond.errors import PrecondError
from precond.recipe import builtin_recipes, load_recipe

# compared when `precond compare` gets no recipe: whichever of these are built-in recipes right now (a recipe
# added to recipes/ under one of these names joins the default comparison; add a name here to extend it)
DEFAULT_SET = ("adam", "kfac", "shampoo_grafted", "soap", "sophia_g", "muon")


class RecipeFactory:
    """``make_optimizer(model, likelihood, seed, lr)`` for :mod:`precond.training`:
    ``precond.build(recipe, model, likelihood=..., seed=..., lr=...)``. ``lr``
    (the attribute) is the resolved learning rate; the runner's ``lr`` keyword
    (``--lr-grid``) overrides it."""

    def __init__(self, recipe, lr: float, label: str, lr_reason: str):
        self.recipe = recipe
        self.lr = float(lr)
        self.label = label
        self.lr_reason = lr_reason

    def __call__(self, model, likelihood, seed: int = 0, lr: Optional[float] = None):
        import precond

        return precond.build(self.recipe, model, likelihood=likelihood, seed=seed, lr=self.lr if lr is None else lr)


class TorchFactory:
    """A ``torch.optim.Optimizer`` class as a ``precond compare`` contender (``torch.optim.AdamW``), with its
    keyword arguments (``--set torch.optim.AdamW:weight_decay=0.1``), stepped by the plain-loop convention
    (:func:`precond.training.factories.torch_optimizer`); ``recipe`` is None."""

    recipe = None

    def __init__(self, spec: str, kwargs: dict, lr: float, label: str, lr_reason: str):
        from precond.training.factories import torch_optimizer

        self.spec = spec
        self.kwargs = dict(kwargs)
        self.lr = float(lr)
        self.label = label
        self.lr_reason = lr_reason
        self._make = torch_optimizer(spec, **{**self.kwargs, "lr": self.lr})

    def __call__(self, model, likelihood, seed: int = 0, lr: Optional[float] = None):
        return self._make(model, likelihood, lr=lr)

    def describe(self) -> dict:
        return {"class": self._make.optimizer_class, "kwargs": {**self.kwargs, "lr": self.lr}}


def _load_torch(spec: str, overrides: dict, task) -> TorchFactory:
    """An optimizer class by import path with ``--set SPEC:key=value`` keyword arguments; its lr: ``lr=`` among
    them, else the task's hint for the class name (lower case), else the class's own default."""
    import inspect

    from precond.training.factories import resolve_optimizer_class

    cls = resolve_optimizer_class(spec)
    kwargs = dict(overrides)
    bad = [k for k in kwargs if "." in k]
    if bad:
        raise ValueError(f"--set {spec}:{bad[0]}=...: a torch optimizer takes keyword arguments, not dotted recipe fields")
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"--set {spec}:{unknown[0]}=...: {cls.__name__} takes no keyword {unknown[0]!r} "
            f"(it takes {', '.join(k for k in accepted if k not in ('self', 'params'))})"
        )
    key = cls.__name__.lower()
    if "lr" in kwargs:
        lr, why = float(kwargs.pop("lr")), f"from --set {spec}:lr="
    elif key in task.default_lr:
        lr, why = float(task.default_lr[key]), f"task {task.name}'s hint for '{key}'"
    else:
        default = accepted.get("lr")
        if default is None or not isinstance(default.default, (int, float)):
            raise ValueError(f"{spec} has no default lr: give one with --set {spec}:lr=...")
        lr, why = float(default.default), f"{cls.__name__}'s own default; task {task.name} has no hint for '{key}'"
    return TorchFactory(spec, kwargs, lr, spec, why)


def split_scoped_set(items: list[str], specs: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` items of ``precond compare``: ``key=value`` (every recipe) and ``SPEC:key=value`` (only the
    contender given as SPEC, e.g. ``torch.optim.AdamW:weight_decay=0.1`` or ``kfac:curvature.every=5``) ->
    ``(unscoped items, {spec: its items})``; a scope naming no contender is a ``ValueError``."""
    common: list[str] = []
    scoped: dict[str, list[str]] = {}
    lower = {s.lower(): s for s in specs}
    for item in items:
        key = item.partition("=")[0]
        scope, colon, rest = key.rpartition(":")
        if not colon:
            common.append(item)
            continue
        spec = lower.get(scope.strip().lower())
        if spec is None:
            raise ValueError(f"--set {item}: {scope!r} is none of the contenders ({', '.join(specs)})")
        scoped.setdefault(spec, []).append(item[len(scope) + 1 :])
    return common, scoped


def _task(name: str, seed: int, short: bool, dtype):
    """Build the task once (to check its name and read its learning-rate hints)."""
    from precond.tasks import build_task

    return build_task(name, seed=seed, dtype=dtype, short=short)


def _newton_type(recipe) -> bool:
    """A Newton / natural-gradient / quasi-Newton step: ``inverse`` in the transform chain and no ``clip``.

    Its direction ``C⁻¹g`` carries the loss's own scale, so its lr is a dimensionless step fraction
    (1 = the full step) that transfers from task to task, unlike the step size of a first-order or
    diagonal adaptive method, which is what a task's ``default`` hint is for."""
    names = [t.name for t in getattr(recipe, "transform", [])]
    return "inverse" in names and "clip" not in names


def _lr_for(recipe, task, cli_lr: Optional[float], set_lr: bool) -> tuple[float, str]:
    """The learning rate a run uses and why: ``--lr``, then ``--set lr=``, then the task's hint for
    the recipe's name; without one, the task's ``default`` hint, except for Newton-type recipes
    (see :func:`_newton_type`), which keep their own lr."""
    if cli_lr is not None:
        return float(cli_lr), "from --lr"
    if set_lr:
        return float(recipe.lr), "from --set lr="
    key = recipe.name.lower()
    if key in task.default_lr:
        return float(task.default_lr[key]), f"task {task.name}'s hint for '{recipe.name}'; the recipe says {recipe.lr:g}"
    if _newton_type(recipe):
        return float(recipe.lr), (
            f"the recipe's own lr: task {task.name} has no hint for '{recipe.name}', and a Newton-type step "
            "(transform inverse, no clip) is scale-free"
        )
    hint = task.lr_hint(recipe.name)
    if hint is not None:
        return float(hint), (
            f"task {task.name}'s default hint, it has none for '{recipe.name}'; the recipe says {recipe.lr:g}"
        )
    return float(recipe.lr), f"the recipe's own lr; task {task.name} has no hint"


def _load(spec: str, overrides: dict, task, cli_lr: Optional[float]) -> RecipeFactory:
    """The recipe ``spec`` with the ``--set`` overrides and its learning rate on ``task`` (:func:`_lr_for`)."""
    from precond.recipe import resolve

    dotted = {k: v for k, v in overrides.items() if "." in k}
    hyper = {k: v for k, v in overrides.items() if "." not in k}
    recipe = load_recipe(spec, set={**dotted, **hyper})
    lr, why = _lr_for(recipe, task, cli_lr, "lr" in hyper)
    recipe = resolve(recipe, hyper={"lr": lr})  # validates the lr too
    return RecipeFactory(recipe, lr, recipe.name, why)


def _unbuildable(factories: dict, instance) -> dict[str, str]:
    """Recipes whose optimizer cannot be built on the task's model (e.g. K-FAC's layer factors on a
    model without Linear layers): label -> the reason. Probed on the throwaway task instance."""
    import torch

    out = {}
    for label, factory in factories.items():
        with torch.random.fork_rng(devices=[]):
            try:
                factory(instance.model, instance.likelihood, seed=instance.seed)
            except PrecondError as exc:
                out[label] = str(exc)
            except (ValueError, TypeError) as exc:
                if not isinstance(factory, TorchFactory):
                    raise
                raise ValueError(f"{label}: {exc}") from None
    return out


def _write_recipe(path, recipe) -> None:
    Path(path).write_text(f"# the recipe as run (after --set and the learning rate)\n{recipe.to_yaml()}", encoding="utf-8")


def default_set() -> list[str]:
    """The recipes `precond compare` runs without arguments: those of DEFAULT_SET that are built in now."""
    available = builtin_recipes()
    return [name for name in DEFAULT_SET if name in available]


def _unique_label(label: str, taken: set[str], spec: str) -> str:
    if label not in taken:
        return label
    base = f"{label}[{Path(spec).stem}]"
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}#{i}", i + 1
    return candidate

