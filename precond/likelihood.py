"""What distribution the model predicts: the loss, its Hessian, and label sampling.

A *likelihood* ties the loss a user writes in their closure to the
probabilistic model behind it. Curvature estimators need three things from it:

* the **loss Hessian with respect to the model outputs** (for Gauss-Newton
  products ``Jᵀ H_L J v``) -- :meth:`Likelihood.hessian`,
  :meth:`Likelihood.hessian_vp` and a factor :meth:`Likelihood.hessian_sqrt`;
* **labels sampled from the model's own predictive distribution** (for the
  sampled / "true" Fisher, Sophia-G, K-FAC) -- :meth:`Likelihood.sample`;
* the **loss itself**, batch-mean and per sample -- :meth:`Likelihood.loss`,
  :meth:`Likelihood.per_sample_loss`.

Conventions (shared by every likelihood)
----------------------------------------
* The **last dimension of ``outputs`` is the output/class dimension**; every
  leading dimension indexes *samples*. Outputs of shape ``(N, C)`` hold ``N``
  samples, a sequence model's ``(N, T, C)`` logits hold ``N·T`` samples
  (tokens). Note that this differs from :func:`torch.nn.functional.cross_entropy`
  for inputs of more than two dimensions, which expects the class dimension
  at position 1; :meth:`Categorical.loss` reshapes to ``(-1, C)`` instead.
* ``loss(outputs, targets)`` is the *batch-mean* loss and equals the mean over
  all samples of ``per_sample_loss``. With ``M = outputs.numel() //
  outputs.shape[-1]`` samples (see :func:`num_samples`), the Hessian of
  ``loss`` with respect to the whole ``outputs`` tensor is block diagonal with
  blocks ``hessian(outputs)[m] / M``.
* ``per_sample_loss(outputs, targets)`` broadcasts over leading dimensions: a
  single sample ``(C,)`` gives a scalar, a batch ``(..., C)`` gives ``(...)``.
* The Fisher identity holds for the per-sample loss: with ``ŷ ~ sample(f)``,
  ``E[∇_f ℓ(f, ŷ) ∇_f ℓ(f, ŷ)ᵀ] = hessian(f)``, i.e. the loss is exactly the
  negative log-likelihood (up to a constant) of the sampling distribution, so
  the generalised Gauss-Newton matrix equals the Fisher.
* Sampling draws only from the ``torch.Generator`` passed in, never from the
  global RNG; sampled targets are detached.

Likelihoods
-----------
``categorical`` (:class:`Categorical`)
    ``loss = F.cross_entropy(outputs.reshape(-1, C), targets.reshape(-1))``;
    per-sample ``ℓ(f, y) = -log softmax(f)_y``; ``H = diag(p) - p pᵀ`` with
    ``p = softmax(f)``; ``S = diag(√p) - p √pᵀ`` (``S Sᵀ = H`` because
    ``Σ p = 1``); ``H v = p ⊙ v - p (pᵀ v)``; labels ``ŷ ~ Categorical(p)``.
``gaussian`` (:class:`Gaussian`)
    ``loss = F.mse_loss(outputs, targets)`` (torch's default: the mean over
    *all* elements); per-sample ``ℓ(f, y) = (1/D) Σ_d (f_d - y_d)²`` for ``D =
    outputs.shape[-1]``; ``H = (2/D) I``; ``S = √(2/D) I``; targets
    ``ŷ = f + √(D/2) ε`` with ``ε ~ N(0, I)`` (the Gaussian whose negative
    log-likelihood is ``ℓ`` up to a constant). Scalar regression should use
    outputs of shape ``(N, 1)``: with outputs of shape ``(N,)`` the whole
    vector is one sample with ``D = N`` -- the batch loss and its Hessian are
    still right, but sampling and per-sample quantities then treat the batch
    as a single sample.

Use :func:`get_likelihood` to turn a name (or an instance) into an object;
:data:`LIKELIHOODS` is the registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LIKELIHOODS",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "get_likelihood",
    "num_samples",
]


def num_samples(outputs: Tensor) -> int:
    """Number of samples ``M`` in ``outputs``: the product of all but the last dimension.

    The batch-mean loss of every likelihood is ``(1/M) Σ_m ℓ(outputs[m], targets[m])``.
    """
    if outputs.dim() == 0:
        raise ValueError("outputs must have at least one dimension (the output dimension)")
    return outputs.numel() // outputs.shape[-1] if outputs.shape[-1] else 0


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "sampling needs an explicit torch.Generator (precond never draws from the global "
            f"RNG); got {type(generator).__name__}"
        )
    return generator


def _rows(rows: tuple[int, int] | None, m: int) -> tuple[int, int]:
    """``(first, total)`` of this part's ``m`` rows in the whole batch (default: the whole batch)."""
    if rows is None:
        return 0, m
    first, total = rows
    if first < 0 or first + m > total:
        raise ValueError(f"rows {first}..{first + m} do not fit in a batch of {total}")
    return first, total


