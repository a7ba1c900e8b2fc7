"""Reported bugs in the optimizer: torch.optim checkpoints, a missing likelihood found at build time, a loss that
does not match its likelihood. (Non-finite curvature estimates: tests/test_nonfinite_estimates.py.)"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from conftest import loss_of, make_batches, make_mlp
from precond.errors import CheckpointError, LikelihoodMismatchWarning, PipelineError
from precond.likelihood import get_likelihood
from precond.likelihood_check import mismatch
from precond.recipe import builtin_recipes, load_recipe

# --- 1. torch.optim state_dict -> precond ---------------------------------------------------------

N, M = 7, 9  # torch steps, then precond steps

# (recipe, precond set=, torch constructor): precond is built WITHOUT lr / weight_decay: the param groups carry them
TORCH_CASES: dict[str, tuple[str, dict[str, Any], Callable[[Any], torch.optim.Optimizer]]] = {
    "adam": ("adam", {}, lambda p: torch.optim.Adam(p, lr=2e-3, weight_decay=1e-3, foreach=True)),
    "adam_amsgrad": (
        "adam",
        {"structure.amsgrad": True, "structure.beta": 0.99, "momentum.beta": 0.8, "transform.0.damping": 1e-6},
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.01, amsgrad=True, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adamw": ("adamw", {}, lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05)),
    "adam_decoupled": ("adamw", {}, lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.05, decoupled_weight_decay=True)),
    "adagrad": (
        "adagrad",
        {"step.lr_decay": 0.1, "structure.init": 0.1},
        lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.1, weight_decay=0.01, initial_accumulator_value=0.1),
    ),
    "sgd_momentum": (
        "sgd",
        {"momentum.beta": 0.9, "momentum.dampening": 0.1},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    ),
    "sgd_nesterov": ("sgd", {"momentum.beta": 0.9, "momentum.nesterov": True}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "sgd_plain": ("sgd", {}, lambda p: torch.optim.SGD(p, lr=0.05)),
}
# precond's AMSGrad and decoupled weight decay differ from torch's by round-off in float64 (~1e-17 after a few
# steps) when both run from scratch too (tests/test_torch_equivalence.py allows 1e-12): there, 1e-12 after the
# conversion; everything else (and all of float32) is bit for bit
NOT_BITWISE = {("adam_amsgrad", torch.float64), ("adamw", torch.float64), ("adam_decoupled", torch.float64)}


def torch_then_precond(case: str, dtype: torch.dtype, load: bool = True) -> tuple[nn.Module, nn.Module, precond.Optimizer]:
    """N torch steps on two copies; then one continues with torch, the other with precond (loaded or fresh)."""
    recipe, sets, make = TORCH_CASES[case]
    a = make_mlp(dtype)
    b = copy.deepcopy(a)
    batches = make_batches(dtype, N + M)
    ta, tb = make(a.parameters()), make(b.parameters())
    for batch in batches[:N]:
        for model, opt in ((a, ta), (b, tb)):
            opt.zero_grad()
            loss_of(model, batch)[0].backward()
            opt.step()
    ours = precond.build(recipe, b, set=sets)
    if load:
        ours.load_state_dict(tb.state_dict())
    for batch in batches[N:]:
        ta.zero_grad()
        loss_of(a, batch)[0].backward()
        ta.step()
        ours.step(lambda: loss_of(b, batch))  # noqa: B023
    return a, b, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_state_continues_as_torch(case: str, dtype: torch.dtype) -> None:
    """N torch steps + load + M precond steps == N + M torch steps: bit for bit (see NOT_BITWISE: 1e-12)."""
    a, b, ours = torch_then_precond(case, dtype)
    if (case, dtype) in NOT_BITWISE:
        assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) <= 1e-12
    else:
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    make = TORCH_CASES[case][2]
    ref = make([torch.zeros(1, requires_grad=True)]).param_groups[0]
    assert ours.param_groups[0]["lr"] == ref["lr"] and ours.param_groups[0]["weight_decay"] == ref["weight_decay"]
    steps = 0 if case.startswith("sgd") else N  # torch.optim.SGD keeps no step count
    assert ours.global_step == steps + M


@pytest.mark.parametrize("case", ["adam", "adagrad", "sgd_momentum"])
def test_the_moments_matter(case: str) -> None:
    """Not vacuous: continuing with a fresh precond optimizer (moments lost) gives another trajectory."""
    a, b, _ = torch_then_precond(case, torch.float64, load=False)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) > 1e-6


def test_param_groups_and_scheduler_entries_are_carried_over() -> None:
    model = make_mlp()
    groups = [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "weight_decay": 0.1}]
    ref = torch.optim.AdamW(groups, lr=5e-3)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for batch in make_batches(n=3):
        ref.zero_grad()
        loss_of(model, batch)[0].backward()
        ref.step()
        sched.step()
    ours = precond.build("adamw", [{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    ours.load_state_dict(ref.state_dict())
    for g, r in zip(ours.param_groups, ref.param_groups):
        assert (g["lr"], g["weight_decay"], g["initial_lr"], g["rule"]) == (r["lr"], r["weight_decay"], r["initial_lr"], "default")
        assert "betas" not in g and "foreach" not in g
    state = ours.state[model[0].weight]
    assert state["step"] == 3 and state["structure.updates"] == 3
    assert torch.equal(state["momentum.avg"], ref.state[model[0].weight]["exp_avg"])
    assert torch.equal(state["structure.diag"], ref.state[model[0].weight]["exp_avg_sq"])
    assert state["momentum.avg"].data_ptr() != ref.state[model[0].weight]["exp_avg"].data_ptr()  # a copy


def trained_precond(name: str = "adam", **kw: Any) -> tuple[nn.Module, precond.Optimizer]:
    model = make_mlp()
    opt = precond.build(name, model, **kw)
    for batch in make_batches(n=2):
        opt.step(lambda: loss_of(model, batch))  # noqa: B023
    return model, opt


def torch_state(make: Callable[[Any], torch.optim.Optimizer]) -> dict[str, Any]:
    model = make_mlp()
    opt = make(model.parameters())
    for batch in make_batches(n=2):
        opt.zero_grad()
        loss_of(model, batch)[0].backward()
        opt.step()
    return opt.state_dict()


def refused(opt: precond.Optimizer, sd: dict[str, Any], *patterns: str) -> str:
    """load_state_dict raises CheckpointError with every pattern in its message and changes nothing."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(CheckpointError) as info:
        opt.load_state_dict(sd)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["precond"]["global_step"] == before["precond"]["global_step"]
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(v, after["state"][k][key]) if isinstance(v, torch.Tensor) else v == after["state"][k][key]
    return message


