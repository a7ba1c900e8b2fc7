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
# label: (recipe, set, distributed mode, model dtype, tolerance against 1 process on the global batch).
# DDP's all-reduce sums in another order than one process's batch mean: the processes see gradients that
# differ from one process's by round-off (~1e-7 relative in float32), and some methods amplify it:
# - Shampoo's float32 eigendecompositions of factors summed from 1e-4*I: on this model 4.5e-7 after 20 steps
#   (on a 6-12-4 MLP 6e-6); with the eigendecompositions in float64 1e-7 ("shampoo64").
# - AdaHessian (|Hz| / sqrt(EMA) + 1e-4) and EKFAC (rotated moments + 1e-3) in float32: 1e-4 and O(1) after
#   20 steps, also in one process under a 1e-7 perturbation; in float64 they agree to 1e-12 and 1e-7.
# - SOAP: a factor with repeated eigenvalues (G Gᵀ of few gradients, from 0) has no unique eigenbasis, round-off
#   picks one, and Adam in the eigenbasis depends on the choice: no tolerance against one process; its
#   sharded run is compared with its replicated run instead (test_sharded_equals_replicated).
NG = {"structure.scope": "layer", "transform.0.every": 5, "transform.0.damping": 1.0, "lr": 0.3}
CASES: dict[str, tuple[str, dict | None, str, torch.dtype, float | None]] = {
    "adam": ("adam", None, "replicated", torch.float32, 1e-6),
    "kfac": ("kfac", None, "replicated", torch.float32, 1e-6),
    "kfac/sharded": ("kfac", None, "sharded", torch.float32, 1e-6),
    "shampoo64": ("shampoo", {"structure.float64": True}, "replicated", torch.float32, 1e-6),
    "shampoo64/sharded": ("shampoo", {"structure.float64": True}, "sharded", torch.float32, 1e-6),
    "shampoo": ("shampoo", None, "replicated", torch.float32, 1e-6),
    "shampoo/sharded": ("shampoo", None, "sharded", torch.float32, 1e-6),
    "sophia_g": ("sophia_g", None, "replicated", torch.float32, 1e-6),
    "adahessian": ("adahessian", None, "replicated", torch.float64, 1e-10),
    "ekfac": ("ekfac", None, "replicated", torch.float64, 1e-6),
    "soap": ("soap", None, "replicated", torch.float32, 1e-4),  # soap_official: round-off decides (docs/algorithms.md#eigenbasis-mode)
    # full blocks, one per layer, eigendecompositions kept for 5 steps: owners solve and refresh
    "natural_gradient": ("natural_gradient", NG, "replicated", torch.float64, 1e-9),
    "natural_gradient/sharded": ("natural_gradient", NG, "sharded", torch.float64, 1e-9),
    "soap/sharded": ("soap", None, "sharded", torch.float32, 1e-4),
    # the plain loop (loss.backward(); opt.step()): sampled labels drawn while DDP's backward passes the outputs
    "kfac/plain": ("kfac", None, "replicated", torch.float32, 1e-6),
    "sophia_g/plain": ("sophia_g", {"curvature.every": 3, "curvature.start": 1}, "replicated", torch.float32, 1e-6),
    # Newton-Schulz in bfloat16: a 1e-7 change of the gradient can flip a bfloat16 rounding (2^-8 of a step)
    "muon": ("muon", None, "replicated", torch.float32, 1e-5),
    # the probe v comes from the optimizer's generator, seeded alike on every process
    "psgd_kron": ("psgd_kron", {"lr": 0.01}, "replicated", torch.float64, 1e-9),
}
RESUME = ("kfac", "kfac/sharded", "shampoo64/sharded", "natural_gradient", "natural_gradient/sharded")  # checkpoint at 2 processes, resume at 1 and 4


