"""Per-step time of precond recipes against torch.optim.Adam on one device (CUDA when there is one).

Interleaved rounds: each round makes one training step (forward, backward(s), optimizer step) with every
contender in turn, so clock and thermal drift hit all alike; CUDA steps are timed with CUDA events. The
figure is the mean over rounds (refreshes every k steps amortised), with its ratio to torch.optim.Adam
(fused on CUDA, foreach on the CPU). Models: a wide MLP and a small pre-norm transformer (q, k, v, o and
the MLP as nn.Linear, F.scaled_dot_product_attention; LayerNorm and the embeddings go to Adam by the
recipes' rules).

Run: python bench/device_step.py [--rounds 50] [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import precond
from tiny_gpt import TinyGPT  # (bench/ is the script's directory: on sys.path)

RECIPES = ("adam", "adamw", "sgd", "sophia_g", "adahessian", "shampoo_grafted", "soap", "kfac")


def mlp(dims: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def problems(device: torch.device, small: bool) -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    if small:
        dims, batch, vocab, d, layers, heads, t, b = [64, 256, 256, 10], 128, 64, 64, 2, 4, 32, 8
    else:
        dims, batch, vocab, d, layers, heads, t, b = [1024, 4096, 4096, 1024], 4096, 512, 512, 4, 8, 256, 32
    x = torch.randn(batch, dims[0], generator=gen).to(device)
    y = torch.randint(0, dims[-1], (batch,), generator=gen).to(device)
    idx = torch.randint(0, vocab, (b, t + 1), generator=gen).to(device)
    return {
        f"mlp {'-'.join(map(str, dims))}, batch {batch}": (lambda: mlp(dims), x, y),
        f"transformer d{d} x{layers}, {b}x{t} tokens": (lambda: TinyGPT(vocab, d, layers, heads, t), idx[:, :-1], idx[:, 1:]),
    }


def contenders(make: Callable[[], nn.Module], device: torch.device) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    base = make()
    out = {}
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    for name in ("torch.Adam", *RECIPES):
        model = make()
        model.load_state_dict(base.state_dict())
        model.to(device)
        if name == "torch.Adam":
            out[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3, **fused))
        else:
            out[name] = (model, precond.build(name, model, likelihood="categorical"))
    return out


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(make, x, y, device: torch.device, rounds: int) -> dict[str, float]:
    runs = contenders(make, device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 5):
        for name, (model, opt) in runs.items():
            if name.startswith("torch"):
                def step(model=model, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
                    opt.step()
            else:
                def closure(model=model):
                    out = model(x)
                    return F.cross_entropy(out.flatten(0, -2), y.flatten()), out

                def step(opt=opt, closure=closure):
                    opt.step(closure)
            ms = timed(device, step)
            if r >= 5:
                times[name].append(ms)
    return {k: statistics.mean(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (a CPU smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {where}; {args.rounds} interleaved rounds, mean ms per training step")
    for label, (make, x, y) in problems(device, args.small).items():
        res = measure(make, x, y, device, args.rounds)
        ref = res["torch.Adam"]
        print(f"\n{label}\n  {'optimizer':<18}{'ms/step':>10}{'x Adam':>9}")
        for name, ms in res.items():
            print(f"  {name:<18}{ms:>10.2f}{ms / ref:>9.2f}")


if __name__ == "__main__":
    main()
