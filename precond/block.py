"""What every block is: a pydantic config with a few short methods.

A block never sees the optimizer's internals. The pipeline hands it a
:class:`GroupStep` (the tensors of one param group for this step) and a
:class:`Direction` (the update being built), and the block declares through
:meth:`Block.needs` what the step must provide (model outputs, a
differentiable gradient, layer hooks, a closure to re-evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from precond.errors import PipelineError

from precond.interfaces import (  # noqa: F401  (re-exported: blocks import them from here)
    Direction,
    Environment,
    Estimate,
    Facts,
    Needs,
    ParamInfo,
    per_parameter,
    uniform,
)

if TYPE_CHECKING:
    from precond.evaluation import Evaluation

KINDS = ("curvature", "structure", "transform", "momentum", "step", "decay")
T = TypeVar("T")


class Block(BaseModel):
    """Base of every block: an immutable, validated configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def needs(self) -> Needs:
        return Needs()

    def distributed_problem(self) -> str | None:
        """Why this block cannot keep several processes identical (None: it can). Under
        torch.distributed such a recipe is refused at build time instead of drifting."""
        return None

    elementwise: ClassVar[bool] = False  # acts on each entry of a parameter alone (then it runs on FSDP2 shards)

    def shard_problem(self) -> str | None:
        """Why this block cannot run on fully sharded parameters (FSDP2's ``fully_shard``: a process holds some
        rows of every parameter and of its gradient), None when it can: entry by entry on each process's shards
        (``elementwise``), or on each parameter whole and alone at the parameter's owner (:meth:`gathers`).
        Such a recipe is refused at build time."""
        if self.elementwise or self.gathers():
            return None
        return f"{self.kind} '{self.name}' works on whole parameters or layers, not entry by entry"

    def gathers(self) -> bool:
        """Whether this block works on each parameter whole, from its gradient and its shape, never the
        parameter's values: a Kronecker factor of one tensor, a norm or matrix function per tensor, or a layer's
        weight and bias together (its structure stage's ``together`` names such sets, and ``pooled`` says that
        its statistics come from every process's batch, averaged). Under FSDP2 the pipeline holding such a block
        runs at each parameter's (or set's) owner on the gathered whole gradients, and the update's rows go back
        to their processes (docs/distributed.md); the block then sees a stand-in of the parameter with its
        shape, dtype and device, not its values."""
        return False

    # --- facts for other blocks (precond.interfaces.Facts), checked when a recipe is validated --------
    produces: ClassVar[frozenset[str]] = frozenset()  # facts this block writes into ctx.facts
    consumes: ClassVar[frozenset[str]] = frozenset()  # facts it reads when present
    requires: ClassVar[frozenset[str]] = frozenset()  # facts it cannot do without (some block must produce them)

    def group_defaults(self) -> dict[str, Any]:
        """Param-group hyperparameters this block reads on every step, with their initial values (as ``lr``:
        LR schedulers, ``OneCycleLR``'s momentum cycle and per-group settings reach the block through them)."""
        return {}

    # --- the runtime in one optimizer ------------------------------------------------------------
    def stage(self, served: Served) -> Any:
        """The object the pipeline calls for this block in one optimizer, made once when it is built.

        A stateless block is its own stage (the default: check what it serves, return ``self``). A block
        with runtime state (module hooks, a map of layers) returns an object that holds that state and
        its configuration, with the same methods as the block kind (see :class:`Stage`).
        """
        return self

    def before_closure(self, step: int) -> None:
        """Called on the stage before the closure runs on ``step`` (arm hooks on refresh steps)."""

    def after_step(self) -> None:
        """Called on the stage at the end of every step (disarm hooks, drop recorded tensors)."""

    def key(self, what: str) -> str:
        """The per-parameter state key this block stores ``what`` under."""
        return f"{self.kind}.{what}"

    def describe(self) -> str:
        """One line for tables: the type and the fields that differ from defaults."""
        data = self.model_dump(exclude={"type"})
        args = ", ".join(f"{k}={v}" for k, v in data.items())
        return f"{self.name}({args})" if args else self.name


