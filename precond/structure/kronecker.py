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

:class:`Kronecker` is the configuration; :class:`KroneckerStage` composes the
pieces of :mod:`precond.kron` in one optimizer — a source of units and fresh
factors, their accumulation, the refresh and the form of the preconditioner —
and, on several processes, :class:`precond.distributed.Ownership`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from precond.block import Curvature, Direction, Estimate, GroupStep, Needs, Served, Stage, Structure, Transform
from precond.distributed import Ownership
from precond.errors import PipelineError
from precond.kron.accumulate import Accumulation
from precond.kron.sources import GradientSource, LayerSource, Source, assemble
from precond.kron.spectral import Form, Refresh, form_of
from precond.kron.units import Keys, Unit, make_keys
from precond.layers import factor_dtype, layer_problem
from precond.linalg.spectral import EighFailureError
from precond.registry import register

_WHY = (
    "the eigendecomposition failed (the statistics hold NaN/Inf: check the loss and the learning rate) or gave a "
    "non-finite preconditioner (a zero eigenvalue without damping): raise the damping or init"
)


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
    ``first_moment: eigenbasis`` (SOAP): the structure also keeps the first
    moment ``M``, an EMA of the direction rotated into the eigenbasis (with no
    momentum block before it: the gradient, whose rotation is ``D``'s sample
    too), projected into the new basis on a refresh, and applies
    ``Q (M̂ ⊙ f(D̂)) Qᵀ``: one rotation in and one out per step.

    Refreshes follow the transform's ``every`` and ``start``; before ``start`` no block is preconditioned
    (the factors accumulate from step 1): Distributed Shampoo's ``precondition_frequency`` and
    ``start_preconditioning_step``, with a ``graft`` of the same ``start`` taking the grafted method's own step
    until then.

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
    refresh: Literal["eigh", "power_qr"] = Field(
        "eigh",
        description="eigenbasis only: how a refresh finds the basis: eigh of the factors every time, or power_qr (SOAP): "
        "eigh for the first basis, then one power iteration from the previous basis and a QR decomposition, the second "
        "moment permuted as the eigenvalue estimates reorder the columns",
    )
    null_threshold: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="eigenbasis only: a factor's directions with an eigenvalue below this fraction of its largest (its "
        "numerical null space, whose basis round-off decides) share their second moment, its sum along that space, "
        "instead of one each, and such a factor is decomposed again on a power_qr refresh; 0: each its own (official "
        "SOAP, EKFAC)",
    )
    first_moment: Literal["none", "eigenbasis"] = Field(
        "none",
        description="eigenbasis only: none (a momentum block, if any, averages the direction in the parameters' "
        "coordinates); eigenbasis (the official SOAP): the structure keeps the first moment itself, an EMA of the "
        "direction rotated into the eigenbasis (the rotated gradient, which the second moment uses too), projected "
        "into the new basis on a refresh: one rotation in and one out per step instead of two each; the recipe has no "
        "momentum before the transform",
    )
    first_moment_beta: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="first_moment: eigenbasis: its EMA decay (Adam's beta1); the param-group value 'momentum'",
    )
    first_moment_bias_correction: bool = Field(True, description="first_moment: eigenbasis: divide it by 1 - beta^n")
    precondition_1d: bool = Field(
        True,
        description="eigenbasis mode, gradient factors: false keeps each block of one dimension (a bias, a norm's "
        "gain, a scalar) diagonal, without a factor: Adam in its own coordinates (the official SOAP's "
        "precondition_1d=False); true gives it the eigenbasis of its g g^T factor like any block",
    )
    relative_eps: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="eigenbasis only: each entry of the second moment is read at least (relative_eps x the root of its "
        "largest entry in the block)^2, so components that are round-off next to the block's largest are scaled, not "
        "normalised one by one; 0: none (official SOAP, EKFAC)",
    )
    root_method: Literal["eigh", "coupled_newton"] = Field(
        "eigh",
        description="per_factor/factored damping: how the roots (F + damping)^(-1/r) are computed: eigh, or coupled_newton "
        "(matrix products only, batched by size; float32 unless float64, retried in float64 where it does not converge; "
        "damping inside and an integer r = p*k only)",
    )
    newton_iterations: int = Field(100, ge=1, le=1000, description="coupled_newton: the most iterations")
    newton_tol: float = Field(
        1e-6, gt=0.0, lt=1.0, description="coupled_newton: converged when max|M - I| < this (M -> I as X -> the root)"
    )
    max_dim: int = Field(1024, ge=1, description="gradient factors: dimensions above this are split into blocks")
    merge_dims: bool = Field(False, description="gradient factors: merge neighbouring dimensions while the product stays <= max_dim")
    float64: bool = Field(False, description="eigendecompose in float64")
    max_failures: int = Field(5, ge=1, description="raise after this many consecutive failed eigendecompositions of a block")

    def gathers(self) -> bool:
        """Under FSDP2 at an owner, on whole gradients: ``factors: gradient`` (Shampoo, SOAP) each parameter's
        blocks from its own gradient; ``factors: layer`` (K-FAC) each layer's weight and bias at one owner
        (:meth:`KroneckerStage.together`), its factors made on every process from its batch and averaged
        (:attr:`KroneckerStage.pooled`)."""
        return True

    @property
    def pooled(self) -> bool:
        """K-FAC's factors (``factors: layer``) come from every process's layer hooks, averaged."""
        return self.factors == "layer"

    def shard_problem(self) -> str | None:
        if self.factors == "layer" and self.spectrum == "eigenbasis":
            return ("structure 'kronecker' with factors: layer and spectrum: eigenbasis (EKFAC) needs every "
                    "process's per-row gradients in each layer's eigenbasis, which only the layer's owner keeps")
        return None

    def group_defaults(self) -> dict[str, Any]:
        """``first_moment: eigenbasis`` reads its decay from the param group's ``momentum`` (as a momentum block:
        ``OneCycleLR`` cycles it)."""
        return {"momentum": self.first_moment_beta} if self.first_moment == "eigenbasis" else {}

    @property
    def fill(self) -> str:
        return f"kronecker.{self.factors}"

    def cannot_serve(self, module: Any, role: str) -> str | None:
        return layer_problem(module, role) if self.factors == "layer" else None

    def needs(self) -> Needs:
        # layer factors come from hooks armed before the forward pass (at the previous step's end for a plain loop)
        return Needs(hooks=True) if self.factors == "layer" else Needs()

    def spectral_form(self) -> Form:
        """How a refresh is turned into the preconditioner (:mod:`precond.kron.spectral`)."""
        return form_of(
            self.damping_form, self.spectrum, self.eigenbasis_beta, self.eigenbasis_bias_correction, self.refresh,
            self.null_threshold, self.relative_eps, self.root_method, self.newton_iterations, self.newton_tol,
            self.first_moment_beta if self.first_moment == "eigenbasis" else None, self.first_moment_bias_correction,
        )

    def supports(self, transform: Transform) -> bool:
        return callable(getattr(transform, "kronecker", None)) and self.spectral_form().supports(transform)

    def _fill_problem(self, curvature: Any) -> str | None:
        kinds = getattr(curvature, "kronecker_factors", frozenset())
        if curvature is not None and self.factors in kinds:
            return None
        fills = ", ".join(sorted(kinds)) or "none"
        return (
            f"curvature '{getattr(curvature, 'name', None)}' cannot fill Kronecker factors '{self.factors}' (it fills: {fills}); "
            + ("gradient factors (Shampoo) are Gram matrices of the batch gradient: use curvature empirical_fisher"
               if self.factors == "gradient" else "use empirical_fisher, sampled_fisher or gauss_newton")
        )

    def recipe_problems(self, curvature: Curvature) -> list[tuple[str, str]]:
        """Validation, with the recipe (``setup`` checks the same when built without it): the curvature
        must fill these factors. ``(path in the recipe, message)``."""
        problem = self._fill_problem(curvature)
        out = [] if problem is None else [("structure.factors", problem)]
        return out + self._mode_problems()

    def _mode_problems(self) -> list[tuple[str, str]]:
        out = []
        fields = (
            ("refresh", "eigh"), ("null_threshold", 0.0), ("relative_eps", 0.0), ("first_moment", "none"),
            ("precondition_1d", True),
        )
        for field, default in fields:
            if self.spectrum != "eigenbasis" and getattr(self, field) != default:
                out.append((
                    f"structure.{field}",
                    f"{field}: {getattr(self, field)} acts on the eigenbasis mode only (spectrum: eigenbasis, as SOAP and "
                    f"EKFAC); with spectrum: {self.spectrum} remove it",
                ))
        if not self.precondition_1d and self.factors != "gradient":
            out.append((
                "structure.precondition_1d",
                "precondition_1d: false keeps the blocks of one dimension of the gradient diagonal (factors: gradient, "
                "SOAP); layer factors have two per layer: remove it",
            ))
        if self.root_method != "eigh" and (self.spectrum != "factors" or self.damping_form == "exact"):
            out.append((
                "structure.root_method",
                f"root_method: {self.root_method} computes one root per factor (damping_form: per_factor or factored, "
                f"spectrum: factors); this structure has damping_form: {self.damping_form}, spectrum: {self.spectrum}, "
                "which need the factors' eigenvectors: use root_method: eigh",
            ))
        return out

    def _check_roots(self, served: Served) -> None:
        """``coupled_newton`` computes ``(F + damping)^(-1/r)`` for an integer ``r = p·s``: refused otherwise, when
        the optimizer is built (every block's ``s`` is known from the parameters' shapes)."""
        shares = {1}
        if self.factors == "gradient":
            source = GradientSource(self.max_dim, self.merge_dims)
            shares = {len(b) for p in served.params if p.requires_grad for b in source.partition(p).block_shapes}
        for t in served.pipeline.transforms:
            spec = t.kronecker() if t.spectral and callable(getattr(t, "kronecker", None)) else None  # type: ignore[attr-defined]  # checked callable
            if spec is None:
                continue
            root, _, outside = spec
            bad = sorted(k for k in shares if abs(root * k - round(root * k)) > 1e-9)
            if outside or bad:
                raise PipelineError(
                    f"structure kronecker root_method: coupled_newton computes (F + damping)^(-1/r) for an integer r = p*k, "
                    f"with the damping inside; transform '{t.name}' has p = {root:g}"
                    + (f", which gives r = {root * bad[0]:g} for blocks of {bad[0]} factors" if bad else "")
                    + (" and puts its damping outside the root" if outside else "")
                    + ": use root_method: eigh, or a p and damping_position: inside that give it"
                )

    def _check_first_moment(self, served: Served) -> None:
        """``first_moment: eigenbasis`` averages the direction the structure receives once per step: refused after
        a momentum block (a second average) and with more than one spectral transform (one average each)."""
        pipeline = served.pipeline
        momentum = pipeline.momentum
        if momentum is not None and getattr(momentum, "position", "pre") == "pre":
            raise PipelineError(
                "structure kronecker first_moment: eigenbasis keeps the first moment in the eigenbasis itself; the "
                f"recipe also averages the gradient before preconditioning (momentum '{momentum.name}', "
                "position: pre): remove the momentum block, or use first_moment: none"
            )
        spectral = [t.name for t in pipeline.transforms if t.spectral]
        if len(spectral) > 1:
            raise PipelineError(
                f"structure kronecker first_moment: eigenbasis averages the direction of one spectral transform; this "
                f"pipeline has {len(spectral)} ({', '.join(spectral)}): use first_moment: none"
            )

    def stage(self, served: Served) -> KroneckerStage:
        curvature = served.pipeline.curvature
        problem = self._fill_problem(curvature)
        if problem is not None:
            raise PipelineError(problem)
        for _, message in self._mode_problems():
            raise PipelineError(f"structure kronecker: {message}")
        if self.root_method == "coupled_newton":
            self._check_roots(served)
        if self.first_moment == "eigenbasis":
            self._check_first_moment(served)
        if served.env.comm.sharded and self.factors == "layer" and self.spectrum == "eigenbasis":
            raise PipelineError(
                "structure kronecker with factors: layer and spectrum: eigenbasis (EKFAC) needs every process's "
                "per-row gradients in each block's eigenbasis, which distributed.mode: sharded keeps on one process "
                "only: use distributed.mode: replicated"
            )
        return KroneckerStage(self, served)


