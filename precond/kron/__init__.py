"""The Kronecker core: the pieces the ``kronecker`` structure composes (docs/design.md#the-kronecker-core).

A *unit* is one block ``X`` of the direction with one factor per dimension,
standing for ``C = (F_1 ⊗ … ⊗ F_k)^(1/share)``:

* :mod:`~precond.kron.units` — :class:`~precond.kron.units.Unit` (where a
  block's factors live in the state and where it sits in the group's tensors)
  and its state keys.
* :mod:`~precond.kron.sources` — where units and their fresh factors come
  from: :class:`~precond.kron.sources.LayerSource` (``[G, A]`` per
  Linear/Conv2d layer through forward hooks: K-FAC, KFC, KFLR, EKFAC; its
  :class:`~precond.kron.sources.LayerHooks` also serve K-BFGS) and
  :class:`~precond.kron.sources.GradientSource` (Gram matrices of the blocked
  gradient: Shampoo, SOAP).
* :mod:`~precond.kron.accumulate` — ``sum`` / ``ema`` / ``none`` and the bias
  correction.
* :mod:`~precond.kron.spectral` — the refresh (batched eigendecompositions,
  keep-last-good, failure counting) and one form per damping form and for the
  eigenbasis mode: what a refresh keeps and how it is applied, through the
  kernels of :mod:`precond.linalg.kron`.
"""
