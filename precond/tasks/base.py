"""Task protocol and registry for ``precond train`` / ``precond compare``.

A *task* is a factory registered by name::

    @register_task("digits-mlp")
    def digits_mlp(*, seed=0, dtype=torch.float32, short=False) -> TaskInstance:
        ...

``build_task(name, seed=..., dtype=..., short=...)`` calls it and returns a
:class:`TaskInstance`: a model, its likelihood, a deterministic stream of
minibatches, a forward-only closure and an evaluation function.

Third-party tasks are found through the entry-point group ``precond.tasks``.
An entry point either names a factory (registered under the entry point's
name) or a module whose import registers tasks with :func:`register_task`.
Plugins are loaded lazily, the first time the registry is queried; a plugin
that fails to load is reported with a warning and skipped.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from precond import plugins

ENTRY_POINT_GROUP = "precond.tasks"

TaskFactory = Callable[..., "TaskInstance"]


class Forward:
    """What a task's closure calls to run its model: the model itself, or, when ``precond train
    --nproc`` trains on several processes, its ``DistributedDataParallel`` wrapper (whose forward
    arms the gradient all-reduce). Evaluations call the model directly."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@dataclass
class TaskInstance:
    """One built task: everything the training runner needs.

    ``train_batches()`` returns a fresh, *endless*, deterministic iterator of
    minibatches (epoch ``e`` is shuffled with a generator seeded from
    ``(seed, e)``); full-batch tasks yield the same full batch forever.
    ``closure(batch)`` runs the forward pass only and returns
    ``(loss, outputs)``; the optimizer runs the backward pass.
    ``evaluate()`` returns at least ``train_loss``, ``test_loss`` and the
    task metric (key ``metric``); it runs without gradients.
    """

    name: str
    model: nn.Module
    likelihood: str | None
    train_batches: Callable[[], Iterator[Any]]
    closure: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[], dict[str, float]]
    metric: str
    higher_is_better: bool
    target: float
    default_steps: int
    eval_every: int = 10
    default_lr: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    full_batch: bool = False
    seed: int = 0
    short: bool = False
    dtype: torch.dtype = torch.float32
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    forward: Forward | None = None  # what closure() runs the model through (needed on several processes)
    threads: int = 1  # the most torch CPU threads its steps gain from (the CLI's --threads default, capped at the idle CPUs)
    compare_budget_s: float | None = None  # `precond compare`'s default per-run training time (with the steps: whichever first)

    def reached(self, value: float) -> bool:
        """Whether a metric value reaches ``target``."""
        if value is None or not math.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target

    def lr_hint(self, recipe: str | None = None) -> float | None:
        """The learning-rate hint for a recipe name or family (``default`` else)."""
        if recipe is not None:
            key = str(recipe).lower()
            if key in self.default_lr:
                return self.default_lr[key]
        return self.default_lr.get("default")

    def config(self) -> dict[str, Any]:
        """A JSON-able description of the task as built."""
        return {
            "task": self.name,
            "seed": self.seed,
            "short": self.short,
            "dtype": str(self.dtype).replace("torch.", ""),
            "likelihood": self.likelihood,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "default_steps": self.default_steps,
            "batch_size": self.batch_size,
            "full_batch": self.full_batch,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "threads_hint": self.threads,
            "compare_budget_s": self.compare_budget_s,
            **{k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool))},
        }


# ---------------------------------------------------------------------------
# registry

_TASKS: dict[str, TaskFactory] = {}
_PLUGIN_NAMES: set[str] = set()  # names currently registered by plugins
_PLUGIN_CACHE: dict[tuple[str, str], dict[str, TaskFactory]] = {}
_plugins_loaded = False
_loading_plugins = False


