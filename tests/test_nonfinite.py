"""Bad numbers never corrupt training: the step is skipped (or raises) before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import precond
from conftest import loss_of, make_batches, make_mlp
from precond.curvature.hutchinson import Hutchinson
from precond.guard import NonFiniteError


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def same(model, opt, snap) -> bool:
    params, sd = snap
    now = opt.state_dict()
    if not all(torch.equal(p, q) for p, q in zip(model.parameters(), params)):
        return False
    for k, st in sd["state"].items():
        for key, v in st.items():
            w = now["state"][k][key]
            if isinstance(v, torch.Tensor) and not torch.equal(v, w):
                return False
    return now["precond"]["global_step"] == sd["precond"]["global_step"]


def nan_loss_closure(model, batch):
    def closure():
        loss, out = loss_of(model, batch)
        return loss * float("nan"), out

    return closure


@pytest.mark.parametrize("name", ["adam", "sgd", "adahessian", "sophia_g"])
def test_nan_loss_is_skipped_and_changes_nothing(name: str) -> None:
    model = make_mlp()
    opt = precond.build(name, model, likelihood="categorical")
    batches = make_batches(n=3)
    opt.step(lambda: loss_of(model, batches[0]))
    snap = snapshot(model, opt)
    opt.step(nan_loss_closure(model, batches[1]))
    assert same(model, opt, snap)
    assert opt.guard.skipped == 1 and "the loss is nan" in opt.guard.last
    opt.step(lambda: loss_of(model, batches[2]))
    assert opt.guard.consecutive == 0 and opt.global_step == 2


def test_nan_gradient_names_the_parameter() -> None:
    model = make_mlp()
    opt = precond.build("adam", model)
    batch = make_batches(n=1)[0]
    opt.step(lambda: loss_of(model, batch))
    snap = snapshot(model, opt)
    handle = model[2].weight.register_hook(lambda g: g * float("inf"))
    opt.step(lambda: loss_of(model, batch))
    handle.remove()
    assert same(model, opt, snap)
    assert "non-finite gradient in parameter '2.weight'" in opt.guard.last


def test_nonfinite_curvature_is_caught_before_accumulating(monkeypatch) -> None:
    model = make_mlp()
    opt = precond.build("adahessian", model)
    batch = make_batches(n=1)[0]
    opt.step(lambda: loss_of(model, batch))
    snap = snapshot(model, opt)
    real = Hutchinson.estimate

    def poisoned(self, params, grads, generator, mean_=None):
        out = real(self, params, grads, generator, mean_)
        out[1] = out[1] * float("nan")
        return out

    monkeypatch.setattr(Hutchinson, "estimate", poisoned)
    opt.step(lambda: loss_of(model, batch))
    assert same(model, opt, snap)
    assert "curvature 'hutchinson' is non-finite for parameter '0.bias'" in opt.guard.last


def test_nonfinite_update_from_the_transform_leaves_parameters() -> None:
    """1/C with C = 0 and no damping: the update is non-finite; parameters stay."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    recipe = {"name": "undamped", "lr": 0.1, "curvature": {"type": "empirical_fisher"},
              "structure": {"type": "diagonal", "accumulate": "sum"}, "transform": {"type": "inverse"}}
    opt = precond.build(recipe, [w])
    opt.step(lambda: (w[0] ** 2))  # the gradient of w[1] is exactly 0: 0 / 0
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert "the update of parameter 0 of param group 0 is non-finite" in opt.guard.last


def test_raise_policy_and_consecutive_limit() -> None:
    model = make_mlp()
    batch = make_batches(n=1)[0]
    opt = precond.build("adam", model, set={"on_nonfinite": "raise"})
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan .*Nothing was changed"):
        opt.step(nan_loss_closure(model, batch))
    assert opt.global_step == 0 and not any(opt.state.values())
    opt = precond.build("adam", model, set={"max_nonfinite": 3})
    opt.step(nan_loss_closure(model, batch))
    opt.step(nan_loss_closure(model, batch))
    with pytest.raises(NonFiniteError, match="3 consecutive steps skipped.*Lower the learning rate"):
        opt.step(nan_loss_closure(model, batch))


def test_ignore_policy_lets_nan_through() -> None:
    model = make_mlp()
    opt = precond.build("sgd", model, set={"on_nonfinite": "ignore"})
    opt.step(nan_loss_closure(model, make_batches(n=1)[0]))
    assert torch.isnan(next(model.parameters())).any()


def test_guard_counters_are_checkpointed() -> None:
    model = make_mlp()
    opt = precond.build("adam", model)
    opt.step(nan_loss_closure(model, make_batches(n=1)[0]))
    opt2 = precond.build("adam", make_mlp())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.guard.skipped == 1 and opt2.guard.consecutive == 1


def test_plain_idiom_with_nan_gradients() -> None:
    model = make_mlp()
    opt = precond.build("adam", model)
    x, y = make_batches(n=1)[0]
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.guard.skipped == 1


def test_first_nonfinite_finds_the_first_bad_tensor_and_not_an_overflowed_sum() -> None:
    """The check sums the tensors' norms (one number to the host); the sum of finite norms can overflow, which
    must not read as a bad tensor, and a bad one is still named by its position, whatever its sign or dtype."""
    from precond.guard import first_nonfinite

    huge = [torch.tensor([3.0e38]), torch.tensor([3.0e38]), torch.tensor([2.0e38])]
    norms = torch._foreach_norm(huge)
    assert all(torch.isfinite(n) for n in norms) and not torch.isfinite(torch.stack(norms).sum())  # the sum overflows
    assert first_nonfinite(huge) is None
    assert first_nonfinite(huge + [torch.tensor([1.0], dtype=torch.float64)]) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensors = [torch.ones(3), torch.ones(2, 2, dtype=torch.float64), torch.tensor([1.0, bad]), torch.tensor([bad])]
        assert first_nonfinite(tensors) == 2, bad
        assert first_nonfinite(huge + tensors) == 5, bad
    # divided directions: a zero divisor is bad unless a damping keeps them away from 0 (nonzero)
    num = [torch.ones(2), torch.ones(2)]
    assert first_nonfinite(num, [torch.ones(2), torch.tensor([1.0, 0.0])]) == 1
    assert first_nonfinite(num, [torch.ones(2), torch.tensor([1.0, 0.0])], nonzero=True) is None
    assert first_nonfinite(num, [torch.tensor([float("inf"), 1.0]), torch.ones(2)], nonzero=True) == 0
    assert first_nonfinite([]) is None
