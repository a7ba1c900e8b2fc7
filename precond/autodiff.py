"""Autodiff primitives for curvature: HVPs, JVP/VJP, GGN-vector products, per-sample gradients.

Everything here is a thin, typed layer over :mod:`torch.autograd` and
:mod:`torch.func`; nothing is differentiated by hand.

Parameters and vectors
----------------------
"The parameters" of a model are its *trainable* parameters (``requires_grad``)
in ``model.parameters()`` order (shared parameters appear once). Vectors in
parameter space are lists of tensors shaped like those parameters;
:func:`flatten` / :func:`unflatten` convert to and from one flat vector, and
dense matrices (:func:`dense_hessian`, :func:`dense_ggn`) are indexed by that
flattened order. Every function that takes ``params=None`` evaluates at the
model's current parameter values; passing ``params`` (a sequence of tensors in
the same order) evaluates the model at other values without touching it.

Returned tensors are detached (no autograd graph is kept alive by a result),
except ``functional_model``'s ``fn``, which is meant to be differentiated.

Scaling conventions
-------------------
Model outputs have the output/class dimension *last*; all leading dimensions
index samples (``(N, C)`` -> ``N`` samples, a sequence model's ``(N, T, C)``
-> ``M = N·T`` samples). Curvature is that of the **batch-mean loss**
``L = (1/M) Σ_m ℓ(f_m, y_m)`` as defined by the likelihood
(:mod:`precond.likelihood`): for ``categorical`` this is exactly
``F.cross_entropy(outputs.reshape(-1, C), targets.reshape(-1))`` (the mean
over all ``N·T`` tokens), for ``gaussian`` ``F.mse_loss(outputs, targets)``.
Hence :func:`ggn_vp` computes ``G v = (1/M) Σ_m J_mᵀ H_m J_m v`` with ``J_m``
the Jacobian of sample ``m``'s outputs and ``H_m`` the Hessian of the
per-sample loss with respect to them -- i.e. ``Jᵀ (∇²_f L) J v``.

API
---
``flatten(tensors) -> Tensor`` / ``unflatten(vector, like) -> list[Tensor]``
    concatenate into / split back out of one 1-D vector.
``hvp(grads, params, vectors, retain_graph=True) -> list[Tensor]``
    Hessian-vector product by double backward from gradients computed with
    ``torch.autograd.grad(loss, params, create_graph=True)``.
``hvp_fn(loss_fn, params, vectors) -> list[Tensor]``
    builds the graph (``loss_fn()``), computes ``H v``, and frees the graph.
``dense_hessian(loss_fn, params) -> Tensor``
    ``(P, P)`` Hessian of ``loss_fn()`` (small models, tests).
``functional_model(model) -> (names, params, fn)``
    ``fn(params, *args, **kwargs)`` calls ``model`` with the given parameters
    through :func:`torch.func.functional_call`.
``jvp_outputs(model, inputs, tangents, params=None) -> (outputs, J v)``
    forward-mode product (:func:`torch.func.jvp`).
``vjp_outputs(model, inputs, cotangents, params=None) -> list[Tensor]``
    reverse-mode product ``Jᵀ u`` (:func:`torch.func.vjp`).
``ggn_vp(model, inputs, likelihood, vectors, params=None) -> list[Tensor]``
    Gauss-Newton-vector product ``Jᵀ H_L J v`` (jvp, output Hessian, vjp).
``dense_ggn(model, inputs, likelihood, params=None) -> Tensor``
    ``(P, P)`` GGN matrix built from :func:`torch.func.jacrev` (small models).
``per_sample_grads(model, loss_fn, inputs, targets, params=None, randomness="error") -> list[Tensor]``
    ``vmap(grad(...))``: tensors of shape ``(N, *param.shape)``.

Model state
-----------
Functional calls carry the model's buffers along as *copies*, so they never
mutate the model: a BatchNorm in training mode normalises with batch
statistics but its running statistics are not updated by curvature passes
(the user's own forward does that). :func:`ggn_vp` runs the model twice (jvp,
then vjp); it replays the RNG state so stochastic layers such as dropout use
the same mask in both passes. :func:`per_sample_grads` runs the model on
batches of one sample, which BatchNorm in training mode does not support.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from precond.likelihood import Likelihood, get_likelihood, num_samples

__all__ = [
    "dense_ggn",
    "dense_hessian",
    "flatten",
    "functional_model",
    "ggn_vp",
    "gauss_newton_product",
    "hvp",
    "hvp_fn",
    "jvp_outputs",
    "per_sample_grads",
    "unflatten",
    "vjp_outputs",
]

FunctionalModel = Callable[..., Any]


# --------------------------------------------------------------------------- helpers


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate ``tensors`` (any shapes) into one 1-D vector, in order."""
    parts = [t.reshape(-1) for t in tensors]
    if not parts:
        raise ValueError("flatten needs at least one tensor")
    return torch.cat(parts)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vector`` into tensors shaped like ``like`` (views into ``vector``)."""
    if vector.dim() != 1:
        raise ValueError(f"unflatten expects a 1-D vector, got shape {tuple(vector.shape)}")
    sizes = [t.numel() for t in like]
    if sum(sizes) != vector.numel():
        raise ValueError(f"vector has {vector.numel()} elements but the tensors to match hold {sum(sizes)}")
    return [chunk.view(t.shape) for chunk, t in zip(torch.split(vector, sizes), like)]


def _match(tensors: Sequence[Tensor], like: Sequence[Tensor], what: str) -> list[Tensor]:
    tensors = list(tensors)
    if len(tensors) != len(like):
        raise ValueError(f"{what}: expected {len(like)} tensors (one per parameter), got {len(tensors)}")
    for i, (t, p) in enumerate(zip(tensors, like)):
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
    return tensors


def _scalar_loss(value: Any) -> Tensor:
    """Accept ``loss`` or a ``(loss, outputs, ...)`` tuple, as closures return."""
    loss = value[0] if isinstance(value, (tuple, list)) else value
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar loss tensor (or a tuple whose first item is one)")
    return loss.reshape(())


# --------------------------------------------------------------------------- Hessian


def hvp(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    retain_graph: bool = True,
) -> list[Tensor]:
    """Hessian-vector product ``H v`` by double backward.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``.
    With ``retain_graph=True`` (default) the graph survives for further products;
    it is freed when ``grads`` is dropped. Parameters the gradient does not depend
    on get zeros. The result is detached.
    """
    params = list(params)
    grads = _match(grads, params, "grads")
    vectors = _match(vectors, params, "vectors")
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:  # the loss is at most linear in params: H = 0
        return [torch.zeros_like(p) for p in params]
    out = torch.autograd.grad(
        [grads[i] for i in live],
        params,
        grad_outputs=[vectors[i] for i in live],
        retain_graph=retain_graph,
        materialize_grads=True,
    )
    return [o.detach() for o in out]


def _grads_with_graph(loss_fn: Callable[[], Any], params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    with torch.enable_grad():
        loss = _scalar_loss(loss_fn())
        return torch.autograd.grad(loss, list(params), create_graph=True, materialize_grads=True)


def hvp_fn(loss_fn: Callable[[], Any], params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` for the Hessian of ``loss_fn()`` w.r.t. ``params``; the graph is freed afterwards.

    ``loss_fn`` takes no arguments and computes the loss from ``params`` (leaf tensors
    with ``requires_grad``, e.g. ``list(model.parameters())``); it may return a scalar
    or a ``(loss, outputs)`` tuple like an optimizer closure. The result is detached.
    """
    params = list(params)
    grads = _grads_with_graph(loss_fn, params)
    return hvp(grads, params, vectors, retain_graph=False)


