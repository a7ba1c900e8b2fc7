"""Logistic regression on scikit-learn's breast-cancer data (convex, full batch).

569 samples, 30 features, standardised with the training statistics; a fixed
75/25 split independent of the seed. The model is ``nn.Linear(30, 2)`` with
softmax cross-entropy (likelihood ``categorical``) plus a small L2 term
``l2/2 * ||W||^2`` on the weight matrix, which makes the objective strongly
convex (without it the two-logit parametrisation has a flat direction and the
Hessian is singular, so Newton-type recipes need the term).

``evaluate()``: ``train_loss`` is the objective the optimizer minimises (with
the L2 term), ``train_gap`` its distance to the optimum (computed once in
float64), ``test_loss`` the plain cross-entropy on the test split, and
``test_accuracy`` the task metric (0.979 at the optimum).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precond.tasks.base import Forward, TaskInstance, register_task, seeded, split_standardized

L2 = 1e-2


@lru_cache(maxsize=1)
def breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)`` standardised, cached in-process."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return split_standardized(data.data, data.target, 0.25)


@lru_cache(maxsize=8)
def optimum(l2: float = L2) -> float:
    """The minimum of the training objective (Newton's method in float64,
    closed-form gradient and Hessian of softmax cross-entropy)."""
    xs = breast_cancer_arrays()
    x = torch.tensor(xs[0], dtype=torch.float64)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # bias column
    y = F.one_hot(torch.tensor(xs[2]), 2).to(torch.float64)
    n, d1 = x.shape
    reg = torch.full((2, d1), l2, dtype=torch.float64)
    reg[:, -1] = 0.0  # no L2 on the bias
    theta = torch.zeros(2, d1, dtype=torch.float64)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        z = x @ theta.T
        return -(y * z.log_softmax(-1)).sum(-1).mean() + 0.5 * (reg * theta.pow(2)).sum()

    for _ in range(50):
        p = (x @ theta.T).softmax(-1)
        g = (p - y).T @ x / n + reg * theta
        if g.norm() < 1e-13:
            break
        s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        h = torch.einsum("ikl,ij,im->kjlm", s, x, x).reshape(2 * d1, 2 * d1) / n
        h = h + torch.diag(reg.reshape(-1)) + 1e-12 * torch.eye(2 * d1, dtype=torch.float64)
        # the two-logit parametrisation has a flat direction (the bias sum): lstsq
        step = torch.linalg.lstsq(h, g.reshape(-1, 1)).solution.reshape(2, d1)
        theta = theta - step
    return objective(theta).item()


@register_task("logistic")
def logistic(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False, l2: float = L2) -> TaskInstance:
    """Breast-cancer logistic regression, Linear(30, 2) + cross-entropy + L2, full batch; metric test accuracy."""
    xs = breast_cancer_arrays()
    x_train, x_test = (torch.tensor(a, dtype=dtype) for a in xs[:2])
    y_train, y_test = (torch.tensor(a) for a in xs[2:])
    with seeded(seed):
        model = nn.Linear(30, 2).to(dtype)

    def objective(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        if l2:
            loss = loss + 0.5 * l2 * model.weight.pow(2).sum()
        return loss

    forward = Forward(model)

    def closure(batch):
        x, y = batch
        out = forward(x)
        return objective(out, y), out

    f_star = optimum(l2)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        out_tr = model(x_train)
        out_te = model(x_test)
        train_loss = objective(out_tr, y_train).item()
        return {
            "train_loss": train_loss,
            "train_gap": train_loss - f_star,
            "test_loss": F.cross_entropy(out_te, y_test).item(),
            "train_accuracy": (out_tr.argmax(-1) == y_train).double().mean().item(),
            "test_accuracy": (out_te.argmax(-1) == y_test).double().mean().item(),
        }

    def batches():
        while True:
            yield (x_train, y_train)

    return TaskInstance(
        name="logistic",
        model=model,
        likelihood="categorical",
        train_batches=batches,
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_accuracy",
        higher_is_better=True,
        target=0.95 if short else 0.97,
        default_steps=50 if short else 200,
        eval_every=1 if short else 2,
        default_lr={
            "default": 0.1, "adam": 0.05, "sgd": 0.5, "newton": 1.0, "lbfgs": 1.0, "bfgs": 1.0, "kfac": 0.5,
            # measured with `precond compare ... --lr-grid` (seed 0, full mode)
            "shampoo": 1.0, "sophia_g": 0.1, "sophia_h": 0.1, "adahessian": 0.1,
        },
        batch_size=len(y_train),
        full_batch=True,
        seed=seed,
        short=short,
        dtype=dtype,
        description="breast-cancer logistic regression (convex), full batch",
        info={"n_train": len(y_train), "n_test": len(y_test), "l2": l2},
    )
