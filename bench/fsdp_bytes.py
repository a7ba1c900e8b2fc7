"""Bytes per step and state per process under DDP, FSDP2 and HSDP for a 38 M-parameter transformer (gloo, CPU).

A decoder-only transformer of plain nn modules (token and position embeddings, LAYERS blocks of causal
attention with Linear q/k/v/o and a Linear-GELU-Linear MLP, LayerNorms, an output head named ``head``) runs
a few steps of each recipe at 1, 2 and 4 processes (spawned, gloo, one thread each) and reports, per process:

  - the wrapper's own bytes per step: DDP's gradient buckets, counted exactly by a communication hook
    (``register_comm_hook``: each bucket's flat buffer before it is all-reduced); FSDP2's all-gathers and
    reduce-scatters and HSDP's all-reduce across the replicas, counted by wrapping the functions FSDP2 calls
    (``torch.distributed.all_gather_single``, ``reduce_scatter_single``, ``all_reduce``) while the model runs
    forward and backward (precond's own collectives inside ``opt.step`` are not counted there);
  - precond's own bytes per step (``opt.comm.traffic``, what precond receives: the whole output of each
    all-gather, the buffer of each all-reduce), for every step (a step that refreshes roots moves more);
  - the bytes of every tensor in ``opt.state`` (a DTensor counted by its local shard) and of the parameters
    this process holds.

Sizes are what each collective carries: an all-gather's output, a reduce-scatter's input, an all-reduce's
buffer (bytes through the wire per process with ring algorithms: (W-1)/W of an all-gather's or a
reduce-scatter's size, 2 (W-1)/W of an all-reduce's).

Each recipe runs in fresh processes (in one process per configuration they grew to 6 GB each). ``--arithmetic
2,4,64,512 [--out DIR --shards 8]`` prints what the code's rules predict at any W without running anything
(owners from precond's own assignment; the state from each parameter's state in DIR's one-process run).

Run (from the repository root): PYTHONPATH=. python bench/fsdp_bytes.py [--warmup 1] [--steps 2] [--out DIR]
    [--configs none:1,fsdp:2,fsdp:4,hsdp:4,ddp:2,ddp:4] [--only adam,shampoo_grafted,...] [--summarize]
Results and the table: docs/distributed.md, "Bytes and state per process under DDP, FSDP2 and HSDP".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import precond
from tiny_gpt import Block  # (bench/ is the script's directory: on sys.path); its MLP is 4 x D_MODEL wide

D_MODEL, HEADS, LAYERS, VOCAB, SEQ = 512, 8, 11, 4096, 64
if os.environ.get("FSDP_BYTES_SMOKE"):  # a tiny model to check the script itself
    D_MODEL, HEADS, LAYERS, VOCAB, SEQ = 32, 2, 2, 128, 16
GLOBAL_BATCH = 4  # sequences per step, split over the processes
# (recipe, build keywords, label) per wrapper
DDP_RUNS = [("adam", {}, "adam"), ("shampoo_grafted", {"distributed": "replicated"}, "shampoo_grafted"),
            ("shampoo_grafted", {"distributed": "sharded"}, "shampoo_grafted/sharded"), ("soap", {}, "soap"),
            ("muon", {}, "muon"), ("kfac", {"likelihood": "categorical"}, "kfac")]
FSDP_RUNS = [("adam", {}, "adam"), ("shampoo_grafted", {}, "shampoo_grafted"), ("soap", {}, "soap"),
             ("muon", {}, "muon"), ("kfac", {"likelihood": "categorical"}, "kfac")]


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos_embed = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(SEQ, D_MODEL)
        self.layers = nn.ModuleList(Block(D_MODEL, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed.weight[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x)).reshape(-1, VOCAB)  # (tokens, vocab): one categorical per token


def model() -> LM:
    torch.manual_seed(0)
    return LM()


def nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class Counter:
    """Bytes of the wrapper's collectives, by name, while ``on`` (the model's forward and backward)."""

    def __init__(self) -> None:
        self.on = False
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.bytes[name] = self.bytes.get(name, 0) + t.numel() * t.element_size()
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self) -> None:
        def counted(name: str, real, pick):  # type: ignore[no-untyped-def]
            def f(*args, **kw):  # type: ignore[no-untyped-def]
                if self.on:
                    self.add(name, pick(args, kw))
                return real(*args, **kw)
            return f

        # the functions torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py calls (as dist.<name>, looked up
        # at each call): an all-gather's output, a reduce-scatter's input, an all-reduce's buffer
        dist.all_gather_single = counted(  # type: ignore[assignment]
            "all_gather", dist.all_gather_single, lambda a, k: k.get("output_tensor", a[0] if a else None))
        dist.reduce_scatter_single = counted(  # type: ignore[assignment]
            "reduce_scatter", dist.reduce_scatter_single, lambda a, k: k.get("input", a[1] if len(a) > 1 else None))
        dist.all_reduce = counted(  # type: ignore[assignment]
            "all_reduce", dist.all_reduce, lambda a, k: a[0] if a else k["tensor"])

    def ddp_hook(self):  # type: ignore[no-untyped-def]
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]
            self.add("all_reduce", bucket.buffer())
            return allreduce_hook(state, bucket)
        return hook


def wrap(net: nn.Module, wrapper: str, world: int, counter: Counter) -> nn.Module:
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(net)
        ddp.register_comm_hook(None, counter.ddp_hook())
        return ddp
    if wrapper in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if wrapper == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for layer in net.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(net, mesh=mesh)
    return net


def worker(rank: int, world: int, wrapper: str, tmp: str, warmup: int, steps: int, out: str, only: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    counter = Counter()
    counter.wrap()
    g = torch.Generator().manual_seed(1)
    n = warmup + steps
    data = [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(n)]
    per = GLOBAL_BATCH // world if wrapper != "none" else GLOBAL_BATCH
    runs = DDP_RUNS if wrapper in ("ddp", "none") else FSDP_RUNS
    rows = {}
    for recipe, kw, label in runs:
        if (only and label not in only.split(",")) or (world == 1 and label.endswith("/sharded")):
            continue  # (one process: the sharded mode is the replicated one)
        net = model()
        wrapped = wrap(net, wrapper, world, counter)
        opt = precond.build(recipe, net, seed=0, **kw)
        closure_needed = recipe == "kfac"
        per_step, wrapper_step, times = [], [], []
        for i, seq in enumerate(data):
            x, y = seq[rank * per : (rank + 1) * per, :-1], seq[rank * per : (rank + 1) * per, 1:].reshape(-1)
            before = dict(opt.comm.traffic)
            counter.bytes, counter.calls = {}, {}
            t0 = time.perf_counter()
            if closure_needed:  # the sampled-label backward needs the outputs; DDP's hook counts whatever it reduces
                opt.step(lambda x=x, y=y: (lambda o: (F.cross_entropy(o, y), o))(wrapped(x)))
            else:
                opt.zero_grad()
                counter.on = wrapper in ("fsdp", "hsdp")  # (DDP: its hook counts; its all_reduce is not counted twice)
                F.cross_entropy(wrapped(x), y).backward()
                counter.on = False
                opt.step()
            times.append(time.perf_counter() - t0)
            per_step.append({k: v - before.get(k, 0) for k, v in opt.comm.traffic.items()})
            wrapper_step.append((dict(counter.bytes), dict(counter.calls)))
        rows[label] = {
            "precond": per_step,
            "wrapper": wrapper_step,
            "state": state_bytes(opt),
            "params": sum(nbytes(p) for p in net.parameters()),
            "state_by_param": {n: sum(nbytes(v) for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
                               for n, p in net.named_parameters()},
            "s_step": times,
        }
        print(f"[{wrapper}:{world} rank {rank}] {label}: {[round(t, 1) for t in times]} s/step", flush=True)
        del opt, wrapped, net
    for label, row in rows.items():
        torch.save(row, f"{out}/{wrapper}{world}r{rank}_{label.replace('/', '-')}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def summarize(results: dict[str, list[dict]], warmup: int) -> None:
    """One table: bytes per measured step (means over the measured steps) and state per process."""
    print("\n| wrapper | W | recipe | wrapper bytes/step (MB) | precond bytes/step (MB), step 1 / measured | "
          "state per process (MB) | params per process (MB) | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for key, ranks in results.items():
        wrapper, world = key.split(":")
        for label in ranks[0]:
            r0 = ranks[0][label]
            ranks = [r for r in ranks if label in r]
            meas = range(warmup, len(r0["precond"]))
            wb = [sum(sum(r[label]["wrapper"][i][0].values()) for i in meas) / len(meas) for r in ranks]
            kinds = {k: sum(r0["wrapper"][i][0].get(k, 0) for i in meas) / len(meas) for k in r0["wrapper"][warmup][0]}
            pb1 = sum(r0["precond"][0].values())
            pb = sum(sum(r0["precond"][i].values()) for i in meas) / len(meas)
            st = " / ".join(f"{r[label]['state'] / 1e6:.1f}" for r in ranks)
            pa = " / ".join(f"{r[label]['params'] / 1e6:.1f}" for r in ranks)
            sec = sum(sum(r[label]["s_step"][warmup:]) for r in ranks) / len(ranks) / len(meas)
            kind = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in kinds.items())
            print(f"| {wrapper} | {world} | {label} | {max(wb) / 1e6:.2f} ({kind}) | "
                  f"{pb1 / 1e6:.3f} / {pb / 1e6:.3f} | "
                  f"{st} | {pa} | {sec:.1f} |")


def _gathered(opt: precond.Optimizer) -> tuple[list[list[torch.Tensor]], list[tuple[str, float]]]:
    """The owner units of ``opt``'s pipelines over whole parameters, as the optimizer makes them under
    fully_shard (:meth:`precond.Optimizer.owner_units`), from an optimizer built on one process."""
    rules = {r for r, pipe in opt.pipelines.items() if any(b.gathers() for b in pipe.config.blocks())}
    return opt.owner_units(rules)


def _chunks(n: int, w: int) -> list[int]:
    c = -(-n // w)
    return [max(0, min(c, n - r * c)) for r in range(w)]


def arithmetic(worlds: list[int]) -> None:
    """What the code's rules predict per process and step (sizes of the collectives, bytes), for any W: the
    owners from precond's own assignment (pure functions of the shapes and W), no processes needed."""
    from precond.distributed import assign_named, kronecker_blocks

    net = model()
    root = [p for n, p in net.named_parameters() if not n.startswith("layers.")]
    P = 4 * sum(p.numel() for p in net.parameters())
    P_root = 4 * sum(p.numel() for p in root)
    recipes = ("shampoo_grafted", "soap", "muon", "kfac")
    print(f"\nP = {P / 1e6:.2f} MB (root module's own parameters {P_root / 1e6:.2f} MB, gathered once per step: "
          f"FSDP2 keeps the root unsharded from forward to backward)")
    print("precond under FSDP2, per process and step, the largest process: its owned gradients (all-to-all) + its "
          "rows of every update (all-to-all) + the heads (an all-gather padded to the most parameters one process owns)")
    print("| W | FSDP all-gather + reduce-scatter (sizes, MB) | ring wire | DDP all-reduce wire | "
          + " | ".join(f"precond FSDP {r} (MB)" for r in recipes)
          + " | precond DDP sharded shampoo_grafted (MB) |")
    print("|---|---|---|---|" + "---|" * len(recipes) + "---|")
    whole = {}
    for recipe in recipes:
        opt = precond.build(recipe, net, **({"likelihood": "categorical"} if recipe == "kfac" else {}))
        whole[recipe] = _gathered(opt)
    opt = precond.build("shampoo_grafted", net)
    names = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    blocks = kronecker_blocks({f"{names[id(p)]}": tuple(p.shape) for p in net.parameters()}, 1024)
    for w in worlds:
        cells = []
        for recipe, (units, costs) in whole.items():
            owner = assign_named(costs, w)
            owned = [0] * w  # bytes of the gradients each process receives whole
            rows = [0] * w  # bytes of its rows of every update
            count = [0] * w
            for unit, (name, _) in zip(units, costs):
                o = owner[name]
                count[o] += len(unit)
                for p in unit:
                    owned[o] += 4 * p.numel()
                    per_row = p.numel() // p.shape[0]
                    for r, k in enumerate(_chunks(p.shape[0], w)):
                        rows[r] += 4 * k * per_row
            heads = 32 * w * max(count)
            total = [a + b + heads for a, b in zip(owned, rows)]
            r = max(range(w), key=lambda i: total[i])
            cells.append(f"{total[r] / 1e6:.1f} (gradients {owned[r] / 1e6:.1f}, updates {rows[r] / 1e6:.1f})")
        owner = assign_named([(b.name, b.cost("eigh")) for b in blocks], w)
        share = [0] * w
        for b in blocks:
            share[owner[b.name]] += 1 + math.prod(b.dims)
        fs = 2 * (P - P_root) + P_root + P
        print(f"| {w} | {fs / 1e6:.1f} | {fs * (w - 1) / w / 1e6:.1f} | {2 * P * (w - 1) / w / 1e6:.1f} | "
              + " | ".join(cells) + f" | {4 * w * max(share) / 1e6:.1f} |")