class KroneckerStage(Stage):
    """The Kronecker structure in one optimizer: its source of units (layers and their hooks, or the gradient's
    blocks), their accumulation and refresh, and who owns which unit on several processes."""

    config: Kronecker

    def __init__(self, config: Kronecker, served: Served) -> None:
        super().__init__(config)
        curvature = served.pipeline.curvature
        assert curvature is not None  # Kronecker.stage checked that it fills these factors
        self.source: Source = (
            LayerSource(served, curvature, keep_rows=config.spectrum == "eigenbasis", owner=self)
            if config.factors == "layer" else GradientSource(config.max_dim, config.merge_dims, config.precondition_1d)
        )
        self.ownership = Ownership(served.env.comm)
        self.spectral = config.spectral_form()
        self.accumulation = Accumulation(config.accumulate, config.beta, config.bias_correction, config.init)
        self.refresh = Refresh(self.spectral, self.accumulation, config.float64)
        self._units_of: dict[tuple[int, ...], list[Unit]] = {}  # per list of parameters (by id): its units
        self._keys: dict[tuple[str, int], Keys] = {}
        self._labels: dict[int, tuple[tuple[int, ...], list[str]]] = {}  # per unit (by id): what its factors are

    def init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        """Nothing per parameter up front: a unit's factors appear with its first statistics."""

    def together(self, params: list[Tensor]) -> list[tuple[list[int], float]]:
        """Fully sharded: the positions in ``params`` that one owner holds together, each set with what its state
        weighs there (sizes and factors): a layer's weight and bias, or a parameter and its blocks' factors."""
        return self.source.together(params)

    def before_closure(self, step: int) -> None:
        self.source.before_closure(step)

    def from_outputs(self, ctx: GroupStep, curvature: Curvature) -> None:
        self.source.from_outputs(ctx, curvature)

    def added(self, params: list[Tensor]) -> None:
        added = getattr(self.source, "added", None)
        if added is not None:
            added(params)

    def after_step(self) -> None:
        self.source.after_step()

    # --- units ------------------------------------------------------------------------------

    def unit_keys(self, tag: str, k: int) -> Keys:
        """The state keys of unit ``tag`` of a parameter with ``k`` factors (made once, shared by parameters)."""
        if (tag, k) not in self._keys:
            self._keys[tag, k] = make_keys(self.config.key, tag, k, self.config.max_failures)
        return self._keys[tag, k]

    def _units(self, ctx: GroupStep, params: list[Tensor] | None = None) -> list[Unit]:
        """The units of ``ctx.params`` (or of ``params``, for the owner table), bound to their state dicts.

        The units depend only on which parameters are present, so they are made once per such list; the
        state dicts are looked up on every call, since ``load_state_dict`` replaces them.
        """
        params = ctx.params if params is None else params
        # by the parameters themselves (fully sharded: a step's shards are new views each step, their DTensors are
        # not); the units hold every parameter: an id is not reused while cached
        key = tuple(id(ctx.env.param_of(p)) for p in params)
        units = self._units_of.get(key)
        if units is None:
            units = self._units_of[key] = self.source.units(params, self.unit_keys)
        state_of = ctx.env.state_of
        for u in units:
            u.state = state_of(u.holder)
        return units

    def _owners(self, ctx: GroupStep, units: list[Unit]) -> list[int]:
        """Each unit's owner, balanced over every unit of the param group (a pure function of the shapes)."""
        env, group = ctx.env, ctx.group["params"]

        def everything() -> list[tuple[str, float]]:
            return [(self.source.name(env, u), u.cost) for u in self._units(ctx, [p for p in group if p.requires_grad])]

        return self.ownership.owners([self.source.name(env, u) for u in units], tuple(map(id, group)), everything)

    @staticmethod
    def _drop(u: Unit) -> None:
        for key in u.keys.own():
            u.state.pop(key, None)

    # --- statistics ----------------------------------------------------------------------------

    def _batch(self, ctx: GroupStep, curvature: Curvature) -> list[tuple[Unit, list[Tensor]]]:
        """This step's factors per unit (in the unit's dimension order), computed once per group and step."""
        return ctx.memo(self, "batch", lambda: self.source.fresh(ctx, curvature, self._units(ctx)))

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """Every fresh factor, with its parameter(s) and its place: ``Kronecker factor j of k, dims n``
        (K-FAC: ``G`` of the output gradients is factor 0, ``A`` of the inputs factor 1; a gradient cut
        into blocks also names the block)."""
        out: list[Estimate] = []
        gram = self.config.factors == "gradient"
        for u, fresh in self._batch(ctx, curvature):
            named = self._labels.get(id(u))  # the same for every step of the unit: made once
            if named is None:
                named = self._labels[id(u)] = self.source.labels(ctx, u, fresh)
            params, labels = named
            # a Gram matrix G_(i) G_(i)ᵀ of a finite gradient is finite where its diagonal is: |F_ab| <= max(F_aa, F_bb)
            # (Cauchy-Schwarz), so its n diagonal entries are checked instead of its n² entries
            out.extend(Estimate(f.diagonal() if gram else f, params, label) for f, label in zip(fresh, labels))
        return out

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        pairs = self._batch(ctx, curvature)
        kept = pairs
        if self.ownership.sharded:  # only the owner keeps a unit's statistics
            owners = self._owners(ctx, [u for u, _ in pairs])
            kept = [(u, f) for (u, f), o in zip(pairs, owners) if self.ownership.keeps(o)]
            for (u, _), o in zip(pairs, owners):
                if not self.ownership.keeps(o):
                    self._drop(u)
        self.accumulation.add(ctx.step, kept, [u for u, _ in pairs])

    # --- refresh and preconditioning ----------------------------------------------------------

    def _failure(self, u: Unit) -> EighFailureError:
        what = f"structure kronecker: refreshing block {u.tag} of a parameter with factors {list(u.dims)}"
        return u.keys.cache.error(what, _WHY)

    def _prepare(
        self,
        ctx: GroupStep,
        units: list[Unit],
        transform: Transform,
        direction: list[Tensor],
        owners: list[int] | None = None,
    ) -> tuple[list[Unit], list[Tensor], list[Unit]]:
        """Refresh the units that are due and return the units ready to apply with their blocks of ``direction``
        (the direction's tensors, as the form applies them), and the units that failed ``max_failures`` times in
        a row. ``owners`` (replicated mode): each process decomposes the units it owns and every process receives
        every result, so failures are counted identically everywhere."""
        ready = [u for u in units if u.state.get(u.keys.updates, 0) > 0]
        due = transform.due(ctx.step)
        # nothing before the transform's start (Distributed Shampoo's start_preconditioning_step): the direction
        # passes unchanged, the factors accumulate from step 1
        todo = [u for u in ready if due or u.keys.refreshed not in u.state] if ctx.step >= transform.start else []
        for u in todo:
            if u.diagonal:  # no factor to decompose: the identity is its basis from the first refresh on
                u.state[u.keys.refreshed] = ctx.step
        todo = [u for u in todo if not u.diagonal]
        failed = []
        if todo:
            for u in todo:
                self.spectral.before_refresh(u)
            ids = set(map(id, todo))
            kept = [self.spectral.kept(u) for u in todo]
            factor64 = any(u.state[u.keys.factor[0]].dtype == torch.float64 for u in todo)
            results = self.ownership.share(
                None if owners is None else [o for u, o in zip(units, owners) if id(u) in ids],
                [[shape for _, shape in k] for k in kept],
                lambda mine: self.refresh([todo[i] for i in mine], transform),
                torch.float64 if factor64 else torch.float32,
            )
            for u, k, (_, tensors) in zip(todo, kept, results):
                like = u.state[u.keys.factor[0]].dtype
                derived = None if tensors is None else {key: t.to(like) for (key, _), t in zip(k, tensors)}
                if u.keys.cache.refresh(u.state, derived, ctx.step):
                    failed.append(u)
                elif derived is not None:
                    self.spectral.committed(u)
        live, blocks = self.spectral.prepare(ctx, ready, self.source, direction)
        return live, blocks, failed

    def _apply(self, u: Unit, x: Tensor, transform: Transform) -> Tensor:
        """Low-precision parameters keep float32 factors: compute in the factors' dtype, return in x's."""
        dtype = factor_dtype(x)
        if dtype == x.dtype:
            return self.spectral.apply(u, x, transform)
        return self.spectral.apply(u, x.to(dtype), transform).to(x.dtype)

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        units = self._units(ctx)
        if self.spectral.keeps_direction and not direction.plain:  # an average of the direction: of its values
            direction = direction.materialize()
        if self.ownership.sharded:
            return self._precondition_sharded(ctx, units, transform, direction)
        owners = self._owners(ctx, units) if self.ownership.active else None
        live, blocks, failed = self._prepare(ctx, units, transform, direction.tensors, owners)
        if failed:
            raise self._failure(failed[0])
        results = [self._apply(u, x, transform) for u, x in zip(live, blocks)]
        return Direction(assemble(self.source, ctx, live, results, direction), direction.coef, True)

    def _precondition_sharded(
        self, ctx: GroupStep, units: list[Unit], transform: Transform, direction: Direction
    ) -> Direction:
        """Memory-saving mode: each process refreshes and applies the units it owns; one exchange of the
        preconditioned blocks (status 1: preconditioned, 0: passes unchanged, -1: failed) serves all."""
        owners = self._owners(ctx, units)
        mine = [u for u, o in zip(units, owners) if self.ownership.mine(o)]
        for u, o in zip(units, owners):
            if not self.ownership.mine(o):
                self._drop(u)
        live, blocks, failed = self._prepare(ctx, mine, transform, direction.tensors)
        results = {id(u): self._apply(u, x, transform) for u, x in zip(live, blocks)}
        bad = set(map(id, failed))

        def computed(indices: list[int]) -> list[tuple[float, list[Tensor] | None]]:
            out: list[tuple[float, list[Tensor] | None]] = []
            for u in (units[i] for i in indices):
                y = results.get(id(u))
                out.append((-1.0, None) if id(u) in bad else (0.0, None) if y is None else (1.0, [y]))
            return out

        dtype = functools.reduce(torch.promote_types, [t.dtype for t in direction.tensors])
        gathered = self.ownership.share(owners, [[u.dims] for u in units], computed, dtype)
        for u, (status, _) in zip(units, gathered):
            if status < 0:
                raise self._failure(u)
        done = [(u, tensors[0]) for u, (_, tensors) in zip(units, gathered) if tensors is not None]
        out = assemble(self.source, ctx, [u for u, _ in done], [y for _, y in done], direction)
        return Direction(out, direction.coef, True)
