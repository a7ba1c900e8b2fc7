"""Running the user's closure: the forward pass, and the backward pass the blocks need."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from precond.errors import PipelineError
from precond.interfaces import Environment, Needs

PLAIN_IDIOM = "loss.backward(); opt.step()"
CLOSURE = "closure"  # opt.step(closure), the closure runs the forward pass only: precond runs the backward(s)
TORCH_CLOSURE = "torch-style closure"  # opt.step(closure), the closure zeroes, runs forward and backward itself
PLAIN = "plain loop"  # loss.backward(); opt.step()


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
    convention: str = CLOSURE  # how the step got its gradients: CLOSURE, TORCH_CLOSURE or PLAIN
    template: bool = False  # torch's state-initialisation step (zero gradients, lr 0, no forward pass): zero estimates
    output_grad: torch.Tensor | None = None  # ∂loss/∂outputs, when a backward pass the user ran reached the outputs
    sample_total: int | None = None  # samples of the forward passes since the last step (the output tap)
    grad_scale: float | None = None  # GradScaler's loss scale of the backward passes (their statistics are scaled)

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

    def samples(self, who: str) -> int:
        """The number of samples ``M`` behind this step's gradient (every micro-batch of an accumulation)."""
        if self.sample_total:
            return self.sample_total
        out = self.outputs[0] if isinstance(self.outputs, (tuple, list)) else self.outputs
        if not isinstance(out, torch.Tensor):
            raise PipelineError(
                f"{who} needs the number of samples: return (loss, outputs) from the closure, or pass the nn.Module "
                "to precond.build (its outputs are counted)"
            )
        return out.numel() // out.shape[-1]

    def loss_output_grad(self, who: str) -> torch.Tensor:
        """``∂loss/∂outputs``: from the backward pass the user ran, or by differentiating the returned loss."""
        if self.output_grad is not None:
            return self.output_grad
        out = self.require_outputs(who)
        (grad,) = torch.autograd.grad(self.loss_graph, out, retain_graph=True)
        return grad

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


def math_attention_in_forward(model: nn.Module, owner: object) -> None:
    """Every forward pass of ``model`` runs with the math attention kernel (:func:`twice_differentiable`): for
    recipes that differentiate the gradient of a loss the user backpropagates (``create_graph=True``)."""
    stacks: list[contextlib.ExitStack] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(twice_differentiable(True))
        stacks.append(stack)

    def leave(module: nn.Module, args: Any, result: Any) -> None:
        if stacks:
            stacks.pop().close()

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    weakref.finalize(owner, lambda: [h.remove() for h in handles])


_OWN = [0]  # > 0 while precond runs a backward pass of its own (a forward-only closure's, an estimate's)
_INNER = [0]  # > 0 while precond backpropagates from the outputs inside a backward pass (sampled labels, ...)


@contextlib.contextmanager
def own_backward() -> Iterator[None]:
    """Precond's own backward pass: output taps ignore it (their optimizer takes what it needs itself)."""
    _OWN[0] += 1
    try:
        yield
    finally:
        _OWN[0] -= 1


@contextlib.contextmanager
def inner_backward() -> Iterator[None]:
    """A backward pass precond runs from the model's outputs inside another: taps, the gradient captures of
    layer hooks and the likelihood check ignore it (its gradients are not the loss's)."""
    _INNER[0] += 1
    try:
        yield
    finally:
        _INNER[0] -= 1


def in_inner_backward() -> bool:
    return _INNER[0] > 0


