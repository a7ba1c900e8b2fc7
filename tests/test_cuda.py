"""Every built-in recipe on a CUDA device (skipped without one; CI has none, the device runs in docs/benchmarks.md
were made on an H200): the same trajectory as on the CPU where no random numbers are drawn, state and random
generator on the parameters' device, checkpoints that resume bit for bit, and the host synchronisations of a step.

Run with ``python -m pytest -q -s tests/test_cuda.py`` to print the synchronisations per step of every recipe.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond.recipe import builtin_recipes, load_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducible run to run (before CUDA starts)

RECIPES = sorted(builtin_recipes())
RANDOM = {"sampled_fisher", "hutchinson"}  # curvatures that draw probes or labels from the optimizer's generator
STEPS = 12
# Newton-type steps solve with the Hessian/GGN of a softmax, singular in the directions softmax ignores: without
# damping, round-off decides which eigenvalues count as zero (the pseudo-inverse), on each device differently
DAMPED = {name: {"transform.0.damping": 1e-2} for name in ("newton", "gauss_newton", "hessian_free", "natural_gradient")}
# the official SOAP normalises components that round-off decides (docs/algorithms.md#eigenbasis-mode); soap does not, but
# stays here until a device run shows it within the tolerance
CHAOTIC = {"soap", "soap_official"}


def draws(name: str) -> bool:
    recipe = load_recipe(name)
    blocks = [recipe.curvature] + [r.recipe.curvature for r in recipe.rules]
    return any(b is not None and (b.name in RANDOM or getattr(b, "mc_samples", 0)) for b in blocks)


def setup(device: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 6, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 4, (32,), generator=gen).to(device)

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    return model, closure


def run(name: str, device: str, steps: int = STEPS) -> tuple[nn.Module, precond.Optimizer, list[float]]:
    model, closure = setup(device)
    opt = precond.build(name, model, likelihood="categorical", seed=0, set=DAMPED.get(name))
    losses = [float(opt.step(closure)) for _ in range(steps)]
    return model, opt, losses


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_cuda(name: str) -> None:
    model, opt, losses = run(name, "cuda")
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.device.type == "cuda", (name, key)
    assert opt.generator.device.type == "cuda"
    if draws(name) or name in CHAOTIC:  # CUDA's random stream is not the CPU's: other probes or labels
        assert losses[-1] < losses[0], losses
        return
    cpu, _, cpu_losses = run(name, "cpu")
    for p, q in zip(model.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["adam", "kfac", "shampoo", "soap", "sophia_g", "adahessian"])
def test_checkpoint_resumes_bit_for_bit_on_cuda(name: str) -> None:
    torch.use_deterministic_algorithms(True)
    model, closure = setup("cuda", torch.float32)
    opt = precond.build(name, model, likelihood="categorical", seed=0)
    for _ in range(6):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() refers to the live state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(6):
        opt.step(closure)
    straight = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(weights)
    again = precond.build(name, model, likelihood="categorical", seed=0)
    again.load_state_dict(saved)
    for _ in range(6):
        again.step(closure)
    torch.use_deterministic_algorithms(False)
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p.detach(), q), name


def syncs_per_step(name: str, **build) -> float:
    model, closure = setup("cuda", torch.float32)
    opt = precond.build(name, model, likelihood="categorical", seed=0, **build)
    for _ in range(3):
        opt.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / 5


def test_host_synchronisations_per_step() -> None:
    """Adam without the non-finite check makes no host synchronisation; the check costs one per step (it must
    know before any state changes). The others are printed for docs/benchmarks.md."""
    assert syncs_per_step("adam", set={"on_nonfinite": "ignore"}) == 0
    assert syncs_per_step("adam") <= 1
    for name in RECIPES:
        print(f"syncs per step: {name}: {syncs_per_step(name):g}")
