"""Bad numbers: find non-finite values before they reach the state, and apply the recipe's policy.

``on_nonfinite: skip`` (default) leaves parameters and optimizer state as they
were when the loss, a gradient or a curvature estimate is NaN/Inf, counts the
step, and raises after ``max_nonfinite`` consecutive bad steps. When a
transform turns finite statistics into a non-finite update (a zero curvature
with no damping), the parameters are left unchanged and the step counted;
the statistics keep what they accumulated from finite inputs.
``raise`` raises at the first bad step; ``ignore`` does no checking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from precond.errors import PrecondError


class NonFiniteError(PrecondError, FloatingPointError):
    """Non-finite numbers in training, under ``on_nonfinite: raise`` or after too many skipped steps."""


def _stack(norms: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.stack(list(norms))
    except RuntimeError:  # mixed dtypes or devices
        return torch.stack([n.to("cpu", torch.float64) for n in norms])


def first_nonfinite(
    tensors: list[torch.Tensor], divisors: list[torch.Tensor] | None = None, nonzero: bool = False
) -> int | None:
    """Index of the first tensor holding NaN/Inf, or None (one fused reduction, one sync).

    With ``divisors`` (a direction kept as ``tensors / divisors``), the numerators
    are finite state or checked gradients; the divisors are checked for NaN/Inf
    and, unless ``nonzero`` (a transform's damping keeps them away from zero),
    for zeros.
    """
    if not tensors:
        return None
    # The L2 norm is torch's fused fast path (other orders fall back to per-tensor kernels many times
    # slower); NaN/Inf propagate into it. Values whose squares overflow (|x| > ~1e19 in float32) count
    # as non-finite too.
    norms = _stack(torch._foreach_norm(tensors if divisors is None else divisors))
    if divisors is None or nonzero:
        # the common case in three ops: the norms are >= 0, so their sum is finite exactly when every one is
        # (or it overflowed: settled below)
        if math.isfinite(float(norms.sum())):
            return None
        bad = ~torch.isfinite(norms)
    else:  # no damping floor: a zero divisor is possible (rare: only undamped transforms)
        bad = ~torch.isfinite(norms) | ~(_stack([d.abs().amin() for d in divisors]) > 0)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite: one sum per tensor and one sync.

    NaN/Inf propagate into a sum, so a finite sum proves its tensor finite at the cost of one fast
    reduction (``isfinite(t).all()`` is several times slower on CPU, worse on transposed layouts).
    A non-finite sum is settled exactly: only then may the sum itself have overflowed.
    """
    if not tensors:
        return True
    if bool(torch.isfinite(_stack([t.sum() for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class Guard:
    policy: str = "skip"
    max_consecutive: int = 10
    skipped: int = 0
    consecutive: int = 0
    last: str = ""
    history: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    def check(
        self,
        tensors: list[torch.Tensor],
        describe: Callable[[int], str],
        divisors: list[torch.Tensor] | None = None,
        nonzero: bool = False,
    ) -> str | None:
        """A message naming what is non-finite in ``tensors`` (or ``tensors / divisors``), or None."""
        if not self.active:
            return None
        i = first_nonfinite(tensors, divisors, nonzero)
        return None if i is None else describe(i)

    def record(self, problem: str | None, step: int) -> None:
        """Count the outcome of one step; raise per the policy."""
        if problem is None:
            self.consecutive = 0
            return
        message = f"step {step}: {problem}"
        if self.policy == "raise":
            raise NonFiniteError(f"{message} (on_nonfinite: raise). Nothing was changed.")
        self.skipped += 1
        self.consecutive += 1
        self.last = message
        self.history = (self.history + [message])[-20:]
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps skipped for non-finite numbers (max_nonfinite="
                f"{self.max_consecutive}); the last: {message}. Lower the learning rate, raise the damping, "
                "or check the data and the loss."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.last = str(state.get("last", ""))
