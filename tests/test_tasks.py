"""Built-in tasks (precond.tasks) and the task registry with entry-point plugins.

Plain torch optimizers go through a small test-only adapter that zeroes the
gradients, calls the forward-only closure, backpropagates and steps (the
precond optimizers do the backward pass themselves).
"""

from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch

from conftest import TorchAdapter

from precond.tasks import (
    TaskInstance,
    build_task,
    get_task,
    register_task,
    reload_plugins,
    task_names,
    unregister_task,
)

BUILTIN = ["char-lm", "digits-autoencoder", "digits-mlp", "logistic", "mnist-autoencoder", "mnist-cnn", "rosenbrock",
           "tiny-lm"]

# outputs shape for the first training batch of each task (short mode)
OUTPUT_SHAPES = {
    "digits-mlp": (64, 10),
    "digits-autoencoder": (64, 64),
    "logistic": (427, 2),
    "tiny-lm": (32, 32, 96),
    "rosenbrock": (2,),
    "mnist-autoencoder": (250, 784),
    "mnist-cnn": (64, 10),
    "char-lm": (16, 64, 96),
}







def _run(task: TaskInstance, opt, steps: int) -> tuple[int | None, dict[str, float]]:
    """Train for up to ``steps``; return (step the target was reached, last eval)."""
    batches = task.train_batches()
    metrics = task.evaluate()
    for k in range(1, steps + 1):
        batch = next(batches)
        opt.step(lambda batch=batch: task.closure(batch))
        if k % task.eval_every == 0 or k == steps:
            metrics = task.evaluate()
            if task.reached(metrics[task.metric]):
                return k, metrics
    return None, metrics


def test_builtin_tasks_are_listed():
    names = task_names()
    for name in BUILTIN:
        assert name in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", BUILTIN)
def test_task_builds_and_closure_is_forward_only(name):
    task = build_task(name, seed=0, short=True)
    assert isinstance(task, TaskInstance)
    assert task.name == name
    assert task.likelihood in ("categorical", "gaussian", None)
    assert task.default_steps > 0 and task.eval_every > 0
    assert isinstance(task.higher_is_better, bool)
    batch = next(task.train_batches())
    loss, outputs = task.closure(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.requires_grad  # the optimizer will backprop through it
    assert tuple(outputs.shape) == OUTPUT_SHAPES[name]
    # forward only: no gradients were computed
    assert all(p.grad is None for p in task.model.parameters())
    metrics = task.evaluate()
    assert {"train_loss", "test_loss", task.metric} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert not task.reached(metrics[task.metric])  # an untrained model is not done


def test_tiny_lm_loss_is_per_token_cross_entropy():
    task = build_task("tiny-lm", short=True)
    x, y = next(task.train_batches())
    assert x.shape == y.shape == (32, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    loss, out = task.closure((x, y))
    v = out.shape[-1]
    expected = torch.nn.functional.cross_entropy(out.reshape(-1, v), y.reshape(-1))
    assert torch.equal(loss, expected)


def test_logistic_is_full_batch_and_reports_the_optimality_gap():
    task = build_task("logistic")
    assert task.full_batch
    it = task.train_batches()
    a, b = next(it), next(it)
    assert a[0] is b[0] and a[0].shape == (427, 30)
    metrics = task.evaluate()
    assert metrics["train_gap"] > 0
    assert math.isclose(metrics["train_loss"] - metrics["train_gap"], 0.0824649, rel_tol=1e-4)


@pytest.mark.parametrize("name", BUILTIN)
def test_adam_reaches_the_short_target_within_the_short_budget(name):
    # precond's `adam` recipe at the task's "adam" lr hint, for every task; on
    # rosenbrock that is lr 0.1, reaching distance 1e-2 after ~850 of 1000 steps
    import precond

    task = build_task(name, seed=0, short=True)
    lr = task.lr_hint("adam")
    assert lr is not None
    opt = precond.build("adam", task.model, likelihood=task.likelihood, lr=lr)
    reached, metrics = _run(task, opt, task.default_steps)
    assert reached is not None, f"{name}: {metrics} after {task.default_steps} steps, target {task.target}"


def test_rosenbrock_lbfgs_reaches_the_full_target():
    # quasi-Newton is the natural method here: L-BFGS with a strong-Wolfe line search
    task = build_task("rosenbrock")
    opt = TorchAdapter(torch.optim.LBFGS(task.model.parameters(), lr=1.0, max_iter=5, line_search_fn="strong_wolfe"))
    reached, metrics = _run(task, opt, 60)
    assert reached is not None, metrics
    assert metrics["distance"] <= 1e-4


def test_rosenbrock_outputs_are_residuals():
    task = build_task("rosenbrock")
    assert task.likelihood is None
    loss, r = task.closure(None)
    assert loss.item() == pytest.approx(12.5)  # f(-1.5, 2)
    assert torch.allclose(loss, r.pow(2).sum())
    assert task.evaluate()["distance"] == pytest.approx(math.hypot(2.5, 1.0))


@pytest.mark.parametrize("name", ["digits-mlp", "digits-autoencoder", "tiny-lm"])
def test_minibatches_are_deterministic_per_seed(name):
    def first(seed, n=3):
        it = build_task(name, seed=seed, short=True).train_batches()
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    for ba, bb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0]))


