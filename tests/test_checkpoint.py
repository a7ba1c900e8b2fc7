"""A run resumed from a checkpoint continues bit for bit, for every shipped recipe."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import precond
from conftest import loss_of, make_batches, make_mlp
from precond.errors import CheckpointError
from precond.recipe import builtin_recipes

SETS = {"sgd": {"momentum.beta": 0.9}}  # exercise the momentum buffer too


def _run(model, opt, batches):
    for batch in batches:
        opt.step(lambda: loss_of(model, batch))


STEPS, SPLIT = 24, 13  # crosses curvature refreshes on both sides (every 10 from step 1 or 11)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_resume_is_bitwise(name: str) -> None:
    batches = make_batches(n=STEPS)
    straight = make_mlp()
    resumed = copy.deepcopy(straight)
    opt = precond.build(name, straight, set=SETS.get(name), likelihood="categorical")
    _run(straight, opt, batches)

    opt1 = precond.build(name, resumed, set=SETS.get(name), likelihood="categorical")
    _run(resumed, opt1, batches[:SPLIT])
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = make_mlp(seed=123)  # a different init: everything must come from the checkpoint
    fresh.load_state_dict(ckpt["model"])
    opt2 = precond.build(name, fresh, set=SETS.get(name), likelihood="categorical", seed=12345)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.global_step == SPLIT
    _run(fresh, opt2, batches[SPLIT:])
    for p, q in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(straight.parameters(), fresh.parameters()):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_state_keeps_its_dtype() -> None:
    """torch casts floating state to the parameter dtype on load; precond keeps the state's dtype."""
    model = make_mlp(torch.float32)
    opt = precond.build("adam", model)
    _run(model, opt, make_batches(torch.float32, n=2))
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["structure.diag"] = s["structure.diag"].double()
    opt.load_state_dict(sd)
    assert all(s["structure.diag"].dtype == torch.float64 for s in opt.state.values())


def test_mismatched_checkpoint_fails_before_changing_anything() -> None:
    model = make_mlp()
    adam = precond.build("adam", model)
    _run(model, adam, make_batches(n=3))
    sd = adam.state_dict()

    sgd = precond.build("sgd", make_mlp())
    before = copy.deepcopy(sgd.state_dict())
    with pytest.raises(CheckpointError, match="recipe 'adam'"):
        sgd.load_state_dict(sd)
    def hyper(groups: list[dict]) -> list[dict]:  # (the first also carries precond's section, for DCP)
        return [{k: v for k, v in g.items() if k != "precond"} for g in groups]

    assert hyper(sgd.state_dict()["param_groups"]) == hyper(before["param_groups"]) and not sgd.state
    assert sgd.state_dict()["precond"]["global_step"] == 0

    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    adam2 = precond.build("adam", other)
    with pytest.raises(CheckpointError, match="shape"):
        adam2.load_state_dict(sd)
    assert not adam2.state and adam2.global_step == 0

    with pytest.raises(CheckpointError, match="param groups"):
        precond.build("adam", [{"params": [model[0].weight]}, {"params": [model[0].bias]}]).load_state_dict(sd)


def test_generator_state_round_trips() -> None:
    model = make_mlp()
    opt = precond.build("adam", model, seed=7)
    torch.rand(3, generator=opt.generator)
    sd = opt.state_dict()
    expected = torch.rand(3, generator=opt.generator)
    opt2 = precond.build("adam", make_mlp(), seed=99)
    opt2.load_state_dict(sd)
    assert torch.equal(torch.rand(3, generator=opt2.generator), expected)


def bfloat16_setup():
    """A bfloat16 MLP and a closure computing the loss in float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(torch.bfloat16)
    x = torch.randn(16, 5, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (16,))

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out.float(), y), out

    return model, closure


def test_float32_factors_of_a_bfloat16_model_stay_float32() -> None:
    """torch would cast every floating state tensor to the parameter dtype on load; precond keeps it."""
    model, closure = bfloat16_setup()
    opt = precond.build("shampoo", model)
    opt.step(closure)
    factor_dtypes = {v.dtype for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() == 2
                     and v.shape[0] == v.shape[1] and v.is_floating_point()}
    assert torch.float32 in factor_dtypes
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = precond.build("shampoo", model)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert opt2.state[p][k].dtype == v.dtype, k


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_recipe_trains_a_bfloat16_model(name: str) -> None:
    """Half-precision parameters: curvature state in float32 where it matters, finite parameters."""
    model, closure = bfloat16_setup()
    opt = precond.build(name, model, likelihood="categorical")
    for _ in range(12):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# recipes whose curvature comes from a forward pass (outputs, layer hooks) that torch's state-initialisation step
# does not run, and recipes whose state appears only on refresh steps
DCP_RECIPES = ("kfac", "ekfac", "sophia_g", "shampoo_grafted", "adam")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP on one process, no process group
@pytest.mark.parametrize("name", DCP_RECIPES)
def test_a_dcp_checkpoint_resumes_into_a_fresh_optimizer(name: str, tmp_path) -> None:
    """torch.distributed.checkpoint loads only the keys a fresh optimizer's state has; get_optimizer_state_dict
    makes them with one step at zero gradients and lr 0 and no forward pass. precond's curvature estimates are
    zeros on that step, so K-FAC's factors and eigenbases and Sophia's Hessian EMA exist and are then loaded:
    the resumed run continues bit for bit, and the initialisation step moved no parameter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    batches = make_batches(n=STEPS)
    straight = make_mlp()
    resumed = copy.deepcopy(straight)
    opt = precond.build(name, straight, likelihood="categorical")
    _run(straight, opt, batches)
    opt1 = precond.build(name, resumed, likelihood="categorical")
    _run(resumed, opt1, batches[:SPLIT])
    saved = get_optimizer_state_dict(resumed, opt1)
    dcp.save({"model": resumed.state_dict(), "optim": saved}, checkpoint_id=str(tmp_path / "ckpt"))

    fresh = make_mlp(seed=123)
    before = [p.detach().clone() for p in fresh.parameters()]
    opt2 = precond.build(name, fresh, likelihood="categorical", seed=12345)
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, opt2)}
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), before))  # lr 0: nothing moved
    assert {k for s in state["optim"]["state"].values() for k in s} == {k for s in saved["state"].values() for k in s}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    assert opt2.global_step == SPLIT
    _run(fresh, opt2, batches[SPLIT:])
    for p, q in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_the_initialisation_step_is_told_from_a_real_step() -> None:
    """Only a fresh optimizer's step with every gradient zero, every lr 0 and no closure takes zero estimates; a
    real first step at lr 0 (a warm-up from 0) measures the curvature: K-FAC's input factor of the first layer,
    0.95 I + 0.05 A, has the batch's off-diagonal entries, where the initialisation step leaves 0.95 I."""
    key = "structure.factor.0.1"  # A of the layer's inputs
    model = make_mlp()
    opt = precond.build("kfac", model, likelihood="categorical", lr=0.0)
    loss, _ = loss_of(model, make_batches(n=1)[0])
    loss.backward()  # a plain loop: the outputs' graph is taken during this backward pass
    opt.step()
    a = opt.state[model[0].weight][key]
    assert (a - torch.diag(a.diagonal())).abs().max() > 1e-3
    model = make_mlp()
    opt = precond.build("kfac", model, likelihood="categorical")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()  # what get_optimizer_state_dict does with a fresh optimizer
    a = opt.state[model[0].weight][key]
    assert torch.equal(a, 0.95 * torch.eye(a.shape[0], dtype=a.dtype))
