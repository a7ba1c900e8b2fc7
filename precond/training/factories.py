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
    opt = factory(task.model, task.likelihood, **kwargs)
    if _plain_torch(opt):  # a bare torch.optim optimizer: its step(closure) would not run the backward pass
        opt = PlainLoop(opt)
    return opt


def _plain_torch(opt: Any) -> bool:
    """A ``torch.optim`` optimizer itself (not precond's, not a wrapper): it needs the plain loop."""
    from precond.optimizer import Optimizer as PrecondOptimizer

    return (
        isinstance(opt, torch.optim.Optimizer)
        and not isinstance(opt, PrecondOptimizer)
        and type(opt).__module__.startswith("torch.optim")
    )


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


# ---------------------------------------------------------------------------
# plain torch optimizers as contenders (the plain-loop convention)


class PlainLoop:
    """A ``torch.optim.Optimizer`` stepped by the plain-loop convention behind the precond ``step(closure)``
    contract the runner uses: ``zero_grad(); loss = closure()[0]; loss.backward(); optimizer.step()``. An
    optimizer whose ``step`` requires a closure (``torch.optim.LBFGS``) gets one that does the same
    (zero_grad, forward, backward) each time it is called. Its ``param_groups`` and ``defaults`` are the
    inner optimizer's; ``inner`` is the optimizer itself."""

    def __init__(self, inner: Any, note: str = "") -> None:
        self.inner = inner
        self.note = note  # how the parameters were split (see torch_optimizer), "" when they were not
        self.param_groups = inner.param_groups
        self.defaults = getattr(inner, "defaults", {})
        self._needs_closure = _step_requires_closure(inner)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any]) -> Any:
        def backward_closure():
            self.inner.zero_grad()
            out = closure()
            loss = out[0] if isinstance(out, (tuple, list)) else out
            loss.backward()
            return loss

        if self._needs_closure:
            return self.inner.step(backward_closure)
        loss = backward_closure()
        self.inner.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    @property
    def name(self) -> str:
        return getattr(self.inner, "name", type(self.inner).__name__)


def _step_requires_closure(opt: Any) -> bool:
    try:
        param = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