class Stage:
    """Base of a block's runtime when it has state of its own (a stateless block is its own stage).

    It holds the block's configuration (``config``) and answers to the kind's methods; ``name``,
    ``kind`` and ``form`` are the configuration's.
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def form(self) -> str:
        return getattr(self.config, "form", "")

    def before_closure(self, step: int) -> None:
        """Called before the closure runs on ``step``."""

    def after_step(self) -> None:
        """Called at the end of every step."""

    def added(self, params: list[torch.Tensor]) -> None:
        """Parameters joined the optimizer after it was built (``add_param_group``, this stage's rule)."""

    def from_outputs(self, ctx: GroupStep, curvature: Any) -> None:
        """A structure's stage: as :meth:`Structure.from_outputs` (by default this step's estimates, recorded)."""
        self.estimates(ctx, curvature)  # type: ignore[attr-defined]  # structures' stages have estimates

    @property
    def pooled(self) -> bool:
        """A structure's stage: as :attr:`Structure.pooled` (its configuration's)."""
        return bool(self.config.pooled)

    def together(self, params: list[torch.Tensor]) -> list[tuple[list[int], float]]:
        """A structure's stage: as :meth:`Structure.together` (its configuration's, unless the stage knows more)."""
        return self.config.together(params)  # type: ignore[no-any-return]  # config: a Structure (Any here)


class Interval(BaseModel):
    """Mixin: the block acts only on every ``every``-th step, from step ``start``."""

    every: int = Field(1, ge=1, description="act on every k-th step only (amortise expensive work)")
    start: int = Field(1, ge=1, description="first step (1-based) on which to act")

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0


@dataclass
class GroupStep:
    """The tensors of one param group for one ``step()`` call, and what the blocks may read besides.

    ``env`` is what the optimizer provides (names, process group, generator,
    per-parameter state), ``facts`` what blocks of this group's pipeline
    produce for each other on this step, ``objective_l2`` the coefficient
    ``c`` of ``½c‖θ‖²`` that the group's weight decay adds to the objective
    (``None`` when it moves the parameters outside the objective: decoupled).
    """

    group: dict[str, Any]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict[str, Any]]
    steps: list[int]  # per-parameter step counts, after this step's increment
    step: int  # the optimizer's global step count (1-based)
    evaluation: Evaluation
    env: Environment = field(default_factory=Environment)
    scope: list[torch.Tensor] = field(default_factory=list)  # every parameter this step's curvature serves
    facts: Facts = field(default_factory=Facts)
    objective_l2: float | None = 0.0
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def gathered(self, key: str) -> list[torch.Tensor]:
        return [s[key] for s in self.states]

    @property
    def lr(self) -> float:
        return float(self.group["lr"])

    def memo(self, owner: object, what: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per step for this group: a block's own per-step cache (e.g. its fresh
        statistics, checked by the guard and then accumulated); ``owner`` is the block, so blocks never
        see each other's entries. Shared by :meth:`part` views of the group."""
        key = (id(owner), what)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def part(self, idx: list[int]) -> GroupStep:
        """The view of ``params[idx]`` (same group, evaluation, facts and per-step cache)."""
        if len(idx) == len(self.params):
            return self
        return GroupStep(
            self.group, [self.params[i] for i in idx], [self.grads[i] for i in idx], [self.states[i] for i in idx],
            [self.steps[i] for i in idx], self.step, self.evaluation, self.env, self.scope, self.facts,
            self.objective_l2, self._memo,
        )


