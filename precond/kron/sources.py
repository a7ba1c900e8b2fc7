"""Where Kronecker units and their fresh factors come from: layers through forward hooks, or the gradient.

A source makes the units of a list of parameters once, computes each unit's
factors for this step (in the unit's dimension order), names what they are
for the non-finite check, cuts a group-aligned list of tensors into the units'
blocks and writes blocks back, and gives the eigenbasis mode its second-moment
samples:

* :class:`LayerSource` — ``[G, A]`` per Linear/Conv2d layer (K-FAC, KFC, KFLR;
  EKFAC's per-row moments), from :class:`LayerHooks` armed on curvature steps;
* :class:`GradientSource` — one Gram matrix per dimension of each block of the
  gradient (Shampoo, SOAP), blocks as Distributed Shampoo cuts them.

:class:`LayerHooks` (the layers of a structure's parameters and one
:class:`~precond.layers.Recorder` on them) is shared with ``kbfgs``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterable, Protocol

import torch
from torch import Tensor

from precond.block import Curvature, Direction, Environment, GroupStep, Served
from precond.distributed import kronecker_costs
from precond.errors import PipelineError
from precond.kron.units import Keys, Unit
from precond.layers import (
    Layer,
    Recorder,
    factor_dtype,
    find_layers,
    layer_factors,
    layer_rows,
    require_one_group,
    warn_silent,
)
from precond.linalg.kron import (
    BlockPartition,
    block_partition,
    mode_products,
    reassemble_blocks,
    shampoo_statistics,
    split_into_blocks,
)

MakeKeys = Callable[[str, int], Keys]  # (tag, number of factors) -> the unit's keys


class Source(Protocol):
    """What the Kronecker structure asks of where its units come from (a new source implements these)."""

    def before_closure(self, step: int) -> None:
        """Before the closure of ``step`` (arm hooks on the steps that need them)."""

    def after_step(self) -> None:
        """After every step (disarm hooks, drop what was recorded)."""

    def from_outputs(self, ctx: GroupStep, curvature: Curvature) -> None:
        """During a backward pass the user runs, while it passes the model's outputs: keep what needs their graph."""

    def units(self, params: list[Tensor], keys: MakeKeys) -> list[Unit]:
        """The units of ``params`` (made once per list), with their positions in it."""
        ...

    def name(self, env: Environment, u: Unit) -> str:
        """A name of ``u`` that is the same on every process (its owner is assigned by it)."""
        ...

    def together(self, params: list[Tensor]) -> list[tuple[list[int], float]]:
        """Fully sharded: the positions in ``params`` that one owner holds together, each set with what its
        state weighs there (the parameters' sizes and their factors' entries)."""
        ...

    def fresh(self, ctx: GroupStep, curvature: Curvature, units: list[Unit]) -> list[tuple[Unit, list[Tensor]]]:
        """This step's factors of each unit that has statistics, in the unit's dimension order."""
        ...

    def labels(self, ctx: GroupStep, u: Unit, fresh: list[Tensor]) -> tuple[tuple[int, ...], list[str]]:
        """For the non-finite check: the positions of ``u``'s parameters, and what each fresh factor is."""
        ...

    def cut(self, ctx: GroupStep, units: list[Unit], tensors: list[Tensor]) -> list[Tensor]:
        """Each unit's block of ``tensors`` (aligned with ``ctx.params``)."""
        ...

    def paste(self, ctx: GroupStep, units: list[Unit], blocks: list[Tensor], out: list[Tensor]) -> set[int]:
        """Write ``blocks`` back into ``out`` (in its tensors' dtypes); the positions written."""
        ...

    def moment_samples(self, ctx: GroupStep, units: list[Unit], rotated: list[Tensor] | None = None) -> list[Tensor]:
        """The eigenbasis mode's new second-moment sample per unit, in its current bases (global over processes).
        ``rotated``: the units' gradient blocks in their bases when the caller has them already (the eigenbasis
        first moment), for a source whose sample is made from them."""
        ...


