"""A non-finite curvature estimate skips the step, whatever the structure keeps per parameter.

Each structure says what each of its fresh estimates is (``precond.block.Estimate``: which parameters,
which factor or pair); the guard names it. NaN and +Inf are injected into every kind of estimate by
monkeypatching the method that produces it (the structure's, or the curvature's output), so that the
update would use the poisoned tensor too: were the guard to miss it, the state or the parameters would
change and these tests would fail.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from conftest import loss_of, make_batches, make_mlp
from precond.block import DiagonalEstimate
from precond.curvature.hessian import Hessian
from precond.curvature.sampled_fisher import SampledFisher
from precond.curvature.secant import Secant, SecantStep
from precond.structure.kbfgs import KBFGSStage
from precond.structure.kronecker import KroneckerStage

BAD = {"nan": float("nan"), "inf": float("inf")}


def poison(t: torch.Tensor, value: float) -> torch.Tensor:
    out = t.clone()
    out.view(-1)[-1] = value
    return out


def snapshot(model: nn.Module, opt: precond.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(model: nn.Module, opt: precond.Optimizer, snap: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
    params, before = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    def hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:  # (precond's section: its guard counters move)
        return [{k: v for k, v in g.items() if k != "precond"} for g in groups]

    assert hyper(now["param_groups"]) == hyper(before["param_groups"])
    assert now["precond"]["global_step"] == before["precond"]["global_step"]
    assert now["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        assert now["state"][k].keys() == st.keys(), k
        for key, v in st.items():
            w = now["state"][k][key]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), (k, key)
            else:
                assert v == w, (k, key)


class Tensor3(nn.Module):
    """A 3-D weight (Shampoo: one factor per dimension, cut into blocks by max_dim) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(4, 3, 5, dtype=torch.float64))
        self.head = nn.Linear(12, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(torch.einsum("nk,ijk->nij", x, self.w)).reshape(len(x), 12))


def run_poisoned(
    model: nn.Module, opt: precond.Optimizer, patch: Callable[[], None], good_steps: int = 3
) -> tuple[str, int]:
    """``good_steps`` clean steps, then one with the estimate poisoned: it must change nothing."""
    batches = make_batches(n=good_steps + 2)
    for b in batches[:good_steps]:
        opt.step(lambda: loss_of(model, b))  # noqa: B023
    assert opt.guard.skipped == 0
    snap = snapshot(model, opt)
    patch()
    opt.step(lambda: loss_of(model, batches[good_steps]))
    assert_unchanged(model, opt, snap)
    assert opt.guard.skipped == 1 and opt.guard.consecutive == 1
    return opt.guard.last, opt.global_step


# --- the reported crash ----------------------------------------------------------------------


