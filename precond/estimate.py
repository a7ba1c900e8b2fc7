"""``precond.estimate``: the curvature of a loss, without an optimizer.

For inspection, Laplace approximations and influence functions. Every
estimator block can be called here; see :mod:`precond.curvature.common` for
the scaling conventions (the curvature of the batch-mean loss).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import nn

from precond import registry
from precond.block import Curvature, GroupStep
from precond.interfaces import Environment, param_info
from precond.errors import PipelineError, RecipeError
from precond.evaluation import evaluate
from precond.likelihood import get_likelihood
from precond.likelihood_check import OutputGradient, warn_if_mismatch


def estimate(
    estimator: str | Curvature,
    model: nn.Module,
    closure: Callable[[], Any],
    structure: str = "diagonal",
    likelihood: str | None = "categorical",
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    **options: Any,
) -> dict[str, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]] | torch.Tensor:
    """Estimate the curvature of the loss ``closure()`` returns (the batch mean).

    ``estimator``: a curvature block name (``"hessian"``, ``"gauss_newton"``,
    ``"sampled_fisher"``, ``"empirical_fisher"``, ``"hutchinson"``, ...) with
    its fields as ``**options``, or a block instance. ``closure`` runs the
    forward pass and returns ``(loss, outputs)`` (or the loss, for estimators
    that do not need outputs); it must not call backward. Random probes and
    sampled labels come from ``generator`` (or a new one seeded with ``seed``).

    Returns, for ``structure="diagonal"``, ``{name: tensor shaped like the
    parameter}``; for ``"full"``, one dense matrix over the trainable
    parameters of ``model.parameters()`` flattened in order; for
    ``"kronecker"``, ``{module_name: (A, G)}`` for every Linear/Conv2d layer
    (``A`` the input factor, with the bias coordinate last when the layer has
    a trainable bias; ``G`` the output factor), so that ``kron(G, A)`` is the
    layer's curvature block for ``[W.reshape(d_out, -1) | b]`` flattened
    row-major (conventions in :mod:`precond.layers`).

    For an estimator that uses the likelihood (``sampled_fisher``,
    ``gauss_newton``), a loss that visibly is not the likelihood's (a
    cross-entropy with ``likelihood="gaussian"``, a summed instead of a mean
    loss, ...) gives a :class:`precond.errors.LikelihoodMismatchWarning`;
    the exact criterion is in :mod:`precond.likelihood_check`.
    """
    block = _block(estimator, options)
    if structure not in block.fills:
        raise PipelineError(
            f"curvature '{block.name}' cannot fill a '{structure}' structure; it fills: {', '.join(sorted(block.fills))}"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    params = [p for _, p in named]
    saved = [p.grad for p in params]
    recorder = None
    if structure == "kronecker":
        from precond.layers import Recorder, model_layers

        recorder = Recorder(model_layers(model), getattr(block, "capture_output_grads", False))
        recorder.arm()
    lik = None if likelihood is None else get_likelihood(likelihood)
    captured = OutputGradient(closure) if lik is not None and block.needs().likelihood else None
    try:
        ev = evaluate(captured or closure, params, block.needs(), f"curvature '{block.name}'")
        if captured is not None and lik is not None:  # ∂loss/∂outputs from the backward pass evaluate ran: no extra pass
            warn_if_mismatch(lik, captured, f"precond.estimate('{block.name}', likelihood='{lik.name}')", stacklevel=2)
        ev.env = Environment(
            recipe=f"precond.estimate('{block.name}')", info=param_info(model), model=model, likelihood=lik,
            generator=generator if generator is not None else torch.Generator(device=params[0].device).manual_seed(seed),
        )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ctx = GroupStep({}, params, grads, [{} for _ in params], [1] * len(params), 1, ev, ev.env, scope=params)
        with torch.no_grad():
            if recorder is not None:
                from precond.layers import estimate_factors

                return estimate_factors(block, ctx, recorder)
            if structure == "diagonal":
                est = block.diagonal(ctx)
                values = est.values if est.values is not None else [r * r for r in est.roots or []]
                return {n: (v * est.scale).detach().clone() for (n, _), v in zip(named, values)}
            return getattr(block, structure)(ctx).detach()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        if recorder is not None:
            recorder.disarm()
            recorder.remove()


def _block(estimator: str | Curvature, options: dict[str, Any]) -> Curvature:
    if isinstance(estimator, Curvature):
        if options:
            raise TypeError("give options either in the block instance or as keywords, not both")
        return estimator
    try:
        cls = registry.get("curvature", estimator)
    except KeyError as exc:
        raise RecipeError(str(exc.args[0])) from None
    try:
        block = cls(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"curvature '{estimator}': {problems}") from None
    assert isinstance(block, Curvature)  # the registry's curvature kind holds Curvature subclasses
    return block