def assemble(
    source: Source, ctx: GroupStep, units: list[Unit], blocks: list[Tensor], direction: Direction
) -> list[Tensor]:
    """The direction's tensors with the units' blocks written back (in each tensor's dtype), all owned by the
    pipeline: blocks are new tensors; only what no unit covers is copied (when the direction is someone's state)."""
    out = list(direction.tensors)
    written = source.paste(ctx, units, blocks, out)
    if not direction.owned:
        out = [t if i in written else t.clone() for i, t in enumerate(out)]
    return out


# --- layers -------------------------------------------------------------------------------


class LayerHooks:
    """The Linear/Conv2d layers of the parameters a structure serves and one :class:`Recorder` on them.

    Made once per optimizer (``who`` names the structure in messages); the hooks record only while
    armed (:meth:`arm` before the closure of a step that needs them, :meth:`disarm` after every step).
    """

    def __init__(
        self, params: Iterable[Tensor], served: Served, who: str, capture_grads: bool, owner: object
    ) -> None:
        env = served.env
        self.who = f"recipe '{env.recipe}' ({who})"
        self.info = env.info
        self.layers: dict[Tensor, Layer] = find_layers(params, env.info, self.who)
        require_one_group(self.layers.values(), list(served.all_groups), who)
        self.recorder = Recorder(dict.fromkeys(self.layers.values()), capture_grads, owner=owner)

    def add(self, params: list[Tensor]) -> None:
        """The layers of parameters added to the optimizer after it was built (``add_param_group``), hooked."""
        new = find_layers([p for p in params if p not in self.layers], self.info, self.who)
        self.layers.update(new)
        self.recorder.add(new.values())

    def arm(self) -> None:
        self.recorder.arm()

    def disarm(self) -> None:
        self.recorder.disarm()

    def of(self, params: list[Tensor]) -> list[tuple[Layer, int | None, int | None]]:
        """The layers of ``params`` in order, each with the positions of its weight and bias in ``params``."""
        pos = {p: i for i, p in enumerate(params)}
        layers: dict[Layer, None] = {}
        for p in params:
            layer = self.layers.get(p)
            if layer is None:
                raise PipelineError(
                    "a parameter was added to the optimizer after it was built; Kronecker factors know only the "
                    "layers seen at build time"
                )
            layers[layer] = None
        return [(layer, pos.get(layer.weight), pos.get(layer.bias)) for layer in layers]


_LAYER_FACTORS = ("G, of the output gradients", "A, of the inputs")  # a layer unit's factors, in order


def _layer(u: Unit) -> Layer:
    assert u.layer is not None  # the units of a LayerSource
    return u.layer