def model_output(result: Any) -> torch.Tensor | None:
    """The tensor of a model's result that a likelihood describes: the result itself, its ``logits`` (Hugging Face
    model outputs), or the first tensor of a tuple, list or dict."""
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = result.values() if isinstance(result, dict) else result if isinstance(result, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


class OutputTap:
    """A forward hook on the model: counts the samples of every forward pass with gradients since :meth:`reset`
    and, on a backward pass the user runs, calls ``on_backward(outputs, grad)`` when the backward reaches the
    model's outputs -- while their graph is alive, before any parameter has its gradient. That is when precond
    draws what it needs from the graph in the plain loop and with a torch-style closure (sampled-label output
    gradients, Gauss-Newton factors). Inside ``on_backward`` and during precond's own backward passes
    (:func:`own_backward`, :func:`inner_backward`) the hook does nothing; it goes with the optimizer that owns it."""

    def __init__(self, model: nn.Module, on_backward: Callable[[torch.Tensor, torch.Tensor], None], owner: object) -> None:
        self.on_backward = on_backward
        self.inside = False
        self.listening = True  # False while the optimizer's step runs, except during a closure it calls
        self.outputs: list[torch.Tensor] = []  # the forward passes' outputs since reset, with their graphs
        self.sample_total = 0
        tap = weakref.ref(self)

        def forward(module: nn.Module, args: Any, result: Any) -> None:
            me = tap()
            if me is not None:
                me._forward(result)

        handle = model.register_forward_hook(forward)
        weakref.finalize(owner, handle.remove)

    def reset(self) -> None:
        self.outputs = []
        self.sample_total = 0

    def _forward(self, result: Any) -> None:
        if not torch.is_grad_enabled():
            return
        out = model_output(result)
        if out is None or not out.requires_grad or out.dim() == 0:
            return
        self.sample_total += out.numel() // out.shape[-1]
        self.outputs.append(out)
        index, tap = len(self.outputs) - 1, weakref.ref(self)

        def backward(grad: torch.Tensor) -> None:
            me = tap()
            if me is None or not me.listening or me.inside or _OWN[0] or _INNER[0] or index >= len(me.outputs):
                return
            me.inside = True
            try:
                me.on_backward(me.outputs[index], grad)
            finally:
                me.inside = False

        out.register_hook(backward)


def evaluate(
    closure: Callable[[], Any] | None,
    params: list[torch.Tensor],
    needs: Needs,
    who: str,
    tap: OutputTap | None = None,
    always: Needs | None = None,
) -> Evaluation:
    """The gradients of one step, and what the blocks need besides, in one of three conventions.

    * :data:`CLOSURE`: the closure runs the forward pass and returns ``loss`` or ``(loss, outputs)``; precond zeroes
      the gradients and runs the backward pass(es) ``needs`` asks for (a differentiable gradient, the outputs'
      graph kept for the step).
    * :data:`TORCH_CLOSURE`: the closure zeroes, runs forward and backward itself and returns the loss
      (``torch.optim.LBFGS``'s convention; Lightning's automatic optimization).
    * :data:`PLAIN`: no closure: ``loss.backward()`` ran before ``opt.step()``; the gradients are in ``.grad``.

    In the last two precond takes what it needs from the passes the user ran: layer hooks are armed before the
    forward pass, the outputs' graph is used when the backward reaches the outputs (:class:`OutputTap`), and a
    differentiable gradient comes from ``loss.backward(create_graph=True)``. What cannot be had that way (a
    closure to call again, the graph while the step runs) is refused naming the convention that works --
    from the first step on, by what the recipe needs on any step (``always``), not only on this one.
    """
    always = needs if always is None else always | needs
    if closure is None:
        ev = Evaluation(params=params, convention=PLAIN, sample_total=tap.sample_total if tap is not None else None)
        _from_user_passes(ev, needs, always, who, tap)
        return ev
    if tap is not None:
        tap.reset()  # the closure's forward pass is this step's
    for p in params:
        p.grad = None
    with torch.enable_grad(), twice_differentiable(needs.create_graph), _listening(tap):
        result = closure()
    loss, outputs = (result[0], result[1]) if isinstance(result, (tuple, list)) and len(result) >= 2 else (result, None)
    if isinstance(loss, (tuple, list)) and len(loss) == 1:
        loss = loss[0]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PipelineError(f"the closure must return a scalar loss tensor or (loss, outputs); got {type(loss).__name__}")
    samples = tap.sample_total if tap is not None and tap.sample_total else None
    if any(p.grad is not None for p in params):  # a torch-style closure that ran backward itself
        ev = Evaluation(loss=loss.detach(), outputs=outputs, params=params, closure=closure, convention=TORCH_CLOSURE,
                        sample_total=samples)
        _from_user_passes(ev, needs, always, who, tap)
        return ev
    if needs.outputs and outputs is None and tap is not None and tap.outputs:
        outputs = tap.outputs[-1]  # a bare loss returned: the model's outputs from its forward hook
    if needs.outputs and outputs is None:
        raise PipelineError(f"{who} needs the model outputs: return (loss, outputs) from the closure")
    ev = Evaluation(loss=loss.detach(), outputs=outputs, params=params, closure=closure, sample_total=samples)
    if needs.outputs:
        ev.loss_graph = loss
    if loss.grad_fn is None:
        raise PipelineError("the loss does not depend on any parameter that requires grad (computed under no_grad?)")
    with own_backward():  # the graph is precond's: no tap takes anything from it in passing
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


@contextlib.contextmanager
def _listening(tap: OutputTap | None) -> Iterator[None]:
    """The tap takes what a backward pass inside the closure gives (a torch-style closure's), nothing after."""
    if tap is None:
        yield
        return
    tap.listening = True
    try:
        yield
    finally:
        tap.listening = False


def _from_user_passes(ev: Evaluation, needs: Needs, always: Needs, who: str, tap: OutputTap | None) -> None:
    """The plain loop or a torch-style closure: what the passes the user ran give, or a refusal naming what works."""
    if always.outputs and tap is None:
        raise PipelineError(
            f"{who} takes its curvature from the model's outputs, which in the {ev.convention} it reads while your "
            "backward pass reaches them: pass the nn.Module to precond.build(recipe, model, ...) (not its "
            "parameters), or call opt.step(closure) with a closure that runs the forward pass only and returns "
            "(loss, outputs)"
        )
    if always.closure and ev.convention == PLAIN:
        raise PipelineError(
            f"{who} needs a closure to call again (a line search, the loss at the new point), which {PLAIN_IDIOM} "
            "cannot give. Call opt.step(closure) with a torch-style closure (it zeroes the gradients, runs the "
            "forward and backward passes and returns the loss) or a forward-only closure returning (loss, outputs)"
        )
    if always.graph_at_step and always.outputs:
        raise PipelineError(
            f"{who} needs the outputs' graph while the step runs (matrix-free curvature products), which the "
            f"{ev.convention} frees with its backward pass. Call opt.step(closure) with a closure that runs the "
            "forward pass only and returns (loss, outputs): precond then runs the backward pass and keeps the graph"
        )
    if needs.create_graph:
        live = [(p, p.grad) for p in ev.params if p.grad is not None]
        if not live or any(g.grad_fn is None for _, g in live):
            raise PipelineError(
                f"{who} needs a differentiable gradient (Hessian-vector products): call "
                "loss.backward(create_graph=True) (as torch-optimizer's AdaHessian asks), or use a forward-only "
                "closure returning (loss, outputs), from which precond takes it itself"
            )
        ev.graph_grads = {}
        for p, g in live:
            ev.graph_grads[p] = g
            p.grad = g.detach()  # the graph is precond's to use once, then free
