"""Kronecker-factored structure: K-FAC's layer factors and Shampoo's per-dimension gradient factors.

A *block* is a gradient-shaped tensor ``X`` of order ``k`` with one symmetric
PSD factor ``F_i`` per dimension; the curvature it stands for is

    C = (F_1 ⊗ … ⊗ F_k)^(1/s)

with ``s = 1`` for K-FAC layer factors (``X = [dW | db]``, factors ``[G, A]``,
``C = A ⊗ G``) and ``s = k`` for Shampoo's gradient factors (the ``k``-th root
makes ``inverse_root(p=2)`` the paper's ``F_i^(-1/(2k))``, and makes Adam,
Adagrad and Shampoo the same transform). A spectral transform ``f`` (``inverse``,
``inverse_root``) acts through one eigendecomposition per factor, recomputed
on the transform's refresh steps (``every``), batched over factors of equal
size, and cached in the optimizer state between refreshes. See
:class:`Kronecker` for the damping forms and the eigenbasis mode.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from precond.block import Curvature, Direction, Estimate, GroupStep, Needs, Structure, Transform
from precond.errors import PipelineError
from precond.guard import all_finite
from precond.layers import Layer, Recorder, factor_dtype, find_layers, layer_factors, layer_rows, require_one_group, warn_silent
from precond.linalg.kron import BlockPartition, block_partition, mode_products, reassemble_blocks, shampoo_statistics, split_into_blocks
from precond.linalg.spectral import EighFailureError, EighResult, matrix_function, robust_eigh
from precond.registry import register

# Per-optimizer runtime objects (hooks, layer maps), kept off the frozen block and out of the
# optimizer's own attributes; an entry disappears with its optimizer.
_RUNTIMES: weakref.WeakKeyDictionary[Any, dict[int, _Runtime]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class _Runtime:
    curvature: Curvature
    layers: dict[Tensor, Layer] = field(default_factory=dict)
    recorder: Recorder | None = None
    reported: set[int] = field(default_factory=set)  # layers whose silent hooks were reported
    rows: dict[Layer, tuple[Tensor, Tensor, float]] = field(default_factory=dict)  # eigenbasis (EKFAC): this step's rows
    owners: dict[tuple[int, ...], dict[str, int]] = field(default_factory=dict)  # per param group: block name -> rank
    units: dict[tuple[int, ...], list[_Unit]] = field(default_factory=dict)  # per list of parameters (by id): its blocks


@dataclass(frozen=True)
class _Keys:
    """A block's state keys, formatted once: rebuilding the strings on every access cost a small model's step dearly."""

    factor: tuple[str, ...]  # one per dimension
    basis: tuple[str, ...]
    root: tuple[str, ...]
    scale: str
    moment: str
    refreshed: str
    failures: str
    # per parameter, shared by the blocks cut from it
    updates: str
    updated_at: str
    moment_updates: str
    failures_total: str

    def own(self) -> list[str]:
        """Every key that holds this block's own tensors (dropped by processes that do not own it)."""
        return [*self.factor, *self.basis, *self.root, self.scale, self.moment, self.refreshed, self.failures]


@dataclass(eq=False)
class _Unit:
    """One block: where its factors live in the state and where it sits in the group's tensors.

    Under torch.distributed each unit has one owner (:meth:`Kronecker._owners`).
    """

    holder: Tensor  # the parameter whose state holds the block (gradient factors: the one it is cut from)
    tag: str  # the block's index within the holder's state
    dims: tuple[int, ...]  # the block's shape: one factor per dimension
    share: int  # C = (⊗ factors)^(1/share)
    keys: _Keys
    layer: Layer | None = None
    where: tuple[Any, ...] = ()  # layer: (weight index, bias index) in ctx.params; gradient: (param index, block index)
    state: dict[str, Any] = field(default_factory=dict)  # the holder's state, bound by Kronecker._units on every call


_LAYER_FACTORS = ("G, of the output gradients", "A, of the inputs")  # a layer unit's factors, in order


@lru_cache(maxsize=1024)
def _partition(shape: tuple[int, ...], max_dim: int, merge_dims: bool) -> BlockPartition:
    if merge_dims:
        return block_partition(shape, max_dim, merge_dims=True)
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    return block_partition(squeezed, max_dim, merge_dims=False)


def _rotate(x: Tensor, qs: list[Tensor], into: bool) -> Tensor:
    """Into the eigenbasis (``Q_1ᵀ X Q_2`` for a matrix) or back out of it (``Q_1 X Q_2ᵀ``), in the bases' dtype."""
    x = x.to(qs[0].dtype)
    if x.dim() == 2:
        return qs[0].T @ x @ qs[1] if into else qs[0] @ x @ qs[1].T
    return mode_products(x, [q.T if into else q for q in qs])


