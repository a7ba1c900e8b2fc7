"""The small typed values that pass between the optimizer and its blocks.

Nothing here knows a block or the optimizer (this module imports neither), so
every block, the pipeline and :func:`precond.estimate` share these types
without a dependency circle:

* :class:`Needs` -- what a block needs from the step (outputs, a differentiable
  gradient, hooks, a closure, a likelihood); the pipeline provides the union.
* :class:`Direction` -- the update under construction, with a symbolic
  coefficient and denominator.
* :class:`ParamInfo` -- where a parameter lives in the model.
* :class:`Environment` -- what the optimizer provides to its blocks, fixed when
  it is built: parameter names and modules, the process group, the random
  generator, the model and likelihood, the per-parameter state.
* :class:`Facts` -- values one block produces for another within a step (the
  quadratic model of a direction, an adapted damping), declared by the
  producer and the consumers (``Block.produces`` / ``Block.consumes`` /
  ``Block.requires``) and checked when the recipe is validated.
* :class:`Estimate` -- one fresh curvature statistic and what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch
from torch import nn

from precond.distributed import Comm

@dataclass(frozen=True)
class Needs:
    """What a block needs from the step; the pipeline provides the union."""

    outputs: bool = False  # the model outputs, returned by the closure as (loss, outputs)
    create_graph: bool = False  # a differentiable gradient (double backward)
    hooks: bool = False  # forward/backward hooks on the layers (needs an nn.Module)
    closure: bool = False  # a closure it can call again (line searches, extra passes)
    model: bool = False  # a functional call of the model (torch.func)
    likelihood: bool = False  # the distribution the model predicts (precond.build(..., likelihood=...))
    graph_at_step: bool = False  # curvature products while the step runs (a CG solve): with ``outputs``, their graph then

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
            "graph_at_step": "the outputs' graph during the step",
        }
        return [labels[f.name] for f in fields(self) if getattr(self, f.name) and f.name in labels]

    def need_closure(self) -> bool:
        """Whether the plain ``loss.backward(); opt.step()`` loop cannot serve: a closure to call again, or the
        outputs' graph while the step runs (everything else precond takes from the passes the user ran)."""
        return self.closure or (self.graph_at_step and self.outputs)


@lru_cache(maxsize=64)
def _union(a: Needs, b: Needs) -> Needs:
    # every step unions each pipeline's needs: few distinct pairs, each built once
    return Needs(**{f.name: getattr(a, f.name) or getattr(b, f.name) for f in fields(a)})


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
        n = len(a) if isinstance(a, list) else len(b)  # type: ignore[arg-type]  # one of them is a list
        aa = a if isinstance(a, list) else [a] * n
        bb = b if isinstance(b, list) else [b] * n
        return [x * y for x, y in zip(aa, bb)]
    return a * b


def uniform(values: list[float]) -> float | list[float]:
    """A list of per-tensor scalars, collapsed to one float when all are equal."""
    first = values[0]
    return first if all(v == first for v in values) else values


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter lives in the model: for layer-wise blocks and messages."""

    name: str  # "layer1.weight"
    module_name: str  # "layer1"
    module: nn.Module
    role: str  # "weight", "bias", ...


def param_info(model: nn.Module) -> dict[torch.Tensor, ParamInfo]:
    """Each parameter's owning module (the first module that registers it)."""
    out: dict[torch.Tensor, ParamInfo] = {}
    for module_name, module in model.named_modules():
        for role, p in module.named_parameters(recurse=False):
            if p not in out:
                name = f"{module_name}.{role}" if module_name else role
                out[p] = ParamInfo(name, module_name, module, role)
    return out


def _no_state(param: torch.Tensor) -> dict[str, Any]:
    raise LookupError("no per-parameter state outside an optimizer")


def _no_index(param: torch.Tensor) -> int:
    raise LookupError("no parameter index outside an optimizer")


@dataclass(frozen=True)
class Environment:
    """What the optimizer provides to its blocks, fixed when it is built (never the optimizer itself).

    ``state_of(p)`` is ``p``'s per-parameter state dict (looked up on each
    call: ``load_state_dict`` replaces the dicts); ``index(p)`` is ``p``'s
    position over all param groups, a stable name (e.g. for block owners);
    ``info`` holds names and owning modules when the optimizer was built from
    an ``nn.Module``. :func:`precond.estimate` builds one without state.
    """

    recipe: str = "<none>"  # the recipe's name, for messages
    info: Mapping[torch.Tensor, ParamInfo] = field(default_factory=dict)
    comm: Comm = field(default_factory=lambda: Comm("off"))
    model: nn.Module | None = None
    likelihood: Any = None  # a precond.likelihood.Likelihood, when one was given
    generator: torch.Generator = field(default_factory=torch.Generator)
    state_of: Callable[[torch.Tensor], dict[str, Any]] = _no_state
    index: Callable[[torch.Tensor], int] = _no_index
    tap: Any = None  # the model's output tap (precond.evaluation.OutputTap): its forward passes' samples
    param_of: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # fully sharded: a step's shard -> its DTensor


@dataclass
class Facts:
    """Values one block produces for another within one step of one param group.

    Each field is declared by the block that writes it (``produces``) and the
    blocks that read it (``consumes``; ``requires`` when it cannot do
    without): the recipe validator refuses a recipe whose pipeline requires a
    fact that none of its blocks produces.
    """

    damping: float | None = None  # produced by step 'lm' (its adapted damping), consumed by transform 'inverse'
    quadratic: tuple[float, float] | None = None  # (gᵀd, dᵀ(scale·C + λI)d) of structure 'full''s output, for 'lm'


FACTS = tuple(f.name for f in fields(Facts))  # what blocks may declare they produce, consume or require


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
