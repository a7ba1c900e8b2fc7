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

Batch size: ``--batch N`` replaces the problem's default batch; ``--batches 256,1024,4096`` sweeps
several (each problem at each size, with ``--steps`` either one number or one per batch size, e.g.
``--steps 60,20,10``). A batch no larger than the training set is drawn from seeded permutations
(epochs without replacement, as before); a larger one samples the training set *with replacement*
from a fixed seeded generator: per-step time does not depend on the data, only on the batch size,
so the sweep measures cost at batch sizes the digits set cannot supply (its losses at such batches
are just a sanity check).

Each table also prints FLOP lower bounds on the ratio to Adam. Adam's forward and backward cost
about ``6·B·o·i`` flops per ``o×i`` linear layer (its elementwise update is ignored). A Kronecker
product of an ``o×i`` gradient with an ``o×o`` and an ``i×i`` factor (two matrix products) costs
``2·o·i·(o+i)``, so

  bound4 = 1 + Σ 4·o·i·(o+i) / Σ 6·B·o·i   (four products per step: K-FAC's exact damping rotates into
                                            both eigenbases and back; Shampoo's two statistics G Gᵀ, Gᵀ G
                                            plus its two-sided preconditioning)
  bound2 = 1 + Σ 2·o·i·(o+i) / Σ 6·B·o·i   (two products: K-FAC with damping_form factored or
                                            per_factor and its statistics on an ``every: k`` interval)

and ``bound`` is the recipe's own, read from the built optimizer: its preconditioning products (4
exact / 2 precomputed), Shampoo's 2 statistics products per curvature step, and K-FAC's factor
statistics ``A = aᵀa``, ``G = δᵀδ`` (``2·B·(o²+i²)``) plus, for ``sampled_fisher``, the extra
backward at sampled labels (``2·B·o·i``, the output gradients only), divided by ``curvature.every``. The
products are counted per block the optimizer keeps (read from its state: a dimension over ``max_dim`` is cut
into blocks, a bias has its own factor). ``+roots`` adds the refreshes of the factors (every
``transform.every`` steps, the ones the run made): per ``n×n`` factor the least an eigendecomposition does,
the tridiagonal reduction (4n³/3) and the back-transformation of the eigenvectors (2n³), or SOAP's power
iteration and QR (2n³ + 4n³/3), plus n³ where a root ``Q·diag·Qᵀ`` is formed (Shampoo); a float64 flop counts
as two float32 ones (``structure.float64``). A goal below ``bound``
cannot be met by any implementation of that recipe at that batch size (up to the non-matmul part of
Adam's own step - tanh, loss, its update - which the count leaves out, so a measured ratio can sit a
little below its bound). With ``--batch`` or ``--batches`` a summary at the end gives, per problem,
batch and recipe, the measured ratio, the bounds, the verdict against the goal and the smallest batch
at which the recipe's bound meets the goal.

Run: python bench/kronecker.py [--steps 200] [--chunk 10] [--threads 1] [--problems mlp,ae,wide]
         [--recipes kfac,shampoo,kfac10=kfac] [--set kfac10:curvature.every=10]
         [--batch N | --batches 256,1024,4096 --steps 100,60,20]
"""

from __future__ import annotations

import argparse
import copy
import math
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


# Per-step time goals of issue 4 (x Adam): (a), (b) 1.25; (c) 1.5.
GOAL: dict[str, float] = {"mlp": 1.25, "ae": 1.25, "wide": 1.5}


def batch_indices(n: int, size: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Row indices of each step's minibatch: seeded epochs without replacement when ``size <= n``,
    otherwise sampled with replacement (timing depends on the batch size only, not on the rows)."""
    g = torch.Generator().manual_seed(seed)
    if size > n:
        return [torch.randint(n, (size,), generator=g) for _ in range(steps)]
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - size + 1, size):
            out.append(perm[i : i + size])
    return out[:steps]


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)]


def product_bound(shapes: list[tuple[int, int]], batch: int, products: float, extra: float = 0.0) -> float:
    """``1 + (Σ products·o·i·(o+i) + extra) / Σ 6·B·o·i``: ``products`` matrix products per layer and step
    (the pair ``(o×o)·X`` and ``X·(i×i)`` costs ``2·o·i·(o+i)``), ``extra`` flops on top."""
    adam = sum(6 * batch * o * i for o, i in shapes)
    return 1.0 + (sum(products * o * i * (o + i) for o, i in shapes) + extra) / adam


