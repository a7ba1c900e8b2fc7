"""Sharded preconditioner work on torch.distributed (gloo, CPU): eigendecompositions per process and bytes per step.

For 1, 2 and 4 processes on this machine, trains an MLP with mixed layer sizes under
DistributedDataParallel with `shampoo` and `kfac` in both `distributed.mode`s and reports, per process:

  - eigh: how many matrices each process eigendecomposes per refresh, their summed dim^3 and the time
    spent in `eigh_many` per refresh (the block owners' share; the others receive the results),
  - bytes per step that precond itself moves (its all-reduces of curvature statistics and the all-gathers
    of eigenbases or updates), next to DDP's gradient all-reduce (4 bytes x parameters),
  - the preconditioner state each process keeps (bytes of tensors in the optimizer state).

One thread per process; with 4 processes on 2 cores two processes share a core, so times at 4 include
that contention (the counts and dim^3 do not).

Run: python bench/distributed.py [--steps 40] [--worlds 1,2,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import precond
from precond.kron import spectral as kron_spectral

WIDTHS = [256, 768, 512, 512, 512, 512, 384, 384, 256, 10]
BATCH = 256
RUNS = [("shampoo", "replicated"), ("shampoo", "sharded"), ("kfac", "replicated"), ("kfac", "sharded")]


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def worker(rank: int, world: int, tmp: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    calls: list[tuple[int, float, float]] = []  # (matrices, sum dim^3, seconds) per refresh's eigh_many call
    real = kron_spectral.eigh_many

    def timed(mats, float64=False):  # type: ignore[no-untyped-def]  # eigh_many's signature
        t0 = time.perf_counter()
        res = real(mats, float64)
        calls.append((len(mats), float(sum(m.shape[-1] ** 3 for m in mats)), time.perf_counter() - t0))
        return res

    kron_spectral.eigh_many = timed  # type: ignore[assignment]  # the name the Kronecker refresh calls
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)) for _ in range(steps)]
    per = BATCH // world
    rows = {}
    for recipe, mode in RUNS:
        net = model()
        wrapped = DDP(net) if world > 1 else net
        opt = precond.build(recipe, net, likelihood="categorical", distributed=mode)
        calls.clear()
        t0 = time.perf_counter()
        for x, y in data:
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            opt.step(lambda xs=xs, ys=ys: (lambda o: (F.cross_entropy(o, ys), o))(wrapped(xs)))
        total = time.perf_counter() - t0
        refreshes = [c for c in calls if c[0] > 0]
        n_refresh = max(1, steps // 10)
        rows[(recipe, mode)] = {
            "matrices": sum(c[0] for c in refreshes) / n_refresh,
            "dim3": sum(c[1] for c in refreshes) / n_refresh,
            "eigh_s": sum(c[2] for c in refreshes) / n_refresh,
            "bytes_step": sum(opt.comm.traffic.values()) / steps,
            "traffic": dict(opt.comm.traffic),
            "state": state_bytes(opt),
            "ms_step": 1e3 * total / steps,
        }
    torch.save(rows, f"{out}/w{world}r{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args()
    params = sum(p.numel() for p in model().parameters())
    print(f"MLP {'-'.join(map(str, WIDTHS))} ({params / 1e6:.2f} M parameters), global batch {BATCH}, {args.steps} steps, "
          f"roots/eigenbases refreshed every 10 steps; DDP all-reduces {4 * params / 1e6:.2f} MB of gradients per step")
    out = tempfile.mkdtemp()
    results: dict[int, list[dict]] = {}
    for world in map(int, args.worlds.split(",")):
        tmp = tempfile.mkdtemp()
        if world == 1:
            worker(0, 1, tmp, args.steps, out)
        else:
            mp.start_processes(worker, args=(world, tmp, args.steps, out), nprocs=world, join=True, start_method="spawn")
        results[world] = [torch.load(Path(out) / f"w{world}r{r}.pt") for r in range(world)]
    print("\n| recipe | mode | processes | eigh matrices per refresh, per process | sum dim^3 per process (G) | eigh s per refresh, per process | precond bytes/step received | optimizer state per process (MB) | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe, mode in RUNS:
        for world, ranks in results.items():
            if world == 1 and mode == "sharded":
                continue
            r = [x[(recipe, mode)] for x in ranks]
            fmt = lambda key, f: " / ".join(f(x[key]) for x in r)  # noqa: E731
            print(f"| {recipe} | {mode if world > 1 else '-'} | {world} | {fmt('matrices', lambda v: f'{v:.0f}')} | "
                  f"{fmt('dim3', lambda v: f'{v / 1e9:.3f}')} | {fmt('eigh_s', lambda v: f'{v:.3f}')} | "
                  f"{statistics.mean(x['bytes_step'] for x in r) / 1e6:.2f} MB | {fmt('state', lambda v: f'{v / 1e6:.1f}')} | "
                  f"{statistics.mean(x['ms_step'] for x in r):.0f} |")


if __name__ == "__main__":
    main()
