"""precond.distributed: the block assignment (pure), and precond under DDP on gloo (2 CPU processes)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import precond
from precond.distributed import (
    assign_blocks,
    assign_named,
    kronecker_blocks,
    kronecker_costs,
    load_balance,
    rank_loads,
)
from precond.linalg.kron import block_partition


def transformer_shapes(layers: int = 4, d: int = 512, ff: int = 2048, vocab: int = 50000) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a small transformer: mixed sizes, one huge embedding, biases, norms."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes[p + "attn.qkv.weight"] = (3 * d, d)
        shapes[p + "attn.qkv.bias"] = (3 * d,)
        shapes[p + "attn.out.weight"] = (d, d)
        shapes[p + "attn.out.bias"] = (d,)
        shapes[p + "ff.up.weight"] = (ff, d)
        shapes[p + "ff.up.bias"] = (ff,)
        shapes[p + "ff.down.weight"] = (d, ff)
        shapes[p + "ff.down.bias"] = (d,)
        shapes[p + "norm.weight"] = (d,)
        shapes[p + "norm.bias"] = (d,)
    return shapes


# --------------------------------------------------------------------------- the assignment (pure)


def test_greedy_rule_on_a_hand_example() -> None:
    # visit order: 9 (i1), 7 (i3), 5 (i0), 5 (i4: the tie after i0), 1 (i2); loads (r0, r1) after each:
    # 9 -> r0 (9, 0); 7 -> r1 (9, 7); 5 -> r1 (9, 12); 5 -> r0 (14, 12); 1 -> r1 (14, 13)
    assert assign_blocks([5, 9, 1, 7, 5], 2) == [1, 0, 1, 1, 0]
    assert assign_blocks([], 3) == []
    assert assign_blocks([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    assert assign_blocks([3.0, 3.0], 4) == [0, 1]  # equal costs: lower index to the lower rank
    assert assign_blocks([0.0, 0.0, 0.0], 2) == [0, 0, 0]  # zero cost leaves rank 0 the least loaded


def test_bad_inputs_are_refused() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            assign_blocks([1.0], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        assign_blocks([1.0, -2.0], 2)
    with pytest.raises(ValueError):
        assign_blocks([float("nan")], 2)
    with pytest.raises(ValueError):
        assign_named([("a", 1.0), ("a", 2.0)], 2)
    with pytest.raises(ValueError):
        rank_loads([0, 2], [1.0, 1.0], 2)


def test_blocks_follow_the_kronecker_partition() -> None:
    shapes = {"emb": (50000, 512), "w": (512, 2048), "b": (512,), "scalar": (), "conv": (8, 1, 3, 3)}
    blocks = kronecker_blocks(shapes, 1024)
    by_param: dict[str, list] = {}
    for b in blocks:
        by_param.setdefault(b.param, []).append(b)
    emb = by_param["emb"]
    assert len(emb) == 49 and [b.dims for b in emb[:48]] == [(1024, 512)] * 48 and emb[48].dims == (848, 512)
    assert [b.dims for b in by_param["w"]] == [(512, 1024), (512, 1024)]
    assert [b.dims for b in by_param["b"]] == [(512,)]
    assert [b.dims for b in by_param["scalar"]] == [(1,)]
    assert [b.dims for b in by_param["conv"]] == [(8, 3, 3)]  # size-1 dims dropped, as the structure does
    for name, shape in shapes.items():
        part = block_partition(tuple(d for d in shape if d != 1) or (1,), 1024, merge_dims=False)
        assert [b.dims for b in by_param[name]] == part.block_shapes
    costs = dict(kronecker_costs(shapes, 1024))
    assert costs["emb#0"] == 1024**3 + 512**3 and costs["b#0"] == 512**3
    assert dict(kronecker_costs(shapes, 1024, kind="memory"))["w#1"] == 512**2 + 1024**2
    merged = kronecker_blocks({"conv": (8, 1, 3, 3)}, 1024, merge_dims=True)
    assert [b.dims for b in merged] == [(72,)]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_transformer_assignment_is_deterministic_complete_and_balanced(world_size: int) -> None:
    shapes = transformer_shapes()
    costs = kronecker_costs(shapes, 1024)
    names = [n for n, _ in costs]
    assert len(names) == len(set(names))
    owners = assign_named(costs, world_size)
    # every block exactly once, to a valid rank
    assert sorted(owners) == sorted(names)
    assert all(0 <= r < world_size for r in owners.values())
    assert set(owners.values()) == set(range(world_size))
    # the same twice, and independent of the order shapes or costs are given in
    assert assign_named(costs, world_size) == owners
    items = list(shapes.items())
    for seed in range(3):
        random.Random(seed).shuffle(items)
        shuffled_costs = kronecker_costs(dict(items), 1024)
        assert shuffled_costs == costs
        reordered = list(costs)
        random.Random(seed).shuffle(reordered)
        assert assign_named(reordered, world_size) == owners
        assert assign_named(set(reordered), world_size) == owners
    # balanced: the busiest rank carries at most 1.3x the mean
    order = [owners[n] for n in names]
    values = [c for _, c in costs]
    assert load_balance(order, values, world_size) <= 1.3
    loads = rank_loads(order, values, world_size)
    assert sum(loads) == pytest.approx(sum(values))


def test_balance_is_bounded_by_the_largest_block() -> None:
    # more ranks than big blocks: the best any assignment can do is the largest block
    costs = [1000.0, 10.0, 10.0, 10.0]
    owners = assign_blocks(costs, 4)
    assert owners[0] == 0 and sorted(owners[1:]) == [1, 2, 3]
    assert max(rank_loads(owners, costs, 4)) == 1000.0
    assert load_balance(owners, costs, 4) == pytest.approx(1000.0 / (1030.0 / 4))
    assert load_balance([0, 1], [0.0, 0.0], 2) == 1.0


# --------------------------------------------------------------------------- precond under DDP (gloo, CPU)

STEPS = 20
GLOBAL_BATCH = 16
# Shampoo's float32 eigendecompositions of factors summed from 1e-4*I amplify round-off: a relative
# change of 1e-7 in the gradients (the order of summation of DDP's all-reduce against the one-process
# batch mean) moves the parameters by ~8e-6 after 20 steps; with the eigendecompositions in float64
# (parameters, gradients and factors stay float32) it is ~5e-7. Hence "shampoo64" for the 1e-6 check.
RECIPES: dict[str, tuple[str, dict | None, float]] = {  # label: (recipe, set, tolerance against 1 process)
    "adam": ("adam", None, 1e-6),
    "shampoo64": ("shampoo", {"structure.float64": True}, 1e-6),
    "shampoo": ("shampoo", None, 3e-5),
}
# (label, what precond.build receives): the DDP wrapper or the wrapped module; both share the parameters
CASES = [("adam", "ddp"), ("adam", "module"), ("shampoo64", "ddp"), ("shampoo64", "module"), ("shampoo", "ddp")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def _train(model: nn.Module, target: nn.Module, label: str, rank: int, world: int) -> list[float]:
    recipe, overrides, _ = RECIPES[label]
    opt = precond.build(recipe, target, set=overrides)
    per = GLOBAL_BATCH // world
    losses = []
    for x, y in _data():
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]

        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> tuple[torch.Tensor, torch.Tensor]:
            out = model(xs)
            return F.cross_entropy(out, ys), out

        losses.append(float(opt.step(closure)))
    return losses


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        for label, target in CASES:
            ddp = DDP(_model())
            losses = _train(ddp, ddp if target == "ddp" else ddp.module, label, rank, world)
            results[f"{label}/{target}"] = {
                "params": [p.detach().clone() for p in ddp.module.parameters()],
                "losses": losses,
            }
        torch.save(results, f"{tmp}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("label,target", CASES)
def test_two_ddp_processes_equal_one_process_on_the_global_batch(ddp_results: list[dict], label: str, target: str) -> None:
    reference = _model()
    ref_losses = _train(reference, reference, label, 0, 1)
    key = f"{label}/{target}"
    rank0, rank1 = (r[key] for r in ddp_results)
    # every rank holds bitwise-identical parameters
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    # and they are the parameters one process gets on the whole batch
    start = [p.detach() for p in _model().parameters()]
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(reference.parameters(), start))
    assert moved > 1e-3  # the runs did train
    diff = max(float((p.detach() - q).abs().max()) for p, q in zip(reference.parameters(), rank0["params"]))
    tolerance = RECIPES[label][2]
    assert diff <= tolerance, f"{key}: 2 DDP ranks differ from 1 process by {diff:.3g}"
    # the global loss (mean of the ranks' halves) matches as well
    mean_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    assert mean_losses == pytest.approx(ref_losses, abs=1e-5)


def test_reference_run_is_not_trivially_equal_to_a_half_batch_run() -> None:
    # the check above is meaningful: training on one rank's half alone gives different parameters
    full, half = _model(), _model()
    _train(full, full, "adam", 0, 1)
    _train(half, half, "adam", 0, 2)
    assert max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(full.parameters(), half.parameters())) > 1e-4


def test_recipes_that_would_drift_under_ddp_are_refused(monkeypatch) -> None:
    """Curvature from outputs, activations or double backward is not all-reduced yet: refuse, don't drift."""
    import precond
    from precond.errors import PipelineError

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for name in ("adahessian", "sophia_g", "sophia_h", "kfac", "lbfgs", "newton"):
        with pytest.raises(PipelineError, match="would differ between ranks"):
            precond.build(name, model, likelihood="categorical")
    for name in ("adam", "adamw", "sgd", "adagrad", "shampoo", "soap"):
        precond.build(name, model, likelihood="categorical")