def factor_blocks(opt: Any) -> list[tuple[int, ...]]:
    """The sizes of each Kronecker block's factors, read from the optimizer's state after a step (a block of a
    parameter cut at ``max_dim`` is its own block; a vector's block has one factor)."""
    out: list[tuple[int, ...]] = []
    for state in opt.state.values():
        blocks: dict[str, dict[int, int]] = {}
        for key, value in state.items():
            if key.startswith("structure.factor.") and torch.is_tensor(value):
                _, _, block, factor = key.split(".")
                blocks.setdefault(block, {})[int(factor)] = value.shape[0]
        out += [tuple(sizes[k] for k in sorted(sizes)) for sizes in blocks.values()]
    return out


# Flops of one refresh of an n x n factor, the least any implementation of the refresh does: an eigendecomposition
# reduces the factor to tridiagonal form (4n³/3) and back-transforms the eigenvectors (2n³; the tridiagonal
# eigenproblem in between, O(n²) per eigenvector with deflation, is not counted); SOAP's power-QR refresh
# multiplies the factor into the previous basis (2n³) and orthonormalises it by Householder QR (4n³/3). Forming a
# root Q·diag·Qᵀ (Shampoo keeps roots; K-FAC applies its eigenbases as they are) adds a symmetric product (n³).
# In float64 on a float32 model a flop counts twice (half the SIMD lanes; a float64 matmul here runs at 0.53x
# the float32 rate).
REFRESH_FLOPS = 10.0 / 3.0
ROOT_FLOPS = 1.0