def _check_samples(samples: int | None) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be None or a positive integer, got {samples!r}")


class Likelihood(ABC):
    """The predictive distribution of a model and its loss. See the module docstring."""

    #: registry name
    name: str = ""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Batch-mean loss (the loss a user writes in the closure)."""

    @abstractmethod
    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Loss of each sample; broadcasts over leading dims (``(..., C)`` -> ``(...)``)."""

    @abstractmethod
    def sample(
        self, outputs: Tensor, generator: torch.Generator, samples: int | None = None, rows: tuple[int, int] | None = None
    ) -> Tensor:
        """Targets drawn from the predictive distribution defined by ``outputs``.

        ``samples=None`` returns one draw shaped like ``targets`` (``loss``-ready);
        ``samples=k`` returns ``k`` independent draws stacked as ``(k, *target_shape)``
        (also for ``k = 1``). Only ``generator`` is used; the result is detached.
        ``rows=(first, total)``: the outputs are rows ``first ..`` of a batch of
        ``total`` rows (one process of several): the random numbers of all
        ``total`` rows are drawn and this part's are used, so the draws do not
        depend on how the batch is split (docs/distributed.md).
        """

    @abstractmethod
    def hessian(self, outputs: Tensor) -> Tensor:
        """Per-sample Hessian of ``per_sample_loss`` w.r.t. the outputs, ``(..., C, C)``."""

    @abstractmethod
    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """A factor ``S`` of shape ``(..., C, K)`` with ``S @ Sᵀ == hessian(outputs)``."""

    @abstractmethod
    def hessian_vp(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """Per-sample ``H v`` without forming ``H``; ``vectors`` has the shape of ``outputs``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class Categorical(Likelihood):
    """Softmax over the last dimension of the outputs (logits); loss = cross-entropy."""

    name = "categorical"

    @staticmethod
    def _check_targets(outputs: Tensor, targets: Tensor) -> None:
        if outputs.dim() < 1:
            raise ValueError("categorical outputs must have a class dimension (last)")
        if tuple(targets.shape) != tuple(outputs.shape[:-1]):
            raise ValueError(
                f"categorical targets must have shape outputs.shape[:-1] = {tuple(outputs.shape[:-1])} "
                f"(class dimension last), got {tuple(targets.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"categorical targets must be integer class indices, got dtype {targets.dtype}")

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``F.cross_entropy(outputs.reshape(-1, C), targets.reshape(-1))`` (mean over all samples)."""
        self._check_targets(outputs, targets)
        num_classes = outputs.shape[-1]
        return F.cross_entropy(outputs.reshape(-1, num_classes), targets.reshape(-1))

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``-log softmax(outputs)[targets]``; ``(..., C)`` logits, ``(...)`` integer targets."""
        log_p = torch.log_softmax(outputs, dim=-1)
        return -log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

    def sample(
        self, outputs: Tensor, generator: torch.Generator, samples: int | None = None, rows: tuple[int, int] | None = None
    ) -> Tensor:
        """Class indices ``ŷ ~ Categorical(softmax(outputs))`` (int64), from ``generator`` only.

        Inverse-CDF sampling: one uniform ``u`` per row and draw, ``ŷ = #{j : cdf_j <= u}``.
        """
        generator = _check_generator(generator)
        _check_samples(samples)
        logits = outputs.detach()
        if logits.dim() < 1:
            raise ValueError("categorical outputs must have a class dimension (last)")
        batch_shape = tuple(logits.shape[:-1])
        num_classes = logits.shape[-1]
        compute_dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        probs = torch.softmax(logits.to(compute_dtype), dim=-1).reshape(-1, num_classes)
        k = 1 if samples is None else samples
        first, total = _rows(rows, probs.shape[0])
        u = torch.rand(k, total, generator=generator, dtype=compute_dtype, device=generator.device)[:, first : first + probs.shape[0]]
        cdf = probs.cumsum(-1)
        drawn = torch.searchsorted(cdf, u.T.to(logits.device).contiguous(), right=True).clamp_(max=num_classes - 1)  # (M, k)
        drawn = drawn.transpose(0, 1).reshape(k, *batch_shape)
        return drawn[0] if samples is None else drawn

    def hessian(self, outputs: Tensor) -> Tensor:
        """``diag(p) - p pᵀ`` with ``p = softmax(outputs)``, shape ``(..., C, C)``."""
        p = torch.softmax(outputs, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """``diag(√p) - p √pᵀ`` (``C × C``); its square ``S Sᵀ`` is ``diag(p) - p pᵀ`` since ``Σp = 1``."""
        p = torch.softmax(outputs, dim=-1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)

    def hessian_vp(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``p ⊙ v - p (pᵀ v)`` per sample."""
        p = torch.softmax(outputs, dim=-1)
        pv = p * vectors
        return pv - p * pv.sum(dim=-1, keepdim=True)


class Gaussian(Likelihood):
    """Gaussian with mean = outputs; loss = mean squared error (``F.mse_loss`` default)."""

    name = "gaussian"

    @staticmethod
    def _check_targets(outputs: Tensor, targets: Tensor) -> None:
        if outputs.dim() < 1:
            raise ValueError("gaussian outputs must have an output dimension (last)")
        if tuple(targets.shape) != tuple(outputs.shape):
            raise ValueError(
                f"gaussian targets must have the shape of the outputs {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)} (no broadcasting)"
            )

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``F.mse_loss(outputs, targets)``: the mean of ``(f - y)²`` over all elements."""
        self._check_targets(outputs, targets)
        return F.mse_loss(outputs, targets)

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``mean_d (f_d - y_d)²`` over the last dimension."""
        return (outputs - targets).square().mean(dim=-1)

    def sample(
        self, outputs: Tensor, generator: torch.Generator, samples: int | None = None, rows: tuple[int, int] | None = None
    ) -> Tensor:
        """``ŷ = f + √(D/2) ε``, ``ε ~ N(0, I)`` from ``generator``; same dtype as the outputs."""
        generator = _check_generator(generator)
        _check_samples(samples)
        mean = outputs.detach()
        if mean.dim() < 1:
            raise ValueError("gaussian outputs must have an output dimension (last)")
        scale = math.sqrt(mean.shape[-1] / 2.0)
        k, d = 1 if samples is None else samples, mean.shape[-1]
        m = mean.numel() // d if d else 0
        first, total = _rows(rows, m)
        noise = torch.randn(k, total, d, generator=generator, dtype=mean.dtype, device=generator.device)[:, first : first + m].to(mean.device)
        noise = noise.reshape(mean.shape if samples is None else (samples, *mean.shape))
        return mean + scale * noise

    def _identity(self, outputs: Tensor, scale: float) -> Tensor:
        d = outputs.shape[-1]
        eye = torch.eye(d, dtype=outputs.dtype, device=outputs.device) * scale
        return eye.expand(*outputs.shape[:-1], d, d)

    def hessian(self, outputs: Tensor) -> Tensor:
        """``(2/D) I``, shape ``(..., D, D)`` (an expanded view; clone before writing to it)."""
        return self._identity(outputs, 2.0 / outputs.shape[-1])

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """``√(2/D) I``, shape ``(..., D, D)`` (an expanded view; clone before writing to it)."""
        return self._identity(outputs, math.sqrt(2.0 / outputs.shape[-1]))

    def hessian_vp(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``(2/D) v``."""
        return vectors * (2.0 / outputs.shape[-1])


#: name -> likelihood class
LIKELIHOODS: dict[str, type[Likelihood]] = {
    Categorical.name: Categorical,
    Gaussian.name: Gaussian,
}


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """Return a likelihood instance for a registry ``name`` (an instance is passed through).

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    if isinstance(name, Likelihood):
        return name
    if isinstance(name, str):
        cls = LIKELIHOODS.get(name.strip().lower())
        if cls is not None:
            return cls()
    valid = ", ".join(repr(k) for k in sorted(LIKELIHOODS))
    raise ValueError(f"unknown likelihood {name!r}; valid likelihoods are: {valid}")
