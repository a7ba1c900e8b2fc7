"""The diagonal case of a spectral function ``λ ↦ (λ + ε)^(-1/p)`` or ``1/(λ^(1/p) + ε)``.

Shared by ``inverse`` and ``inverse_root``; on a diagonal structure the
eigenvalues are the entries, so the function applies elementwise. The ops
are ordered as torch.optim orders them (Adam: ``sqrt(v)/sqrt(bc2) + eps``).
"""

from __future__ import annotations

import torch

from precond.block import Direction


def diagonal_power(
    values: list[torch.Tensor],
    divisors: list[float] | None,
    direction: Direction,
    root: float,
    damping: float,
    outside: bool,
) -> Direction:
    """``direction / f(values / divisors)`` with ``f(λ) = λ^(1/root) + damping`` (outside)
    or ``(λ + damping)^(1/root)`` (inside). Never modifies its inputs."""
    if outside:
        denom = list(torch._foreach_sqrt(values) if root == 2 else torch._foreach_pow(values, 1.0 / root))
        if divisors is not None:
            torch._foreach_div_(denom, [d ** (1.0 / root) for d in divisors])
        if damping:
            torch._foreach_add_(denom, damping)
    else:
        denom = list(torch._foreach_div(values, divisors) if divisors is not None else torch._foreach_add(values, damping))
        if divisors is not None and damping:
            torch._foreach_add_(denom, damping)
        if root == 2:
            torch._foreach_sqrt_(denom)
        elif root != 1:
            torch._foreach_pow_(denom, 1.0 / root)
    if direction.denominator is not None:
        direction = direction.materialize()
    # outside: sqrt(v) + eps >= eps > 0; inside: (v + eps)^(1/p) > 0 for v >= 0 (negative v gives NaN, caught)
    return Direction(direction.tensors, direction.coef, direction.owned, denom, nonzero=damping > 0)