def recipe_bound(
    opt: Any, shapes: list[tuple[int, int]], batch: int, roots: bool = False, steps: int | None = None
) -> float | None:
    """The FLOP lower bound of a built precond optimizer's Kronecker pipeline (None: not Kronecker), from the
    blocks it keeps (read from its state, so after a step; before one, from the layers' whole shapes).
    ``roots``: with the refreshes (eigendecompositions or power-QR) at ``REFRESH_FLOPS`` per factor, amortised
    over the first transform's ``every`` (or, with ``steps``, over the refreshes a run of that many steps makes:
    the one at the transform's ``start`` and one every ``every`` steps after it)."""
    pipe = getattr(opt, "pipelines", {}).get("default")
    structure = getattr(pipe, "structure", None)
    if structure is None or getattr(structure, "form", None) != "kronecker":
        return None
    structure = getattr(structure, "config", structure)  # a stage holds its block's configuration
    curvature = pipe.curvature
    every = max(1, int(getattr(curvature, "every", 1)))
    eigenbasis = structure.spectrum == "eigenbasis"
    precond_products = 4 if (structure.damping_form == "exact" or eigenbasis) else 2
    blocks = factor_blocks(opt) or [(o, i) for o, i in shapes]
    # per block of N entries with factors n_k, one pass of products costs 2·N·Σ n_k (a pair o×o, i×i: 2·o·i·(o+i))
    passes = sum(math.prod(b) * sum(b) for b in blocks)
    work = precond_products * passes
    if structure.factors == "gradient":
        work += 2 * passes / every  # G Gᵀ and Gᵀ G (SOAP's rotation of G into the eigenbasis is in its 4 products)
    else:
        per_step = sum(2 * batch * (o * o + i * i) for o, i in shapes)  # A = aᵀa, G = δᵀδ
        if curvature.type == "sampled_fisher":
            per_step += sum(2 * batch * o * i * getattr(curvature, "samples", 1) for o, i in shapes)
        work += per_step / every
    if roots:
        keeps_roots = any(k.startswith("structure.root.") for s in opt.state.values() for k in s)
        per_factor = REFRESH_FLOPS + (ROOT_FLOPS if keeps_roots else 0.0)
        weight = 2.0 if getattr(structure, "float64", False) else 1.0
        first = pipe.transforms[0] if pipe.transforms else None
        every_k = max(1, int(getattr(first, "every", 1)))
        start = max(1, int(getattr(first, "start", 1)))
        rate = 1.0 / every_k if steps is None else ((steps - start) // every_k + 1 if steps >= start else 0) / steps
        work += weight * per_factor * sum(n**3 for b in blocks for n in b) * rate
    adam = sum(6 * batch * o * i for o, i in shapes)
    return 1.0 + work / adam


def min_batch(opt: Any, shapes: list[tuple[int, int]], goal: float) -> float | None:
    """The smallest batch at which the recipe's bound ``1 + c + P/B`` is at most ``goal``.

    ``inf``: never (the batch-independent part ``c``, K-FAC's statistics, is too large); None: no bound."""
    b1, b2 = recipe_bound(opt, shapes, 1024), recipe_bound(opt, shapes, 2048)
    if b1 is None or b2 is None:
        return None
    per_batch = 2 * (b1 - b2) * 1024  # P
    floor = b1 - 1 - per_batch / 1024  # c: the batch-independent part (K-FAC's factor statistics)
    return float("inf") if floor >= goal - 1 else per_batch / (goal - 1 - floor)


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


def run_problem(
    key: str, recipes: list[str], steps: int, chunk: int, sets: dict[str, dict[str, Any]], batch: int | None = None
) -> list[dict[str, Any]]:
    spec = PROBLEMS[key]
    size = batch or spec["batch"]
    x, y = data(spec["ae"])
    torch.manual_seed(0)
    base = mlp(spec["dims"], linear_at=(len(spec["dims"]) // 2 - 1,) if spec["ae"] else ())
    shapes = linear_shapes(base)
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
    seq = batch_indices(len(x), size, steps)
    times: dict[str, list[float]] = {k: [] for k in runs}
    curves: dict[str, list[float]] = {k: [full_loss(m, x, y, spec["ae"])] for k, (m, _) in runs.items()}
    for start in range(0, steps, chunk):
        chunk_batches = [(x[idx], y[idx]) for idx in seq[start : start + chunk]]
        for name, (model, opt) in runs.items():
            kind = "adam" if name == "adam" else "precond"
            closures = [make_closure(kind, model, opt, b, spec["ae"]) for b in chunk_batches]
            t0 = time.perf_counter()
            for c in closures:
                opt.step(c)
            times[name].append((time.perf_counter() - t0) / len(closures))
            curves[name].append(full_loss(model, x, y, spec["ae"]))
        del chunk_batches
    title = spec["title"].replace(f"batch {spec['batch']}", f"batch {size}")
    if size > len(x):
        title += f" (sampled with replacement from {len(x)} examples)"
    print(f"\n{title}; {steps} steps, {len(times['adam'])} interleaved rounds of {chunk} steps")
    adam_mean = statistics.mean(times["adam"])
    adam_med = statistics.median(times["adam"])
    target = curves["adam"][-1]
    b4, b2 = product_bound(shapes, size, 4), product_bound(shapes, size, 2)
    print(f"  FLOP bounds (x Adam): 4 products {b4:.2f}, 2 products {b2:.2f}; goal {GOAL[key]:.2f}")
    print(
        f"  {'optimizer':<18}{'ms/step':>9}{'x Adam':>8}{'median':>9}{'x Adam':>8}{'bound':>7}{'+roots':>7}"
        f"{'train loss':>12}{'steps to Adam final':>21}"
    )
    rows: list[dict[str, Any]] = []
    for name, (_, opt) in runs.items():
        mean, med = statistics.mean(times[name]) * 1e3, statistics.median(times[name]) * 1e3
        reach = next((i * chunk for i, v in enumerate(curves[name]) if v <= target), None)
        bound = 1.0 if name == "adam" else recipe_bound(opt, shapes, size)
        with_roots = 1.0 if name == "adam" else recipe_bound(opt, shapes, size, roots=True, steps=steps)
        ratio = mean / (adam_mean * 1e3)
        print(
            f"  {name:<18}{mean:>9.2f}{ratio:>8.2f}{med:>9.2f}{med / (adam_med * 1e3):>8.2f}"
            f"{('-' if bound is None else f'{bound:.2f}'):>7}{('-' if with_roots is None else f'{with_roots:.2f}'):>7}"
            f"{curves[name][-1]:>12.4f}{('-' if reach is None else str(reach)):>21}"
        )
        rows.append({"problem": key, "batch": size, "recipe": name, "ms": mean, "ratio": ratio, "bound": bound,
                     "with_roots": with_roots,
                     "bound4": b4, "bound2": b2, "loss": curves[name][-1], "reach": reach, "steps": steps,
                     "min_batch": None if name == "adam" else min_batch(opt, shapes, GOAL[key])})
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    """One line per problem, batch size and recipe: measured ratio against its bound and the goal."""
    print("\nsummary (x Adam per step: measured, the recipe's FLOP bound without and with its refreshes, measured over"
          " the latter, the generic 4- and 2-product bounds)")
    print(f"  {'problem':<8}{'batch':>7}  {'recipe':<18}{'x Adam':>8}{'bound':>7}{'+roots':>7}{'meas/b':>7}"
          f"{'4-prod':>8}{'2-prod':>8}"
          f"{'goal':>6}  "
          f"{'verdict':<27}{'bound<=goal from batch':>23}{'train loss':>12}")
    for r in rows:
        if r["recipe"] == "adam":
            continue
        goal = GOAL[r["problem"]]
        bound = r["bound"]
        if r["ratio"] <= goal:
            verdict = "met"
        elif bound is not None and bound > goal:
            verdict = "impossible (bound > goal)"
        else:
            verdict = "not met (bound allows)"
        low = r["min_batch"]
        low_text = "-" if low is None else ("never" if low == float("inf") else str(math.ceil(low)))
        roots = r["with_roots"]
        over = "-" if roots is None else f"{r['ratio'] / roots:.2f}"
        print(f"  {r['problem']:<8}{r['batch']:>7}  {r['recipe']:<18}{r['ratio']:>8.2f}"
              f"{('-' if bound is None else f'{bound:.2f}'):>7}{('-' if roots is None else f'{roots:.2f}'):>7}"
              f"{over:>7}"
              f"{r['bound4']:>8.2f}{r['bound2']:>8.2f}{goal:>6.2f}  "
              f"{verdict:<27}{low_text:>23}{r['loss']:>12.4f}")


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
    ap.add_argument("--steps", default="200",
                    help="steps per run; with --batches, one number or one per batch size (e.g. 60,20,10)")
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable when other work shares the cores)")
    ap.add_argument("--problems", default="mlp,ae,wide")
    ap.add_argument("--recipes", default="kfac,shampoo,shampoo_grafted,soap",
                    help="recipe names, or label=recipe for a variant configured with --set label:key=value")
    ap.add_argument("--set", action="append", default=[], help="label:key=value, e.g. kfac:lr=0.01 or kfac:transform.0.every=20")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size for every problem (default: each problem's own)")
    ap.add_argument("--widths", default=None,
                    help="comma-separated widths W: run the MLP 64-W-W-W-10 (the wide problem's shape and learning "
                         "rates) at each, instead of --problems (the FLOP floor as the width grows)")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes to sweep for every problem "
                         "(larger than the training set: sampled with replacement)")
    args = ap.parse_args()
    if args.batch is not None and args.batches is not None:
        ap.error("give --batch or --batches, not both")
    sizes: list[int | None] = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
    steps = [int(s) for s in str(args.steps).split(",")]
    if len(steps) == 1:
        steps = steps * len(sizes)
    if len(steps) != len(sizes):
        ap.error(f"--steps: give one number or one per batch size ({len(sizes)})")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sets = parse_sets(args.set)
    rows: list[dict[str, Any]] = []
    problems = args.problems.split(",")
    if args.widths:
        problems = []
        for w in (int(v) for v in args.widths.split(",")):
            key = f"wide{w}"
            PROBLEMS[key] = {"title": f"(c') MLP 64-{w}-{w}-{w}-10, batch 1024", "dims": [64, w, w, w, 10], "batch": 1024,
                             "ae": False}
            LR[key], GOAL[key] = LR["wide"], GOAL["wide"]
            problems.append(key)
    for key in problems:
        for size, n in zip(sizes, steps):
            rows += run_problem(key, [r for r in args.recipes.split(",") if r], n, args.chunk, sets, size)
    if args.batch is not None or args.batches is not None or args.widths:
        summary(rows)


if __name__ == "__main__":
    main()