def test_minibatches_cover_an_epoch_without_repeats():
    task = build_task("digits-mlp", short=True)
    it = task.train_batches()
    n_train = task.info["n_train"]
    per_epoch = n_train // task.batch_size
    xs = torch.cat([next(it)[0] for _ in range(per_epoch)])
    assert torch.unique(xs, dim=0).shape[0] == xs.shape[0]


@pytest.mark.parametrize("name", ["digits-mlp", "logistic", "tiny-lm"])
def test_model_init_is_seeded_and_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    a = build_task(name, seed=0, short=True)
    b = build_task(name, seed=0, short=True)
    c = build_task(name, seed=1, short=True)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(t.model.parameters()) for t in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_dtype_float64():
    task = build_task("digits-autoencoder", dtype=torch.float64, short=True)
    assert all(p.dtype == torch.float64 for p in task.model.parameters())
    loss, out = task.closure(next(task.train_batches()))
    assert loss.dtype == out.dtype == torch.float64


# ---------------------------------------------------------------------------
# registry


def test_unknown_task_suggests_close_names():
    with pytest.raises(ValueError) as err:
        get_task("digits-mpl")
    msg = str(err.value)
    assert "did you mean" in msg and "'digits-mlp'" in msg
    with pytest.raises(ValueError, match="known tasks"):
        build_task("no-such-thing-at-all")


def test_names_are_normalised():
    assert get_task("Digits_MLP") is get_task("digits-mlp")


def test_register_and_unregister_a_task():
    @register_task("test-inline-task")
    def make(*, seed=0, dtype=torch.float32, short=False):
        return build_task("logistic", seed=seed, dtype=dtype, short=short)

    try:
        assert "test-inline-task" in task_names()
        assert build_task("test-inline-task").name == "logistic"
        with pytest.raises(ValueError, match="already registered"):
            register_task("test-inline-task")(lambda **kw: None)
    finally:
        unregister_task("test-inline-task")
    assert "test-inline-task" not in task_names()


def test_factory_must_return_a_task_instance():
    register_task("test-bad-factory")(lambda **kw: "nope")
    try:
        with pytest.raises(TypeError, match="TaskInstance"):
            build_task("test-bad-factory")
    finally:
        unregister_task("test-bad-factory")


PLUGIN_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from precond.tasks import TaskInstance

    def make_quadratic(*, seed=0, dtype=torch.float32, short=False):
        """A toy plugin task: minimise ||w - 3||^2."""
        model = nn.Linear(3, 1, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.zero_()

        def closure(batch):
            out = model.weight.reshape(-1)
            return (out - 3.0).pow(2).sum(), out

        @torch.no_grad()
        def evaluate():
            loss = (model.weight - 3.0).pow(2).sum().item()
            return {"train_loss": loss, "test_loss": loss, "distance": loss ** 0.5}

        def batches():
            while True:
                yield None

        return TaskInstance(
            name="toy-quadratic", model=model, likelihood=None, train_batches=batches,
            closure=closure, evaluate=evaluate, metric="distance", higher_is_better=False,
            target=1e-3, default_steps=100, seed=seed, short=short, dtype=dtype,
        )
    '''
)


def _make_plugin_dist(root, entry_points: str, module: str | None = None, name: str = "fake_precond_plugin"):
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (root / f"{name}.py").write_text(module)


def test_plugin_task_via_entry_point(tmp_path, monkeypatch):
    _make_plugin_dist(
        tmp_path,
        "[precond.tasks]\ntoy-quadratic = fake_precond_plugin:make_quadratic\n",
        PLUGIN_MODULE,
    )
    assert "toy-quadratic" not in task_names()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reload_plugins()
        assert "toy-quadratic" in task_names()
        task = build_task("toy-quadratic")
        loss, out = task.closure(next(task.train_batches()))
        assert loss.item() == pytest.approx(27.0) and out.shape == (3,)
        opt = TorchAdapter(torch.optim.SGD(task.model.parameters(), lr=0.25))
        reached, metrics = _run(task, opt, task.default_steps)
        assert reached is not None, metrics
        # suggestions know about plugin tasks too
        with pytest.raises(ValueError, match="toy-quadratic"):
            get_task("toy-quadratik")
    finally:
        monkeypatch.undo()
        reload_plugins()
    assert "toy-quadratic" not in task_names()


def test_broken_plugin_warns_and_does_not_crash(tmp_path, monkeypatch):
    _make_plugin_dist(
        tmp_path,
        "[precond.tasks]\nbroken-task = no_such_module_for_precond_tests:make\n",
        name="broken_precond_plugin",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reload_plugins()
        assert any("broken-task" in str(w.message) for w in caught)
        names = task_names()
        assert "broken-task" not in names and "digits-mlp" in names
    finally:
        monkeypatch.undo()
        reload_plugins()