class LayerSource:
    """K-FAC's factors per layer: ``G = w Σ g gᵀ`` of the output gradients (the curvature supplies
    them) and ``A = (1/R) Σ a aᵀ`` of the inputs, recorded by hooks armed on curvature steps only.
    ``keep_rows``: also keep this step's rows for EKFAC's per-row second moments."""

    def __init__(self, served: Served, curvature: Curvature, keep_rows: bool, owner: object) -> None:
        self.hooks = LayerHooks(
            served.params, served, "structure kronecker", getattr(curvature, "capture_output_grads", False), owner
        )
        self.curvature = curvature
        self.keep_rows = keep_rows
        self.param_of = served.env.param_of  # fully sharded: a step's shard or an owner's stand-in -> its parameter
        self.rows: dict[Layer, tuple[Tensor, Tensor, float]] = {}  # this step's (input rows, gradient rows, weight)
        # fully sharded: this step's factors of every layer, made on every process from its batch and averaged in
        # place by the optimizer before the owners read them (:meth:`fresh`)
        self.pooled: dict[Layer, list[Tensor]] | None = None
        self.reported: set[int] = set()  # layers whose silent hooks were reported

    @property
    def recorder(self) -> Recorder:
        return self.hooks.recorder

    def before_closure(self, step: int) -> None:
        self.hooks.disarm()
        if self.curvature.due(step):
            self.hooks.arm()

    def added(self, params: list[Tensor]) -> None:
        self.hooks.add(params)

    def after_step(self) -> None:
        self.hooks.disarm()
        self.rows.clear()
        self.pooled = None

    def from_outputs(self, ctx: GroupStep, curvature: Curvature) -> None:
        """During a backward pass the user runs: the output gradients the curvature draws from the outputs'
        graph (sampled labels, the likelihood's Hessian root), for this forward pass's layer calls."""
        record = getattr(curvature, "record_output_grads", None)
        if callable(record):
            record(ctx, self.recorder)

    def units(self, params: list[Tensor], keys: MakeKeys) -> list[Unit]:
        k = keys("0", 2)
        return [
            Unit(layer.params[0], "0", (layer.d_out, layer.d_in), 1, k, layer, (iw, ib))
            for layer, iw, ib in self.hooks.of([self.param_of(p) for p in params])
        ]

    def together(self, params: list[Tensor]) -> list[tuple[list[int], float]]:
        """Fully sharded: the positions in ``params`` that one owner holds together (a layer's weight and bias),
        with what their state weighs there (their sizes and the factors' ``d_out² + d_in²``)."""
        out = []
        for layer, iw, ib in self.hooks.of([self.param_of(p) for p in params]):
            where = [i for i in (iw, ib) if i is not None]
            out.append((where, float(sum(params[i].numel() for i in where) + layer.d_out**2 + layer.d_in**2)))
        return out

    def name(self, env: Environment, u: Unit) -> str:
        return f"layer:{_layer(u).name}"

    def fresh(self, ctx: GroupStep, curvature: Curvature, units: list[Unit]) -> list[tuple[Unit, list[Tensor]]]:
        """Each unit's ``[G, A]`` of this step. Fully sharded, every process makes every layer's from its own
        batch (the pipeline's ctx of its rows; the optimizer averages them in place over the processes) and the
        owners' ctxs, whose pipeline sees one process, read those."""
        if self.pooled is not None and not ctx.env.comm.fully_sharded:
            return [(u, self.pooled[_layer(u)]) for u in units if _layer(u) in self.pooled]
        if ctx.env.comm.fully_sharded and self.pooled is None:  # (every param group's layers, until the step ends)
            self.pooled = {}
        est = curvature.kronecker(ctx, self.recorder)  # type: ignore[attr-defined]  # it fills Kronecker factors
        out: list[tuple[Unit, list[Tensor]]] = []
        silent = []
        for u in units:
            layer = _layer(u)
            if est.zero:  # torch's state-initialisation step: the state's keys and shapes, no statistics
                like = ctx.grads[next(i for i in u.where if i is not None)]
                zeros = [like.new_zeros(d, d, dtype=factor_dtype(like)) for d in (layer.d_out, layer.d_in)]
                out.append((u, zeros))
                if self.pooled is not None:
                    self.pooled[layer] = zeros
                if self.keep_rows:  # no rows: EKFAC's second-moment sample is zero
                    self.rows[layer] = (zeros[1][:0], zeros[0][:0].unsqueeze(0), 1.0)
                continue
            rec = self.recorder.records.get(layer)
            grads = (est.output_grads or {}).get(layer)
            if rec is None or not rec.inputs or not grads:
                silent.append(layer)
                continue
            a_rows, g_rows = layer_rows(layer, rec, grads)
            a, g = layer_factors(a_rows, g_rows, est.weight)
            out.append((u, [g, a]))
            if self.pooled is not None:
                self.pooled[layer] = [g, a]
            if self.keep_rows:
                self.rows[layer] = (a_rows, g_rows, est.weight)
        fresh = [l for l in silent if id(l) not in self.reported]
        if fresh:
            self.reported.update(id(l) for l in fresh)
            warn_silent(fresh, f"structure kronecker (recipe '{ctx.env.recipe}')")
        return out

    def labels(self, ctx: GroupStep, u: Unit, fresh: list[Tensor]) -> tuple[tuple[int, ...], list[str]]:
        k = len(fresh)
        params = tuple(i for i in u.where if i is not None)
        return params, [
            f"Kronecker factor {j} of {k} ({_LAYER_FACTORS[j]}), dims {f.shape[-1]}" for j, f in enumerate(fresh)
        ]

    def cut(self, ctx: GroupStep, units: list[Unit], tensors: list[Tensor]) -> list[Tensor]:
        out = []
        for u in units:
            iw, ib = u.where
            out.append(_layer(u).to_matrix(None if iw is None else tensors[iw], None if ib is None else tensors[ib]))
        return out

    def paste(self, ctx: GroupStep, units: list[Unit], blocks: list[Tensor], out: list[Tensor]) -> set[int]:
        written: set[int] = set()
        for u, y in zip(units, blocks):
            for i, t in zip(u.where, _layer(u).from_matrix(y)):
                if i is not None and t is not None:
                    out[i] = t if t.dtype == out[i].dtype else t.to(out[i].dtype)
                    written.add(i)
        return written

    def moment_samples(self, ctx: GroupStep, units: list[Unit], rotated: list[Tensor] | None = None) -> list[Tensor]:
        """EKFAC: ``w Σ_r (Q_Gᵀ g_r)² (Q_Aᵀ a_r)²ᵀ`` per unit, averaged over the processes' batches (``rotated``
        is not used: the sample is made of the per-row gradients)."""
        out = []
        for u in units:
            q_g, q_a = u.bases()
            a_rows, g_rows, w = self.rows[_layer(u)]
            a2 = (a_rows.to(q_a.dtype) @ q_a).square()
            g2 = (g_rows.to(q_g.dtype) @ q_g).square().sum(0)
            out.append((g2.T @ a2) * w)
        ctx.evaluation.mean_(out)
        return out


