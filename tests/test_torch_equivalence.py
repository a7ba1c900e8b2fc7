"""The first-order recipes reproduce torch.optim trajectories (50 steps, a small MLP)."""

from __future__ import annotations

import copy

import pytest
import torch

import precond
from conftest import loss_of, make_batches, make_mlp, max_diff

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}

# (recipe, precond overrides, torch constructor)
CASES = {
    "adam": ("adam", {}, {}, lambda p: torch.optim.Adam(p, foreach=True)),
    "adam_wd_amsgrad": (
        "adam",
        {"lr": 3e-3, "weight_decay": 0.01},
        {"structure.amsgrad": True, "structure.beta": 0.99, "momentum.beta": 0.8, "transform.0.damping": 1e-6},
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.01, amsgrad=True, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": ("adamw", {}, {}, lambda p: torch.optim.AdamW(p)),
    "adamw_lr": ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, {}, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "adagrad": ("adagrad", {}, {}, lambda p: torch.optim.Adagrad(p)),
    "adagrad_all": (
        "adagrad",
        {"weight_decay": 0.01},
        {"step.lr_decay": 0.1, "structure.init": 0.1},
        lambda p: torch.optim.Adagrad(p, lr_decay=0.1, weight_decay=0.01, initial_accumulator_value=0.1),
    ),
    "sgd": ("sgd", {"lr": 0.05}, {}, lambda p: torch.optim.SGD(p, lr=0.05)),
    "sgd_momentum": (
        "sgd",
        {"lr": 0.05, "weight_decay": 1e-3},
        {"momentum.beta": 0.9, "momentum.dampening": 0.1},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    ),
    "sgd_nesterov": (
        "sgd",
        {"lr": 0.05},
        {"momentum.beta": 0.9, "momentum.nesterov": True},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    ),
}


def run_pair(case: str, dtype: torch.dtype, idiom: str, steps: int = 50) -> float:
    recipe, hyper, sets, make_ref = CASES[case]
    a = make_mlp(dtype)
    b = copy.deepcopy(a)
    ours = precond.build(recipe, a, set=sets, **hyper)
    ref = make_ref(b.parameters())
    for batch in make_batches(dtype, steps):
        if idiom == "closure":
            ours.step(lambda: loss_of(a, batch))
        else:
            ours.zero_grad()
            loss_of(a, batch)[0].backward()
            ours.step()
        ref.zero_grad()
        loss_of(b, batch)[0].backward()
        ref.step()
    return max_diff(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("idiom", ["closure", "plain"])
def test_matches_torch(case: str, dtype: torch.dtype, idiom: str) -> None:
    assert run_pair(case, dtype, idiom) <= TOL[dtype]


def test_moves_at_all() -> None:
    """Guard against a vacuous comparison: the parameters really change."""
    m = make_mlp()
    before = [p.detach().clone() for p in m.parameters()]
    opt = precond.build("adam", m)
    for batch in make_batches(n=5):
        opt.step(lambda: loss_of(m, batch))
    assert min((p - q).abs().max().item() for p, q in zip(m.parameters(), before)) > 1e-3


def test_defaults_equal_torch_defaults() -> None:
    adam = precond.load_recipe("adam")
    ref = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults
    assert adam.lr == ref["lr"] and adam.weight_decay == ref["weight_decay"]
    assert (adam.momentum.beta, adam.structure.beta) == ref["betas"]
    assert adam.transform[0].damping == ref["eps"] and adam.structure.amsgrad == ref["amsgrad"]
    adamw = precond.load_recipe("adamw")
    ref = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    assert (adamw.lr, adamw.weight_decay, adamw.transform[0].damping) == (ref["lr"], ref["weight_decay"], ref["eps"])
    adagrad = precond.load_recipe("adagrad")
    ref = torch.optim.Adagrad([torch.zeros(1, requires_grad=True)]).defaults
    assert (adagrad.lr, adagrad.transform[0].damping, adagrad.structure.init, adagrad.step.lr_decay) == (
        ref["lr"], ref["eps"], ref["initial_accumulator_value"], ref["lr_decay"])
    sgd = precond.load_recipe("sgd")
    ref = torch.optim.SGD([torch.zeros(1, requires_grad=True)]).defaults
    assert (sgd.lr, sgd.momentum.beta, sgd.momentum.dampening, sgd.momentum.nesterov) == (
        ref["lr"], ref["momentum"], ref["dampening"], ref["nesterov"])


def test_param_groups_and_scheduler_match_torch() -> None:
    a = make_mlp()
    b = copy.deepcopy(a)

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 1e-2}, {"params": m[2].parameters(), "weight_decay": 0.1}]

    ours = precond.build("adamw", groups(a))
    ref = torch.optim.AdamW(groups(b))
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=7, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=7, gamma=0.5)
    for batch in make_batches(n=30):
        ours.step(lambda: loss_of(a, batch))
        ref.zero_grad()
        loss_of(b, batch)[0].backward()
        ref.step()
        s1.step()
        s2.step()
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 1e-2
    assert max_diff(a, b) <= 1e-12


def test_params_without_grad_are_skipped_like_torch() -> None:
    """A parameter that gets no gradient on some steps keeps its own step count (bias correction)."""
    a = make_mlp()
    b = copy.deepcopy(a)
    ours = precond.build("adam", a)
    ref = torch.optim.Adam(b.parameters())
    for i, batch in enumerate(make_batches(n=12)):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m[2].bias.requires_grad_(i % 3 != 0)
            loss_of(m, batch)[0].backward()
            opt.step()
    assert ours.state[a[2].bias]["step"] == 8
    assert max_diff(a, b) <= 1e-12
