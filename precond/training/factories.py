"""Optimizer factories: ``make_optimizer(model, likelihood, [lr=], [task=], [seed=])``, called with the
keywords they accept (see :mod:`precond.training`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from precond.tasks import TaskInstance, build_task

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _accepts_kw(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_factory(factory: OptimizerFactory, task: TaskInstance, lr: float | None) -> torch.optim.Optimizer:
    """The factory's optimizer for the task's model: with ``lr`` when given, ``task`` and ``seed`` when it
    takes them."""
    kwargs: dict[str, Any] = {}
    if lr is not None:
        kwargs["lr"] = lr
    if _accepts_kw(factory, "task"):
        kwargs["task"] = task
    if _accepts_kw(factory, "seed"):
        kwargs["seed"] = task.seed
    return factory(task.model, task.likelihood, **kwargs)


def first_lr(opt: Any) -> float | None:
    """``param_groups[0]["lr"]`` as a float (None when the optimizer has none)."""
    try:
        lr = opt.param_groups[0]["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def factory_label(factory: Any) -> str:
    """A run's label when none is given: the factory's ``label`` attribute, else its name."""
    name = getattr(factory, "label", None) or getattr(factory, "__name__", None) or type(factory).__name__
    return str(name)


def base_lr(factory: OptimizerFactory, task_name: str, seed: int, short: bool, dtype: torch.dtype) -> float:
    """The lr an lr grid multiplies: the factory's ``lr`` attribute, else the lr of an optimizer it builds on a
    throwaway copy of the task."""
    lr = getattr(factory, "lr", None)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    probe = build_task(task_name, seed=seed, dtype=dtype, short=short)
    with torch.random.fork_rng(devices=[]):
        opt = call_factory(factory, probe, None)
    lr = first_lr(opt)
    if lr is None:
        raise ValueError("lr_grid needs factories whose optimizer has param_groups[0]['lr'] (or an `lr` attribute)")
    return lr
