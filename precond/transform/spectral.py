"""The diagonal case of a spectral function ``λ ↦ (λ + ε)^(-1/p)`` or ``1/(λ^(1/p) + ε)``.

Shared by ``inverse`` and ``inverse_root``; on a diagonal structure the
eigenvalues are the entries, so the function applies elementwise. The ops
are ordered as torch.optim orders them (Adam: ``sqrt(v)/sqrt(bc2) + eps``).
"""

from __future__ import annotations

import math

import torch

from precond.block import Direction

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 1.1754943508222875e-38, the smallest normal float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4028234663852886e+38
MIN_ROOT = 0.25  # inverse_root's p: C^(-1/p) is at most C^-4 (see InverseRoot.p)


def float32_damping(value: float, what: str, *, zero: bool = True, example: str = "1.0e-8") -> float:
    """A damping-like field (a floor or an epsilon that keeps a denominator away from 0) as float32
    arithmetic sees it: a positive value below the smallest normal float32 rounds to 0 (or keeps only a
    few bits) there, so it no longer keeps anything away from 0 while the pipeline trusts that it does;
    one above the largest float32 is inf there (inf * 0 = NaN). Refused with what works."""
    if 0 < value < FLOAT32_TINY or (value == 0 and not zero):
        allowed = f"0 (none) or at least {FLOAT32_TINY:.3g}" if zero else f"at least {FLOAT32_TINY:.3g}"
        raise ValueError(
            f"{what} = {value:g} is below the smallest normal float32 number ({FLOAT32_TINY:.3g}): float32 "
            f"arithmetic rounds it to 0, so it cannot keep a denominator away from 0; use {allowed}, e.g. {example}"
        )
    if value > FLOAT32_MAX:
        raise ValueError(
            f"{what} = {value:g} is above the largest float32 number ({FLOAT32_MAX:.3g}): it is inf in float32 "
            f"arithmetic (and inf * 0 is NaN); use at most {FLOAT32_MAX:.3g}, e.g. {example}"
        )
    return value


def finite_power(base: float, exponent: float) -> bool:
    """Whether ``base ** exponent`` (base > 0) is a finite float32 number."""
    return base > 0 and exponent * math.log(base) <= math.log(FLOAT32_MAX)


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