def test_different_betas_are_refused_with_the_fix() -> None:
    _, opt = trained_precond("adam")
    sd = torch_state(lambda p: torch.optim.Adam(p, betas=(0.8, 0.99)))
    refused(
        opt, sd,
        "a torch.optim state_dict (torch.optim.Adam) with per-parameter keys exp_avg, exp_avg_sq, step",
        "betas[0]=0.8, recipe 'adam' has momentum.beta=0.9",
        "betas[1]=0.99, recipe 'adam' has structure.beta=0.999",
        "set={'structure.beta': 0.99, 'momentum.beta': 0.8}",
    )
    # and that set= does load it
    model = make_mlp()
    precond.build("adam", model, set={"momentum.beta": 0.8, "structure.beta": 0.99}).load_state_dict(sd)


@pytest.mark.parametrize(
    "make,patterns",
    [
        (lambda p: torch.optim.Adam(p, eps=1e-6), ["eps=1e-06, recipe 'adam' has transform.0.damping=1e-08"]),
        (lambda p: torch.optim.Adam(p, amsgrad=True), ["amsgrad=True, recipe 'adam' has structure.amsgrad=False"]),
        (lambda p: torch.optim.Adam(p, maximize=True), ["maximize=True"]),
        (lambda p: torch.optim.AdamW(p), ["weight decay 0.01 is decoupled (AdamW)", "precond.build('adamw'"]),
    ],
)
def test_adam_hyperparameters_precond_cannot_represent_are_refused(make, patterns) -> None:
    _, opt = trained_precond("adam")
    refused(opt, torch_state(make), *patterns)