def _normalize(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_task(name: str, *, overwrite: bool = False) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator registering a task factory under ``name``.

    The factory is called with keyword arguments ``seed``, ``dtype`` and
    ``short`` and returns a :class:`TaskInstance`.
    """
    key = _normalize(name)

    def decorator(factory: TaskFactory) -> TaskFactory:
        existing = _TASKS.get(key)
        if existing is not None and not overwrite and not _same_factory(existing, factory):
            raise ValueError(f"task {key!r} is already registered (by {_qualname(existing)})")
        _TASKS[key] = factory
        if _loading_plugins:
            _PLUGIN_NAMES.add(key)
        factory.task_name = key  # type: ignore[attr-defined]  # a plain function: the attribute is ours to add
        return factory

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _same_factory(a: Any, b: Any) -> bool:
    # re-registration of the same function (e.g. importlib.reload) is fine
    return a is b or _qualname(a) == _qualname(b)


def unregister_task(name: str) -> None:
    """Remove a task from the registry (no error when absent)."""
    key = _normalize(name)
    _TASKS.pop(key, None)
    _PLUGIN_NAMES.discard(key)


def _ensure_builtins() -> None:
    # the built-in task modules register themselves on import
    import precond.tasks  # noqa: F401


def load_plugins(reload: bool = False) -> list[str]:
    """Discover task plugins from the ``precond.tasks`` entry-point group.

    Runs once lazily; ``reload=True`` forgets the tasks plugins registered
    before and scans ``sys.path`` again (entry points that disappeared are
    dropped, new ones are loaded). Returns the names plugins provide.
    """
    global _plugins_loaded, _loading_plugins
    _ensure_builtins()
    if _plugins_loaded and not reload:
        return sorted(_PLUGIN_NAMES)
    for name in list(_PLUGIN_NAMES):
        _TASKS.pop(name, None)
    _PLUGIN_NAMES.clear()
    _plugins_loaded = True
    for ep in plugins.entry_points(ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        cached = _PLUGIN_CACHE.get(key)
        if cached is not None:
            for name, factory in cached.items():
                if name not in _TASKS:
                    _TASKS[name] = factory
                    _PLUGIN_NAMES.add(name)
            continue
        before = set(_TASKS)

        def forget(before: set[str] = before) -> None:  # what the broken plugin registered before failing
            for name in set(_TASKS) - before:
                _TASKS.pop(name, None)
                _PLUGIN_NAMES.discard(name)

        _loading_plugins = True
        try:
            errors: dict[str, str] = {}
            obj = plugins.load(ep, "task", errors, undo=forget)
        finally:
            _loading_plugins = False
        if errors:
            continue
        ep_key = _normalize(ep.name)
        if callable(obj) and not inspect.ismodule(obj):
            if ep_key not in _TASKS:
                _TASKS[ep_key] = obj
            elif ep_key in before and not _same_factory(_TASKS[ep_key], obj):
                warnings.warn(
                    f"precond: task plugin {ep.name!r} ({ep.value}) clashes with an existing task; skipped",
                    stacklevel=2,
                )
        added = {name: _TASKS[name] for name in set(_TASKS) - before}
        _PLUGIN_NAMES.update(added)
        _PLUGIN_CACHE[key] = added
    return sorted(_PLUGIN_NAMES)


def reload_plugins() -> list[str]:
    """Rescan the ``precond.tasks`` entry points (see :func:`load_plugins`)."""
    return load_plugins(reload=True)


def task_names() -> list[str]:
    """Sorted names of every known task, built-in and plugin."""
    load_plugins()
    return sorted(_TASKS)


def get_task(name: str) -> TaskFactory:
    """The factory registered under ``name``; unknown names raise ``ValueError``
    with "did you mean" suggestions."""
    load_plugins()
    key = _normalize(name)
    factory = _TASKS.get(key)
    if factory is None:
        names = sorted(_TASKS)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (known tasks: {', '.join(names)})")
    return factory


def build_task(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False, **kwargs: Any
) -> TaskInstance:
    """Build the task ``name`` for a seed; model initialisation is seeded and
    does not disturb the global RNG."""
    factory = get_task(name)
    instance = factory(seed=seed, dtype=dtype, short=short, **kwargs)
    if not isinstance(instance, TaskInstance):
        raise TypeError(f"task factory {name!r} returned {type(instance).__name__}, expected TaskInstance")
    return instance


def task_description(name: str) -> str:
    """First line of the task factory's docstring."""
    doc = inspect.getdoc(get_task(name)) or ""
    return doc.splitlines()[0] if doc else ""


# ---------------------------------------------------------------------------
# helpers shared by the built-in tasks


@contextmanager
def seeded(seed: int):
    """Run a block with the torch CPU RNG seeded, restoring the outer state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def epoch_batches(
    tensors: tuple[torch.Tensor, ...], batch_size: int | None, seed: int, *, drop_last: bool = True
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless minibatches: epoch ``e`` is a permutation drawn from a generator
    seeded with ``seed * 1_000_003 + e``. ``batch_size=None`` or one at least
    the data size yields the full batch forever."""
    n = tensors[0].shape[0]
    if batch_size is None or batch_size >= n:
        while True:
            yield tensors
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        stop = n - batch_size + 1 if drop_last else n
        for start in range(0, stop, batch_size):
            idx = perm[start : start + batch_size]
            yield tuple(t[idx] for t in tensors)
        epoch += 1


def split_standardized(x: Any, y: Any, test_fraction: float = 0.25) -> tuple[Any, Any, Any, Any]:
    """``(x_train, x_test, y_train, y_test)``: a fixed shuffled split (seed 0, independent of the run
    seed), inputs z-scored with the training statistics, arrays read-only (cached by the callers)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = standardize(x[train], x[test])
    arrays = (x_train, x_test, y[train], y[test])
    for a in arrays:
        a.setflags(write=False)
    return arrays


def standardize(train: Any, test: Any) -> tuple[Any, Any]:
    """z-score with the training mean/std (constant columns keep std 1)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std < 1e-8] = 1.0
    return (train - mean) / std, (test - mean) / std


@torch.no_grad()
def classification_metrics(
    model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Cross-entropy and accuracy of a classifier on a train and a test set, in eval mode (its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for split, (x, y) in (("train", train), ("test", test)):
            logits = model(x)
            out[f"{split}_loss"] = torch.nn.functional.cross_entropy(logits, y).item()
            out[f"{split}_accuracy"] = (logits.argmax(-1) == y).double().mean().item()
        return {k: out[k] for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")}
    finally:
        model.train(was_training)
