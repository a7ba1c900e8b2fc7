"""The Rosenbrock function as a (data-free, deterministic) task.

``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2`` from the classic start ``(-1.5, 2)``;
the minimum is ``f(1, 1) = 0``. There is no data and no predictive
distribution, so the likelihood is ``None``: only recipes that need gradients,
Hessians (``hessian``, ``hutchinson``) or secant pairs (SR1/BFGS/L-BFGS) make
sense here, not Fisher or Gauss-Newton estimators that need a likelihood.

``closure`` returns ``(f, r)`` with the residual vector
``r = (1 - x, 10 (y - x^2))`` as the "outputs" (``f = sum(r^2)``), so a
Gauss-Newton step can still be formed by hand from ``r``.
"""

from __future__ import annotations

import torch
from torch import nn

from precond.tasks.base import Forward, TaskInstance, register_task

START = (-1.5, 2.0)


class Rosenbrock(nn.Module):
    """A 2-parameter module; ``forward()`` returns the residuals ``r``."""

    def __init__(self, start: tuple[float, float] = START, a: float = 1.0, b: float = 100.0):
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(start))
        self.a = a
        self.b = b

    def residuals(self) -> torch.Tensor:
        x, y = self.xy[0], self.xy[1]
        return torch.stack([self.a - x, self.b**0.5 * (y - x * x)])

    def forward(self, batch=None) -> torch.Tensor:
        return self.residuals()

    def value(self) -> torch.Tensor:
        return self.residuals().pow(2).sum()


@register_task("rosenbrock")
def rosenbrock(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """Rosenbrock function from (-1.5, 2); no likelihood; metric distance to the minimum (1, 1)."""
    model = Rosenbrock().to(dtype)  # deterministic: the seed plays no role
    optimum = torch.tensor([1.0, 1.0], dtype=dtype)

    forward = Forward(model)

    def closure(batch=None):
        r = forward(batch)
        return r.pow(2).sum(), r

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        f = model.value().item()
        return {
            "train_loss": f,
            "test_loss": f,
            "distance": (model.xy - optimum).norm().item(),
        }

    def batches():
        while True:
            yield None

    return TaskInstance(
        name="rosenbrock",
        model=model,
        likelihood=None,
        train_batches=batches,
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="distance",
        higher_is_better=False,
        target=1e-2 if short else 1e-4,
        default_steps=1000 if short else 3000,
        eval_every=1,
        default_lr={
            "default": 1e-2, "adam": 0.1, "sgd": 1e-3, "newton": 1.0, "lbfgs": 1.0, "bfgs": 1.0, "sr1": 1.0,
            "adahessian": 3.0,  # measured with `precond compare ... --lr-grid`
        },
        batch_size=None,
        full_batch=True,
        seed=seed,
        short=short,
        dtype=dtype,
        description="Rosenbrock function from (-1.5, 2)",
        info={"start": list(START)},
    )