@register("structure", "kronecker")
class Kronecker(Structure):
    """Kronecker factors per layer (K-FAC, KFC, KFLR) or per gradient dimension (Shampoo), with cached eigenbases.

    ``factors: layer``: for each ``Linear``/``Conv2d``, ``A = E[a aᵀ]`` of the
    layer inputs (with the bias as a homogeneous coordinate when the bias is
    in the same rule) and ``G = E[δ δᵀ]`` of the output gradients, which the
    curvature supplies (``empirical_fisher``: the main backward; ``sampled_fisher``:
    one extra backward at sampled labels; ``gauss_newton``: the likelihood's
    Hessian root, KFLR). Module forward hooks record on curvature steps only;
    scaling and conv patches as in :mod:`precond.layers`. ``factors: gradient``:
    for a gradient of order ``k``, ``F_i = G_(i) G_(i)ᵀ`` (all other dims
    contracted); size-1 dims are dropped (``merge_dims`` also merges small
    neighbours as Distributed Shampoo does) and dims above ``max_dim`` are cut
    into blocks, each with its own factors.

    Accumulation: ``sum`` (Shampoo, from ``init·I``), ``ema`` (K-FAC; read as
    ``F / (1 - βⁿ)`` with ``bias_correction``), or ``none`` (this step's
    factors only: with ``inverse_root`` the Muon-like orthogonal polar factor).

    ``damping_form`` says how the transform's damping ``λ`` enters (a matter of
    the structure, so one ``inverse`` serves all): ``exact`` applies ``f`` to
    ``C``'s eigenvalues, ``(A ⊗ G + λI)⁻¹`` through both eigenbases (4
    products per step); ``per_factor`` damps each factor, ``f_i(F_i + λI)``
    (kfac-pytorch ``inverse``, Distributed Shampoo's ε), and ``factored`` is
    Martens & Grosse's π-adjusted split ``F_i + π_i λ^(1/k) I`` with
    ``π_i = t_i / (Π_j t_j)^(1/k)``, ``t_i = tr(F_i)/dim F_i`` (for K-FAC
    ``A + π√λ I``, ``G + √λ/π I``); both precompute one matrix per factor (2
    products per step). Per factor the power is ``-1/(p·s)``.

    ``spectrum: eigenbasis`` (EKFAC, SOAP): keep the factors' eigenbasis ``Q`` but
    replace ``C``'s eigenvalues by an EMA ``D`` of squared rotated gradients,
    ``f(D̂)`` elementwise in the eigenbasis: Adam in the Kronecker eigenbasis with
    ``inverse_root``, EKFAC's corrected natural gradient with ``inverse``. ``D``
    is updated on curvature steps from per-row gradients (layer factors, EKFAC)
    or the batch gradient (gradient factors, SOAP), and kept across refreshes.

    Robustness: a factor with NaN/Inf or a failed ``eigh`` (after a float64
    retry) keeps the block's previous preconditioner (none before the first
    success: the direction passes unchanged), counts the failure in the state
    (``structure.failures.*``) and raises after ``max_failures`` in a row.
    """

    form: ClassVar[str] = "kronecker"

    factors: Literal["layer", "gradient"] = Field("layer", description="layer: K-FAC input/output-gradient factors; gradient: Shampoo's per-dimension Gram matrices")
    accumulate: Literal["sum", "ema", "none"] = Field("ema", description="sum (Shampoo), ema (K-FAC), none (this step only: Muon-like)")
    beta: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay of the factors (ema only)")
    bias_correction: bool = Field(False, description="read the EMA factors as F / (1 - beta^n)")
    init: float = Field(0.0, ge=0.0, description="initial factors init*I (Shampoo's epsilon; 1 for K-FAC from the identity)")
    damping_form: Literal["exact", "factored", "per_factor"] = Field(
        "exact", description="how the transform's damping enters: exact (C + damping), factored (pi-adjusted per factor), per_factor"
    )
    spectrum: Literal["factors", "eigenbasis"] = Field(
        "factors", description="factors: eigenvalues of the factors; eigenbasis: an EMA of squared gradients in their eigenbasis (EKFAC, SOAP)"
    )
    eigenbasis_beta: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay of the eigenbasis second moment (eigenbasis only)")
    eigenbasis_bias_correction: bool = Field(True, description="divide the eigenbasis second moment by 1 - beta^n")
    max_dim: int = Field(1024, ge=1, description="gradient factors: dimensions above this are split into blocks")
    merge_dims: bool = Field(False, description="gradient factors: merge neighbouring dimensions while the product stays <= max_dim")
    float64: bool = Field(False, description="eigendecompose in float64")
    max_failures: int = Field(5, ge=1, description="raise after this many consecutive failed eigendecompositions of a block")

    def needs(self) -> Needs:
        # layer factors come from hooks armed before the forward pass: the closure must run inside step()
        return Needs(hooks=True, closure=True) if self.factors == "layer" else Needs()

    def supports(self, transform: Transform) -> bool:
        method = getattr(transform, "kronecker", None)
        if not callable(method):
            return False
        return self.damping_form == "exact" or self.spectrum == "eigenbasis" or method() is not None

    def recipe_problems(self, curvature: Curvature) -> list[tuple[str, str]]:
        """Validation, with the recipe (``setup`` checks the same when built without it): the curvature
        must fill these factors. ``(path in the recipe, message)``."""
        kinds = getattr(curvature, "kronecker_factors", frozenset())
        if self.factors in kinds:
            return []
        fills = ", ".join(sorted(kinds)) or "none"
        return [(
            "structure.factors",
            f"curvature '{curvature.name}' cannot fill Kronecker factors '{self.factors}' (it fills: {fills}); "
            + ("gradient factors (Shampoo) are Gram matrices of the batch gradient: use curvature empirical_fisher"
               if self.factors == "gradient" else "use empirical_fisher, sampled_fisher or gauss_newton"),
        )]

    # --- lifecycle ------------------------------------------------------------------------

    def setup(self, optimizer: Any) -> None:
        table = _RUNTIMES.setdefault(optimizer, {})
        if id(self) in table:
            return
        pipes = [p for p in optimizer.pipelines.values() if p.structure is self]
        curvature = pipes[0].curvature
        kinds = getattr(curvature, "kronecker_factors", frozenset())
        if self.factors not in kinds:
            fills = ", ".join(sorted(kinds)) or "none"
            raise PipelineError(
                f"curvature '{curvature.name}' cannot fill Kronecker factors '{self.factors}' (it fills: {fills}); "
                + ("gradient factors (Shampoo) are Gram matrices of the batch gradient: use curvature empirical_fisher"
                   if self.factors == "gradient" else "use empirical_fisher, sampled_fisher or gauss_newton")
            )
        if optimizer.comm.sharded and self.factors == "layer" and self.spectrum == "eigenbasis":
            raise PipelineError(
                "structure kronecker with factors: layer and spectrum: eigenbasis (EKFAC) needs every process's "
                "per-row gradients in each block's eigenbasis, which distributed.mode: sharded keeps on one process "
                "only: use distributed.mode: replicated"
            )
        rt = _Runtime(curvature)
        if self.factors == "layer":
            params = [q for pipe in pipes for q in optimizer.pipeline_params(pipe)]
            rt.layers = find_layers(params, optimizer.param_info, f"recipe '{optimizer.recipe.name}' (structure kronecker, factors: layer)")
            require_one_group(rt.layers.values(), optimizer.param_groups, "structure kronecker")
            rt.recorder = Recorder(dict.fromkeys(rt.layers.values()), getattr(curvature, "capture_output_grads", False), owner=optimizer)
        table[id(self)] = rt

    def _runtime(self, optimizer: Any) -> _Runtime:
        rt = _RUNTIMES.get(optimizer, {}).get(id(self))
        if rt is None:
            raise PipelineError("structure 'kronecker' runs inside a precond Optimizer (its setup was not called)")
        return rt

    def before_closure(self, optimizer: Any, step: int) -> None:
        rt = _RUNTIMES.get(optimizer, {}).get(id(self))
        if rt is not None and rt.recorder is not None:
            rt.recorder.disarm()
            if rt.curvature.due(step):
                rt.recorder.arm()

    def after_step(self, optimizer: Any) -> None:
        rt = _RUNTIMES.get(optimizer, {}).get(id(self))
        if rt is not None:
            if rt.recorder is not None:
                rt.recorder.disarm()
            rt.rows.clear()

    # --- units ------------------------------------------------------------------------------

    def _units(self, ctx: GroupStep, rt: _Runtime, params: list[Tensor] | None = None) -> list[_Unit]:
        """The blocks of ``ctx.params`` (or of ``params``, for the ownership table), bound to their state dicts.

        The blocks depend only on which parameters are present, so they are made once per such list; the
        state dicts are looked up on every call, since ``load_state_dict`` replaces them.
        """
        params = ctx.params if params is None else params
        key = tuple(map(id, params))  # the units hold every parameter: an id is not reused while cached
        units = rt.units.get(key)
        if units is None:
            units = rt.units[key] = self._make_units(rt, params)
        state = ctx.optimizer.state
        for u in units:
            u.state = state[u.holder]
        return units

    def _make_units(self, rt: _Runtime, params: list[Tensor]) -> list[_Unit]:
        """The blocks of ``params``, with their positions in that list."""
        if self.factors == "gradient":
            units: list[_Unit] = []
            for i, p in enumerate(params):
                part = _partition(tuple(p.shape), self.max_dim, self.merge_dims)
                for b, dims in enumerate(part.block_shapes):
                    units.append(_Unit(p, str(b), dims, len(dims), self._keys(str(b), len(dims)), None, (i, b)))
            return units
        pos = {p: i for i, p in enumerate(params)}
        layers: dict[Layer, None] = {}
        for p in params:
            layer = rt.layers.get(p)
            if layer is None:
                raise PipelineError("a parameter was added to the optimizer after it was built; Kronecker factors know only the layers seen at build time")
            layers[layer] = None
        keys = self._keys("0", 2)
        return [
            _Unit(layer.params[0], "0", (layer.d_out, layer.d_in), 1, keys, layer, (pos.get(layer.weight), pos.get(layer.bias)))
            for layer in layers
        ]

    def _keys(self, tag: str, k: int) -> _Keys:
        def per_factor(what: str) -> tuple[str, ...]:
            return tuple(self.key(f"{what}.{tag}.{j}") for j in range(k))

        return _Keys(
            per_factor("factor"), per_factor("basis"), per_factor("root"),
            *(self.key(f"{what}.{tag}") for what in ("scale", "moment", "refreshed", "failures")),
            *(self.key(what) for what in ("updates", "updated_at", "moment_updates", "failures_total")),
        )

    # --- several processes: who owns which block ---------------------------------------------

    @staticmethod
    def _name(optimizer: Any, u: _Unit) -> str:
        if u.layer is not None:
            return f"layer:{u.layer.name}"
        return f"{optimizer.index_of(u.holder)}#{u.tag}"

    def _owners(self, ctx: GroupStep, rt: _Runtime, units: list[_Unit]) -> list[int]:
        """Each unit's owner: :func:`precond.distributed.assign_named` over every block of the param
        group (cost: one ``dim³`` per factor), a pure function of the shapes and the process count."""
        comm = ctx.optimizer.comm
        if not comm.active:
            return [0] * len(units)
        key = tuple(id(p) for p in ctx.group["params"])
        if key not in rt.owners:
            everything = self._units(ctx, rt, params=[p for p in ctx.group["params"] if p.requires_grad])
            costs = [(self._name(ctx.optimizer, u), float(sum(d**3 for d in u.dims))) for u in everything]
            rt.owners[key] = dict(zip((n for n, _ in costs), comm.owners(costs)))
        table = rt.owners[key]
        return [table[self._name(ctx.optimizer, u)] for u in units]

    def _drop(self, u: _Unit) -> None:
        for key in u.keys.own():
            u.state.pop(key, None)

    def _blocks(self, ctx: GroupStep, units: list[_Unit], tensors: list[Tensor]) -> list[Tensor]:
        """Each unit's block of ``tensors`` (a group-aligned list)."""
        out: list[Tensor] = []
        split: dict[int, list[Tensor]] = {}
        for u in units:
            if u.layer is not None:
                iw, ib = u.where
                out.append(u.layer.to_matrix(None if iw is None else tensors[iw], None if ib is None else tensors[ib]))
                continue
            i, b = u.where
            if i not in split:
                p = ctx.params[i]
                part = _partition(tuple(p.shape), self.max_dim, self.merge_dims)
                split[i] = split_into_blocks(tensors[i].reshape(part.shape), part)
            out.append(split[i][b])
        return out

    def _assemble(self, ctx: GroupStep, units: list[_Unit], blocks: list[Tensor], direction: Direction) -> list[Tensor]:
        """The direction's tensors with the units' blocks written back, all owned by the pipeline.

        Blocks are new tensors; only what no unit covers is copied (when the direction is someone's state).
        """
        out = list(direction.tensors)
        written: set[int] = set()
        per_param: dict[int, list[Tensor]] = {}
        for u, y in zip(units, blocks):
            if u.layer is not None:
                w, b = u.layer.from_matrix(y)
                iw, ib = u.where
                if iw is not None:
                    out[iw] = w  # type: ignore[assignment]
                    written.add(iw)
                if ib is not None:
                    out[ib] = b  # type: ignore[assignment]
                    written.add(ib)
            else:
                per_param.setdefault(u.where[0], []).append(y)
        for i, ys in per_param.items():
            p = ctx.params[i]
            part = _partition(tuple(p.shape), self.max_dim, self.merge_dims)
            out[i] = reassemble_blocks(ys, part).reshape(p.shape)
            written.add(i)
        if not direction.owned:
            out = [t if i in written else t.clone() for i, t in enumerate(out)]
        return out

    # --- statistics ----------------------------------------------------------------------------

    def _ensure(self, u: _Unit, like: Tensor) -> None:
        dtype = factor_dtype(like)
        for key, n in zip(u.keys.factor, u.dims):
            if key not in u.state:
                u.state[key] = self.init * torch.eye(n, dtype=dtype, device=like.device)
        u.state.setdefault(u.keys.updates, 0)

    def _batch(self, ctx: GroupStep, curvature: Curvature) -> list[tuple[_Unit, list[Tensor]]]:
        """This step's factors per unit (in the unit's dimension order), computed once per group and step."""
        key = self.key("batch")
        if key in ctx.extra:
            return ctx.extra[key]
        rt = self._runtime(ctx.optimizer)
        units = self._units(ctx, rt)
        est = curvature.kronecker(ctx, rt.recorder)  # type: ignore[attr-defined]
        out: list[tuple[_Unit, list[Tensor]]] = []
        if self.factors == "layer":
            silent = []
            for u in units:
                layer = u.layer
                assert layer is not None and rt.recorder is not None
                rec = rt.recorder.records.get(layer)
                grads = (est.output_grads or {}).get(layer)
                if rec is None or not rec.inputs or not grads:
                    silent.append(layer)
                    continue
                a_rows, g_rows = layer_rows(layer, rec, grads)
                a, g = layer_factors(a_rows, g_rows, est.weight)
                out.append((u, [g, a]))
                if self.spectrum == "eigenbasis":
                    rt.rows[layer] = (a_rows, g_rows, est.weight)
            fresh = [l for l in silent if id(l) not in rt.reported]
            if fresh:
                rt.reported.update(id(l) for l in fresh)
                warn_silent(fresh, f"structure kronecker (recipe '{ctx.optimizer.recipe.name}')")
        else:
            for u, x in zip(units, self._blocks(ctx, units, est.gradients)):
                out.append((u, _gram(x)))
        ctx.extra[key] = out
        return out

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """Every fresh factor, with its parameter(s) and its place: ``Kronecker factor j of k, dims n``
        (K-FAC: ``G`` of the output gradients is factor 0, ``A`` of the inputs factor 1; a gradient cut
        into blocks also names the block)."""
        out: list[Estimate] = []
        for u, fresh in self._batch(ctx, curvature):
            k = len(fresh)
            if u.layer is not None:
                params = tuple(i for i in u.where if i is not None)
                labels = [f"Kronecker factor {j} of {k} ({_LAYER_FACTORS[j]}), dims {f.shape[-1]}" for j, f in enumerate(fresh)]
            else:
                params = (u.where[0],)
                total = len(_partition(tuple(ctx.params[u.where[0]].shape), self.max_dim, self.merge_dims).block_shapes)
                where = f"block {u.where[1]} of {total} {list(u.dims)}, " if total > 1 else ""
                labels = [f"{where}Kronecker factor {j} of {k}, dims {f.shape[-1]}" for j, f in enumerate(fresh)]
            out.extend(Estimate(f, params, label) for f, label in zip(fresh, labels))
        return out

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        factors: list[Tensor] = []
        batch: list[Tensor] = []
        touched: dict[int, _Unit] = {}  # one unit per state dict: the per-parameter counters advance once
        pairs = self._batch(ctx, curvature)
        comm = ctx.optimizer.comm
        owners = self._owners(ctx, self._runtime(ctx.optimizer), [u for u, _ in pairs]) if comm.sharded else None
        for n, (u, fresh) in enumerate(pairs):
            touched.setdefault(id(u.state), u)
            u.state.setdefault(u.keys.updates, 0)
            if owners is not None and owners[n] != comm.rank:
                self._drop(u)  # sharded: only the owner keeps a block's statistics
                continue
            self._ensure(u, fresh[0])
            for j, f in enumerate(fresh):
                factors.append(u.state[u.keys.factor[j]])
                batch.append(f.to(factors[-1].dtype) if f.dtype != factors[-1].dtype else f)
        if self.accumulate == "ema" and factors:
            torch._foreach_mul_(factors, self.beta)
            torch._foreach_add_(factors, batch, alpha=1.0 - self.beta)
        elif self.accumulate == "sum" and factors:
            torch._foreach_add_(factors, batch)
        elif factors:
            torch._foreach_copy_(factors, batch)
        for u in touched.values():
            u.state[u.keys.updates] += 1
            u.state[u.keys.updated_at] = ctx.step

    def _divisor(self, u: _Unit) -> float:
        n = u.state.get(u.keys.updates, 0)
        if self.accumulate == "ema" and self.bias_correction and n:
            return 1.0 - self.beta**n
        return 1.0

    # --- refresh: eigendecompositions ----------------------------------------------------------

    def _refresh(
        self, ctx: GroupStep, units: list[_Unit], transform: Transform, owners: list[int] | None = None
    ) -> list[tuple[_Unit, str]]:
        """Eigendecompose the factors of ``units`` and keep what the transform needs.

        With ``owners`` (several processes, replicated mode) each process
        decomposes only the blocks it owns and one all-gather hands every
        process every result; failures are counted identically everywhere.
        Returns the blocks that failed ``max_failures`` times in a row, with a message.
        """
        comm = ctx.optimizer.comm
        mine = units if owners is None else [u for u, o in zip(units, owners) if o == comm.rank]
        derived = dict(zip(map(id, mine), self._compute(mine, transform)))
        if owners is not None:
            dtype = torch.float64 if any(u.state[u.keys.factor[0]].dtype == torch.float64 for u in units) else torch.float32
            items = [(o, [s for _, s in self._derived_shapes(u)]) for u, o in zip(units, owners)]
            local = {}
            for i, (u, o) in enumerate(zip(units, owners)):
                if o == comm.rank:
                    d = derived[id(u)]
                    local[i] = (1.0, [d[k] for k, _ in self._derived_shapes(u)]) if d is not None else (0.0, None)
            for u, (status, tensors) in zip(units, comm.exchange(items, local, dtype)):
                like = u.state[u.keys.factor[0]]
                keys = [k for k, _ in self._derived_shapes(u)]
                derived[id(u)] = None if tensors is None else {k: t.to(like.dtype) for k, t in zip(keys, tensors)}
        return [(u, m) for u, m in ((u, self._account(u, derived[id(u)], ctx.step)) for u in units) if m]

    def _derived_shapes(self, u: _Unit) -> list[tuple[str, tuple[int, ...]]]:
        """The state keys and shapes :meth:`_derive` fills for ``u``, in its order."""
        if self.spectrum == "eigenbasis" or self.damping_form == "exact":
            out = [(key, (n, n)) for key, n in zip(u.keys.basis, u.dims)]
            if self.spectrum == "factors":
                out.append((u.keys.scale, tuple(u.dims)))
            return out
        return [(key, (n, n)) for key, n in zip(u.keys.root, u.dims)]

    def _compute(self, units: list[_Unit], transform: Transform) -> list[dict[str, Tensor] | None]:
        mats: list[Tensor] = []
        for u in units:
            div = self._divisor(u)
            for key in u.keys.factor:
                f = u.state[key]
                mats.append(f / div if div != 1.0 else f)
        eigs = self._eigh_all(mats)
        out: list[dict[str, Tensor] | None] = []
        start = 0
        for u in units:
            k = len(u.dims)
            mine, start = eigs[start : start + k], start + k
            out.append(None if any(e is None for e in mine) else self._derive(u, mine, transform))  # type: ignore[arg-type]
        return out

    def _account(self, u: _Unit, derived: dict[str, Tensor] | None, step: int) -> str | None:
        """Keep a successful refresh; count a failed one (the previous preconditioner stays)."""
        failures = u.keys.failures
        if derived is not None:
            u.state[failures] = 0
            u.state.update(derived)
            u.state[u.keys.refreshed] = step
            return None
        u.state[failures] = u.state.get(failures, 0) + 1
        u.state[u.keys.failures_total] = u.state.get(u.keys.failures_total, 0) + 1
        if u.state[failures] < self.max_failures:
            return None
        return self._failure_message(u, u.state[failures])

    def _failure_message(self, u: _Unit, count: int | str) -> str:
        return (
            f"structure kronecker: refreshing block {u.tag} of a parameter with factors {list(u.dims)} "
            f"failed {count} times in a row (max_failures={self.max_failures}): the "
            "eigendecomposition failed (the statistics hold NaN/Inf: check the loss and the learning "
            "rate) or gave a non-finite preconditioner (a zero eigenvalue without damping): raise the "
            "damping or init, or max_failures"
        )

    def _eigh_all(self, mats: list[Tensor]) -> list[EighResult | None]:
        """Eigendecompositions, batched over matrices of equal size; a failed batch is retried one by one."""
        out: list[EighResult | None] = [None] * len(mats)
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(mats):
            by_size.setdefault(m.shape[-1], []).append(i)
        for idx in by_size.values():
            dtype = mats[idx[0]].dtype
            work = torch.stack([mats[i] for i in idx])
            if self.float64:
                work = work.double()
            res = robust_eigh(work)
            if res is not None:
                for n, i in enumerate(idx):
                    out[i] = EighResult(res.eigenvalues[n].to(dtype), res.eigenvectors[n].to(dtype), res.retried)
                continue
            for n, i in enumerate(idx):
                one = robust_eigh(work[n])
                out[i] = None if one is None else EighResult(one.eigenvalues.to(dtype), one.eigenvectors.to(dtype), one.retried)
        return out

    def _derive(self, u: _Unit, eigs: list[EighResult], transform: Transform) -> dict[str, Tensor] | None:
        """What the block keeps between refreshes; None if it is not finite (counted as a failure)."""
        lams = [_floor(e.eigenvalues) for e in eigs]
        qs = [e.eigenvectors for e in eigs]
        out: dict[str, Tensor] = {}
        made: list[Tensor] = []  # what the eigenvalues were turned into (the eigenvectors were checked by robust_eigh)
        if self.spectrum == "eigenbasis" or self.damping_form == "exact":
            for key, q in zip(u.keys.basis, qs):
                out[key] = q.contiguous()  # one memory layout however it was computed or received: identical products everywhere
            if self.spectrum == "factors":
                prod = lams[0]
                for lam in lams[1:]:
                    prod = prod.unsqueeze(-1) * lam
                if u.share != 1:
                    prod = prod ** (1.0 / u.share)
                out[u.keys.scale] = transform.fn(prod)  # type: ignore[attr-defined]
                made.append(out[u.keys.scale])
        else:
            root, damping, outside = transform.kronecker()  # type: ignore[attr-defined]
            k = len(lams)
            dampings = [damping] * k
            if self.damping_form == "factored" and damping > 0:
                traces = [lam.sum() / lam.numel() for lam in lams]
                if all(t > 0 for t in traces):
                    mean = math.exp(sum(math.log(float(t)) for t in traces) / k)
                    dampings = [float(t) / mean * damping ** (1.0 / k) for t in traces]
                else:
                    dampings = [damping ** (1.0 / k)] * k
            e = 1.0 / (root * u.share)
            for key, lam, q, d in zip(u.keys.root, lams, qs, dampings):
                fn = (lambda x, d=d: 1.0 / (x.pow(e) + d)) if outside else (lambda x, d=d: (x + d).pow(-e))
                out[key] = matrix_function(lam, q, fn)
                made.append(out[key])
        return out if all_finite(made) else None

    # --- preconditioning ------------------------------------------------------------------------

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        rt = self._runtime(ctx.optimizer)
        comm = ctx.optimizer.comm
        units = self._units(ctx, rt)
        owners = self._owners(ctx, rt, units) if comm.active else None
        if comm.sharded:
            return self._precondition_sharded(ctx, rt, units, owners, transform, direction)  # type: ignore[arg-type]
        live, errors = self._prepare(ctx, rt, units, transform, owners)
        if errors:
            raise EighFailureError(errors[0][1])
        blocks = self._blocks(ctx, live, direction.tensors)
        results = [self._apply_infactor_dtype(u, x, transform) for u, x in zip(live, blocks)]
        return Direction(self._assemble(ctx, live, results, direction), direction.coef, True)

    def _prepare(
        self, ctx: GroupStep, rt: _Runtime, units: list[_Unit], transform: Transform, owners: list[int] | None = None
    ) -> tuple[list[_Unit], list[tuple[_Unit, str]]]:
        """Refresh the blocks that are due (``owners``: shared out, replicated mode) and return the blocks
        ready to apply, with the blocks that failed ``max_failures`` times in a row."""
        ready = [u for u in units if u.state.get(u.keys.updates, 0) > 0]
        due = transform.due(ctx.step)
        todo = [u for u in ready if due or u.keys.refreshed not in u.state]
        errors: list[tuple[_Unit, str]] = []
        if todo:
            ids = set(map(id, todo))
            owned = None if owners is None else [o for u, o in zip(units, owners) if id(u) in ids]
            errors = self._refresh(ctx, todo, transform, owned)
        live = [u for u in ready if u.keys.refreshed in u.state]
        if self.spectrum == "eigenbasis":
            self._update_moments(ctx, rt, live)
            live = [u for u in live if u.state.get(u.keys.moment_updates, 0) > 0]
        return live, errors

    def _precondition_sharded(
        self, ctx: GroupStep, rt: _Runtime, units: list[_Unit], owners: list[int], transform: Transform, direction: Direction
    ) -> Direction:
        """Memory-saving mode: each process refreshes and applies the blocks it owns; one all-gather of
        the preconditioned blocks (status 1: preconditioned, 0: passes unchanged, -1: failed) serves all."""
        comm = ctx.optimizer.comm
        for u, o in zip(units, owners):
            if o != comm.rank:
                self._drop(u)
        live, errors = self._prepare(ctx, rt, [u for u, o in zip(units, owners) if o == comm.rank], transform)
        failed = {id(u) for u, _ in errors}
        blocks = self._blocks(ctx, live, direction.tensors)
        results = {id(u): self._apply_infactor_dtype(u, x, transform) for u, x in zip(live, blocks)}
        local = {}
        for i, (u, o) in enumerate(zip(units, owners)):
            if o == comm.rank:
                local[i] = (-1.0, None) if id(u) in failed else (1.0, [results[id(u)]]) if id(u) in results else (0.0, None)
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in direction.tensors])
        gathered = comm.exchange([(o, [u.dims]) for u, o in zip(units, owners)], local, dtype)
        for u, (status, _) in zip(units, gathered):
            if status < 0:
                raise EighFailureError(self._failure_message(u, self.max_failures))
        done = [(u, tensors[0]) for u, (_, tensors) in zip(units, gathered) if tensors is not None]
        first = [u.where[0] if u.layer is None or u.where[0] is not None else u.where[1] for u, _ in done]
        out = self._assemble(ctx, [u for u, _ in done], [y.to(direction.tensors[i].dtype) for (_, y), i in zip(done, first)], direction)
        return Direction(out, direction.coef, True)

    def _apply_infactor_dtype(self, u: _Unit, x: Tensor, transform: Transform) -> Tensor:
        """Low-precision parameters keep float32 factors: compute in the factors' dtype, return in x's."""
        dtype = factor_dtype(x)
        if dtype == x.dtype:
            return self._apply(u, x, transform)
        return self._apply(u, x.to(dtype), transform).to(x.dtype)

    def _apply(self, u: _Unit, x: Tensor, transform: Transform) -> Tensor:
        if self.spectrum == "factors" and self.damping_form != "exact":
            ps = [u.state[key] for key in u.keys.root]
            if x.dim() == 2:
                return ps[0] @ x @ ps[1]
            return mode_products(x, ps)
        qs = [u.state[key] for key in u.keys.basis]
        rotated = _rotate(x, qs, True)
        if self.spectrum == "factors":
            scale = u.state[u.keys.scale]
        else:
            moment = u.state[u.keys.moment]
            n = u.state[u.keys.moment_updates]
            if self.eigenbasis_bias_correction:
                moment = moment / (1.0 - self.eigenbasis_beta**n)
            scale = transform.fn(moment)  # type: ignore[attr-defined]
        return _rotate(rotated * scale, qs, False)

    def _update_moments(self, ctx: GroupStep, rt: _Runtime, units: list[_Unit]) -> None:
        """Eigenbasis mode: ``D ← β D + (1-β) (Qᵀ g)²`` on curvature steps, in the current eigenbasis."""
        fresh = [u for u in units if u.state.get(u.keys.updated_at) == ctx.step]
        if not fresh:
            return
        moments, batch, counted = [], [], {}
        grads = self._blocks(ctx, fresh, ctx.grads) if self.factors == "gradient" else [None] * len(fresh)
        for u, g in zip(fresh, grads):
            qs = [u.state[key] for key in u.keys.basis]
            if u.layer is not None:
                a_rows, g_rows, w = rt.rows[u.layer]
                a2 = (a_rows.to(qs[1].dtype) @ qs[1]).square()
                g2 = (g_rows.to(qs[0].dtype) @ qs[0]).square().sum(0)
                new = (g2.T @ a2) * w  # EKFAC: w Σ_r (Q_Gᵀ g_r)² (Q_Aᵀ a_r)²ᵀ
            else:
                new = _rotate(g, qs, True).square()
            key = u.keys.moment
            if key not in u.state:
                u.state[key] = torch.zeros_like(new)
            moments.append(u.state[key])
            batch.append(new)
            counted.setdefault(id(u.state), u)  # one count per state dict: blocks of a parameter share it
        if self.factors == "layer":
            ctx.evaluation.mean_(batch)  # EKFAC: per-row moments of this process's batch
        torch._foreach_mul_(moments, self.eigenbasis_beta)
        torch._foreach_add_(moments, batch, alpha=1.0 - self.eigenbasis_beta)
        for u in counted.values():
            u.state[u.keys.moment_updates] = u.state.get(u.keys.moment_updates, 0) + 1


def _floor(lam: Tensor) -> Tensor:
    """Eigenvalues below round-off (``λ_max · eps`` of the dtype; negative ones included) are raised to it.

    A PSD factor's eigenvalues that small are noise of the decomposition; left at 0 they make an
    undamped inverse root infinite (Shampoo's float32 factors summed from a tiny ``eps·I``).
    """
    top = lam.amax().clamp_min(0.0)
    return lam.clamp_min(float(top) * torch.finfo(lam.dtype).eps)


def _gram(x: Tensor) -> list[Tensor]:
    """Shampoo's per-dimension statistics of one block."""
    if x.dim() == 2:
        return [x @ x.T, x.T @ x]
    if x.dim() == 1:
        return [torch.outer(x, x)]
    return shampoo_statistics(x)