def test_recipe_fields_torch_cannot_have_are_refused() -> None:
    _, opt = trained_precond("adam", set={"structure.bias_correction": False})
    refused(opt, torch_state(lambda p: torch.optim.Adam(p)), "structure.bias_correction=False, which torch.optim.Adam cannot have")


@pytest.mark.parametrize(
    "make,what",
    [
        (lambda p: torch.optim.RMSprop(p), "a torch.optim state_dict with per-parameter keys square_avg, step"),
        (lambda p: torch.optim.NAdam(p), "a torch.optim state_dict with per-parameter keys exp_avg, exp_avg_sq, mu_product, step"),
        (lambda p: torch.optim.Adadelta(p), "a torch.optim state_dict with per-parameter keys acc_delta, square_avg, step"),
    ],
)
def test_other_torch_optimizers_are_refused(make, what: str) -> None:
    _, opt = trained_precond("adam")
    refused(opt, torch_state(make), what, "which precond cannot convert",
            "This optimizer (recipe 'adam') expects a precond state_dict", "momentum.avg", "structure.diag")


def test_torch_state_into_a_recipe_without_torch_equivalent_is_refused() -> None:
    _, opt = trained_precond("shampoo")
    refused(opt, torch_state(lambda p: torch.optim.Adam(p)),
            "a torch.optim state_dict (torch.optim.Adam) with per-parameter keys exp_avg, exp_avg_sq, step",
            "recipe 'shampoo' has no torch.optim equivalent", "recipe 'shampoo') expects a precond state_dict")