def test_diverging_shampoo_on_the_digits_autoencoder_skips_instead_of_crashing() -> None:
    """Was: IndexError in the guard's message (one estimate per parameter assumed; Kronecker keeps two)."""
    from precond.tasks.digits import digits_arrays

    x_train = torch.tensor(digits_arrays()[0], dtype=torch.float32)
    torch.manual_seed(0)
    sizes = (64, 256, 128, 32, 128, 256, 64)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    opt = precond.build("shampoo", model, lr=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = x_train[torch.randint(0, len(x_train), (128,), generator=g)]
        snap = snapshot(model, opt)
        opt.step(lambda: (F.mse_loss(model(x), x), None))  # noqa: B023
        if opt.guard.skipped:
            break
    assert opt.guard.skipped == 1, "the run was expected to diverge"
    assert_unchanged(model, opt, snap)
    message = opt.guard.last
    assert "curvature 'empirical_fisher' is non-finite for parameter '" in message
    name = message.split("parameter '")[1].split("'")[0]
    j, dims = int(message.split("Kronecker factor ")[1].split(" ")[0]), int(message.split("dims ")[1].split(",")[0])
    param = dict(model.named_parameters())[name]
    assert f"of {param.dim()}" in message and param.shape[j] == dims
    # the factor really is the non-finite one: its Gram matrix overflows
    assert "in structure 'kronecker'" in message


# --- diagonal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", sorted(BAD))
def test_diagonal_estimate(bad: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("sophia_g", model, likelihood="categorical", set={"curvature.every": 1, "curvature.start": 1})
    real = SampledFisher.diagonal
    target = model[0].bias

    def patch() -> None:
        def poisoned(self, ctx):
            est = real(self, ctx)  # one draw: the roots ĝ and the scale B
            own = est.roots if est.roots is not None else est.values
            own = [poison(v, BAD[bad]) if p is target else v for p, v in zip(ctx.params, own)]
            if est.roots is not None:
                return DiagonalEstimate(roots=own, scale=est.scale)
            return DiagonalEstimate(values=own)

        monkeypatch.setattr(SampledFisher, "diagonal", poisoned)

    message, _ = run_poisoned(model, opt, patch)
    assert "curvature 'sampled_fisher' is non-finite for parameter '0.bias' (structure 'diagonal')" in message


# --- Kronecker: K-FAC's layer factors, Shampoo's gradient factors ------------------------------


def poison_kronecker(monkeypatch, value: float, pick: Callable[[Any], bool], factor: int) -> None:
    real = KroneckerStage._batch
    done: set[int] = set()

    def poisoned(self, ctx, *args):
        out = real(self, ctx, *args)  # memoised per step: the check and the update share this list
        if id(out) not in done:
            done.add(id(out))
            for u, fresh in out:
                if pick(u):
                    fresh[factor] = poison(fresh[factor], value)
        return out

    monkeypatch.setattr(KroneckerStage, "_batch", poisoned)


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("factor,label", [(0, "G, of the output gradients), dims 3"), (1, "A, of the inputs), dims 8")])
def test_kfac_layer_factor(bad: str, factor: int, label: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("kfac", model, likelihood="categorical")
    message, _ = run_poisoned(
        model, opt, lambda: poison_kronecker(monkeypatch, BAD[bad], lambda u: u.layer is not None and u.layer.name == "2", factor)
    )
    assert (
        f"curvature 'sampled_fisher' is non-finite for parameters '2.weight', '2.bias' "
        f"(Kronecker factor {factor} of 2 ({label}, in structure 'kronecker')"
    ) in message


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("factor,dims", [(0, 3), (1, 7)])
def test_shampoo_gradient_factor(bad: str, factor: int, dims: int, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("shampoo", model)
    target = model[2].weight
    message, _ = run_poisoned(model, opt, lambda: poison_kronecker(monkeypatch, BAD[bad], lambda u: u.holder is target, factor))
    assert (
        f"curvature 'empirical_fisher' is non-finite for parameter '2.weight' (Kronecker factor {factor} of 2, dims {dims}, "
        "in structure 'kronecker')"
    ) in message


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("block,factor,dims,shape", [(0, 0, 3, "[3, 3, 3]"), (1, 2, 2, "[3, 3, 2]"), (3, 0, 1, "[1, 3, 2]")])
def test_shampoo_blocked_3d_factor(bad: str, block: int, factor: int, dims: int, shape: str, monkeypatch) -> None:
    model = Tensor3()
    opt = precond.build("shampoo", model, set={"structure.max_dim": 3})
    message, _ = run_poisoned(
        model, opt, lambda: poison_kronecker(monkeypatch, BAD[bad], lambda u: u.holder is model.w and u.tag == str(block), factor)
    )
    assert (
        f"curvature 'empirical_fisher' is non-finite for parameter 'w' (block {block} of 4 {shape}, "
        f"Kronecker factor {factor} of 3, dims {dims}, in structure 'kronecker')"
    ) in message


# --- full: dense blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("scope", ["layer", "model"])
def test_full_dense_block(bad: str, scope: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("newton", model, set={"structure.scope": scope, "transform.0.damping": 1.0}, lr=0.1)
    real = Hessian.full
    target = model[2].weight

    def patch() -> None:
        def poisoned(self, ctx):
            out = real(self, ctx)
            return poison(out, BAD[bad]) if any(p is target for p in ctx.params) else out

        monkeypatch.setattr(Hessian, "full", poisoned)

    message, _ = run_poisoned(model, opt, patch)
    if scope == "layer":
        expected = "parameters '2.weight', '2.bias' (dense block 1 of 2, 24x24, in structure 'full')"
    else:
        expected = "parameters '0.weight', '0.bias', '2.weight', '2.bias' (dense block 0 of 1, 66x66, in structure 'full')"
    assert f"curvature 'hessian' is non-finite for {expected}" in message


# --- secant pairs: history (L-BFGS) and full (BFGS) ---------------------------------------------


def poison_pair(monkeypatch, value: float, which: str, pick: Callable[[Any], bool]) -> None:
    real = Secant.pair
    done: set[int] = set()

    def poisoned(self, ctx) -> SecantStep:
        step = real(self, ctx)  # memoised per step: the check and the update share it
        if step.s is not None and pick(ctx) and id(step) not in done:
            done.add(id(step))
            t = getattr(step, which)
            t.view(-1)[0] = value
        return step

    monkeypatch.setattr(Secant, "pair", poisoned)


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("which,label", [("s", "the parameter change"), ("y", "the gradient change")])
def test_history_secant_pair(bad: str, which: str, label: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("lbfgs", model, set={"structure.scope": "layer"})
    target = model[2].weight
    message, _ = run_poisoned(model, opt, lambda: poison_pair(monkeypatch, BAD[bad], which, lambda ctx: ctx.params[0] is target))
    assert (
        f"curvature 'secant' is non-finite for parameters '2.weight', '2.bias' (history block 1 of 2: secant pair {which}, "
        f"{label}, in structure 'history')"
    ) in message


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("which", ["s", "y"])
def test_bfgs_secant_pair(bad: str, which: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("bfgs", model)
    message, _ = run_poisoned(model, opt, lambda: poison_pair(monkeypatch, BAD[bad], which, lambda ctx: True))
    assert (
        "curvature 'secant' is non-finite for parameters '0.weight', '0.bias', '2.weight', '2.bias' "
        f"(dense block 0 of 1: secant pair {which}"
    ) in message


# --- K-BFGS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize(
    "key,label",
    [("hh", "K-BFGS input statistic hh^T (for A and H_a), dims 6"), ("h", "K-BFGS mean input row (the H_a pair), dims 6"),
     ("a", "K-BFGS mean pre-activation (the H_g pair), dims 7"), ("g", "K-BFGS mean output gradient (the H_g pair), dims 7")],
)
def test_kbfgs_statistics(bad: str, key: str, label: str, monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("kbfgs", model)
    real = KBFGSStage._fresh
    done: set[int] = set()

    def patch() -> None:
        def poisoned(self, ctx, *args):
            out = real(self, ctx, *args)  # memoised per step
            if id(out) not in done:
                done.add(id(out))
                for layer, _, stats in out:
                    if layer.name == "0":
                        stats[key] = poison(stats[key], BAD[bad])
            return out

        monkeypatch.setattr(KBFGSStage, "_fresh", poisoned)

    message, _ = run_poisoned(model, opt, patch)
    assert (
        f"curvature 'secant' is non-finite for parameters '0.weight', '0.bias' (layer '0': {label}, in structure 'kbfgs')"
    ) in message


def test_a_skipped_step_is_followed_by_normal_steps(monkeypatch) -> None:
    """After the poisoned step the run continues from the unchanged state (the counter resets)."""
    model = make_mlp()
    opt = precond.build("shampoo", model)
    run_poisoned(model, opt, lambda: poison_kronecker(monkeypatch, float("nan"), lambda u: True, 0))
    monkeypatch.undo()
    batch = make_batches(n=1, seed=5)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: loss_of(model, batch))
    assert opt.guard.consecutive == 0 and opt.global_step == 4
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
