"""Training and comparison runner behind ``precond train`` and ``precond compare``.

``train(make_optimizer, task_name)`` runs one optimizer on one built-in task
(:mod:`precond.tasks`); ``compare({label: make_optimizer, ...}, task_name)``
runs several on the same task and seeds. Both return dataclasses, write
result files when given ``out_dir`` and can be shown with
:func:`render_table`. No CLI code lives here.

An *optimizer factory* is ``make_optimizer(model, likelihood) ->
torch.optim.Optimizer`` whose ``step(closure)`` accepts a closure that runs
the forward pass only and returns ``(loss, outputs)`` (the precond
contract: the optimizer runs the backward pass itself). A factory that
accepts a keyword ``task`` also receives the :class:`~precond.tasks.TaskInstance`
(for learning-rate hints), one that accepts ``seed`` receives the run seed
(for ``precond.build(..., seed=seed)``); with ``lr_grid`` it must accept a
keyword ``lr``. For example::

    def make(model, likelihood, lr=None, seed=0):
        extra = {} if lr is None else {"lr": lr}
        return precond.build("kfac", model, likelihood=likelihood, seed=seed, **extra)

Any ``torch.optim.Optimizer`` is a contender too: a ``torch.optim.Optimizer``
subclass, a one-argument callable ``lambda params: torch.optim.AdamW(params,
lr=1e-3)`` or :func:`~precond.training.factories.torch_optimizer` (a class or
import path with its keyword arguments; ``torch.optim.Muon``, which takes only
2-D parameters, gets the matrices and AdamW the rest). It runs in the same
interleaved loop by the plain-loop convention (``zero_grad(); loss =
closure()[0]; loss.backward(); optimizer.step()``, the timed step included;
:class:`~precond.training.factories.PlainLoop`); under an lr grid its groups'
learning rates are scaled. A precond factory that returns a bare ``torch.optim``
optimizer is stepped the same way.

``time_budget=S`` (``--time-budget``) stops each run after ``S`` seconds of its
own training time (the step that crosses ``S`` completes and is evaluated)
instead of after ``steps``; with both, whichever comes first. A comparison
under a budget ranks by the final metric: who is best after ``S`` seconds.

Conventions
-----------
* Step ``k`` (1-based) is the ``k``-th call of ``optimizer.step``. The loss
  recorded for step ``k`` is the first loss the closure computed in that
  step, i.e. the minibatch loss at the parameters *before* update ``k``
  (line searches may evaluate the closure more often; only the first counts).
  On several processes it is the loss of the global minibatch: the
  processes' first losses, weighted by their rows (an all-reduce after the
  timed step).
* Wall-clock is training time only: fetching the batch plus
  ``optimizer.step``, measured with ``time.perf_counter``; evaluations are
  not timed. ``ms_per_step`` is the mean over all steps (amortised work such
  as periodic eigendecompositions counts), ``ms_per_step_median`` the median.
* Evaluations (``task.evaluate()``) run after 0 updates, every
  ``eval_every`` updates and after the last one. ``steps_to_target`` is the
  first evaluated step whose task metric reaches the task target,
  ``time_to_target_s`` the training wall-clock at that step.
* Divergence: a non-finite loss, or a loss above ``1e6 * max(|initial loss|,
  1e-3)``, stops the run with status ``"diverged"`` and a message naming the
  step and the last finite loss. An exception inside ``step`` stops it with
  status ``"error"`` (the traceback is kept in ``RunResult.traceback``);
  Ctrl-C gives ``"interrupted"``. Result files are written in every case.
* Determinism: the task seeds its model and minibatch order; each run owns
  a torch CPU RNG state seeded with the run seed, swapped in around its own
  work only (optimizer construction, steps, evaluations), so a run's curve
  is the same alone or interleaved in ``compare`` and the caller's global
  RNG is left untouched.

Fair interleaving in ``compare``
--------------------------------
All runs (every label x lr multiplier x seed) are built up front and
advanced in lock-step, round robin, one optimizer step at a time: at global
step ``t`` each unfinished run makes one step, in the label order rotated by
``t`` (so no run is always first after an evaluation or a context switch).
Machine noise (other processes, thermal throttling, allocator state) thus
hits every run alike within a few milliseconds, and the per-step times
stay comparable. Evaluations happen at the same steps for all runs and are
not timed.

Files
-----
``train(..., out_dir=D)`` writes ``D/metrics.json`` (summary, final
evaluation, every evaluation, config), ``D/curve.csv`` (``step,
wall_time_s, loss`` then the evaluation columns, empty where no evaluation
ran; row ``step=0`` holds the initial evaluation and an empty loss) and
``D/curve.png`` (the task metric vs step and vs wall-clock with the target
line, the training loss below). ``compare(...,
out_dir=D)`` writes ``D/compare.json``, ``D/compare.csv`` (one row per label
and lr multiplier, in table order), ``D/compare.png`` (the same panels, one colour per label in table order, the
median over seeds as the line and their min-max as a band, the winner in
wall-clock and in steps in the headline) and
``D/runs/<label>[-lrx<mult>]-seed<seed>/{metrics.json,curve.csv}``.
Non-finite numbers are ``null`` in JSON and ``nan``/``inf`` in CSV.

Modules
-------
:mod:`~precond.training.runner` the run loop (``train``, ``compare``, one
steppable run); :mod:`~precond.training.results` the result types and the
ranking of a comparison; :mod:`~precond.training.files` the result files;
:mod:`~precond.training.report` progress bars, tables and plots (rich and
matplotlib, from the ``cli`` extra, imported only when used);
:mod:`~precond.training.ddp` the exchanges between several processes;
:mod:`~precond.training.factories` how optimizer factories are called.
"""

from __future__ import annotations

from precond.training.factories import OptimizerFactory
from precond.training.files import write_compare, write_run
from precond.training.report import plot_runs, render_table
from precond.training.results import INTERLEAVING, CompareResult, CompareRow, RunResult
from precond.training.runner import DEFAULT_LR_GRID, DIVERGENCE_FACTOR, compare, train

__all__ = [
    "DEFAULT_LR_GRID",
    "DIVERGENCE_FACTOR",
    "INTERLEAVING",
    "CompareResult",
    "CompareRow",
    "OptimizerFactory",
    "RunResult",
    "compare",
    "plot_runs",
    "render_table",
    "train",
    "write_compare",
    "write_run",
]