def test_torch_state_of_another_family_is_refused() -> None:
    _, opt = trained_precond("sgd", set={"momentum.beta": 0.9})
    refused(opt, torch_state(lambda p: torch.optim.Adam(p)), "recipe 'sgd' equals torch.optim.SGD, not Adam/AdamW")
    _, opt = trained_precond("adagrad")
    refused(opt, torch_state(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
            "(torch.optim.SGD) with per-parameter keys momentum_buffer", "recipe 'adagrad' equals torch.optim.Adagrad, not SGD")


def test_precond_state_without_its_section_is_refused() -> None:
    _, opt = trained_precond("adam")
    sd = copy.deepcopy(opt.state_dict())
    del sd["precond"]
    del sd["param_groups"][0]["precond"]  # (its copy for torch.distributed.checkpoint)
    _, other = trained_precond("adam")
    refused(other, sd, "a precond state_dict without its 'precond' section", "momentum.avg, step, structure.diag, structure.updates")
    sd = torch_state(lambda p: torch.optim.Adam(p))
    for st in sd["state"].values():
        st["unknown"] = torch.zeros(1)
    refused(other, sd, "per-parameter keys exp_avg, exp_avg_sq, step, unknown", "which precond cannot convert")


def test_original_report_adam_state_dict_no_longer_fails_at_step() -> None:
    """Was: loaded without complaint, then KeyError: 'rule' in step()."""
    model = make_mlp()
    ref = torch.optim.Adam(model.parameters())
    for batch in make_batches(n=2):
        ref.zero_grad()
        loss_of(model, batch)[0].backward()
        ref.step()
    opt = precond.build("adam", model)
    opt.load_state_dict(ref.state_dict())
    batch = make_batches(n=1, seed=3)[0]
    opt.step(lambda: loss_of(model, batch))
    assert opt.global_step == 3 and opt.state[model[0].weight]["step"] == 3


# --- 2. a missing likelihood is found at build time ----------------------------------------------


# the built-in recipes with a curvature block that calls Evaluation.require_likelihood (sampled labels, the loss
# Hessian in the outputs); test_the_blocks_that_call_require_likelihood_declare_it keeps the list honest
LIKELIHOOD_RECIPES = {"ekfac", "gauss_newton", "hessian_free", "kfac", "natural_gradient", "normalized_natural_gradient", "sophia_g"}


def likelihood_recipes() -> set[str]:
    return {name for name in builtin_recipes() if any(b.needs().likelihood for _, b in load_recipe(name).blocks())}


def test_the_blocks_that_call_require_likelihood_declare_it() -> None:
    """sampled_fisher and gauss_newton call Evaluation.require_likelihood; both declare it."""
    from precond import registry

    declared = {name for name, cls in registry.blocks("curvature").items() if cls.__module__.startswith("precond.") and cls().needs().likelihood}
    assert declared == {"sampled_fisher", "gauss_newton"}
    assert likelihood_recipes() == LIKELIHOOD_RECIPES


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_recipe_refuses_at_build_or_never_needs_a_likelihood(name: str) -> None:
    """Was: sophia_g built without likelihood= and failed at step 11 (its first curvature step)."""
    model = make_mlp()
    if name in LIKELIHOOD_RECIPES:
        with pytest.raises(PipelineError) as info:
            precond.build(name, model)
        message = str(info.value)
        assert f"recipe '{name}': curvature '" in message and "needs a likelihood" in message
        assert "likelihood='categorical'" in message and "likelihood='gaussian'" in message
        precond.build(name, model, likelihood="categorical")
        return
    opt = precond.build(name, model)
    for batch in make_batches(n=12):  # crosses every recipe's first curvature step (sophia_g: 11)
        opt.step(lambda: loss_of(model, batch))  # noqa: B023


def test_sophia_g_names_block_and_fix() -> None:
    with pytest.raises(PipelineError, match=r"recipe 'sophia_g': curvature 'sampled_fisher' needs a likelihood.*"
                       r"likelihood='categorical' to precond\.build for a cross-entropy loss.*likelihood='gaussian' for squared error"):
        precond.build("sophia_g", make_mlp())


def test_rules_recipes_are_checked() -> None:
    recipe = {"name": "mixed", "transform": {"type": "identity"},
              "rules": [{"name": "second_order", "match": {"names": ["2.*"]}, "recipe": "sophia_g"}]}
    with pytest.raises(PipelineError, match="recipe 'mixed', rule 'second_order' \\(recipe 'sophia_g'\\): curvature 'sampled_fisher'"):
        precond.build(recipe, make_mlp())
    precond.build(recipe, make_mlp(), likelihood="categorical")
    unused = {**recipe, "rules": [{"name": "second_order", "match": {"names": ["nothing.*"]}, "recipe": "sophia_g"}]}
    precond.build(unused, make_mlp())  # a rule that takes no parameter never runs


def test_estimate_keeps_its_behaviour() -> None:
    model = make_mlp()
    batch = make_batches(n=1)[0]
    est = precond.estimate("sampled_fisher", model, lambda: loss_of(model, batch))  # the default: categorical
    assert set(est) == {n for n, _ in model.named_parameters()}
    with pytest.raises(PipelineError, match="needs to know what distribution the model predicts"):
        precond.estimate("sampled_fisher", model, lambda: loss_of(model, batch), likelihood=None)


def test_tasks_pass_their_likelihood() -> None:
    from precond.tasks import build_task

    for name in ("digits-mlp", "digits-autoencoder", "logistic"):
        task = build_task(name, short=True)
        assert task.likelihood in ("categorical", "gaussian")
        precond.build("sophia_g", task.model, likelihood=task.likelihood)
    task = build_task("rosenbrock", short=True)
    with pytest.raises(PipelineError, match="needs a likelihood"):
        precond.build("sophia_g", task.model, likelihood=task.likelihood)


# --- 3. the loss and the likelihood disagree ---------------------------------------------------------


def regression_batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def penalty(model: nn.Module) -> torch.Tensor:
    return 0.05 * sum(p.square().sum() for p in model.parameters())


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]] = {
    "cross_entropy": lambda out, y, t, m: F.cross_entropy(out, y),
    "cross_entropy_penalty": lambda out, y, t, m: F.cross_entropy(out, y) + penalty(m),
    "cross_entropy_smoothed": lambda out, y, t, m: F.cross_entropy(out, y, label_smoothing=0.1),
    "cross_entropy_soft": lambda out, y, t, m: F.cross_entropy(out, t.softmax(-1)),
    "cross_entropy_sum": lambda out, y, t, m: F.cross_entropy(out, y, reduction="sum"),
    "cross_entropy_half": lambda out, y, t, m: 0.5 * F.cross_entropy(out, y),
    "cross_entropy_ignore": lambda out, y, t, m: F.cross_entropy(out, torch.where(torch.arange(len(y)) < 4, -100, y)),
    "nll_of_logits": lambda out, y, t, m: F.nll_loss(out, y),  # forgot log_softmax
    "mse": lambda out, y, t, m: F.mse_loss(out, t),
    "mse_penalty": lambda out, y, t, m: F.mse_loss(out, t) + penalty(m),
    "mse_sum": lambda out, y, t, m: F.mse_loss(out, t, reduction="sum"),
    "mse_sum_over_outputs": lambda out, y, t, m: (out - t).square().sum(-1).mean(),
    "mse_1.001": lambda out, y, t, m: 1.001 * F.mse_loss(out, t),
}
# (loss, likelihood) -> a fragment of the warning, or None: no warning
EXPECTED = {
    ("cross_entropy", "categorical"): None,
    ("cross_entropy_penalty", "categorical"): None,
    ("cross_entropy_smoothed", "categorical"): None,
    ("cross_entropy_soft", "categorical"): None,
    ("cross_entropy_sum", "categorical"): "is not the mean over every sample",
    ("cross_entropy_ignore", "categorical"): "is not the mean over every sample",
    ("cross_entropy_half", "categorical"): "a constant factor < 1",
    ("nll_of_logits", "categorical"): "do not sum to zero",
    ("mse", "categorical"): "pass likelihood='gaussian'",
    ("cross_entropy", "gaussian"): "pass likelihood='categorical'",
    ("cross_entropy_penalty", "gaussian"): "pass likelihood='categorical'",
    ("mse", "gaussian"): None,
    ("mse_penalty", "gaussian"): None,
    ("mse_sum", "gaussian"): "behaves like 48 × F.mse_loss",
    ("mse_sum_over_outputs", "gaussian"): "behaves like 3 × F.mse_loss",
    ("mse_1.001", "gaussian"): "behaves like 1.001 × F.mse_loss",
}