# --- the gradient ------------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _partition(shape: tuple[int, ...], max_dim: int, merge_dims: bool) -> BlockPartition:
    if merge_dims:
        return block_partition(shape, max_dim, merge_dims=True)
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    return block_partition(squeezed, max_dim, merge_dims=False)


def _gram(x: Tensor) -> list[Tensor]:
    """Shampoo's per-dimension statistics of one block."""
    if x.dim() == 2:
        return [x @ x.T, x.T @ x]
    if x.dim() == 1:
        return [torch.outer(x, x)]
    return shampoo_statistics(x)


class GradientSource:
    """Shampoo's factors: for each block of order ``k`` of the gradient, ``F_i = G_(i) G_(i)ᵀ``. Size-1
    dims are dropped (``merge_dims`` also merges small neighbours) and dims above ``max_dim`` cut."""

    def __init__(self, max_dim: int, merge_dims: bool, precondition_1d: bool = True) -> None:
        self.max_dim = max_dim
        self.merge_dims = merge_dims
        self.precondition_1d = precondition_1d  # False: a block of one dimension is a diagonal unit (no factor)

    def before_closure(self, step: int) -> None:
        """Nothing to arm: the factors come from the gradient."""

    def after_step(self) -> None:
        """Nothing recorded."""

    def from_outputs(self, ctx: GroupStep, curvature: Curvature) -> None:
        """Nothing: the factors come from the gradient."""

    def partition(self, p: Tensor) -> BlockPartition:
        return _partition(tuple(p.shape), self.max_dim, self.merge_dims)

    def units(self, params: list[Tensor], keys: MakeKeys) -> list[Unit]:
        out = []
        for i, p in enumerate(params):
            for b, dims in enumerate(self.partition(p).block_shapes):
                diagonal = not self.precondition_1d and len(dims) == 1
                out.append(Unit(p, str(b), dims, len(dims), keys(str(b), len(dims)), None, (i, b), diagonal))
        return out

    def name(self, env: Environment, u: Unit) -> str:
        return f"{env.index(u.holder)}#{u.tag}"

    def together(self, params: list[Tensor]) -> list[tuple[list[int], float]]:
        """Each parameter alone, with its size and its blocks' factors' ``Σ d²``."""
        return [
            ([i], float(p.numel()) + sum(c for _, c in kronecker_costs(
                {"p": tuple(p.shape)}, self.max_dim, merge_dims=self.merge_dims, kind="memory")))
            for i, p in enumerate(params)
        ]

    def fresh(self, ctx: GroupStep, curvature: Curvature, units: list[Unit]) -> list[tuple[Unit, list[Tensor]]]:
        est = curvature.kronecker(ctx, None)  # type: ignore[attr-defined]  # it fills Kronecker factors
        return [(u, [] if u.diagonal else _gram(x)) for u, x in zip(units, self.cut(ctx, units, est.gradients))]

    def labels(self, ctx: GroupStep, u: Unit, fresh: list[Tensor]) -> tuple[tuple[int, ...], list[str]]:
        k = len(fresh)
        total = self.partition(ctx.params[u.where[0]]).num_blocks
        where = f"block {u.where[1]} of {total} {list(u.dims)}, " if total > 1 else ""
        return (u.where[0],), [f"{where}Kronecker factor {j} of {k}, dims {f.shape[-1]}" for j, f in enumerate(fresh)]

    def cut(self, ctx: GroupStep, units: list[Unit], tensors: list[Tensor]) -> list[Tensor]:
        split: dict[int, list[Tensor]] = {}
        out = []
        for u in units:
            i, b = u.where
            t = tensors[i]
            if t.shape == u.dims:  # the whole tensor is the unit's one block (no size-1 dims, no cut)
                out.append(t)
                continue
            if i not in split:
                part = self.partition(ctx.params[i])
                split[i] = split_into_blocks(tensors[i].reshape(part.shape), part)
            out.append(split[i][b])
        return out

    def paste(self, ctx: GroupStep, units: list[Unit], blocks: list[Tensor], out: list[Tensor]) -> set[int]:
        per_param: dict[int, list[tuple[int, Tensor]]] = {}
        for u, y in zip(units, blocks):
            per_param.setdefault(u.where[0], []).append((u.where[1], y))
        for i, ys in per_param.items():
            p = ctx.params[i]
            if len(ys) == 1 and ys[0][1].shape == p.shape:  # one block, the whole tensor
                y = ys[0][1]
                out[i] = y if y.dtype == out[i].dtype else y.to(out[i].dtype)
                continue
            part = self.partition(p)
            if len(ys) == part.num_blocks:
                pieces = [y for _, y in ys]
            else:  # some blocks pass unpreconditioned (no preconditioner yet)
                pieces = split_into_blocks(out[i].reshape(part.shape), part)
                for b, y in ys:
                    pieces[b] = y
            y = reassemble_blocks(pieces, part).reshape(p.shape)
            out[i] = y if y.dtype == out[i].dtype else y.to(out[i].dtype)
        return set(per_param)

    def moment_samples(self, ctx: GroupStep, units: list[Unit], rotated: list[Tensor] | None = None) -> list[Tensor]:
        """SOAP: the squared batch gradient in the eigenbasis, ``(Q_1ᵀ G Q_2)²`` (mode products for other orders;
        ``rotated``: ``Q_1ᵀ G Q_2`` already computed); DDP has averaged the gradient already."""
        if rotated is not None:
            return [r.square() for r in rotated]
        out = []
        for u, g in zip(units, self.cut(ctx, units, ctx.grads)):
            if u.diagonal:  # the identity as its basis
                out.append(g.to(factor_dtype(g)).square())
                continue
            qs = u.bases()
            out.append(mode_products(g.to(qs[0].dtype), [q.mT for q in qs]).square())
        return out