def dense_hessian(loss_fn: Callable[[], Any], params: Sequence[Tensor]) -> Tensor:
    """Dense ``(P, P)`` Hessian of ``loss_fn()`` over ``params`` flattened in order.

    Same ``loss_fn`` convention as :func:`hvp_fn`. Rows are computed with one batched
    double backward (``is_grads_batched``); meant for small models and tests.
    """
    params = list(params)
    grads = _grads_with_graph(loss_fn, params)
    flat = flatten(grads)
    n = flat.numel()
    if not flat.requires_grad:
        return torch.zeros(n, n, dtype=flat.dtype, device=flat.device)
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    try:
        rows = torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one double backward per row
        per_row = [torch.autograd.grad(flat, params, grad_outputs=e, retain_graph=True, allow_unused=True) for e in eye]
        rows = tuple(
            None if per_row[0][i] is None else torch.stack([r[i] for r in per_row]) for i in range(len(params))
        )
    blocks = [
        torch.zeros(n, p.numel(), dtype=flat.dtype, device=flat.device) if r is None else r.reshape(n, -1)
        for r, p in zip(rows, params)
    ]
    return torch.cat(blocks, dim=1).detach()


# --------------------------------------------------------------------------- functional model


def functional_model(model: nn.Module) -> tuple[tuple[str, ...], tuple[Tensor, ...], FunctionalModel]:
    """Functional view of ``model`` for :mod:`torch.func` transforms.

    Returns ``(names, params, fn)``: the names and current values (detached, sharing
    storage with the model) of the trainable parameters in ``model.parameters()``
    order, and ``fn(params, *args, **kwargs)`` which calls ``model(*args, **kwargs)``
    with those parameter values via :func:`torch.func.functional_call`. Frozen
    parameters are the model's own; buffers are passed as copies, so ``fn`` never
    mutates the model (BatchNorm running statistics are left alone).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = tuple(n for n, _ in named)
    params = tuple(p.detach() for _, p in named)

    def fn(params: Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
        params = tuple(params)
        if len(params) != len(names):
            raise ValueError(f"expected {len(names)} parameter tensors, got {len(params)}")
        state: dict[str, Tensor] = dict(zip(names, params))
        for name, buf in model.named_buffers():
            state[name] = buf.clone()
        return functional_call(model, state, args, kwargs)

    return names, params, fn


def _params_for(model: nn.Module, params: Sequence[Tensor] | None) -> tuple[tuple[Tensor, ...], FunctionalModel]:
    _, current, fn = functional_model(model)
    if params is None:
        return current, fn
    return tuple(_match(params, current, "params")), fn


def _as_tensor_output(outputs: Any) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return a Tensor of outputs, got {type(outputs).__name__}")
    return outputs


def jvp_outputs(
    model: nn.Module,
    inputs: Any,
    tangents: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(outputs, J v)``: the model outputs and their directional derivative along ``tangents``.

    ``J = ∂ model(inputs) / ∂ params``; ``tangents`` is one tensor per trainable parameter.
    Computed with :func:`torch.func.jvp` (forward mode, one forward pass).
    """
    params, fn = _params_for(model, params)
    tangents = tuple(_match(tangents, params, "tangents"))
    outputs, jv = torch.func.jvp(lambda *ps: fn(ps, inputs), params, tangents)
    return _as_tensor_output(outputs).detach(), jv.detach()


