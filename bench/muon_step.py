"""Optimizer-step time of recipe `muon` against torch.optim.Muon + torch.optim.AdamW, side by side.

Two copies of one model: one stepped by `precond.build("muon", model)`, the other by torch.optim.Muon on the
matrices the recipe gives Newton-Schulz (lr 1e-3, wd 0.1, momentum 0.95, Nesterov, adjust_lr_fn
"match_rms_adamw") and torch.optim.AdamW (betas (0.9, 0.95), eps 1e-8, wd 0.1, foreach) on what its rules
route away (embeddings, the output layer, scalars and vectors) -- the settings under which the two are equal
bit for bit. Interleaved rounds: each round computes both models' gradients (not timed), then times one
`step()` of each, alternating which goes first, so clock drift and other load hit both alike. Reports the
median and mean ms per step and their ratio, and checks at the end that both copies still hold identical
parameters. Models: an MLP and a small pre-norm transformer (bench/device_step.py's).

Run: python bench/muon_step.py [--rounds 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's precond (not another installed one), device_step
from device_step import TinyGPT, mlp  # noqa: E402

import precond  # noqa: E402


def torch_pair(model: nn.Module, ours: torch.optim.Optimizer, like: nn.Module) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon on the parameters of ``model`` that ``ours`` (built on ``like``) gives its default rule,
    torch.optim.AdamW on the others."""
    names = {id(p): n for n, p in like.named_parameters()}
    default = {names[id(p)] for g in ours.param_groups if g["rule"] == "default" for p in g["params"]}
    hidden = [p for n, p in model.named_parameters() if n in default]
    rest = [p for n, p in model.named_parameters() if n not in default]
    muon = torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    return [muon, adamw]


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    a, b = model, copy.deepcopy(model)
    ours = precond.build("muon", a)
    refs = torch_pair(b, ours, a)

    def grads(m: nn.Module) -> None:
        for p in m.parameters():
            p.grad = None
        F.cross_entropy(m(x).flatten(0, -2), y.flatten()).backward()

    def step_torch() -> None:
        for r in refs:
            r.step()

    runs = {"precond muon": (a, ours.step), "torch Muon+AdamW": (b, step_torch)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    warmup = 3
    for r in range(rounds + warmup):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            m, step = runs[name]
            grads(m)
            t0 = time.perf_counter()
            step()
            ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(ms)
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    n_hidden = sum(len(g["params"]) for g in ours.param_groups if g["rule"] == "default")
    n_rest = sum(len(g["params"]) for g in ours.param_groups if g["rule"] != "default")
    print(f"  {n_hidden} matrices to Muon, {n_rest} tensors to AdamW; identical parameters after {rounds + warmup} steps: {same}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dims, batch = [256, 512, 512, 512, 10], 256
    vocab, d, layers, heads, t, bsz = 256, 128, 2, 4, 64, 8
    idx = torch.randint(0, vocab, (bsz, t + 1), generator=gen)
    problems = {
        f"mlp {'-'.join(map(str, dims))}, batch {batch}": (mlp(dims), torch.randn(batch, dims[0], generator=gen),
                                                           torch.randint(0, dims[-1], (batch,), generator=gen)),
        f"transformer d{d} x{layers}, {bsz}x{t} tokens": (TinyGPT(vocab, d, layers, heads, t), idx[:, :-1], idx[:, 1:]),
    }
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s); {args.rounds} interleaved rounds; "
          "ms per optimizer step (gradients not timed)")
    for label, (model, x, y) in problems.items():
        print(f"\n{label}")
        times = measure(model, x, y, args.rounds)
        ref = times["torch Muon+AdamW"]
        print(f"  {'optimizer':<20}{'median':>9}{'mean':>9}{'x torch (median)':>18}")
        for name, v in times.items():
            print(f"  {name:<20}{statistics.median(v):>9.2f}{statistics.mean(v):>9.2f}"
                  f"{statistics.median(v) / statistics.median(ref):>18.2f}")


if __name__ == "__main__":
    main()
