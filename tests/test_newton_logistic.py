"""On logistic regression over a real data set (breast cancer, standardised, full batch), ``newton``,
``bfgs`` and ``lbfgs`` reach the optimum scipy finds to 1e-6 in fewer iterations than gradient descent."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch

import precond
from precond.tasks import build_task
from precond.tasks.logistic import L2, breast_cancer_arrays

pytest.importorskip("sklearn")

D = torch.float64


def numpy_objective():
    """The task's objective written independently: cross-entropy of [W b] x + ½·L2·‖W‖², parameters [W (2x30), b]."""
    xs = breast_cancer_arrays()
    x = np.c_[xs[0], np.ones(len(xs[0]))]
    y = np.eye(2)[xs[2]]
    reg = np.full((2, 31), L2)
    reg[:, -1] = 0.0

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        th = np.c_[theta[:60].reshape(2, 30), theta[60:]]
        z = x @ th.T
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        g = (np.exp(logp) - y).T @ x / len(x) + reg * th
        return float(-(y * logp).sum(1).mean() + 0.5 * (reg * th**2).sum()), np.r_[g[:, :30].ravel(), g[:, 30]]

    return f


@pytest.fixture(scope="module")
def scipy_optimum():
    f = numpy_objective()
    res = so.minimize(f, np.zeros(62), jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 10_000})
    return f, res.fun, res.x


def flat(model) -> np.ndarray:
    return np.r_[model.weight.detach().numpy().ravel(), model.bias.detach().numpy()]


def iterations_to(recipe: str, f, target: float, limit: int, **build) -> tuple[int | None, object]:
    task = build_task("logistic", dtype=D)
    opt = precond.build(recipe, task.model, likelihood="categorical", **build)
    batch = next(task.train_batches())
    for it in range(1, limit + 1):
        opt.step(lambda: task.closure(batch))
        if f(flat(task.model))[0] - target <= 1e-6:
            return it, task.model
    return None, task.model


def test_newton_bfgs_lbfgs_beat_gradient_descent(scipy_optimum) -> None:
    f, f_star, x_star = scipy_optimum
    counts = {}
    for name in ("newton", "bfgs", "lbfgs"):
        it, model = iterations_to(name, f, f_star, 200)
        assert it is not None, name
        counts[name] = it
        assert abs(f(flat(model))[0] - f_star) <= 1e-6
    # gradient descent with the step 1/L, L the largest Hessian eigenvalue at the optimum
    task = build_task("logistic", dtype=D)
    with torch.no_grad():
        task.model.weight.copy_(torch.tensor(x_star[:60].reshape(2, 30)))
        task.model.bias.copy_(torch.tensor(x_star[60:]))
    batch = next(task.train_batches())
    h = precond.estimate("hessian", task.model, lambda: task.closure(batch), structure="full")
    lr = 1.0 / float(torch.linalg.eigvalsh(h).max())
    budget = max(counts.values())
    gd, _ = iterations_to("sgd", f, f_star, budget, lr=lr)
    assert gd is None, counts  # gradient descent has not reached the optimum after the most any of them needed
    assert counts["newton"] <= 10


def test_newton_reaches_the_optimum_parameters(scipy_optimum) -> None:
    """Newton converges quadratically: the parameters (up to the softmax's shift of both biases) match scipy's."""
    f, f_star, x_star = scipy_optimum
    task = build_task("logistic", dtype=D)
    opt = precond.build("newton", task.model, likelihood="categorical")
    batch = next(task.train_batches())
    for _ in range(10):
        opt.step(lambda: task.closure(batch))
    x = flat(task.model)
    assert np.abs(x[:60] - x_star[:60]).max() <= 1e-6
    assert abs((x[60] - x[61]) - (x_star[60] - x_star[61])) <= 1e-6
    assert f(x)[0] <= f_star + 1e-12
