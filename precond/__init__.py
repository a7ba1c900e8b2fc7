"""precond: second-order and adaptive optimizers declared as recipes.

The public face: ``build``, ``compose``, ``load_recipe``, ``estimate``,
``Recipe``, ``RecipeError``. Submodules are imported lazily so that ``import precond``
stays cheap and ``precond.autodiff`` can be used on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build": "precond.api",
    "estimate": "precond.estimate",
    "compose": "precond.api",
    "load_recipe": "precond.recipe",
    "Recipe": "precond.recipe",
    "RecipeError": "precond.errors",
    "PipelineError": "precond.errors",
    "Optimizer": "precond.optimizer",
    "register": "precond.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'precond' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