@dataclass(frozen=True)
class Served:
    """What a block serves in one optimizer, handed to :meth:`Block.stage` once when it is built.

    ``groups``: the param groups whose pipeline holds the block (each with
    its ``params`` and hyperparameters); ``all_groups``: every param group
    (e.g. to see that a layer's weight and bias are in one group);
    ``pipeline``: the blocks of that pipeline (configurations), so a block
    can check its neighbours; ``pipelines``: every pipeline by rule name
    (a param group's ``"rule"``: the step control spans them all);
    ``env``: the optimizer's environment.
    """

    env: Environment
    groups: tuple[dict[str, Any], ...]
    all_groups: tuple[dict[str, Any], ...]
    pipeline: PipelineBlocks
    pipelines: Mapping[str, PipelineBlocks] = field(default_factory=dict)

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the block serves, in param-group order (frozen ones included)."""
        return [p for g in self.groups for p in g["params"]]


@dataclass(frozen=True)
class PipelineBlocks:
    """The blocks of one pipeline (a recipe's own, or a rule's), in the order they run."""

    curvature: Curvature | None
    structure: Structure | None
    transforms: tuple[Transform, ...]
    momentum: Momentum | None
    decay: Decay

    def blocks(self) -> list[Block]:
        return [b for b in (self.curvature, self.structure, *self.transforms, self.momentum, self.decay) if b is not None]


# --- the kinds -----------------------------------------------------------------------------


class Curvature(Block, Interval):
    """Estimates the curvature; ``fills`` names the structures it can fill.

    An estimator implements one method per structure form it fills
    (``diagonal(ctx)``, ``full(ctx)``, ...). Work that spans all parameters
    (one HVP over the whole model) is done once per step through
    :meth:`shared` and handed out per param group.
    """

    kind: ClassVar[str] = "curvature"
    fills: ClassVar[frozenset[str]] = frozenset()

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        raise NotImplementedError(f"curvature '{self.name}' cannot fill a diagonal structure")

    def nonnegative(self) -> bool:
        """Whether every estimate is >= 0 (sums of squares, PSD diagonals); lets the pipeline skip
        the update check when the transforms cannot turn such statistics into NaN/Inf."""
        return False

    def full(self, ctx: GroupStep) -> torch.Tensor:
        """The dense curvature over ``ctx.params`` flattened in order."""
        raise NotImplementedError(f"curvature '{self.name}' cannot fill a full structure")

    def shared(self, ctx: GroupStep, what: str, compute: Any) -> list[Any]:
        """``compute(ctx.scope) -> list`` once per step for every parameter served; this group's part."""
        memo = ctx.evaluation.memo
        key = (id(self), what)
        if key not in memo:
            memo[key] = dict(zip(ctx.scope, compute(ctx.scope)))
        return [memo[key][p] for p in ctx.params]

    def needs_at(self, step: int) -> Needs:
        """What this block needs on ``step``: nothing on steps it does not refresh."""
        return self.needs() if self.due(step) else Needs()

    # --- micro-batches: estimates taken during the user's backward passes (CurvatureRecord) -------------

    def micro_batch(self, what: str, ctx: GroupStep) -> Any:
        """What one micro-batch (one forward pass, ``ctx.evaluation``) contributes to the ``what`` estimate
        (``"diagonal"``, ``"full"``): by default the estimate of that micro-batch."""
        return getattr(self, what)(ctx)

    def combine(self, what: str, parts: list[tuple[int, Any]]) -> Any:
        """The estimate of a step from its micro-batches' contributions ``(samples, part)``. The default is
        right for estimates that are batch means (each part's mean, weighted by its share of the samples);
        an estimate nonlinear in the batch (a square of the batch gradient) combines its linear parts itself."""
        return parts[0][1] if len(parts) == 1 else _weighted(parts)

    def reduce_estimates(self, fill: str) -> bool:
        """Under torch.distributed: whether the fresh estimates this block makes for a structure that asks
        for ``fill`` (:attr:`Structure.fill`) are means over this process's batch, which the pipeline
        averages over the processes (the default), or already global (False: built from DDP's averaged
        gradients, or averaged inside the block before a nonlinear step)."""
        return True


@dataclass
class DiagonalEstimate:
    """A diagonal curvature estimate, ``values`` or the squares of ``roots``.

    Giving ``roots`` (e.g. the gradient for the empirical Fisher ``g*g``) lets
    the structure accumulate with one fused ``addcmul`` and no temporary.
    ``scale`` multiplies the estimate (e.g. a batch-size factor).
    """

    values: list[torch.Tensor] | None = None
    roots: list[torch.Tensor] | None = None
    scale: float = 1.0


def each_alone(params: list[torch.Tensor]) -> list[tuple[list[int], float]]:
    """Fully sharded: every parameter at its owner alone, weighed by its size (a structure's ``together`` by
    default, and a pipeline's without a structure)."""
    return [([i], float(p.numel())) for i, p in enumerate(params)]


