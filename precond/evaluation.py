"""Running the user's closure: the forward pass, and the backward pass the blocks need."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from precond.errors import PipelineError
from precond.interfaces import Environment, Needs

PLAIN_IDIOM = "loss.backward(); opt.step()"


@dataclass
class Evaluation:
    """What one call of the closure produced, shared by every block in a step."""

    loss: torch.Tensor | None = None
    loss_graph: torch.Tensor | None = None  # the loss with its graph, kept when a block needs the outputs
    outputs: Any = None  # with their autograd graph when a block needs them
    params: list[torch.Tensor] = field(default_factory=list)
    graph_grads: dict[torch.Tensor, torch.Tensor] | None = None  # differentiable gradients (create_graph)
    closure: Callable[[], Any] | None = None
    env: Environment = field(default_factory=Environment)  # the optimizer's (set by whoever runs the step)
    memo: dict[Any, Any] = field(default_factory=dict)  # per-step results shared across param groups

    @property
    def model(self) -> nn.Module | None:
        return self.env.model

    @property
    def likelihood(self) -> Any:
        """A :class:`precond.likelihood.Likelihood`, when one was given."""
        return self.env.likelihood

    @property
    def generator(self) -> torch.Generator:
        return self.env.generator

    def require_outputs(self, who: str) -> torch.Tensor:
        out = self.outputs
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            raise PipelineError(f"{who} needs the model outputs with their graph: return (loss, outputs) from the closure")
        return out

    @property
    def distributed(self) -> bool:
        """Whether this step runs on several processes (estimates from local data must be averaged)."""
        return self.env.comm.active

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over the processes in place (nothing in one process)."""
        if self.distributed:
            self.env.comm.mean_(tensors)

    def rows(self, m: int) -> tuple[int, int] | None:
        """This process's first row and the global row count (None in one process)."""
        if not self.distributed:
            return None
        key = ("rows", m)
        if key not in self.memo:
            self.memo[key] = self.env.comm.rows(m)
        return self.memo[key]

    def require_likelihood(self, who: str) -> Any:
        if self.likelihood is None:
            raise PipelineError(
                f"{who} needs to know what distribution the model predicts: pass likelihood='categorical' "
                "(cross-entropy) or likelihood='gaussian' (squared error) to precond.build"
            )
        return self.likelihood


def twice_differentiable(on: bool) -> contextlib.AbstractContextManager[Any]:
    """Inside: ``F.scaled_dot_product_attention`` takes its math kernel, whose backward is differentiable (the
    fused CPU and CUDA kernels have no double backward). Used for the forward passes whose gradient precond
    differentiates again (Hessian-vector products, ``create_graph``)."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def evaluate(
    closure: Callable[[], Any] | None,
    params: list[torch.Tensor],
    needs: Needs,
    who: str,
) -> Evaluation:
    """Zero the gradients, run ``closure`` and the backward pass ``needs`` asks for.

    The closure returns ``loss`` or ``(loss, outputs)``. A torch-style closure
    that runs ``backward`` itself is accepted when no block needs a
    differentiable gradient. Without a closure (the plain idiom) the
    gradients already in ``.grad`` are used.
    """
    if closure is None:
        if needs.need_closure():
            raise PipelineError(
                f"{who} needs {' and '.join(needs.names())}, which {PLAIN_IDIOM} cannot give. Call "
                "opt.step(closure) with a closure that runs the forward pass and returns (loss, outputs), "
                "without calling backward."
            )
        return Evaluation(params=params)
    for p in params:
        p.grad = None
    with torch.enable_grad(), twice_differentiable(needs.create_graph):
        result = closure()
    loss, outputs = (result[0], result[1]) if isinstance(result, (tuple, list)) and len(result) >= 2 else (result, None)
    if isinstance(loss, (tuple, list)) and len(loss) == 1:
        loss = loss[0]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PipelineError(f"the closure must return a scalar loss tensor or (loss, outputs); got {type(loss).__name__}")
    if needs.outputs and outputs is None:
        raise PipelineError(f"{who} needs the model outputs: return (loss, outputs) from the closure")
    ev = Evaluation(loss=loss.detach(), outputs=outputs, params=params, closure=closure)
    if needs.outputs:
        ev.loss_graph = loss
    if any(p.grad is not None for p in params):  # a torch-style closure that ran backward itself
        if needs.create_graph or needs.outputs:
            raise PipelineError(
                f"{who} needs {' and '.join(needs.names())}: the closure must return (loss, outputs) without "
                "calling backward (the optimizer runs the backward pass itself)"
            )
        return ev
    if loss.grad_fn is None:
        raise PipelineError("the loss does not depend on any parameter that requires grad (computed under no_grad?)")
    if needs.create_graph:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        ev.graph_grads = {}
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g.detach()
                ev.graph_grads[p] = g
        return ev
    loss.backward(retain_graph=needs.outputs)
    return ev
