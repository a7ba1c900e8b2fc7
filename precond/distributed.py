"""Who owns which preconditioner block: a deterministic, cost-balanced assignment (pure shape logic).

The foundation of sharded preconditioner work (docs/distributed.md, DESIGN.md
"Scaling out"): *block first, then assign*. Every parameter is cut into the
blocks the ``kronecker`` structure uses (:func:`precond.linalg.kron.block_partition`
at ``max_dim``); each block is one unit of ownership with a cost (``dim³`` per
factor for eigendecompositions, ``dim²`` for memory); blocks go to ranks by a
greedy bin-packing — largest first, each to the currently least-loaded rank.

Everything here is a pure function of shapes and the world size: no process
group, no tensors. The same inputs give the same assignment on every rank,
in every run, so checkpoints resume and the assignment is testable on CPU.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from precond.linalg.kron import BlockPartition, block_partition

__all__ = [
    "Block",
    "assign_blocks",
    "assign_named",
    "rank_loads",
    "load_balance",
    "kronecker_blocks",
    "kronecker_costs",
]

Shapes = Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]


# --------------------------------------------------------------------------- assignment


def _check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def assign_blocks(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each block: greedy bin-packing, largest block first to the least-loaded rank.

    Blocks are visited by cost descending (ties: lower index first); each goes
    to the rank with the smallest load so far (ties: lowest rank). Returns
    ``owner[i]`` for block ``i``. A pure function of ``costs`` and
    ``world_size`` (LPT scheduling: the maximal load is at most
    ``4/3 - 1/(3·world_size)`` times the optimum).

    Raises ``ValueError`` for ``world_size < 1`` or a negative / non-finite cost.
    """
    _check_world(world_size)
    values = [float(c) for c in costs]
    for i, c in enumerate(values):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"cost {i} must be finite and >= 0, got {costs[i]!r}")
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    heap: list[tuple[float, int]] = [(0.0, r) for r in range(world_size)]  # (load, rank): ties to the lowest rank
    owner = [0] * len(values)
    for i in order:
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (load + values[i], rank))
    return owner


def assign_named(costs: Mapping[str, float] | Iterable[tuple[str, float]], world_size: int) -> dict[str, int]:
    """:func:`assign_blocks` over named blocks, independent of the order they are given in.

    Names are sorted first, so a dict built in any order (or a set of pairs)
    gives the same owners. Names must be unique.
    """
    pairs = list(costs.items()) if isinstance(costs, Mapping) else list(costs)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"block names must be unique, repeated: {dup}")
    pairs.sort(key=lambda nc: nc[0])
    owners = assign_blocks([c for _, c in pairs], world_size)
    return {name: rank for (name, _), rank in zip(pairs, owners)}


def rank_loads(assignment: Sequence[int], costs: Sequence[float], world_size: int) -> list[float]:
    """The summed cost each rank owns."""
    _check_world(world_size)
    if len(assignment) != len(costs):
        raise ValueError(f"{len(assignment)} owners for {len(costs)} costs")
    loads = [0.0] * world_size
    for rank, c in zip(assignment, costs):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        loads[rank] += float(c)
    return loads


def load_balance(assignment: Sequence[int], costs: Sequence[float], world_size: int) -> float:
    """Max rank load / mean rank load (1.0 is perfect; a world with no cost gives 1.0).

    This is the slowdown of the busiest rank against an ideal split: a refresh
    takes ``load_balance · total / world_size``.
    """
    loads = rank_loads(assignment, costs, world_size)
    total = sum(loads)
    if total == 0:
        return 1.0
    return max(loads) / (total / world_size)


# --------------------------------------------------------------------------- blocks of a model


@dataclass(frozen=True)
class Block:
    """One unit of ownership: block ``index`` of parameter ``param``, with one factor per dimension."""

    param: str
    index: int
    dims: tuple[int, ...]  # the block's shape = the sizes of its factors

    @property
    def name(self) -> str:
        return f"{self.param}#{self.index}"

    def cost(self, kind: Literal["eigh", "memory"] = "eigh") -> float:
        """``Σ dim³`` (one eigendecomposition per factor) or ``Σ dim²`` (the factors' elements)."""
        power = 3 if kind == "eigh" else 2
        return float(sum(d**power for d in self.dims))


def _partition(shape: Sequence[int], max_dim: int, merge_dims: bool) -> BlockPartition:
    """As the ``kronecker`` structure (``factors: gradient``) cuts a parameter."""
    if merge_dims:
        return block_partition(shape, max_dim, merge_dims=True)
    squeezed = tuple(int(d) for d in shape if int(d) != 1) or (1,)
    return block_partition(squeezed, max_dim, merge_dims=False)


def kronecker_blocks(shapes: Shapes, max_dim: int = 1024, *, merge_dims: bool = False) -> list[Block]:
    """Every Kronecker block of named parameter shapes, sorted by parameter name, then block index.

    ``shapes``: ``{name: shape}`` or ``(name, shape)`` pairs (names unique).
    Blocking follows the ``kronecker`` structure with ``factors: gradient``
    (Shampoo): size-1 dims dropped (or merged with ``merge_dims``), then every
    dimension above ``max_dim`` cut into chunks of ``max_dim``.
    """
    pairs = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    out: list[Block] = []
    for name, shape in sorted(pairs, key=lambda ns: ns[0]):
        part = _partition(tuple(shape), max_dim, merge_dims)
        out.extend(Block(name, i, tuple(b)) for i, b in enumerate(part.block_shapes))
    return out


def kronecker_costs(
    shapes: Shapes,
    max_dim: int = 1024,
    *,
    merge_dims: bool = False,
    kind: Literal["eigh", "memory"] = "eigh",
) -> list[tuple[str, float]]:
    """``(block name, cost)`` for every Kronecker block (see :func:`kronecker_blocks`).

    The block name is ``"<param>#<block index>"``; the cost is ``Σ dim³`` over
    the block's factors for ``kind="eigh"`` (the eigendecompositions of a
    refresh) or ``Σ dim²`` for ``kind="memory"``. With :func:`assign_named` the
    owners are a pure function of the shapes, ``max_dim`` and the world size.
    """
    return [(b.name, b.cost(kind)) for b in kronecker_blocks(shapes, max_dim, merge_dims=merge_dims)]
