"""Tasks on scikit-learn's 8x8 handwritten digits (no download needed).

The 1797 images are split once (a fixed permutation, 75% train / 25% test,
independent of the task seed) and standardised per pixel with the training
mean and standard deviation. The seed only drives model initialisation and
minibatch order.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precond.tasks.base import Forward, TaskInstance, classification_metrics, epoch_batches, register_task, seeded, split_standardized

_TEST_FRACTION = 0.25


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)`` standardised, cached in-process."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return split_standardized(data.data, data.target, _TEST_FRACTION)


def _tensors(dtype: torch.dtype):
    x_train, x_test, y_train, y_test = digits_arrays()
    return (
        torch.tensor(x_train, dtype=dtype),
        torch.tensor(x_test, dtype=dtype),
        torch.tensor(y_train),
        torch.tensor(y_test),
    )


@register_task("digits-mlp")
def digits_mlp(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """Digits classification with an MLP 64-64-10 (tanh), cross-entropy; metric test accuracy."""
    x_train, x_test, y_train, y_test = _tensors(dtype)
    with seeded(seed):
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
    batch_size = 64

    forward = Forward(model)

    def closure(batch):
        x, y = batch
        out = forward(x)
        return F.cross_entropy(out, y), out

    def evaluate() -> dict[str, float]:
        return classification_metrics(model, (x_train, y_train), (x_test, y_test))

    return TaskInstance(
        name="digits-mlp",
        model=model,
        likelihood="categorical",
        train_batches=lambda: epoch_batches((x_train, y_train), batch_size, seed),
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_accuracy",
        higher_is_better=True,
        target=0.9 if short else 0.96,
        default_steps=100 if short else 500,
        eval_every=10,
        default_lr={
            "default": 1e-2, "adam": 1e-2, "sgd": 0.1, "adagrad": 0.05, "kfac": 0.05,
            # measured with `precond compare ... --lr-grid` (seed 0, full mode)
            "shampoo": 0.1, "sophia_g": 3e-3, "sophia_h": 3e-3, "adahessian": 0.1,
        },
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description="sklearn digits, MLP 64-64-10 tanh, cross-entropy",
        info={"n_train": len(y_train), "n_test": len(y_test)},
    )


class DigitsAutoencoder(nn.Module):
    """64-48-32-16-32-48-64: tanh hidden layers, linear code and output layers
    (the MNIST deep-autoencoder benchmark of Hinton & Salakhutdinov and K-FAC,
    scaled down to 8x8 images)."""

    def __init__(self, sizes: tuple[int, ...] = (64, 48, 32, 16, 32, 48, 64)):
        super().__init__()
        code = sizes.index(min(sizes))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i + 1 != code and i + 1 != len(sizes) - 1:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_task("digits-autoencoder")
def digits_autoencoder(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """Digits deep autoencoder 64-48-32-16-32-48-64 (tanh), squared error; metric test MSE."""
    x_train, x_test, _, _ = _tensors(dtype)
    with seeded(seed):
        model = DigitsAutoencoder().to(dtype)
    batch_size = 64

    forward = Forward(model)

    def closure(batch):
        (x,) = batch
        out = forward(x)
        return F.mse_loss(out, x), out

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            train_mse = F.mse_loss(model(x_train), x_train).item()
            test_mse = F.mse_loss(model(x_test), x_test).item()
            return {"train_loss": train_mse, "test_loss": test_mse, "test_mse": test_mse}
        finally:
            model.train(was_training)

    return TaskInstance(
        name="digits-autoencoder",
        model=model,
        likelihood="gaussian",
        train_batches=lambda: epoch_batches((x_train,), batch_size, seed),
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_mse",
        higher_is_better=False,
        target=0.6 if short else 0.35,
        default_steps=300 if short else 2000,
        eval_every=10 if short else 25,
        default_lr={
            "default": 3e-3, "adam": 3e-3, "sgd": 0.05,
            # measured with `precond compare ... --lr-grid` (seed 0, full mode)
            "kfac": 5e-3, "shampoo": 0.05, "sophia_g": 1e-3, "sophia_h": 1e-3, "adahessian": 0.15,
        },
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description="sklearn digits, deep tanh autoencoder 64-48-32-16-32-48-64, squared error",
        info={"n_train": len(x_train), "n_test": len(x_test)},
    )