def vjp_outputs(
    model: nn.Module,
    inputs: Any,
    cotangents: Tensor,
    params: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """``Jᵀ u`` for ``u = cotangents`` (shaped like the outputs), one tensor per parameter.

    Computed with :func:`torch.func.vjp` (one forward and one backward pass).
    """
    params, fn = _params_for(model, params)
    outputs, vjp_fn = torch.func.vjp(lambda *ps: fn(ps, inputs), *params)
    outputs = _as_tensor_output(outputs)
    if tuple(cotangents.shape) != tuple(outputs.shape):
        raise ValueError(f"cotangents have shape {tuple(cotangents.shape)}, outputs {tuple(outputs.shape)}")
    return [g.detach() for g in vjp_fn(cotangents)]


def _replay_rng(tensors: Iterable[Any]) -> AbstractContextManager[Any]:
    """Fork the RNG of the devices ``tensors`` live on (CPU always): the block's random
    draws are undone on exit, so the next pass sees the same random state."""
    accel = {(t.device.type, t.device.index) for t in tensors if isinstance(t, Tensor) and t.device.type != "cpu"}
    types = {kind for kind, _ in accel}
    if len(types) > 1:  # pragma: no cover - mixed accelerators
        return nullcontext()
    if not types:
        return torch.random.fork_rng(devices=[])
    (device_type,) = types
    indices = sorted({idx if idx is not None else 0 for _, idx in accel})
    return torch.random.fork_rng(devices=indices, device_type=device_type)


def ggn_vp(
    model: nn.Module,
    inputs: Any,
    likelihood: str | Likelihood,
    vectors: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Generalised Gauss-Newton-vector product ``G v = Jᵀ H_L J v`` of the batch-mean loss.

    ``G v = (1/M) Σ_m J_mᵀ H_m J_m v`` where ``M`` is the number of samples in the
    outputs (all leading dimensions, see the module docstring) and ``H_m`` is
    ``likelihood.hessian`` of sample ``m``. Implementation: ``J v`` by
    :func:`torch.func.jvp`, ``H_L (J v)`` by ``likelihood.hessian_vp``, then ``Jᵀ (·)``
    by :func:`torch.func.vjp`. The RNG state is replayed between the two forward passes
    so that dropout draws the same mask. The result is detached.
    """
    lik = get_likelihood(likelihood)
    params, fn = _params_for(model, params)
    vectors = tuple(_match(vectors, params, "vectors"))

    def f(*ps: Tensor) -> Tensor:
        return fn(ps, inputs)

    with _replay_rng([*params, inputs]):
        outputs, jv = torch.func.jvp(f, params, vectors)
    _, vjp_fn = torch.func.vjp(f, *params)
    return gauss_newton_product(_as_tensor_output(outputs).detach(), jv.detach(), vjp_fn, lik)


def gauss_newton_product(
    outputs: Tensor, jv: Tensor, vjp: Callable[[Tensor], Sequence[Tensor]], likelihood: Likelihood
) -> list[Tensor]:
    """``Jᵀ H_L (J v) / M`` from ``J v`` (shaped like ``outputs``) and a map ``u ↦ Jᵀ u``.

    The one GGN-vector product behind :func:`ggn_vp` (``J v`` and ``Jᵀ u`` by
    ``torch.func`` on a functional call of the model) and the curvature blocks'
    matrix-free products (:mod:`precond.curvature.products`: both from the graph
    of the outputs a closure returned). ``M`` is the sample count of ``outputs``.
    """
    return [g.detach() for g in vjp(likelihood.hessian_vp(outputs, jv) / num_samples(outputs))]


def dense_ggn(
    model: nn.Module,
    inputs: Any,
    likelihood: str | Likelihood,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Dense ``(P, P)`` GGN ``(1/M) Σ_m J_mᵀ H_m J_m`` over the parameters flattened in order.

    The full Jacobian comes from :func:`torch.func.jacrev` (one forward pass); memory
    is ``O(M · C · P)``, so this is for small models and tests.
    """
    lik = get_likelihood(likelihood)
    params, fn = _params_for(model, params)

    def f(*ps: Tensor) -> tuple[Tensor, Tensor]:
        out = _as_tensor_output(fn(ps, inputs))
        return out, out

    jac, outputs = torch.func.jacrev(f, argnums=tuple(range(len(params))), has_aux=True)(*params)
    outputs = outputs.detach()
    m, c = num_samples(outputs), outputs.shape[-1]
    jmat = torch.cat([j.reshape(m, c, -1) for j in jac], dim=-1).detach()  # (M, C, P)
    hj = lik.hessian(outputs.reshape(m, c)) @ jmat  # (M, C, P)
    n = jmat.shape[-1]
    return jmat.reshape(-1, n).T @ hj.reshape(-1, n) / m


# --------------------------------------------------------------------------- per-sample gradients


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | str | Likelihood,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor] | None = None,
    randomness: str = "error",
) -> list[Tensor]:
    """Gradients of each sample's loss, one tensor of shape ``(N, *param.shape)`` per parameter.

    Sample ``n`` is ``inputs[n]`` (run through the model as a batch of one) with loss
    ``loss_fn(output_n, targets[n])``, where ``output_n`` has the batch dimension
    removed; ``loss_fn`` must return a scalar. A likelihood (name or instance) may be
    given instead: its ``per_sample_loss`` is used, averaged over any remaining sample
    dimensions (tokens of a sequence), so that the mean over ``n`` of the result is the
    gradient of ``likelihood.loss`` on the whole batch. Computed with
    ``vmap(grad(...))``; ``randomness`` is passed to :func:`torch.func.vmap` (use
    ``"different"`` or ``"same"`` for models with dropout in training mode).
    """
    params, fn = _params_for(model, params)
    if isinstance(loss_fn, (str, Likelihood)):
        lik = get_likelihood(loss_fn)

        def sample_loss(out: Tensor, y: Tensor) -> Tensor:
            return lik.per_sample_loss(out, y).mean()

    else:
        sample_loss = loss_fn

    def one(ps: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        out = _as_tensor_output(fn(ps, x.unsqueeze(0))).squeeze(0)
        return _scalar_loss(sample_loss(out, y))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), randomness=randomness)(
        params, inputs, targets
    )
    return [g.detach() for g in grads]


