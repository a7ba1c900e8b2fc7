"""precond's default recipes against the other libraries' implementations of the same methods on the real tasks
(mnist-autoencoder, char-lm), in one interleaved comparison (``precond.training.compare``).

    python bench/real_tasks.py --task mnist-autoencoder --budget 15 --seeds 0,1
    python bench/real_tasks.py --task char-lm --budget 120 --seeds 0 --grid 0.3,1,3 --only adam,soap,heavyball.SOAP

Each contender runs at its learning rate for the task (below; the recipes at the task's hints), or at the best
of ``--grid`` multipliers of it. Peers that are not installed are skipped with a note. Every run stops after
``--steps`` or ``--budget`` seconds of its own training, whichever first; the table and the verdict are
``precond compare``'s (files under ``--out``).

The peers, with the settings that make them the same method as the recipe next to them:

* ``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``, Nesterov, momentum 0.95, weight decay 0.1) on the
  hidden matrices, ``torch.optim.AdamW`` (betas 0.9/0.95, weight decay 0.1) on embeddings, the output layer
  and every vector: ``muon``'s split and scale.
* ``pytorch_optimizer.SOAP`` and ``heavyball.SOAP`` (betas 0.95/0.95, shampoo beta 0.95, refresh every 10
  steps, weight decay 0.01, 1-D tensors diagonal): ``soap``. heavyball runs eager (``heavyball.utils.
  compile_mode = None``): its default ``torch.compile(mode="max-autotune-no-cudagraphs")`` spends minutes
  autotuning on a CPU before the first step.
* ``pytorch_optimizer.ScalableShampoo`` (RMSProp grafting: it has no Adam grafting; EMA factors 0.999, roots
  every 100 steps from step 1, momentum 0.9): the nearest to ``shampoo_grafted``.
* ``pytorch_optimizer.Kron`` and ``heavyball.PSGDKron`` (PSGD-Kron): no recipe in the default set; listed for
  the second-order field.

The official ``SophiaG`` (``sophia_opt``) is not here: it needs a training loop that samples labels and calls
``update_hessian()`` every k steps, which the plain-loop convention does not run (its step time is in
``bench/peers.py``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's precond (not another installed one)
import precond  # noqa: E402
from precond.cli.report import verdict  # noqa: E402
from precond.recipe import builtin_recipes  # noqa: E402
from precond.tasks import build_task  # noqa: E402
from precond.training import compare, render_table  # noqa: E402
from precond.training.factories import PlainLoop, Split  # noqa: E402

RECIPES = ("adam", "kfac", "shampoo_grafted", "soap", "sophia_g", "muon")
# a peer's lr on each task: the best of x0.3/x1/x3 around its recipe's hint (docs/benchmarks.md, "Real tasks";
# at the grid's edge for the two Kron peers on the autoencoder, which did not train at any of them)
PEER_LR = {
    "mnist-autoencoder": {"torch.optim.Muon": 3e-2, "pytorch_optimizer.SOAP": 1e-2, "heavyball.SOAP": 1e-2,
                          "pytorch_optimizer.ScalableShampoo": 3e-3, "pytorch_optimizer.Kron": 3e-3,
                          "heavyball.PSGDKron": 3e-3},
    "char-lm": {"torch.optim.Muon": 3e-3, "pytorch_optimizer.SOAP": 3e-3, "heavyball.SOAP": 3e-3,
                "pytorch_optimizer.ScalableShampoo": 3e-3, "pytorch_optimizer.Kron": 3e-4, "heavyball.PSGDKron": 3e-4},
}


def recipe(name: str, fixed: float | None) -> Callable[..., Any]:
    """The recipe at ``fixed`` (else the task's hint); the runner passes ``lr`` only under a grid."""

    def make(model: torch.nn.Module, likelihood: Any, lr: float | None = None, seed: int = 0, task: Any = None):
        use = lr if lr is not None else fixed if fixed is not None else task.lr_hint(name)
        return precond.build(name, model, likelihood=likelihood, seed=seed, **({} if use is None else {"lr": use}))

    make.label = name  # type: ignore[attr-defined]  # the runner's label attribute
    if fixed is not None:
        make.lr = fixed  # type: ignore[attr-defined]  # what an lr grid multiplies
    return make


def hidden_matrices(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Muon's split: 2-D weights of hidden layers; embeddings, the output layer and vectors to AdamW."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    named = list(model.named_parameters())
    linears = [p for n, p in named if p.ndim == 2 and id(p) not in embeddings]
    out_layer = linears[-1] if linears else None
    muon = [p for p in linears if p is not out_layer]
    rest = [p for _, p in named if not any(p is q for q in muon)]
    return muon, rest


def peer(path: str, lr: float) -> Callable[..., Any] | None:
    module, _, name = path.rpartition(".")
    try:
        mod = importlib.import_module(module)
        cls = getattr(mod, name)
    except (ImportError, AttributeError):
        print(f"skipped {path}: not installed")
        return None
    if module == "heavyball":
        importlib.import_module("heavyball.utils").compile_mode = None

    def make(model: torch.nn.Module, likelihood: Any, lr: float = lr) -> PlainLoop:
        if path == "torch.optim.Muon":
            muon, rest = hidden_matrices(model)
            return PlainLoop(Split(
                cls(muon, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
            ))
        if name == "SOAP":
            kw = dict(betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.01, precondition_frequency=10)
            return PlainLoop(cls(model.parameters(), lr=lr, **kw))
        if name == "ScalableShampoo":
            grafting = importlib.import_module(cls.__module__).LayerWiseGrafting
            return PlainLoop(cls(model.parameters(), lr=lr, betas=(0.9, 0.999), graft_type=grafting.RMSPROP,
                                 start_preconditioning_step=1, preconditioning_compute_steps=100,
                                 weight_decay=1e-5, decoupled_weight_decay=True))
        return PlainLoop(cls(model.parameters(), lr=lr))

    make.label = path  # type: ignore[attr-defined]
    make.lr = lr  # type: ignore[attr-defined]
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist-autoencoder", choices=sorted(PEER_LR))
    ap.add_argument("--only", default="", help="comma-separated contenders (recipe names, peer import paths)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=None, help="default: the task's")
    ap.add_argument("--budget", type=float, default=None, help="seconds of training per run")
    ap.add_argument("--grid", default="", help="lr multipliers, e.g. 0.3,1,3")
    ap.add_argument("--lr", action="append", default=[], help="NAME=LR, repeatable")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--short", action="store_true", help="the task's small variant (a smoke run)")
    ap.add_argument("--stop-at-target", action="store_true", help="stop each run at its first evaluation at target")
    args = ap.parse_args()

    names = [s for s in args.only.split(",") if s] or [*RECIPES, *PEER_LR[args.task]]
    lrs = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr)}
    factories: dict[str, Any] = {}
    for n in names:
        if n in RECIPES or n in builtin_recipes():
            factories[n] = recipe(n, lrs.get(n))
        else:
            made = peer(n, lrs.get(n, PEER_LR[args.task].get(n, 1e-3)))
            if made is not None:
                factories[n] = made
    task = build_task(args.task, short=args.short)
    out = Path(args.out or f"runs/bench-{args.task}")
    result = compare(
        factories, args.task, seeds=[int(s) for s in args.seeds.split(",")], steps=args.steps or task.default_steps,
        eval_every=args.eval_every, time_budget=args.budget, threads=args.threads, out_dir=out,
        lr_grid=[float(m) for m in args.grid.split(",")] if args.grid else None, progress=False, short=args.short,
        stop_at_target=args.stop_at_target,
    )
    Console(width=200).print(render_table(result))
    for line in verdict(result):
        print(line)
    print(f"files: {out}/")


if __name__ == "__main__":
    main()
