"""Kronecker recipes (K-FAC, Shampoo, ...) against torch.optim.Adam: amortised step time and training loss.

Three problems on scikit-learn's handwritten digits (no download), each trained from the same
initialisation with the same minibatch sequence by every optimizer:

  (a) mlp   - classifier 64-256-256-10 (tanh), cross-entropy, batch 256
  (b) ae    - deep autoencoder on the digits upsampled to 28x28, the classic K-FAC benchmark shape
              784-1000-500-250-30-250-500-1000-784 (tanh, linear code and output), squared error, batch 1000
  (c) wide  - MLP 64-1024-1024-1024-10 (tanh), cross-entropy, batch 1024

Timing is interleaved in one process: each round runs ``--chunk`` training steps (forward, backward(s),
step) of every optimizer in turn, so machine noise hits all of them alike; per-step time is the mean over
rounds (refreshes every k steps amortised in) and the median over rounds is printed too. The training
loss on the whole training set is evaluated between rounds (not timed).

Run: python bench/kronecker.py [--steps 200] [--chunk 10] [--threads 1] [--problems mlp,ae,wide]
         [--recipes kfac,shampoo,kfac10=kfac] [--set kfac10:curvature.every=10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond.tasks.digits import digits_arrays


def mlp(dims: list[int], act: type[nn.Module] = nn.Tanh, linear_at: tuple[int, ...] = ()) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 and i not in linear_at:
            layers.append(act())
    return nn.Sequential(*layers)


def data(upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, _, y, _ = digits_arrays()
    x = torch.tensor(x, dtype=torch.float32)
    if upsample:
        img = x.reshape(-1, 1, 8, 8)
        x = F.interpolate(img, size=(28, 28), mode="bilinear", align_corners=False).reshape(-1, 784)
    return x, torch.tensor(y)


PROBLEMS: dict[str, dict[str, Any]] = {
    "mlp": {"title": "(a) MLP classifier 64-256-256-10, batch 256", "dims": [64, 256, 256, 10], "batch": 256, "ae": False},
    "ae": {"title": "(b) deep autoencoder 784-1000-500-250-30-250-500-1000-784, batch 1000",
           "dims": [784, 1000, 500, 250, 30, 250, 500, 1000, 784], "batch": 1000, "ae": True},
    "wide": {"title": "(c) wide MLP 64-1024-1024-1024-10, batch 1024", "dims": [64, 1024, 1024, 1024, 10], "batch": 1024, "ae": False},
}

# Learning rates: for each problem, the best final training loss of a 100-step run over a small grid
# (Adam {1e-3, 3e-3, 1e-2}; kfac {0.01, 0.1, 1} (the KL clip bounds the step); shampoo {0.03, 0.1, 0.3};
# shampoo_grafted {1e-3, 3e-3, 1e-2}; soap {3e-3, 1e-2}). Every other setting is the recipe's default.
# Override with --set name:lr=...
LR: dict[str, dict[str, float]] = {
    "mlp": {"adam": 1e-2, "kfac": 0.1, "shampoo": 0.1, "shampoo_grafted": 1e-2, "soap": 1e-2, "ekfac": 0.01},
    "ae": {"adam": 1e-3, "kfac": 1.0, "shampoo": 0.1, "shampoo_grafted": 3e-3, "soap": 3e-3, "ekfac": 1.0},
    "wide": {"adam": 3e-3, "kfac": 0.1, "shampoo": 0.03, "shampoo_grafted": 3e-3, "soap": 3e-3, "ekfac": 0.1},
}


def batches(x: torch.Tensor, y: torch.Tensor, size: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - size + 1, size):
            idx = perm[i : i + size]
            out.append((x[idx], y[idx]))
    return out[:steps]


def make_closure(name: str, model: nn.Module, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], ae: bool) -> Callable[[], Any]:
    x, y = batch
    target = x if ae else y

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target) if ae else F.cross_entropy(out, target)

    if name == "adam":
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model(x))
            loss.backward()
            return loss

        return closure

    def closure() -> Any:
        out = model(x)
        return loss_of(out), out

    return closure


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ae: bool) -> float:
    with torch.no_grad():
        out = model(x)
        return float(F.mse_loss(out, x) if ae else F.cross_entropy(out, y))


def run_problem(key: str, recipes: list[str], steps: int, chunk: int, sets: dict[str, dict[str, Any]]) -> None:
    spec = PROBLEMS[key]
    x, y = data(spec["ae"])
    torch.manual_seed(0)
    base = mlp(spec["dims"], linear_at=(len(spec["dims"]) // 2 - 1,) if spec["ae"] else ())
    likelihood = "gaussian" if spec["ae"] else "categorical"
    runs: dict[str, tuple[nn.Module, Any]] = {}
    for spec_name in ["adam", *recipes]:
        label, _, name = spec_name.partition("=")
        name = name or label
        model = copy.deepcopy(base)
        options = {"lr": LR[key].get(name, None), **sets.get(label, {})}
        hyper = {k: v for k, v in options.items() if "." not in k and v is not None}
        dotted = {k: v for k, v in options.items() if "." in k}
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), foreach=True, **hyper)
        else:
            opt = precond.build(name, model, likelihood=likelihood, set=dotted or None, **hyper)
        runs[label] = (model, opt)
    seq = batches(x, y, spec["batch"], steps)
    times: dict[str, list[float]] = {k: [] for k in runs}
    curves: dict[str, list[float]] = {k: [full_loss(m, x, y, spec["ae"])] for k, (m, _) in runs.items()}
    for start in range(0, steps, chunk):
        for name, (model, opt) in runs.items():
            closures = [make_closure("adam" if name == "adam" else "precond", model, opt, b, spec["ae"]) for b in seq[start : start + chunk]]
            t0 = time.perf_counter()
            for c in closures:
                opt.step(c)
            times[name].append((time.perf_counter() - t0) / len(closures))
            curves[name].append(full_loss(model, x, y, spec["ae"]))
    print(f"\n{spec['title']}; {steps} steps, {len(times['adam'])} interleaved rounds of {chunk} steps")
    adam_mean = statistics.mean(times["adam"])
    adam_med = statistics.median(times["adam"])
    target = curves["adam"][-1]
    print(f"  {'optimizer':<18}{'ms/step':>9}{'x Adam':>8}{'median':>9}{'x Adam':>8}{'train loss':>12}{'steps to Adam final':>21}")
    for name in runs:
        mean, med = statistics.mean(times[name]) * 1e3, statistics.median(times[name]) * 1e3
        reach = next((i * chunk for i, v in enumerate(curves[name]) if v <= target), None)
        print(
            f"  {name:<18}{mean:>9.2f}{mean / (adam_mean * 1e3):>8.2f}{med:>9.2f}{med / (adam_med * 1e3):>8.2f}"
            f"{curves[name][-1]:>12.4f}{('-' if reach is None else str(reach)):>21}"
        )


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(name, {})[key] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable when other work shares the cores)")
    ap.add_argument("--problems", default="mlp,ae,wide")
    ap.add_argument("--recipes", default="kfac,shampoo,shampoo_grafted,soap",
                    help="recipe names, or label=recipe for a variant configured with --set label:key=value")
    ap.add_argument("--set", action="append", default=[], help="label:key=value, e.g. kfac:lr=0.01 or kfac:transform.0.every=20")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sets = parse_sets(args.set)
    for key in args.problems.split(","):
        run_problem(key, [r for r in args.recipes.split(",") if r], args.steps, args.chunk, sets)


if __name__ == "__main__":
    main()