class Structure(Block):
    """Stores the curvature and applies spectral transforms to directions."""

    kind: ClassVar[str] = "structure"
    form: ClassVar[str] = ""

    @property
    def pooled(self) -> bool:
        """Fully sharded, at the owners: whether this step's statistics come from every process's batch (layer
        hooks), averaged over the processes before the owners read them, rather than from the gathered gradient."""
        return False

    def together(self, params: list[torch.Tensor]) -> list[tuple[list[int], float]]:
        """Fully sharded, at the owners: the positions in ``params`` that one owner holds together, each set with
        what its state weighs there (:meth:`precond.optimizer.Optimizer.owner_units`)."""
        return each_alone(params)

    def shard_problem(self) -> str | None:
        if self.elementwise or self.gathers():
            return None
        return f"structure '{self.name}' keeps a {self.form or self.name} preconditioner of whole parameters or layers"

    @property
    def fill(self) -> str:
        """What the structure asks of its curvature: its ``form``, refined where one form is filled in
        several ways (Kronecker: ``kronecker.layer`` from module hooks, ``kronecker.gradient`` from the
        gradient)."""
        return self.form

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Create this block's per-parameter state (called once per parameter)."""

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        raise NotImplementedError

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """The fresh statistics ``update`` would accumulate, for the non-finite check before any state changes.

        Each comes with what it is (:class:`Estimate`: which parameters, which
        factor or pair), so that the guard's message names it; a structure may
        keep several per parameter (Kronecker factors) or one per several
        parameters (a dense block). ``update`` must use these same tensors (or
        recompute them identically). Estimates computed through
        :meth:`Curvature.shared` are memoised, so checking costs no extra
        backward pass. Default: nothing to check.
        """
        return []

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        raise NotImplementedError

    def from_outputs(self, ctx: GroupStep, curvature: Any) -> None:
        """While a backward pass the user runs passes the model's outputs (plain loop, torch-style closure):
        take from their graph what this step's estimates need. ``ctx.evaluation`` holds the outputs of one
        forward pass and ``∂loss/∂outputs``, ``ctx.grads`` nothing yet; ``curvature`` is a
        :class:`CurvatureRecord`. The default computes the estimates now, through the record, which replays
        them (micro-batches weighted by their samples) when the step runs."""
        self.estimates(ctx, curvature)

    def cannot_serve(self, module: Any, role: str) -> str | None:
        """Why this structure cannot precondition a parameter (its owning module and its name there), or None.
        A rule with ``match: {unserved: true}`` takes every parameter for which this says why."""
        return None

    def supports(self, transform: Transform) -> bool:
        """Whether ``transform`` knows how to act on this structure (a method named after ``form``)."""
        return callable(getattr(transform, self.form, None))

    def refusal(self, transform: Transform) -> str:
        """Why ``transform`` is not supported, and what is (appended to the validator's message); '' if nothing to add."""
        return ""


class Transform(Block, Interval):
    """A function of the curvature applied to the direction, or a map of the direction.

    ``spectral`` transforms (``inverse``, ``inverse_root``) act through a
    structure; the others (``clip``, ``identity``) act on the direction alone.
    """

    kind: ClassVar[str] = "transform"
    spectral: ClassVar[bool] = False
    linear: ClassVar[bool] = True  # commutes with a scalar coefficient
    solves: ClassVar[bool] = False  # applies (scale·C + λI)⁻¹: a structure may report the quadratic model of it

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        raise NotImplementedError

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        """Whether finite inputs always give a finite direction (on a ``form`` structure holding
        statistics that are ``nonnegative``); when every transform says so, the update check is skipped."""
        return False


class Momentum(Block):
    """Averages directions over steps: before the preconditioner (``position: pre``, Adam, Sophia) or after
    it (``post``, K-FAC's momentum on the natural gradient)."""

    kind: ClassVar[str] = "momentum"

    position: Literal["pre", "post"] = Field("pre", description="before (pre) or after (post) preconditioning")
    beta: float = Field(0.9, ge=0.0, description="momentum factor; also the param-group value 'momentum' (schedulers change it)")

    def group_defaults(self) -> dict[str, Any]:
        return {"momentum": self.beta}

    def factor(self, ctx: GroupStep) -> float:
        """This step's momentum factor: the param group's ``momentum`` (``OneCycleLR`` cycles it), else ``beta``."""
        return float(ctx.group.get("momentum", self.beta))

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Create this block's per-parameter state (called once per parameter)."""

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        raise NotImplementedError


class Step(Block):
    """Chooses the step length and moves the parameters.

    ``scale`` sees every group's preconditioned direction before momentum
    ``post`` (KL clipping, the normalised natural gradient scale the natural
    gradient, as K-FAC implementations do); ``apply`` moves the parameters
    along the final directions (a learning rate, a line search).
    """

    kind: ClassVar[str] = "step"

    def prepare(self, ctxs: list[GroupStep]) -> None:
        """Before any direction is built: put the facts this step control produces into each group's
        ``ctx.facts`` (step 'lm': the damping it adapts, for transform 'inverse')."""

    def scale(self, ctxs: list[GroupStep], directions: list[Direction]) -> list[Direction]:
        return directions

    def apply(self, ctxs: list[GroupStep], directions: list[Direction]) -> None:
        raise NotImplementedError