# --------------------------------------------------------------------------- from a recorded graph
#
# The optimizer's closure hides the model inputs and targets; what it returns
# is the loss and the outputs *with their autograd graph*. The functions below
# work from that graph alone, so every estimator runs on any closure:
# per-sample products batch the backward pass with ``is_grads_batched``
# (vmap over the autograd engine), chunked to bound memory.


def batched_vjp(
    outputs: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    cotangents: Callable[[int, int], Tensor | Sequence[Tensor]],
    count: int,
    chunk: int = 256,
) -> list[Tensor]:
    """``count`` vector-Jacobian products through the recorded graph of ``outputs``.

    ``cotangents(start, stop)`` returns the cotangents ``start..stop-1``
    stacked on a leading dimension (one tensor per output), built lazily per
    chunk. Returns one tensor per parameter of shape ``(count, *param.shape)``,
    detached; the graph is retained for further products.
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    params = list(params)
    if count == 1:  # one product: a plain backward, no vmap over the engine
        cot = cotangents(0, 1)
        cot = [cot] if isinstance(cot, Tensor) else list(cot)
        grads = torch.autograd.grad(
            outs, params, grad_outputs=[c[0] for c in cot], retain_graph=True, allow_unused=True, materialize_grads=True
        )
        return [g.detach().unsqueeze(0) for g in grads]
    results: list[list[Tensor]] = [[] for _ in params]
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        cot = cotangents(start, stop)
        cot = [cot] if isinstance(cot, Tensor) else list(cot)
        grads = torch.autograd.grad(
            outs, params, grad_outputs=cot, retain_graph=True, allow_unused=True, is_grads_batched=True,
            materialize_grads=True,
        )
        for r, g, p in zip(results, grads, params):
            if g.shape != (stop - start, *p.shape):  # unreached parameters come back as one unbatched zero
                g = g.new_zeros(stop - start, *p.shape)
            r.append(g.detach())
    return [torch.cat(r) if len(r) > 1 else r[0] for r in results]


def per_sample_vjp(outputs: Tensor, params: Sequence[Tensor], vectors: Tensor, chunk: int = 256) -> list[Tensor]:
    """``J_mᵀ u_mk`` for every sample ``m`` of ``outputs`` and every vector ``k``.

    ``outputs`` has the class/output dimension last and ``M`` samples in the
    leading dims; ``vectors`` has shape ``(M, C, K)`` (``K`` vectors per
    sample). Returns tensors of shape ``(M*K, *param.shape)`` ordered
    sample-major. This is how per-sample gradients and exact GGN factors are
    obtained from a closure's graph.
    """
    c = outputs.shape[-1]
    m = outputs.numel() // c
    k = vectors.shape[-1]
    flat = vectors.reshape(m, c, k).to(outputs.dtype)

    def cot(start: int, stop: int) -> Tensor:
        idx = torch.arange(start, stop, device=outputs.device)
        sample, column = idx // k, idx % k
        out = torch.zeros(stop - start, m, c, dtype=outputs.dtype, device=outputs.device)
        out[torch.arange(stop - start), sample] = flat[sample, :, column]
        return out.reshape(stop - start, *outputs.shape)

    return batched_vjp(outputs, params, cot, m * k, chunk)


def batched_hvp(grads: Sequence[Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor], chunk: int = 256) -> list[Tensor]:
    """Hessian-vector products for a batch of vectors (each ``(B, *param.shape)``) by double backward.

    ``grads`` come from ``torch.autograd.grad(loss, params, create_graph=True)``.
    Parameters the gradient does not depend on get zeros; results are detached.
    """
    params = list(params)
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    count = vectors[0].shape[0]
    if not live:
        return [torch.zeros(count, *p.shape, dtype=p.dtype, device=p.device) for p in params]
    return batched_vjp([grads[i] for i in live], params, lambda a, b: [vectors[i][a:b] for i in live], count, chunk)