def _model(label: str = "adam") -> nn.Module:
    """Mixed layer sizes, so that blocks land on different processes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))
    return model.to(CASES[label][3])


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def _build(label: str, target: nn.Module) -> precond.Optimizer:
    recipe, overrides, mode, _, _ = CASES[label]
    return precond.build(recipe, target, likelihood="categorical", set=overrides, distributed=mode)


def _steps(model: nn.Module, opt: precond.Optimizer, rank: int, world: int, start: int, stop: int, plain: bool = False) -> list[float]:
    per = GLOBAL_BATCH // world
    losses = []
    for x, y in _data()[start:stop]:
        x = x.to(next(model.parameters()).dtype)
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        if plain:
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            continue

        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> tuple[torch.Tensor, torch.Tensor]:
            out = model(xs)
            return F.cross_entropy(out, ys), out

        losses.append(float(opt.step(closure)))
    return losses


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int, tmp: str, resume_from: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        results: dict[str, dict] = {}
        for label in CASES:
            ddp = DDP(_model(label))
            opt = _build(label, ddp)
            losses = _steps(ddp, opt, rank, world, 0, STEPS, plain=label.endswith("/plain"))
            results[label] = {"params": _params(ddp.module), "losses": losses, "traffic": dict(opt.comm.traffic)}
        for label in RESUME:
            ddp = DDP(_model(label))
            opt = _build(label, ddp)
            if resume_from is None:  # write a checkpoint half-way (a collective in sharded mode), run on
                _steps(ddp, opt, rank, world, 0, STEPS // 2)
                state = opt.state_dict()
                if rank == 0:
                    torch.save({"model": ddp.module.state_dict(), "opt": state}, f"{tmp}/{label.replace('/', '_')}.ckpt")
                _steps(ddp, opt, rank, world, STEPS // 2, STEPS)
            else:
                ckpt = torch.load(f"{resume_from}/{label.replace('/', '_')}.ckpt", weights_only=True)
                ddp.module.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["opt"])
                _steps(ddp, opt, rank, world, STEPS // 2, STEPS)
            results[f"resume:{label}"] = {"params": _params(ddp.module)}
        # a model that is not wrapped in DDP: gradients of different halves, never averaged
        plain = _model()
        opt = precond.build("adam", plain)
        try:
            _steps(plain, opt, rank, world, 0, 1)
            results["plain"] = {"error": None, "params": _params(plain)}
        except precond.errors.PipelineError as exc:
            results["plain"] = {"error": str(exc), "params": _params(plain)}
        torch.save(results, f"{tmp}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path, resume_from: Path | None = None) -> list[dict]:
    mp.start_processes(_worker, args=(world, str(tmp), None if resume_from is None else str(resume_from)),
                       nprocs=world, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp2")
    return tmp, _spawn(2, tmp)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory, two: tuple[Path, list[dict]]) -> list[dict]:
    return _spawn(4, tmp_path_factory.mktemp("ddp4"), resume_from=two[0])


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """One process on the global batch."""
    out = {}
    for label in CASES:
        model = _model(label)
        opt = _build(label, model)
        losses = _steps(model, opt, 0, 1, 0, STEPS)
        out[label] = {"params": _params(model), "losses": losses}
        assert not opt.comm.active
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("label", list(CASES))
def test_ddp_processes_equal_one_process_on_the_global_batch(
    request: pytest.FixtureRequest, reference: dict, world: int, label: str
) -> None:
    ranks = request.getfixturevalue("two")[1] if world == 2 else request.getfixturevalue("four")
    # every process holds bitwise-identical parameters
    for other in ranks[1:]:
        for a, b in zip(ranks[0][label]["params"], other[label]["params"]):
            assert torch.equal(a, b), f"{label}: processes differ"
    # and they are what one process gets on the whole batch
    start = _params(_model(label))
    assert _max_diff(reference[label]["params"], start) > 1e-3  # the runs did train
    tolerance = CASES[label][4]
    if tolerance is None:
        return
    diff = _max_diff(reference[label]["params"], ranks[0][label]["params"])
    assert diff <= tolerance, f"{label}: {world} DDP processes differ from 1 process by {diff:.3g}"
    mean_losses = [sum(r[label]["losses"][i] for r in ranks) / world for i in range(STEPS)]
    assert mean_losses == pytest.approx(reference[label]["losses"], abs=1e-5)


@pytest.mark.parametrize("label", RESUME)
def test_a_checkpoint_from_two_processes_resumes_on_one_and_on_four(two: tuple[Path, list[dict]], four: list[dict], label: str) -> None:
    tmp, ranks2 = two
    uninterrupted = ranks2[0][f"resume:{label}"]["params"]
    assert _max_diff(uninterrupted, ranks2[0][label]["params"]) == 0.0  # the save did not disturb the run
    ckpt = torch.load(tmp / f"{label.replace('/', '_')}.ckpt", weights_only=True)
    model = _model(label)
    model.load_state_dict(ckpt["model"])
    opt = _build(label, model)
    opt.load_state_dict(ckpt["opt"])
    _steps(model, opt, 0, 1, STEPS // 2, STEPS)
    assert _max_diff(_params(model), uninterrupted) <= 1e-6
    for r in four:
        assert _max_diff(r[f"resume:{label}"]["params"], uninterrupted) <= 1e-6
        for a, b in zip(r[f"resume:{label}"]["params"], four[0][f"resume:{label}"]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("recipe", ["kfac", "shampoo", "soap", "natural_gradient"])
def test_sharded_equals_replicated(request: pytest.FixtureRequest, world: int, recipe: str) -> None:
    """The memory-saving mode computes the same numbers on the owners: it changes where, not what."""
    ranks = request.getfixturevalue("two")[1] if world == 2 else request.getfixturevalue("four")
    for a, b in zip(ranks[0][recipe]["params"], ranks[0][f"{recipe}/sharded"]["params"]):
        assert torch.equal(a, b), f"{recipe}: sharded differs from replicated at {world} processes"


def test_sharded_mode_splits_the_work_and_says_what_it_sent(two: tuple[Path, list[dict]]) -> None:
    ranks = two[1]
    replicated, sharded = ranks[0]["kfac"]["traffic"], ranks[0]["kfac/sharded"]["traffic"]
    # both all-reduce the K-FAC factors; replicated all-gathers eigenbases on refreshes, sharded the
    # preconditioned blocks on every step
    assert replicated["all_reduce"] == sharded["all_reduce"] > 0
    assert replicated["all_gather"] > 0 and sharded["all_gather"] > 0
    assert ranks[0]["adam"]["traffic"] == {}  # DDP alone averages Adam's statistics


def test_reference_run_is_not_trivially_equal_to_a_quarter_batch_run() -> None:
    # the checks above mean something: one process on its quarter of the batch ends elsewhere
    full, part = _model(), _model()
    _steps(full, _build("kfac", full), 0, 1, 0, STEPS)
    _steps(part, _build("kfac", part), 0, 4, 0, STEPS)
    assert _max_diff(_params(full), _params(part)) > 1e-4


def test_a_model_without_ddp_is_caught_on_the_first_step(two: tuple[Path, list[dict]]) -> None:
    start = _params(_model())
    for r in two[1]:
        assert "gradients of parameter '0.weight' differ between processes 0 and 1" in r["plain"]["error"]
        assert "DistributedDataParallel" in r["plain"]["error"]
        assert _max_diff(r["plain"]["params"], start) == 0.0  # nothing moved


def test_recipes_that_would_drift_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks that decide on this process's loss, or multiply by its curvature inside CG, are refused."""
    from precond.errors import PipelineError

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    refused = {
        "lbfgs": "step 'line_search'", "bfgs": "step 'line_search'", "hessian_free": "solver: cg",
        "kbfgs": "structure 'kbfgs'",
    }
    for name, why in refused.items():
        with pytest.raises(PipelineError, match="cannot run on 2 processes") as info:
            precond.build(name, model, likelihood="categorical")
        assert why in str(info.value)
    for name in ("adam", "adamw", "sgd", "adagrad", "shampoo", "soap", "kfac", "ekfac", "sophia_g", "sophia_h",
                 "adahessian", "newton", "gauss_newton", "natural_gradient"):
        precond.build(name, model, likelihood="categorical")
    with pytest.raises(PipelineError, match="distributed.mode: replicated"):
        precond.build("ekfac", model, likelihood="categorical", distributed="sharded")
    # mode off: independent optimizers, one per process (nothing refused, nothing averaged)
    opt = precond.build("lbfgs", model, distributed="off")
    assert not opt.comm.active and opt.comm.world == 1