def state_arithmetic(out: str, worlds: list[int], shards: int) -> None:
    """The largest state per process predicted at W processes (FSDP) and at W / shards replicas of ``shards``
    (HSDP) from each parameter's state at one process (``out``/none1r0_<recipe>.pt): a parameter of a pipeline
    over whole parameters keeps its whole state at its owner (the assignment above, among all W processes), any
    other the state of its rows (FSDP2 cuts dim 0 in pieces of ceil(rows / shards), the last short or empty)."""
    from precond.distributed import assign_named

    labels = ("adam", "shampoo_grafted", "soap", "muon")
    one = {lab: torch.load(Path(out) / f"none1r0_{lab}.pt") for lab in labels}
    net = model()
    print(f"\nlargest optimizer state per process (MB), predicted; HSDP with shard groups of {shards}")
    print("| recipe | 1 | " + " | ".join(f"FSDP {w} | HSDP {w}" for w in worlds) + " |")
    print("|---|---|" + "---|---|" * len(worlds))
    for label in labels:
        per = one[label]["state_by_param"]
        opt = precond.build(label, net)
        units, costs = _gathered(opt)
        unit_of = {id(p): name for unit, (name, _) in zip(units, costs) for p in unit}
        cells = []
        for w in worlds:
            for s in (w, shards):
                owner = assign_named(costs, w) if costs else {}
                load = [0.0] * w
                for name, p in net.named_parameters():
                    if id(p) in unit_of:
                        load[owner[unit_of[id(p)]]] += per[name]
                        continue
                    rows, piece = p.shape[0], -(-p.shape[0] // s)
                    for r in range(w):
                        k = r % s  # its place in its shard group
                        load[r] += per[name] * max(0, min(piece, rows - k * piece)) / rows
                cells.append(f"{max(load) / 1e6:.1f}")
        print(f"| {label} | {sum(per.values()) / 1e6:.1f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--configs", default="none:1,fsdp:2,fsdp:4,hsdp:4,ddp:2,ddp:4")
    ap.add_argument("--only", default="", help="comma-separated labels (e.g. adam,muon); default all")
    ap.add_argument("--out", default="", help="directory for the per-process results (default: a temporary one)")
    ap.add_argument("--summarize", action="store_true", help="only print the table of the results already in --out")
    ap.add_argument("--arithmetic", default="", help="comma-separated W: print what the rules predict, run nothing")
    ap.add_argument("--shards", type=int, default=2, help="with --arithmetic: the HSDP shard group's size")
    args = ap.parse_args()
    if args.arithmetic:
        arithmetic([int(w) for w in args.arithmetic.split(",")])
        if args.out and (Path(args.out) / "none1r0_muon.pt").exists():
            state_arithmetic(args.out, [int(w) for w in args.arithmetic.split(",") if int(w) > 1], args.shards)
        return
    params = sum(p.numel() for p in model().parameters())
    print(f"transformer d_model {D_MODEL}, {LAYERS} layers, d_ff {4 * D_MODEL}, vocab {VOCAB}, seq {SEQ}: "
          f"{params / 1e6:.2f} M "
          f"parameters ({4 * params / 1e6:.1f} MB float32), global batch {GLOBAL_BATCH} x {SEQ} tokens, "
          f"{args.warmup} warm-up + {args.steps} measured steps", flush=True)
    out = args.out or tempfile.mkdtemp()
    Path(out).mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for config in args.configs.split(","):
        wrapper, world = config.split(":")[0], int(config.split(":")[1])
        tmp = tempfile.mkdtemp()
        t0 = time.perf_counter()
        labels = [lab for _, _, lab in (DDP_RUNS if wrapper in ("ddp", "none") else FSDP_RUNS)
                  if (not args.only or lab in args.only.split(",")) and not (world == 1 and lab.endswith("/sharded"))]
        for label in labels if not args.summarize else []:  # fresh processes for each recipe: memory stays bounded
            tmp = tempfile.mkdtemp()
            mp.start_processes(worker, args=(world, wrapper, tmp, args.warmup, args.steps, out, label),
                               nprocs=world, join=True, start_method="spawn")
            print(f"{config} {label}: {time.perf_counter() - t0:.0f} s", flush=True)
        results[config] = [{lab: torch.load(f) for lab in labels
                            if (f := Path(out) / f"{wrapper}{world}r{r}_{lab.replace('/', '-')}.pt").exists()}
                           for r in range(world)]
    summarize(results, args.warmup)
    (Path(out) / "results.json").write_text(json.dumps(results, default=str))
    print(f"per-process results: {out}/results.json")


if __name__ == "__main__":
    main()
