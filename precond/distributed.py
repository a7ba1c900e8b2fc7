"""Who owns which preconditioner block: a deterministic, cost-balanced assignment, and how results travel.

The foundation of sharded preconditioner work (docs/distributed.md#block-first-then-assign,
docs/algorithms.md#distributed-averaging): *block first, then assign*. Every parameter is cut into the
blocks the ``kronecker`` structure uses (:func:`precond.linalg.kron.block_partition`
at ``max_dim``); each block is one unit of ownership with a cost (``dim³`` per
factor for eigendecompositions, ``dim²`` for memory); blocks go to ranks by a
greedy bin-packing — largest first, each to the currently least-loaded rank.

The assignment is a pure function of shapes and the world size: no process
group, no tensors. The same inputs give the same assignment on every rank,
in every run, so checkpoints resume and the assignment is testable on CPU.
:class:`Comm` is what an optimizer needs from its process group, and
:class:`Ownership` the one helper the structures that own blocks (``kronecker``,
``full``) use for owners and exchanges.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from collections import Counter
from typing import Any, Callable, Hashable, Iterable, Literal, Mapping, Sequence

import torch

from precond.linalg.kron import BlockPartition, block_partition

__all__ = [
    "Comm",
    "fully_sharded",
    "is_shard",
    "local",
    "rows_of",
    "Ownership",
    "Block",
    "assign_blocks",
    "assign_named",
    "rank_loads",
    "load_balance",
    "kronecker_blocks",
    "kronecker_costs",
]

Shapes = Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]

try:  # torch.distributed is optional in torch builds (then nothing is a DTensor)
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


# --------------------------------------------------------------------------- fully sharded parameters (FSDP2)


def fully_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any parameter is a ``DTensor`` (``torch.distributed.fsdp.fully_shard``: each process holds a
    shard of every parameter and of its gradient, rows of dim 0)."""
    return _DTensor is not None and any(isinstance(p, _DTensor) for p in params)


