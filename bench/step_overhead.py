"""Per-step time of precond recipes relative to torch.optim.Adam(foreach=True).

Interleaved: each round times every optimizer once, in turn, so machine
noise hits all of them alike; the figure is the median over rounds.
Two measurements per model:
  * step only  - the optimizer's own work on fixed gradients (the overhead goal: <= 1.05x Adam)
  * train step - forward + backward(s) + step through ``step(closure)``; the mean over rounds, so
                 curvature refreshes every k steps (Sophia, k = 10) are amortised in the figure

Run: python bench/step_overhead.py [--rounds 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import precond

MODELS = {
    "mlp-small (64-128-128-10)": [64, 128, 128, 10],
    "mlp-wide (784-1024-1024-10)": [784, 1024, 1024, 10],
    "mlp-deep (10 x 256)": [256] * 10 + [10],
}


def mlp(dims: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def contenders(model_dims: list[int]) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    out = {}
    torch.manual_seed(0)
    base = mlp(model_dims)
    names = ("torch.Adam", "precond adam", "torch.AdamW", "precond adamw", "torch.SGD(m=0.9)", "precond sgd(m=0.9)",
             "precond sophia_g", "precond sophia_h", "precond adahessian")
    for name in names:
        model = mlp(model_dims)
        model.load_state_dict(base.state_dict())
        if name == "torch.Adam":
            opt = torch.optim.Adam(model.parameters(), foreach=True)
        elif name == "torch.AdamW":
            opt = torch.optim.AdamW(model.parameters(), foreach=True)
        elif name.startswith("torch.SGD"):
            opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=True)
        elif name.startswith("precond sgd"):
            opt = precond.build("sgd", model, lr=1e-2, set={"momentum.beta": 0.9})
        else:
            opt = precond.build(name.split()[1], model, likelihood="categorical")
        out[name] = (model, opt)
    return out


def measure(dims: list[int], rounds: int) -> dict[str, tuple[float, float]]:
    runs = contenders(dims)
    x = torch.randn(128, dims[0])
    y = torch.randint(0, dims[-1], (128,))
    gradient_only = {k for k, (_, opt) in runs.items() if not getattr(opt, "needs", None) or not opt.needs.need_closure()}
    for name, (model, _) in runs.items():
        if name in gradient_only:
            F.cross_entropy(model(x), y).backward()  # fixed gradients for the step-only timing
    step_t: dict[str, list[float]] = {k: [] for k in runs}
    train_t: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 10):
        for name, (model, opt) in runs.items():
            if name not in gradient_only:
                continue
            t0 = time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            if r >= 10:
                step_t[name].append(t1 - t0)
        for name, (model, opt) in runs.items():
            if name.startswith("torch"):
                def closure(model=model, opt=opt):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
            else:
                def closure(model=model):  # precond: forward only, the optimizer runs the backward pass(es)
                    out = model(x)
                    return F.cross_entropy(out, y), out
            t0 = time.perf_counter()
            opt.step(closure)
            t1 = time.perf_counter()
            if r >= 10:
                train_t[name].append(t1 - t0)
    return {k: (statistics.median(step_t[k]) * 1e3 if step_t[k] else float("nan"), statistics.mean(train_t[k]) * 1e3)
            for k in runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, median ms")
    for label, dims in MODELS.items():
        res = measure(dims, args.rounds)
        ref_step, ref_train = res["torch.Adam"]
        print(f"\n{label}")
        print(f"  {'optimizer':<22}{'step ms':>10}{'x Adam':>9}{'train ms':>11}{'x Adam':>9}")
        for name, (s, t) in res.items():
            print(f"  {name:<22}{s:>10.3f}{s / ref_step:>9.3f}{t:>11.3f}{t / ref_train:>9.3f}")


if __name__ == "__main__":
    main()
