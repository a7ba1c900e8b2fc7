"""What every block is: a pydantic config with a few short methods.

A block never sees the optimizer's internals. The pipeline hands it a
:class:`GroupStep` (the tensors of one param group for this step) and a
:class:`Direction` (the update being built), and the block declares through
:meth:`Block.needs` what the step must provide (model outputs, a
differentiable gradient, layer hooks, a closure to re-evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from precond.evaluation import Evaluation
    from precond.optimizer import Optimizer

KINDS = ("curvature", "structure", "transform", "momentum", "step", "decay")


@dataclass(frozen=True)
class Needs:
    """What a block needs from the step; the pipeline provides the union."""

    outputs: bool = False  # the model outputs, returned by the closure as (loss, outputs)
    create_graph: bool = False  # a differentiable gradient (double backward)
    hooks: bool = False  # forward/backward hooks on the layers (needs an nn.Module)
    closure: bool = False  # a closure it can call again (line searches, extra passes)
    model: bool = False  # a functional call of the model (torch.func)
    likelihood: bool = False  # the distribution the model predicts (precond.build(..., likelihood=...))

    def __or__(self, other: Needs) -> Needs:
        return _union(self, other)

    def names(self) -> list[str]:
        """What the step must provide (the likelihood is given at build time and is not listed)."""
        labels = {
            "outputs": "model outputs",
            "create_graph": "a differentiable gradient",
            "hooks": "layer hooks",
            "closure": "a closure to re-evaluate",
            "model": "the model (nn.Module)",
        }
        return [labels[f.name] for f in fields(self) if getattr(self, f.name) and f.name in labels]

    def need_closure(self) -> bool:
        """Whether the plain ``loss.backward(); opt.step()`` idiom is not enough (layer hooks must be
        armed before the forward pass, so they need the closure too)."""
        return self.outputs or self.create_graph or self.closure or self.hooks


@lru_cache(maxsize=64)
def _union(a: Needs, b: Needs) -> Needs:
    # every step unions each pipeline's needs: few distinct pairs, each built once
    return Needs(**{f.name: getattr(a, f.name) or getattr(b, f.name) for f in fields(a)})


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

    # lifecycle: no-ops unless a block needs them (e.g. layer hooks for Kronecker factors)
    def setup(self, optimizer: Optimizer) -> None:
        """Called once when the optimizer is built (register module hooks, map layers)."""

    def before_closure(self, optimizer: Optimizer, step: int) -> None:
        """Called before the closure runs on ``step`` (arm hooks on refresh steps)."""

    def after_step(self, optimizer: Optimizer) -> None:
        """Called at the end of every step (disarm hooks, drop recorded tensors)."""

    def key(self, what: str) -> str:
        """The per-parameter state key this block stores ``what`` under."""
        return f"{self.kind}.{what}"

    def describe(self) -> str:
        """One line for tables: the type and the fields that differ from defaults."""
        data = self.model_dump(exclude={"type"})
        args = ", ".join(f"{k}={v}" for k, v in data.items())
        return f"{self.name}({args})" if args else self.name


class Interval(BaseModel):
    """Mixin: the block acts only on every ``every``-th step, from step ``start``."""

    every: int = Field(1, ge=1, description="act on every k-th step only (amortise expensive work)")
    start: int = Field(1, ge=1, description="first step (1-based) on which to act")

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0


@dataclass
class Direction:
    """An update under construction: ``coef * tensors / denominator``.

    ``coef`` is a float or one float per tensor, and ``denominator`` an
    optional list of tensors; keeping both symbolic lets a bias correction,
    the learning rate and a diagonal preconditioner fold into one final
    ``addcdiv_`` (as torch.optim's Adam does). ``owned`` says whether
    ``tensors`` belong to the pipeline (may be changed in place) or are
    someone's state (a momentum buffer, ``p.grad``).
    """

    tensors: list[torch.Tensor]
    coef: float | list[float] = 1.0
    owned: bool = False
    denominator: list[torch.Tensor] | None = None
    nonzero: bool = False  # the denominator cannot be 0 where finite (a damping floor); spares the check

    @property
    def plain(self) -> bool:
        """No pending coefficient or denominator: ``tensors`` is the direction."""
        return self.denominator is None and self.coef == 1.0

    def scaled(self, c: float | list[float]) -> Direction:
        return Direction(self.tensors, _mul(self.coef, c), self.owned, self.denominator, self.nonzero)

    def materialize(self) -> Direction:
        """The same direction as plain tensors the pipeline owns."""
        tensors, owned = self.tensors, self.owned
        if self.denominator is not None:
            tensors, owned = list(torch._foreach_div(tensors, self.denominator)), True
        if self.coef == 1.0:
            return Direction(tensors, 1.0, True) if owned else Direction([t.clone() for t in tensors], 1.0, True)
        if owned:
            torch._foreach_mul_(tensors, self.coef)
            return Direction(tensors, 1.0, True)
        return Direction(list(torch._foreach_mul(tensors, self.coef)), 1.0, True)


def _mul(a: float | list[float], b: float | list[float]) -> float | list[float]:
    if isinstance(a, list) or isinstance(b, list):
        n = len(a) if isinstance(a, list) else len(b)  # type: ignore[arg-type]
        aa = a if isinstance(a, list) else [a] * n
        bb = b if isinstance(b, list) else [b] * n
        return [x * y for x, y in zip(aa, bb)]
    return a * b


def uniform(values: list[float]) -> float | list[float]:
    """A list of per-tensor scalars, collapsed to one float when all are equal."""
    first = values[0]
    return first if all(v == first for v in values) else values


@dataclass
class GroupStep:
    """The tensors of one param group for one ``step()`` call."""

    optimizer: Optimizer
    group: dict[str, Any]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict[str, Any]]
    steps: list[int]  # per-parameter step counts, after this step's increment
    step: int  # the optimizer's global step count (1-based)
    evaluation: Evaluation
    scope: list[torch.Tensor] = field(default_factory=list)  # every parameter this step's curvature serves
    extra: dict[str, Any] = field(default_factory=dict)

    def gathered(self, key: str) -> list[torch.Tensor]:
        return [s[key] for s in self.states]

    @property
    def lr(self) -> float:
        return float(self.group["lr"])


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

    def reduce_estimates(self, structure: Structure) -> bool:
        """Under torch.distributed: whether ``structure``'s fresh estimates are means over this process's
        batch, which the pipeline averages over the processes (the default), or already global (False:
        built from DDP's averaged gradients, or averaged inside the block before a nonlinear step)."""
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


@dataclass(frozen=True)
class Estimate:
    """One fresh curvature statistic and what it is, for the non-finite check and its message.

    ``params``: the positions in ``ctx.params`` of the parameters it belongs
    to (one for a diagonal or a gradient factor; a layer's weight and bias
    for K-FAC factors; every parameter of a dense block). ``part``: which
    statistic of them, e.g. ``"Kronecker factor 0 of 2, dims 256"`` (empty
    for the one statistic of a parameter).
    """

    tensor: torch.Tensor
    params: tuple[int, ...]
    part: str = ""


def per_parameter(tensors: list[torch.Tensor]) -> list[Estimate]:
    """One estimate per parameter of the group, in order (diagonal statistics)."""
    return [Estimate(t, (i,)) for i, t in enumerate(tensors)]


class Structure(Block):
    """Stores the curvature and applies spectral transforms to directions."""

    kind: ClassVar[str] = "structure"
    form: ClassVar[str] = ""

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

    def supports(self, transform: Transform) -> bool:
        """Whether ``transform`` knows how to act on this structure (a method named after ``form``)."""
        return callable(getattr(transform, self.form, None))


class Transform(Block, Interval):
    """A function of the curvature applied to the direction, or a map of the direction.

    ``spectral`` transforms (``inverse``, ``inverse_root``) act through a
    structure; the others (``clip``, ``identity``) act on the direction alone.
    """

    kind: ClassVar[str] = "transform"
    spectral: ClassVar[bool] = False
    linear: ClassVar[bool] = True  # commutes with a scalar coefficient

    def apply(self, ctx: GroupStep, direction: Direction) -> Direction:
        raise NotImplementedError

    def keeps_finite(self, form: str, nonnegative: bool) -> bool:
        """Whether finite inputs always give a finite direction (on a ``form`` structure holding
        statistics that are ``nonnegative``); when every transform says so, the update check is skipped."""
        return False


class Momentum(Block):
    kind: ClassVar[str] = "momentum"

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


KIND_BASES: dict[str, type[Block]] = {
    "curvature": Curvature,
    "structure": Structure,
    "transform": Transform,
    "momentum": Momentum,
    "step": Step,
    "decay": Decay,
}