def closure_of(model: nn.Module, loss: str, outputs: Callable[[torch.Tensor], torch.Tensor] = lambda o: o):
    x, t = regression_batch()
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(5))

    def closure():
        out = outputs(model(x))
        return LOSSES[loss](out, y, t, model), out

    return closure


def warnings_of(fn: Callable[[], Any]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, LikelihoodMismatchWarning)]


@pytest.mark.parametrize("loss,likelihood", sorted(EXPECTED))
def test_estimate_warns_exactly_when_the_loss_is_not_the_likelihoods(loss: str, likelihood: str) -> None:
    model = make_mlp()
    got = warnings_of(lambda: precond.estimate("gauss_newton", model, closure_of(model, loss), likelihood=likelihood))
    expected = EXPECTED[(loss, likelihood)]
    if expected is None:
        assert got == []
    else:
        assert len(got) == 1 and expected in got[0], got
        assert f"likelihood '{likelihood}' expects loss = " in got[0]


def test_log_softmax_outputs_with_nll_loss_are_categorical() -> None:
    model = make_mlp()
    closure = closure_of(model, "nll_of_logits", outputs=lambda o: torch.log_softmax(o, -1))
    assert warnings_of(lambda: precond.estimate("gauss_newton", model, closure)) == []


def test_the_criteria_are_exact() -> None:
    """F.mse_loss: loss == (K/4)‖∂loss/∂outputs‖² to round-off in float64, so 1.001 × F.mse_loss is caught (a factor
    below 1 is not: it looks like an added penalty). Cross-entropy: softmax(f) - M·∂loss/∂f are the labels exactly."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    gaussian, categorical = get_likelihood("gaussian"), get_likelihood("categorical")
    loss = F.mse_loss(out, t)
    (grad,) = torch.autograd.grad(loss, out)
    assert abs(48 / 4 * float(grad.square().sum()) - loss.detach().item()) <= 1e-15 * loss.detach().item()
    for c, caught in ((1.0, False), (1.001, True), (0.999, False)):
        loss = c * F.mse_loss(out, t)
        (grad,) = torch.autograd.grad(loss, out)
        assert (mismatch(gaussian, loss.detach(), out.detach(), grad) is not None) == caught, c
    loss = F.cross_entropy(out, y)
    (grad,) = torch.autograd.grad(loss, out)
    assert torch.allclose(torch.softmax(out.detach(), -1) - 16 * grad, F.one_hot(y, 3).double(), rtol=0, atol=1e-15)
    for c, caught in ((1.0, False), (1.01, True), (0.99, True)):
        loss = c * F.cross_entropy(out, y)
        (grad,) = torch.autograd.grad(loss, out)
        assert (mismatch(categorical, loss.detach(), out.detach(), grad) is not None) == caught, c


def test_optimizer_warns_on_its_first_step_only_and_at_the_callers_line() -> None:
    model = make_mlp()
    opt = precond.build("sophia_g", model, likelihood="gaussian")
    closure = closure_of(model, "cross_entropy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
        opt.step(closure)
    mine = [w for w in caught if issubclass(w.category, LikelihoodMismatchWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__
    assert "recipe 'sophia_g' with likelihood='gaussian'" in str(mine[0].message)
    assert "pass likelihood='categorical'" in str(mine[0].message)
    assert warnings_of(lambda: precond.build("sophia_g", model, likelihood="categorical").step(closure)) == []


class CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountBackward.calls += 1
        return g


@pytest.mark.parametrize("name", ["adam", "sophia_g", "kfac", "gauss_newton"])
def test_the_check_adds_no_backward_pass(name: str) -> None:
    """The first step runs as many backward passes through the model with a likelihood (checked) as with the check
    off; and the check did run (a mismatching loss warns)."""

    def passes(check: bool) -> int:
        model = make_mlp()
        counted = nn.Sequential(model[0], nn.Tanh(), model[2])
        x, t = regression_batch()

        def closure():
            out = counted[2](CountBackward.apply(counted[1](counted[0](x))))
            return F.mse_loss(out, t), out

        opt = precond.build(name, counted, likelihood="gaussian")
        opt._likelihood_checked = not check
        CountBackward.calls = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", LikelihoodMismatchWarning)
            opt.step(closure)
        return CountBackward.calls

    assert passes(True) == passes(False)
    model = make_mlp()
    with pytest.warns(LikelihoodMismatchWarning):
        precond.build(name, model, likelihood="gaussian").step(closure_of(model, "cross_entropy"))


@pytest.mark.parametrize("task_name", ["digits-mlp", "digits-autoencoder", "logistic", "tiny-lm"])
@pytest.mark.parametrize("recipe", ["adam", "sophia_g"])
def test_no_warning_on_the_tasks(task_name: str, recipe: str) -> None:
    """The task's own likelihood: no warning; the other one: one warning (the check did run on this closure)."""
    from precond.tasks import build_task

    task = build_task(task_name, short=True)
    batch = next(iter(task.train_batches()))
    state = copy.deepcopy(task.model.state_dict())
    other = "gaussian" if task.likelihood == "categorical" else "categorical"
    for likelihood, count in ((task.likelihood, 0), (other, 1)):
        task.model.load_state_dict(state)
        opt = precond.build(recipe, task.model, likelihood=likelihood)
        assert len(warnings_of(lambda: opt.step(lambda: task.closure(batch)))) == count, likelihood  # noqa: B023
