"""Does the closure's loss match the likelihood it was given? A check from the gradient the step computes anyway.

Curvature blocks that use a likelihood (sampled labels, the loss Hessian in the outputs) assume the
closure's loss is that likelihood's batch-mean negative log-likelihood of the outputs
(:mod:`precond.likelihood`). :func:`mismatch` tests this on one evaluation from three numbers the
step has without extra work: the loss ``L``, the outputs ``f`` (shape ``(..., C)``: ``K`` entries,
``M = K / C`` samples) and ``G = ∂L/∂f``, which the step's own backward pass computes (captured by
:class:`OutputGradient`, a tensor hook on the outputs: no extra backward pass). The labels are
hidden in the closure but recoverable from ``G``, which makes an exact test (to round-off) possible.

Round-off: ``tol = max(1e-4, 8·eps)`` with ``eps`` the machine epsilon of the lowest precision among
``L``, ``f`` and ``G``. ``G ≡ 0`` or anything non-finite: nothing is checked.

``categorical`` (``L = mean_m -log softmax(f_m)[y_m]``, ``F.cross_entropy`` with the mean over all
``M`` samples). For a cross-entropy against any label distributions ``q_m`` (hard labels, label
smoothing), ``M·G_m = p_m - q_m`` with ``p_m = softmax(f_m)``; so with ``R = M·G`` and ``q = p - R``:

1. every row of ``R`` sums to 0: ``max_m |Σ_c R_mc| ≤ tol`` (the loss depends on ``f`` through
   ``softmax(f)`` only);
2. the recovered labels are distributions: ``min q ≥ -tol`` (fails for ``reduction='sum'``,
   ``ignore_index``, a mean over a subset of the rows, a factor > 1);
3. the loss is at least the cross-entropy of the recovered labels,
   ``L ≥ -(1/M) Σ q·log p - tol·(1 + |L| + (1/M) Σ (|R| + p)|log p|)`` (fails for a factor < 1).

If the rows of ``f`` are log-probabilities already (``|logsumexp f_m| ≤ tol``: ``log_softmax``
outputs with ``F.nll_loss``) the test applies to the gradient with respect to the logits they are
the log-softmax of, ``R - p (Σ_c R)``. A parameter penalty added in the closure (the ``logistic``
task's L2 term) changes neither ``G`` nor, being ``≥ 0``, test 3: it passes.

``gaussian`` (``L = F.mse_loss(f, y)``, the mean over all ``K`` entries). Then ``G = 2 (f - y) / K``
and ``L = (K/4) ‖G‖²`` exactly, for any targets. With ``L̂ = (K/4)‖G‖²`` the loss is accepted when
``|L̂ - L| ≤ tol · max(|L|, L̂)``, and also when ``L̂ < L`` unless ``G`` has the categorical
pattern above (tests 1 and 2, with ``mean_m Σ_c |R_mc| > 100·tol`` so that a nearly perfect fit does
not pass for it): a penalty ``P ≥ 0`` in the closure gives ``L = L̂ + P``. So it warns for
``L̂ > L`` (``c × F.mse_loss`` with ``c > 1``, e.g. a sum over the output dimension, ``c = C``, or
``reduction='sum'``, ``c = K``: ``L̂ = c·L``) and for a cross-entropy. Not detected (they look like
a penalty): ``c < 1`` (``0.5 * F.mse_loss``), an added constant ``> 0``.

Only evidence against the likelihood warns: a loss that passes may still differ in ways one
evaluation cannot show.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from precond.errors import LikelihoodMismatchWarning
from precond.evaluation import in_inner_backward

__all__ = ["LikelihoodMismatchWarning", "OutputGradient", "mismatch", "warn_if_mismatch"]


def _tolerance(*tensors: torch.Tensor) -> float:
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in tensors)
    return max(1e-4, 8.0 * eps)


def _categorical_pattern(f: torch.Tensor, g: torch.Tensor, tol: float) -> dict[str, Any]:
    """Tests 1-3 of the module docstring on ``f``, ``g`` (float64, ``(M, C)``)."""
    m = f.shape[0]
    logp = torch.log_softmax(f, dim=-1)
    p = logp.exp()
    r = m * g
    if bool((torch.logsumexp(f, dim=-1).abs() <= tol).all()):  # outputs are log-probabilities already
        r = r - p * r.sum(-1, keepdim=True)
    q = p - r
    row = float(r.sum(-1).abs().max())
    low = float(q.min())
    finite = torch.isfinite(logp)
    terms = torch.where(finite, q * logp, torch.zeros_like(q))
    implied = float(-terms.sum() / m)
    slack = float(torch.where(finite, (r.abs() + p) * logp.abs(), torch.zeros_like(q)).sum() / m)
    return {
        "rows_sum_to_zero": row <= tol,
        "labels_nonnegative": low >= -tol,
        "row": row,
        "low": low,
        "implied": implied,
        "slack": slack,
        "size": float(r.abs().sum() / m),
    }


def mismatch(likelihood: Any, loss: torch.Tensor, outputs: torch.Tensor, grad: torch.Tensor) -> str | None:
    """Why ``loss`` is visibly not ``likelihood``'s loss of ``outputs`` (``grad = ∂loss/∂outputs``), or None.

    The criteria are in the module docstring; the message says what was expected and what would fix it.
    """
    name = getattr(likelihood, "name", "")
    if name not in ("categorical", "gaussian") or outputs.dim() == 0 or grad.shape != outputs.shape:
        return None
    k, c = outputs.numel(), outputs.shape[-1]
    if k == 0 or c == 0 or loss.numel() != 1:
        return None
    tol = _tolerance(loss, outputs, grad)
    f = outputs.detach().to(torch.float64).reshape(-1, c)
    g = grad.detach().to(torch.float64).reshape(-1, c)
    big_l = float(loss.detach().to(torch.float64))
    if not (torch.isfinite(f).all() and torch.isfinite(g).all() and abs(big_l) < float("inf")) or not bool(g.any()):
        return None
    m = f.shape[0]
    l_hat = k / 4.0 * float(g.square().sum())  # F.mse_loss's value, were the loss F.mse_loss
    mse_like = abs(l_hat - big_l) <= tol * max(abs(big_l), l_hat)
    pattern = _categorical_pattern(f, g, tol)
    ce_like = pattern["rows_sum_to_zero"] and pattern["labels_nonnegative"]
    shape = "x".join(map(str, outputs.shape))
    if name == "gaussian":
        expected = (
            f"likelihood 'gaussian' expects loss = F.mse_loss(outputs, targets), the mean over all {k} entries of "
            f"the outputs ({shape}), for which loss = ({k}/4)·‖∂loss/∂outputs‖²; here loss = {big_l:.6g} and "
            f"({k}/4)·‖∂loss/∂outputs‖² = {l_hat:.6g}"
        )
        if mse_like:
            return None
        if ce_like and pattern["size"] > 100 * tol:
            return (
                f"{expected}, and every row of ∂loss/∂outputs sums to zero with softmax(outputs) - {m}·∂loss/∂outputs "
                "a probability vector: the gradient of a cross-entropy of logits. If the loss is a cross-entropy, pass "
                "likelihood='categorical'"
            )
        if l_hat > big_l:
            return (
                f"{expected}: the loss behaves like {l_hat / big_l if big_l > 0 else float('inf'):.4g} × F.mse_loss "
                f"(a sum over the output dimension gives {c}, reduction='sum' gives {k}). Use "
                "F.mse_loss(outputs, targets) (reduction='mean'), or divide the loss by that factor"
            )
        return None
    expected = (
        f"likelihood 'categorical' expects loss = F.cross_entropy(outputs.reshape(-1, {c}), targets.reshape(-1)) of "
        f"logits outputs ({shape}, classes last), the mean over all {m} samples"
    )
    if not pattern["rows_sum_to_zero"]:
        if mse_like:
            return (
                f"{expected}; this loss is squared error (loss = ({k}/4)·‖∂loss/∂outputs‖², as F.mse_loss): pass "
                "likelihood='gaussian'"
            )
        return (
            f"{expected}; the rows of ∂loss/∂outputs do not sum to zero (by up to {pattern['row']:.3g} × 1/{m}), so the "
            "loss is not a function of softmax(outputs): return the logits the cross-entropy is computed from as "
            "the outputs, or pass the likelihood of this loss"
        )
    if not pattern["labels_nonnegative"]:
        return (
            f"{expected}; softmax(outputs) - {m}·∂loss/∂outputs has entries down to {pattern['low']:.3g}, so the loss "
            "is not the mean over every sample: reduction='sum', ignore_index, a mean over some of the rows, or a "
            "constant factor > 1. Use the mean cross-entropy over all rows of the outputs (return only the rows "
            "that count)"
        )
    budget = tol * (1.0 + abs(big_l) + pattern["slack"])
    if big_l < pattern["implied"] - budget:
        return (
            f"{expected}; loss = {big_l:.6g} is below the cross-entropy {pattern['implied']:.6g} of the labels its "
            "gradient implies: a constant factor < 1 or a negative term. Use the plain mean cross-entropy"
        )
    return None


class OutputGradient:
    """Wraps a closure to capture ``∂loss/∂outputs`` from the backward pass the step runs anyway.

    On its first call it registers a hook on the outputs the closure returns; the hook keeps the first
    gradient that reaches them (the loss's, as the step's backward runs before any block's). Later calls
    pass through. :meth:`close` stops listening (blocks backpropagate other cotangents through the
    outputs); a closure that calls ``backward`` itself leaves nothing captured.
    """

    def __init__(self, closure: Callable[[], Any]) -> None:
        self.closure = closure
        self.armed = True
        self.loss: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None

    def __call__(self) -> Any:
        result = self.closure()
        if self.armed:
            self.armed = False
            loss, out = (result[0], result[1]) if isinstance(result, (tuple, list)) and len(result) >= 2 else (result, None)
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            if isinstance(loss, torch.Tensor) and isinstance(out, torch.Tensor) and out.requires_grad and out.grad_fn is not None:
                self.loss = loss.detach()
                self.outputs = out.detach()
                out.register_hook(self._capture)
        return result

    def _capture(self, grad: torch.Tensor) -> None:
        if self.outputs is not None and self.grad is None and not in_inner_backward():
            self.grad = grad.detach().clone()

    def close(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(loss, outputs, ∂loss/∂outputs)`` if captured; stops listening."""
        outputs, self.outputs = self.outputs, None
        if outputs is None or self.grad is None or self.loss is None:
            return None
        return self.loss, outputs, self.grad


def warn_if_mismatch(likelihood: Any, captured: OutputGradient, who: str, stacklevel: int = 2) -> None:
    """Warn (:class:`LikelihoodMismatchWarning`) when the captured loss visibly disagrees with ``likelihood``."""
    got = captured.close()
    if got is None or likelihood is None:
        return
    problem = mismatch(likelihood, *got)
    if problem:
        warnings.warn(f"{who}: {problem}", LikelihoodMismatchWarning, stacklevel=stacklevel + 1)