def is_shard(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (its process holds a shard of it)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` (a view of its memory: in-place changes reach the ``DTensor``; a new
    view on each call for a parameter), or ``t`` when it is a plain tensor."""
    if is_shard(t):
        with torch.no_grad():
            return t.to_local()
    return t


def shard_to_global(value: object, param: torch.Tensor) -> object:
    """A state tensor of ``param``'s shard (same shape) as a ``DTensor`` laid out as ``param`` (for
    ``torch.distributed.checkpoint``, which saves each process's rows); anything else unchanged."""
    if not is_shard(param) or not isinstance(value, torch.Tensor) or is_shard(value):
        return value
    shard = local(param)
    if value.dim() == 0 or value.shape != shard.shape:
        return value
    return _DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def rows_of(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's rows of ``value``, a whole tensor of ``param``'s shape, as ``param`` is laid out (a view)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def global_to_shard(value: object, param: torch.Tensor) -> object:
    """The inverse of :func:`shard_to_global`, for loading: a ``DTensor`` state tensor as this process's rows
    of ``param``'s layout (redistributed if laid out otherwise), a whole plain tensor of ``param``'s shape (a
    checkpoint of one process) cut to this process's rows; anything else unchanged."""
    if not is_shard(param) or not isinstance(value, torch.Tensor):
        return value
    if is_shard(value):
        if value.device_mesh != param.device_mesh or tuple(value.placements) != tuple(param.placements):
            value = value.redistribute(param.device_mesh, param.placements)
        return value.to_local()
    shard = local(param)
    if value.dim() == 0 or value.shape == shard.shape or value.shape != param.shape:
        return value
    return rows_of(value, param)


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


# --------------------------------------------------------------------------- the optimizer's process group


Item = tuple[int, Sequence[Sequence[int]]]  # (owner rank, shapes of the tensors the owner sends)
Result = tuple[float, "list[torch.Tensor] | None"]  # (status, tensors or None)


class Comm:
    """What an optimizer needs from ``torch.distributed``: averages, block owners, one-buffer exchanges.

    Inactive (one process, or no process group) it does nothing and costs
    nothing: :meth:`mean_` returns at once, every block is owned by rank 0 and
    :meth:`exchange` hands back what this rank computed. ``mode`` is the
    recipe's ``distributed.mode``: ``replicated`` (every rank keeps every
    block; owners compute the eigendecompositions and all ranks receive them),
    ``sharded`` (owners alone keep a block's state and compute its
    preconditioned update; all ranks receive the updates) or ``off`` (act as
    one process whatever the process group). ``fully_sharded``: the parameters
    are ``DTensor`` shards (FSDP2); the element-wise recipes then run on each
    process's shards, the modes do not apply, and the processes agree only on
    whether a step is skipped (:meth:`agree`); pipelines over whole parameters
    gather each gradient (:meth:`whole`) at its owner (:meth:`owners`) and send the
    updates back (:meth:`exchange`). ``traffic`` counts
    the bytes each rank receives, by collective, for the benchmark.
    """

    def __init__(self, mode: str = "replicated", group: object = None, *, fully_sharded: bool = False) -> None:
        d = torch.distributed
        on = (mode != "off" or fully_sharded) and d.is_available() and d.is_initialized()
        self.fully_sharded = fully_sharded and on
        self.group = group
        self.world = d.get_world_size(group) if on else 1
        self.rank = d.get_rank(group) if on else 0
        self.mode = mode
        self.traffic: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._owners: dict[tuple[tuple[str, float], ...], dict[str, int]] = {}
        self._layouts: dict[tuple[int, tuple[Any, ...]], tuple[list[int], list[int], int] | None] = {}

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.active and self.mode == "sharded" and not self.fully_sharded

    def agree(self, problem: str | None) -> str | None:
        """Fully sharded: each process checked its own shards; every process returns the problem of the lowest
        process that found one (one all-reduce of one integer; the message travels only when there is one)."""
        if not (self.active and self.fully_sharded):
            return problem
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(self.group) == "nccl" else None
        first = torch.tensor([self.rank if problem else self.world], dtype=torch.int64, device=device)  # NCCL: on the GPU
        torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN, group=self.group)
        self._count("all_reduce", 1, 8)
        src = int(first)
        if src == self.world:
            return None
        box = [problem]
        torch.distributed.broadcast_object_list(box, group=self.group, group_src=src)
        return box[0]

    def total(self, value: float) -> float:
        """Fully sharded: the sum of ``value`` over the processes (one all-reduce of one float64), e.g. an inner
        product of which each process holds the terms of its rows or of the parameters it owns."""
        if not (self.active and self.fully_sharded):
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(self.group) == "nccl" else None
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, group=self.group)
        self._count("all_reduce", 1, 8)
        return float(t)

    def direct(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether the whole tensors of ``params`` travel only to and from their owners (:meth:`to_owners`,
        :meth:`from_owners`): every one a DTensor sharded on dim 0 over a mesh of all this group's processes
        (FSDP2: ``(Shard(0),)``; HSDP: ``(Replicate(), Shard(0))``), so that each process's rows are known from
        the shape alone (``torch.chunk``'s split, as FSDP2's). Otherwise (another layout) they are gathered
        (:meth:`whole`, :meth:`exchange`). The same answer on every process."""
        if not (self.active and self.fully_sharded) or _DTensor is None or self.group is not None:
            return False
        return all(self._layout(p) is not None for p in params)

    def _layout(self, p: torch.Tensor) -> tuple[list[int], list[int], int] | None:
        """For a DTensor laid out as FSDP2 or HSDP lays out a parameter: each process's shard index and
        replica index, and the number of shards; None for any other layout."""
        if not isinstance(p, _DTensor) or p.dim() == 0:
            return None
        mesh, placements = p.device_mesh, tuple(p.placements)
        key = (id(mesh), placements)
        if key not in self._layouts:
            self._layouts[key] = self._layout_of(mesh, placements)
        return self._layouts[key]

    def _layout_of(self, mesh: Any, placements: tuple[Any, ...]) -> tuple[list[int], list[int], int] | None:
        from torch.distributed.tensor import Replicate, Shard

        if mesh.ndim == 1 and placements == (Shard(0),):
            grid = mesh.mesh.reshape(1, -1)
        elif mesh.ndim == 2 and placements == (Replicate(), Shard(0)):
            grid = mesh.mesh
        else:
            return None
        if grid.numel() != self.world or sorted(grid.flatten().tolist()) != list(range(self.world)):
            return None
        shard, replica = [0] * self.world, [0] * self.world
        for i, row in enumerate(grid.tolist()):
            for j, rank in enumerate(row):
                shard[rank], replica[rank] = j, i
        return shard, replica, grid.shape[1]

    @staticmethod
    def chunks(n: int, parts: int) -> list[int]:
        """Each shard's number of rows of a tensor of ``n`` rows cut on dim 0 in ``parts`` (``torch.chunk``, as
        FSDP2)."""
        c = -(-n // parts)
        return [max(0, min(c, n - r * c)) for r in range(parts)]

    def _rows(self, p: torch.Tensor, rank: int) -> int:
        """How many rows of ``p`` process ``rank`` holds."""
        layout = self._layout(p)
        assert layout is not None  # direct() checked every parameter
        shard, _, parts = layout
        return self.chunks(p.shape[0], parts)[shard[rank]]

    def _all_to_all(self, send: list[torch.Tensor], recv_sizes: list[int], dtype: torch.dtype, device: Any) -> list[torch.Tensor]:
        """One ``all_to_all_single``: ``send[d]`` (flat) to process ``d``; what each process sent here, by source."""
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        torch.distributed.all_to_all_single(out, inp, recv_sizes, [t.numel() for t in send], group=self.group)
        self._count("all_to_all", out.numel(), out.element_size())
        return list(torch.split(out, recv_sizes))

    def to_owners(self, rows: Sequence[torch.Tensor], params: Sequence[torch.Tensor], owners: Sequence[int]) -> dict[int, torch.Tensor]:
        """Fully sharded (:meth:`direct`): the whole tensor of each item this process owns, from the ``rows``
        of it (laid out as ``params[i]``) of the processes of the owner's replica: one all-to-all per dtype,
        each process receiving only what it owns (about ``P/W`` bytes where an all-gather brings ``P``). Keyed
        by item position."""
        out: dict[int, torch.Tensor] = {}
        me = self.rank
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(rows):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            device = rows[idx[0]].device
            layouts = {i: self._layout(params[i]) for i in idx}
            empty = rows[idx[0]].new_empty(0)
            send = [torch.cat([rows[i].reshape(-1) for i in idx if owners[i] == d and layouts[i][1][me] == layouts[i][1][d]]
                              or [empty]) for d in range(self.world)]
            mine = [i for i in idx if owners[i] == me]
            per_row = {i: math.prod(params[i].shape[1:]) for i in mine}

            def sent(i: int, s: int) -> int:  # what process s sends here of item i (its rows, from this replica)
                return self._rows(params[i], s) * per_row[i] if layouts[i][1][s] == layouts[i][1][me] else 0

            recv = self._all_to_all(send, [sum(sent(i, s) for i in mine) for s in range(self.world)], dtype, device)
            pieces: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in mine}
            for s, buf in enumerate(recv):
                for i, part in zip(mine, torch.split(buf, [sent(i, s) for i in mine])):
                    if layouts[i][1][s] == layouts[i][1][me]:
                        pieces[i].append((layouts[i][0][s], part))
            for i in mine:
                out[i] = torch.cat([t for _, t in sorted(pieces[i], key=lambda x: x[0])]).view(tuple(params[i].shape))
        return out

    def from_owners(
        self, results: Mapping[int, Sequence[torch.Tensor]], params: Sequence[torch.Tensor], owners: Sequence[int], counts: Sequence[int]
    ) -> list[list[torch.Tensor]]:
        """Fully sharded (:meth:`direct`): this process's rows of each item's ``counts[i]`` whole tensors, which the
        owner holds (``results[i]``, in ``params[i]``'s shape): one all-to-all per dtype (the parameters'), each
        process receiving only its rows (about ``P/W`` bytes per tensor under FSDP2, ``P/S`` under HSDP)."""
        out: list[list[torch.Tensor]] = [[] for _ in params]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            device = local(params[idx[0]]).device
            send = []
            for d in range(self.world):
                parts = []
                for i in (i for i in idx if owners[i] == self.rank):
                    shard, _, n = self._layout(params[i])  # type: ignore[misc]  # direct() checked every parameter
                    start = sum(self.chunks(params[i].shape[0], n)[: shard[d]])
                    stop = start + self._rows(params[i], d)
                    parts += [t[start:stop].to(dtype).reshape(-1) for t in results[i]]
                send.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device))
            per_row = {i: math.prod(params[i].shape[1:]) for i in idx}
            mine = {i: self._rows(params[i], self.rank) for i in idx}
            sizes = [sum(mine[i] * per_row[i] * counts[i] for i in idx if owners[i] == s) for s in range(self.world)]
            recv = self._all_to_all(send, sizes, dtype, device)
            for s, buf in enumerate(recv):
                items = [i for i in idx if owners[i] == s]
                parts_in = torch.split(buf, [mine[i] * per_row[i] for i in items for _ in range(counts[i])])
                k = 0
                for i in items:
                    for _ in range(counts[i]):
                        out[i].append(parts_in[k].view((mine[i], *params[i].shape[1:])))
                        k += 1
        return out

    def whole(self, rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Fully sharded: the whole tensor of which every process holds ``rows`` laid out as ``param`` (an
        all-gather over ``param``'s mesh; counted as the whole tensor received)."""
        t = _DTensor.from_local(
            rows, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        ).full_tensor()
        if self.active:
            self._count("all_gather", t.numel(), t.element_size())
        return t

    def _count(self, kind: str, numel: int, itemsize: int) -> None:
        self.traffic[kind] += numel * itemsize
        self.calls[kind] += 1

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks in place: one all-reduce per dtype through one flat buffer."""
        if not self.active or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            torch.distributed.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            self._count("all_reduce", flat.numel(), flat.element_size())
            for t, chunk in zip(ts, torch.split(flat, [t.numel() for t in ts])):
                t.copy_(chunk.view_as(t))

    def sizes(self, n: int) -> list[int]:
        """Every rank's ``n`` (e.g. its number of samples), in rank order."""
        if not self.active:
            return [n]
        mine = torch.tensor([n], dtype=torch.int64)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        torch.distributed.all_gather(out, mine, group=self.group)
        self._count("all_gather", self.world, 8)
        return [int(t) for t in out]

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's first row and the global row count, when each rank holds ``n`` consecutive rows."""
        sizes = self.sizes(n)
        return sum(sizes[: self.rank]), sum(sizes)

    def owners(self, costs: Sequence[tuple[str, float]]) -> list[int]:
        """The owner of each named block (:func:`assign_named`, cached); all rank 0 when inactive."""
        if not self.active:
            return [0] * len(costs)
        key = tuple(costs)
        if key not in self._owners:
            self._owners[key] = assign_named(key, self.world)
        table = self._owners[key]
        return [table[name] for name, _ in costs]

    def exchange(self, items: Sequence[Item], local: Mapping[int, Result], dtype: torch.dtype) -> list[Result]:
        """Every rank gets what the owners computed: one all-gather of one flat, padded buffer per rank.

        ``items[i] = (owner, shapes)``; this rank gives ``local[i] = (status, tensors)``
        for each item it owns (``tensors`` may be None: zeros are sent). The
        status travels with the tensors (e.g. 1: computed, 0: nothing, -1: failed).
        Values go through ``dtype`` (pick one that holds every item's dtype exactly).
        """
        if not self.active or not items:  # (every process has the same items: all return here, or none)
            return [local[i] for i in range(len(items))]
        sizes = [[math.prod(s) for s in shapes] for _, shapes in items]
        seg = [0] * self.world
        for (owner, _), n in zip(items, sizes):
            seg[owner] += 1 + sum(n)
        width = max(seg)
        buf = torch.zeros(width, dtype=dtype)
        at = 0
        for i, (owner, _) in enumerate(items):
            if owner != self.rank:
                continue
            status, tensors = local[i]
            buf[at] = status
            at += 1
            for t, n in zip(tensors or [None] * len(sizes[i]), sizes[i]):
                if t is not None:
                    buf[at : at + n] = t.reshape(-1)
                at += n
        gathered = [torch.empty(width, dtype=dtype) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, buf, group=self.group)
        self._count("all_gather", width * self.world, buf.element_size())
        cursor = [0] * self.world
        out: list[Result] = []
        for (owner, shapes), n in zip(items, sizes):
            src, at = gathered[owner], cursor[owner]
            status = float(src[at])
            at += 1
            tensors = []
            for shape, k in zip(shapes, n):
                tensors.append(src[at : at + k].view(tuple(shape)).clone())  # own memory: it may go into the state
                at += k
            cursor[owner] = at
            out.append((status, tensors if status > 0 else None))
        return out


class Ownership:
    """Which process owns each of a structure's blocks, and how the owners' results reach every process.

    A structure says what a block is (a name that is the same on every process, a
    cost) and what travels (the shapes of a result); this helper holds the owner
    tables (:func:`assign_named`, made once per set of blocks) and runs both
    modes of ``distributed.mode`` (docs/distributed.md) through :meth:`share`:

    * replicated — *owner computes, all receive*: each process computes the blocks
      it owns (an eigendecomposition, what is derived from it) and every process
      keeps every result;
    * sharded — *owner keeps, all receive updates*: only the owner keeps a block's
      state (:meth:`keeps`) and computes its part of the update; every process
      receives the updates.

    In one process every block is this process's and nothing travels.
    """

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.active = comm.active  # several processes (fixed with the process group)
        self.sharded = comm.sharded
        self._tables: dict[Hashable, dict[str, int]] = {}

    def owners(
        self, names: Sequence[str], key: Hashable, everything: Callable[[], Iterable[tuple[str, float]]]
    ) -> list[int]:
        """The owner of each named block.

        ``everything()`` gives every block the work is balanced over, ``(name, cost)``
        (e.g. ``Σ dim³`` of its eigendecompositions): a superset of ``names`` such as
        all blocks of a param group, so that a parameter without a gradient on some
        step moves no other block. It is called once per ``key``.
        """
        if not self.comm.active:
            return [self.comm.rank] * len(names)
        table = self._tables.get(key)
        if table is None:
            named = list(everything())
            table = self._tables[key] = dict(zip((n for n, _ in named), self.comm.owners(named)))
        return [table[n] for n in names]

    def mine(self, owner: int) -> bool:
        """Whether this process owns a block of ``owner``."""
        return owner == self.comm.rank

    def keeps(self, owner: int) -> bool:
        """Whether this process keeps the state of a block of ``owner``: every process does (replicated),
        or the owner alone (sharded)."""
        return not self.comm.sharded or owner == self.comm.rank

    def share(
        self,
        owners: Sequence[int] | None,
        shapes: Sequence[Sequence[Sequence[int]]],
        compute: Callable[[list[int]], Sequence[Result]],
        dtype: torch.dtype,
    ) -> list[Result]:
        """Owner computes, all receive: every block's ``(status, tensors)``.

        ``compute(indices)`` gives the result of each block this process owns
        (status ``> 0``: ``tensors`` of ``shapes[i]``; ``0``: nothing, e.g. no
        statistics yet; ``< 0``: a failure the others must know of); one all-gather
        (:meth:`Comm.exchange`, through ``dtype``) hands every process every block's,
        with ``tensors`` None where the status is not positive. ``owners=None``:
        this process computes every block and nothing travels (the blocks are its
        own, e.g. those it keeps in sharded mode).
        """
        if owners is None or not self.comm.active:
            return list(compute(list(range(len(shapes)))))
        mine = [i for i, o in enumerate(owners) if o == self.comm.rank]
        local = dict(zip(mine, compute(mine)))
        return self.comm.exchange(list(zip(owners, shapes)), local, dtype)