class Split:
    """Two plain torch optimizers over disjoint parameters, stepped together (e.g. ``torch.optim.Muon`` on
    the 2-D weight matrices and ``torch.optim.AdamW`` on the rest); ``param_groups`` lists the first's
    groups, then the second's (the same dicts, so an lr grid scales both)."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer | None) -> None:
        self.parts = [o for o in (first, second) if o is not None]
        self.param_groups = [g for o in self.parts for g in o.param_groups]
        self.defaults = dict(first.defaults)
        self.name = " + ".join(type(o).__name__ for o in self.parts)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.parts, state["parts"]):
            o.load_state_dict(s)


def resolve_optimizer_class(path: str | type) -> type:
    """``torch.optim.AdamW`` (or any ``package.module.Class`` import path) -> the class; ``ValueError`` when it
    cannot be imported or is not a ``torch.optim.Optimizer`` subclass."""
    if isinstance(path, type):
        cls = path
    else:
        import importlib

        module_name, _, attr = str(path).rpartition(".")
        if not module_name:
            raise ValueError(f"{path!r} is not an import path such as torch.optim.AdamW")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import the optimizer class {path!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return cls


def is_optimizer_path(spec: str) -> bool:
    """Whether a contender spec names an optimizer class by import path (``torch.optim.AdamW``,
    ``mypkg.opt.Lion``) rather than a recipe (a name or a ``.yaml`` file)."""
    text = str(spec)
    return "." in text and not text.endswith((".yaml", ".yml")) and "/" not in text and "\\" not in text


def torch_optimizer(
    cls: str | type, *, rest: str | type | None = "torch.optim.AdamW", rest_kwargs: dict[str, Any] | None = None,
    label: str | None = None, **kwargs: Any,
) -> OptimizerFactory:
    """A contender from a ``torch.optim.Optimizer`` class (or its import path) and its keyword arguments::

        compare({"kfac": ..., "adamw": torch_optimizer("torch.optim.AdamW", lr=1e-3, weight_decay=0.1)}, ...)

    stepped by the plain-loop convention (:class:`PlainLoop`). An optimizer that takes only 2-D parameters
    (``torch.optim.Muon``: its constructor raises ``ValueError`` on a bias) gets the model's 2-D parameters,
    and ``rest`` (default ``torch.optim.AdamW``, with ``rest_kwargs``, else the same ``lr``) the others
    (biases, norms' gains, ...); ``rest=None`` makes that an error naming the parameters. The factory's
    ``lr`` attribute is the ``lr`` given (else the class's default), what ``lr_grid`` multiplies."""
    klass = resolve_optimizer_class(cls)
    default_lr = inspect.signature(klass.__init__).parameters.get("lr")
    lr0 = kwargs.get("lr", default_lr.default if default_lr is not None else None)

    def make(model: torch.nn.Module, likelihood: Any, lr: float | None = None) -> PlainLoop:
        kw = dict(kwargs)
        if lr is not None:
            kw["lr"] = lr
        params = list(model.named_parameters())
        try:
            return PlainLoop(klass(model.parameters(), **kw))
        except ValueError as exc:
            matrices = [p for _, p in params if p.ndim == 2]
            others = [(n, p) for n, p in params if p.ndim != 2]
            if not others or not matrices or "2d" not in str(exc).lower().replace("-", ""):
                raise
            if rest is None:
                raise ValueError(
                    f"{klass.__module__}.{klass.__name__} takes only 2-D parameters; this model also has "
                    f"{', '.join(n for n, _ in others)}; give them another optimizer (rest=torch.optim.AdamW)"
                ) from None
        rest_cls = resolve_optimizer_class(rest)
        rkw = dict(rest_kwargs) if rest_kwargs is not None else {}
        if "lr" not in rkw and "lr" in kw:
            rkw["lr"] = kw["lr"]
        inner = Split(klass(matrices, **kw), rest_cls([p for _, p in others], **rkw))
        note = (f"{klass.__name__} takes only 2-D parameters: the {len(matrices)} matrices go to it, the "
                f"{len(others)} others ({_names(others)}) to {rest_cls.__name__}({_kwargs_text(rkw)})")
        return PlainLoop(inner, note)

    # a plain function: the attributes are ours to add (the runner reads lr and label)
    attrs = {"lr": lr0, "label": label or klass.__name__.lower(), "optimizer_class": f"{klass.__module__}.{klass.__name__}",
             "optimizer_kwargs": dict(kwargs)}
    for name, value in attrs.items():
        setattr(make, name, value)
    return make


def _names(named: list[tuple[str, Any]], limit: int = 4) -> str:
    names = [n for n, _ in named]
    return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _kwargs_text(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def _positional(fn: Callable) -> int:
    """How many positional parameters ``fn`` has (defaults included; 2 when it cannot be told): 1 for
    ``lambda params: ...``, at least 2 for ``make(model, likelihood, ...)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds)


def as_factory(contender: Any) -> OptimizerFactory:
    """What ``train`` and ``compare`` accept as a contender, as an optimizer factory for the runner:

    * ``make_optimizer(model, likelihood, [lr=], [task=], [seed=])`` (the precond contract: ``step(closure)``
      runs the backward pass) as it is;
    * a ``torch.optim.Optimizer`` subclass, or a callable with one positional parameter, ``lambda params:
      torch.optim.AdamW(params, lr=1e-3)``: a plain torch optimizer on ``model.parameters()``, stepped by the plain-loop
      convention (:class:`PlainLoop`); under an lr grid its groups' learning rates are scaled.
    """
    if isinstance(contender, type) and issubclass(contender, torch.optim.Optimizer):
        return torch_optimizer(contender)
    if callable(contender) and not isinstance(contender, type) and _positional(contender) == 1:
        fn = contender

        def make(model: torch.nn.Module, likelihood: Any, lr: float | None = None) -> PlainLoop:
            opt = fn(model.parameters())
            if lr is not None:
                ratio = lr / (first_lr(opt) or lr)
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * ratio
            return opt if isinstance(opt, PlainLoop) else PlainLoop(opt)

        name = getattr(fn, "__name__", "<lambda>")
        setattr(make, "label", getattr(fn, "label", None) or (name if name != "<lambda>" else "torch"))
        return make
    return contender