class Decay(Block):
    """Weight decay: on the gradient (``l2``) or on the parameters (``decoupled``)."""

    kind: ClassVar[str] = "decay"

    def gradient(self, ctx: GroupStep) -> None:
        """Adjust ``ctx.grads`` before any curvature or momentum sees them."""

    def parameters(self, ctx: GroupStep) -> None:
        """Adjust ``ctx.params`` right before the update is applied."""

    def objective_l2(self, weight_decay: float) -> float | None:
        """The coefficient ``c`` of the ``½c‖θ‖²`` this decay adds to the objective that the gradient is of
        (line searches and Levenberg–Marquardt compare losses of that objective), or ``None`` when it
        moves the parameters outside the objective."""
        return 0.0 if not weight_decay else None


class CurvatureRecord:
    """A curvature block whose graph work ran during backward passes the user ran, replayed when the step runs.

    In the plain loop and with a torch-style closure the outputs' graph is gone by the time ``opt.step()``
    runs, so a structure takes what it needs while a backward passes the outputs
    (:meth:`Structure.from_outputs`). Through this record what the curvature's ``diagonal(ctx)`` and
    ``full(ctx)`` need of each micro-batch (:meth:`Curvature.micro_batch`, with its sample count from
    :meth:`begin`) is kept and, on the step, combined (:meth:`Curvature.combine`: the one result of a single
    forward pass as it is, the sample-weighted mean of batch-mean estimates). Everything else is the
    curvature's own.
    """

    def __init__(self, curvature: Curvature) -> None:
        self.curvature = curvature
        self.parts: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        self.samples: list[int] = []
        self.recording = False  # True during a backward pass (between begin and end), False when the step replays
        # per key: (how many parts, their combination): the step asks several times (the estimates' check, the
        # structure's update); see _combine
        self.combined: dict[tuple[Any, ...], tuple[int, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.curvature, name)

    def begin(self, samples: int) -> None:
        """A new micro-batch of ``samples`` samples: record until :meth:`end`."""
        self.samples.append(samples)
        self.recording = True

    def end(self) -> None:
        self.recording = False

    def clear(self) -> None:
        self.parts, self.samples, self.combined = {}, [], {}

    def _call(self, what: str, ctx: GroupStep) -> Any:
        key = (what, tuple(map(id, ctx.params)))
        if self.recording:
            parts = self.parts.setdefault(key, [])
            if len(parts) < len(self.samples):
                parts.append((self.samples[-1], self.curvature.micro_batch(what, ctx)))
            if len(parts) == 1:  # the first micro-batch's estimate is also the step's, unless another follows
                return self._combine(what, key, parts)
            return self.curvature.combine(what, parts[-1:])  # this micro-batch's estimate, for whoever asks now
        parts = self.parts.get(key)
        if not parts:
            raise PipelineError(
                f"curvature '{self.curvature.name}' takes its statistics from the model's outputs while a backward "
                "pass reaches them, and none did since the last step: call the model given to precond.build (or "
                "its DistributedDataParallel wrapper) in the forward pass, and backpropagate a loss of its outputs"
            )
        return self._combine(what, key, parts)

    def _combine(self, what: str, key: tuple[Any, ...], parts: list[tuple[int, Any]]) -> Any:
        """The combination of ``parts``, made once per step (until another micro-batch adds a part)."""
        count, out = self.combined.get(key, (0, None))
        if count != len(parts):
            out = self.curvature.combine(what, parts)
            self.combined[key] = (len(parts), out)
        return out

    def diagonal(self, ctx: GroupStep) -> DiagonalEstimate:
        return self._call("diagonal", ctx)

    def full(self, ctx: GroupStep) -> torch.Tensor:
        return self._call("full", ctx)


def _weighted(parts: list[tuple[int, Any]]) -> Any:
    """The sample-weighted mean of batch-mean estimates (a matrix, or a :class:`DiagonalEstimate`)."""
    total = float(sum(m for m, _ in parts))
    first = parts[0][1]
    if isinstance(first, DiagonalEstimate):
        values = None
        for m, est in parts:
            own = est.values if est.values is not None else [r * r for r in est.roots or []]
            scaled = [v * (m / total * est.scale) for v in own]
            values = scaled if values is None else [a + b for a, b in zip(values, scaled)]
        return DiagonalEstimate(values=values)
    return sum(est * (m / total) for m, est in parts)


KIND_BASES: dict[str, type[Block]] = {
    "curvature": Curvature,
    "structure": Structure,
    "transform": Transform,
    "momentum": Momentum,
    "step": Step,
    "decay": Decay,
}
