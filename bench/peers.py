"""Per-step time of a precond recipe against another library's implementation of the same method, side by side.

    python bench/peers.py [--pairs soap,soap_official,adam] [--rounds 20] [--threads 1]

For each pair the two optimizers train identical copies of the same model on the same batches; rounds of 10
steps alternate between them in one process (the order flips every round), and the table prints the mean
per-step time (refreshes amortised: every 10th step refreshes), its ratio precond / peer, and both against
``torch.optim.Adam`` on the same model. Only the optimizer step is timed; the forward and backward pass are
run outside the timer. Peers not installed are skipped with a note:

* ``soap``: ``pytorch_optimizer.SOAP`` (``pip install pytorch_optimizer``), equal settings: betas (0.95, 0.95),
  shampoo_beta 0.95, eps 1e-8, weight decay 0.01, precondition_frequency 10, max dim 10000, 1-D tensors
  diagonal (its default ``precondition_1d=False``, the recipe's ``precondition_1d: false``).
* ``soap_official``: the same peer against the recipe ``soap_official`` (no null_threshold, no relative_eps).
* ``soap_heavyball``: ``heavyball.SOAP`` (``pip install heavyball``) with the same settings (merge_dims off,
  use_precond_schedule off: a refresh every 10 steps), run eagerly (``heavyball.utils.compile_mode = None``): its
  default compiles every fused function with torch.compile's max-autotune, minutes per model on a CPU.
* ``adam``: ``torch.optim.Adam`` itself, its default (on a CPU the loop over the tensors; the floor of an
  elementwise step).
* ``muon``: ``torch.optim.Muon`` on the matrices plus ``torch.optim.AdamW`` on the rest.

Models: the MLP autoencoder 64-256-128-32-128-256-64 (tanh) at batch 128, and the 512-1024-1024-10 MLP at
batch 256 -- the two of the Kronecker issue's table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's precond (not another installed one)
import precond  # noqa: E402


def autoencoder() -> nn.Module:
    sizes = [64, 256, 128, 32, 128, 256, 64]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def wide() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


PROBLEMS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {"autoencoder": (autoencoder, 128, 64), "wide": (wide, 256, 512)}


def loss_of(model: nn.Module, x: torch.Tensor, problem: str) -> torch.Tensor:
    out = model(x)
    if problem == "autoencoder":
        return F.mse_loss(out, x)
    return F.cross_entropy(out, (x[:, :10].argmax(1)))


RECIPES = {"soap": "soap", "soap_official": "soap_official", "soap_heavyball": "soap", "adam": "adam", "muon": "muon"}


def peer(name: str, model: nn.Module) -> torch.optim.Optimizer | None:
    if name in ("soap", "soap_official"):
        try:
            from pytorch_optimizer import SOAP
        except ImportError:
            return None
        return SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
                    precondition_frequency=10, max_precondition_dim=10000, precondition_1d=False)
    if name == "soap_heavyball":
        try:
            import heavyball
        except ImportError:
            return None
        heavyball.utils.compile_mode = None  # eager: its default compiles each fused function (max-autotune)
        return heavyball.SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8,
                              weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000, merge_dims=False,
                              precondition_1d=False, use_precond_schedule=False)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if name == "muon":
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            return None
        mats = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        return _Pair(muon_cls(mats, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
                     torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    raise ValueError(name)


class _Pair:
    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()


def timed(opt: Any, model: nn.Module, batches: list[torch.Tensor], problem: str) -> float:
    total = 0.0
    for x in batches:
        for p in model.parameters():
            p.grad = None
        loss_of(model, x, problem).backward()
        start = time.perf_counter()
        opt.step()
        total += time.perf_counter() - start
    return total / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="soap,soap_official,adam,muon")
    parser.add_argument("--problems", default="autoencoder,wide")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), rounds of 10 steps: {args.rounds}")
    print("| method | problem | precond ms/step | peer ms/step | precond / peer | precond / Adam | peer / Adam |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for problem in args.problems.split(","):
        make, batch, width = PROBLEMS[problem]
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(batch, width, generator=g) for _ in range(10)]
        for name in args.pairs.split(","):
            torch.manual_seed(0)
            ours_model = make()
            theirs_model, adam_model = make(), make()
            theirs_model.load_state_dict(ours_model.state_dict())
            adam_model.load_state_dict(ours_model.state_dict())
            other = peer(name, theirs_model)
            if other is None:
                print(f"| {name} | {problem} | | | peer not installed | | |")
                continue
            ours = precond.build(RECIPES[name], ours_model)
            adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
            runs: dict[str, list[float]] = {"ours": [], "theirs": [], "adam": []}
            contenders = [("ours", ours, ours_model), ("theirs", other, theirs_model), ("adam", adam, adam_model)]
            for r in range(args.rounds + 1):
                order = contenders if r % 2 == 0 else contenders[::-1]
                for key, opt, model in order:
                    t = timed(opt, model, data, problem)
                    if r:  # round 0 warms up (first refreshes, allocations)
                        runs[key].append(t)
            ms = {k: 1e3 * statistics.mean(v) for k, v in runs.items()}
            print(f"| {name} | {problem} | {ms['ours']:.2f} | {ms['theirs']:.2f} | {ms['ours'] / ms['theirs']:.2f} | "
                  f"{ms['ours'] / ms['adam']:.2f} | {ms['theirs'] / ms['adam']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
