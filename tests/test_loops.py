"""What people put between backward and step, with K-FAC (and the other hook recipes) in their own loop:
gradient accumulation over micro-batches, ``clip_grad_norm_``, ``torch.amp.GradScaler``.

Each is compared with precond's forward-only closure on the same data: the statistics of several micro-batches
must be weighted as the gradient is, the clipped gradient must be the one preconditioned, and statistics taken
from scaled backward passes must be unscaled (a power-of-two loss scale is exact in floating point).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import precond
from precond.errors import PipelineError

D = torch.float64


def data(dtype: torch.dtype = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=g, dtype=dtype), torch.randint(0, 4, (64,), generator=g)


def model(dtype: torch.dtype = D) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def closure_run(name: str, steps: int, scale_of=None, autocast: torch.dtype | None = None, dtype: torch.dtype = D,
                **kw) -> torch.Tensor:
    """The reference: a forward-only closure over the whole batch (its loss times ``scale_of(net, loss)``)."""
    x, y = data(dtype)
    net = model(dtype)
    opt = precond.build(name, net, likelihood="categorical", **kw)
    for _ in range(steps):

        def forward_only():
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                out = net(x)
            loss = F.cross_entropy(out.float() if autocast else out, y)
            return (loss if scale_of is None else loss * scale_of(net, loss)), out

        opt.step(forward_only)
    return flat(net)


# --- gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", ["kfac", "ekfac", "sophia_g", "natural_gradient", "adahessian", "shampoo", "adam"])
@pytest.mark.parametrize("sizes", [(16, 16, 16, 16), (8, 24, 32)])
def test_micro_batches_equal_one_batch(name: str, sizes: tuple[int, ...]) -> None:
    """Micro-batches of one step, each loss weighted by its share of the batch as the gradient is: the same
    trajectory as the whole batch at once (Kronecker factors and sampled-label statistics included)."""
    kw = {"set": {"curvature.every": 1, "curvature.start": 1}} if name == "sophia_g" else {}
    create_graph = name == "adahessian"
    reference = closure_run(name, 3, **kw)
    x, y = data()
    net = model()
    opt = precond.build(name, net, likelihood="categorical", **kw)
    for _ in range(3):
        opt.zero_grad()
        for xb, yb in zip(x.split(list(sizes)), y.split(list(sizes))):
            (F.cross_entropy(net(xb), yb) * (len(yb) / len(y))).backward(create_graph=create_graph)
        opt.step()
    # the dense natural gradient's solve amplifies the round-off of a sum taken in another order by its condition
    rtol = 1e-7 if name == "natural_gradient" else 1e-9
    torch.testing.assert_close(flat(net), reference, rtol=rtol, atol=1e-10)
    assert not torch.equal(flat(net), flat(model()))


@pytest.mark.parametrize("name", ["sophia_g", "natural_gradient"])
@pytest.mark.parametrize("passes", [1, 3])
def test_a_step_combines_its_recorded_micro_batches_once(name: str, passes: int, monkeypatch) -> None:
    """What each backward pass recorded is combined once per step: a single pass's own estimate is the step's, and
    the structure's check and update share one combination of several (a square of the batch gradient, a dense
    Gram matrix: each recombination a pass over every parameter)."""
    from precond.curvature.sampled_fisher import SampledFisher

    calls: list[int] = []
    real = SampledFisher.combine

    def counting(self, what, parts):
        calls.append(len(parts))
        return real(self, what, parts)

    monkeypatch.setattr(SampledFisher, "combine", counting)
    fields = {"curvature": {"type": "sampled_fisher"}} if name == "natural_gradient" else {"curvature.every": 1, "curvature.start": 1}
    x, y = data()
    net = model()
    opt = precond.build(name, net, likelihood="categorical", set=fields)
    for _ in range(2):
        calls.clear()
        opt.zero_grad()
        for xb, yb in zip(x.chunk(passes), y.chunk(passes)):
            (F.cross_entropy(net(xb), yb) / passes).backward()
        opt.step()
        assert calls == [1] * passes + ([] if passes == 1 else [passes])


# --- clip_grad_norm_ ----------------------------------------------------------------------------------


def clip_coefficient(max_norm: float):
    """torch.nn.utils.clip_grad_norm_'s factor, min(1, max_norm / (‖g‖ + 1e-6)), of the loss's gradient."""

    def scale_of(net: nn.Module, loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))

    return scale_of


@pytest.mark.filterwarnings("ignore::precond.errors.LikelihoodMismatchWarning")
@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_clip_grad_norm_preconditions_the_clipped_gradient(name: str) -> None:
    """Sampled-label K-FAC's factors do not depend on the loss's scale, so clipping by ``c`` equals a forward-only
    closure whose loss is multiplied by ``c``; both differ from the unclipped run."""
    max_norm = 0.05
    reference = closure_run(name, 4, scale_of=clip_coefficient(max_norm))
    x, y = data()
    for convention in ("plain", "torch"):
        net = model()
        opt = precond.build(name, net, likelihood="categorical")
        for _ in range(4):

            def torch_style() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
                return loss

            if convention == "plain":
                torch_style()
                opt.step()
            else:
                opt.step(torch_style)
        torch.testing.assert_close(flat(net), reference, rtol=1e-9, atol=1e-12)
    assert (flat(net) - closure_run(name, 4)).abs().max() > 1e-3  # clipping matters here


# --- GradScaler ------------------------------------------------------------------------------------------


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return nn.Linear(2, 2)(torch.randn(1, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


EMPIRICAL = {"curvature": {"type": "empirical_fisher"}}  # K-FAC's G from the gradients of the user's backward


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["kfac", "kfac/empirical", "shampoo"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_unscales_what_it_scaled(name: str, autocast: torch.dtype, unscale_first: bool) -> None:
    """``scaler.scale(loss).backward(); scaler.step(opt)`` under CPU autocast: the same trajectory as a
    forward-only closure under the same autocast without a scaler (the scale is a power of two). Empirical
    K-FAC's output-gradient factor comes from the scaled backward itself: unscaled by the square of the scale."""
    if not cpu_autocast_supports(autocast):
        pytest.skip(f"CPU autocast has no {autocast}")
    recipe, kw = name.split("/")[0], {"set": EMPIRICAL} if name.endswith("empirical") else {}
    reference = closure_run(recipe, 3, autocast=autocast, dtype=torch.float32, **kw)
    x, y = data(torch.float32)
    net = model(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = precond.build(recipe, net, likelihood="categorical", grad_scaler=scaler, **kw)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast):
            out = net(x)
        scaler.scale(F.cross_entropy(out.float(), y)).backward()
        if unscale_first:  # as for clipping under AMP: precond is told the scale by grad_scaler=
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    # float16 without a scaler (the reference) flushes the smallest gradients that the scaled pass keeps
    tol = {"rtol": 1e-5, "atol": 1e-6} if autocast == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-5}
    torch.testing.assert_close(flat(net), reference, **tol)


def test_overflow_step_is_skipped_without_touching_curvature() -> None:
    x, y = data(torch.float32)
    net = model(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = precond.build("kfac", net, likelihood="categorical", grad_scaler=scaler)

    def step(poison: bool) -> None:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()

    step(False)
    params, state = flat(net), copy.deepcopy(opt.state_dict())
    step(True)  # inf in the scaled gradients: skipped, the scale halves
    assert torch.equal(flat(net), params)
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k, s in state["state"].items():
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][k][key], value), key
    assert scaler.get_scale() == 2.0**7
    step(False)
    assert not torch.equal(flat(net), params)


def test_unscaled_before_step_without_grad_scaler_is_refused() -> None:
    """After ``scaler.unscale_(opt)`` the optimizer is not told the scale its hooks saw: it asks for it."""
    x, y = data(torch.float32)
    net = model(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = precond.build("kfac", net, likelihood="categorical", set={"curvature": {"type": "empirical_fisher"}})
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(PipelineError, match="grad_scaler=scaler"):
        scaler.step(opt)


# --- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "shampoo", "soap"])
def test_gradient_only_recipes_run_on_a_compiled_model(name: str) -> None:
    """The plain loop on ``torch.compile(model)`` (aot_eager: no C++ compiler needed) equals the eager model."""
    x, y = data(torch.float32)
    results = []
    for compiled in (False, True):
        net = model(torch.float32)
        run = torch.compile(net, backend="aot_eager") if compiled else net
        opt = precond.build(name, run)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
        results.append(flat(net))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kfac", "sophia_g", "adahessian"])
@pytest.mark.parametrize("how", ["torch.compile", "submodule", "Module.compile"])
def test_compiled_models_are_refused_where_hooks_or_double_backward_are_needed(name: str, how: str) -> None:
    net = model(torch.float32)
    if how == "torch.compile":
        net = torch.compile(net, backend="aot_eager")
    elif how == "submodule":
        net[2] = torch.compile(net[2], backend="aot_eager")
    else:
        net.compile(backend="aot_eager")
    with pytest.raises(PipelineError, match=r"torch\.compile'd module.*uncompiled model.*run on compiled models"):
        precond.build(name, net, likelihood="categorical")


# --- nothing a step recorded outlives it ---------------------------------------------------------------


_LOOPS = ("plain", "torch_closure", "forward_only")
_KEEPS_NOTHING = [(n, loop) for n in ("kfac", "kfac/empirical", "ekfac", "sophia_g", "natural_gradient", "adam")
                  for loop in _LOOPS] + [("kbfgs", "torch_closure"), ("kbfgs", "forward_only")]  # (its line search)


@pytest.mark.parametrize(("name", "loop"), _KEEPS_NOTHING)
def test_a_step_keeps_nothing_of_its_passes(name: str, loop: str) -> None:
    """Every activation, output and graph of a step's forward and backward passes is freed once the step is done
    and the loop drops its own references. The hooks that capture layer output gradients (empirical K-FAC, K-BFGS) once
    closed a reference cycle through autograd's graph node that Python's collector cannot see: every step's
    inputs, outputs and gradients stayed alive (60 MB per step on a small transformer, found by bench/peers.py)."""
    import gc
    import weakref

    recipe, kw = name.split("/")[0], {"set": EMPIRICAL} if name.endswith("empirical") else {}
    x, y = data()
    net = model()
    opt = precond.build(recipe, net, likelihood="categorical", **kw)
    alive: list[weakref.ref] = []
    net[0].register_forward_hook(lambda m, i, o: alive.append(weakref.ref(o)))  # the first layer's output

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = net(x)
        alive.append(weakref.ref(out))
        return F.cross_entropy(out, y), out

    for _ in range(3):
        if loop == "plain":
            opt.zero_grad()
            loss, out = forward()
            loss.backward()
            opt.step()
            del loss, out
        elif loop == "torch_closure":

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss, _ = forward()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.step(forward)
    gc.collect()  # once: a collection costs about 0.2 s in a full test session
    kept = sum(r() is not None for r in alive)
    assert len(alive) >= 6 and kept == 0, f"{kept} of the steps' {len(alive)} outputs outlived them"
