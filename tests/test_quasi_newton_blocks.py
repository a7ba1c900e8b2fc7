"""The ``secant`` curvature and the ``history`` structure along optimizer trajectories, against scipy's
``BFGS`` / ``SR1`` update strategies and a dense BFGS built from the same pairs (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import BFGS, SR1
from torch import nn

import precond
from precond.errors import PipelineError, RecipeError

D = torch.float64


class Bumpy(nn.Module):
    """A smooth non-convex function of 7 numbers in two tensors: logistic terms, a ridge, sine bumps."""

    def __init__(self, seed: int = 0, bumps: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(12, 7, generator=g, dtype=D))
        self.bumps = bumps
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=D))
        self.v = nn.Parameter(torch.randn(3, generator=g, dtype=D))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.v])

    def loss(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.flat() if x is None else x
        return torch.nn.functional.softplus(self.a @ x).mean() + 0.05 * x @ x + self.bumps * torch.sin(2 * x).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(self.loss(x), x)[0].detach()


def recipe(**curvature) -> dict:
    return {
        "name": "qn",
        "lr": 0.2,
        "curvature": {"type": "secant", "init_scale": 1.0, **curvature},
        "structure": {"type": "full"},
        "transform": {"type": "inverse"},
        "step": {"type": "lr"},
    }


def trajectory(opt, f: Bumpy, steps: int):
    """Run ``steps`` steps; the points visited (before each step) and the stored matrix after each step."""
    points, matrices = [], []
    for _ in range(steps):
        points.append(f.flat().detach().clone())
        opt.step(f.loss)
        matrices.append(opt.state[f.w]["structure.matrix"].clone())
    return points, matrices


def pairs_of(f: Bumpy, points: list[torch.Tensor]):
    return [((b - a).numpy(), (f.grad(b) - f.grad(a)).numpy()) for a, b in zip(points, points[1:])]


CASES = [
    # (secant fields, scipy strategy, approx_type, swap s and y)
    ({"update": "bfgs", "form": "inverse"}, BFGS, "inv_hess", False),
    ({"update": "bfgs", "form": "direct"}, BFGS, "hess", False),
    ({"update": "dfp", "form": "inverse"}, BFGS, "hess", True),  # DFP = BFGS with s and y swapped
    ({"update": "dfp", "form": "direct"}, BFGS, "inv_hess", True),
    ({"update": "sr1", "form": "direct"}, SR1, "hess", False),
    ({"update": "sr1", "form": "inverse"}, SR1, "inv_hess", False),
    ({"update": "sherman_morrison"}, SR1, "inv_hess", False),
]


@pytest.mark.parametrize("fields, strategy, approx, swap", CASES, ids=[f"{c[0]['update']}-{c[0].get('form', 'auto')}" for c in CASES])
def test_secant_updates_equal_scipy_along_a_trajectory(fields, strategy, approx, swap) -> None:
    f = Bumpy()
    opt = precond.build(recipe(**fields), f)
    points, matrices = trajectory(opt, f, 12)
    ref = strategy(init_scale=1.0)
    ref.initialize(7, approx)
    statuses = []
    for k, (s, y) in enumerate(pairs_of(f, points)):
        ref.update(y, s) if swap else ref.update(s, y)
        stored = matrices[k + 1].numpy()  # the pair from point k to k+1 is used on step k+2
        np.testing.assert_allclose(stored, ref.get_matrix(), atol=1e-10, rtol=0)
        m = torch.tensor(stored)
        inverse = approx == "inv_hess" if not swap else approx == "hess"
        lhs, rhs = (m @ torch.tensor(y), torch.tensor(s)) if inverse else (m @ torch.tensor(s), torch.tensor(y))
        statuses.append(bool(torch.allclose(lhs, rhs, atol=1e-9, rtol=0)))  # the secant equation
    skipped = opt.state[f.w].get("curvature.skipped", 0)
    assert sum(statuses) >= len(statuses) - skipped and sum(statuses) >= 6


def test_sherman_morrison_is_the_inverse_of_sr1_along_the_same_pairs() -> None:
    f, g = Bumpy(seed=2, bumps=0.0), Bumpy(seed=2, bumps=0.0)
    direct = precond.build(recipe(update="sr1"), f)
    inverse = precond.build(recipe(update="sherman_morrison"), g)
    for _ in range(8):
        direct.step(f.loss)
        inverse.step(g.loss)
        b, h = direct.state[f.w]["structure.matrix"], inverse.state[g.w]["structure.matrix"]
        assert torch.allclose(torch.linalg.inv(b), h, atol=1e-9, rtol=0)
        assert torch.allclose(f.flat(), g.flat(), atol=1e-9, rtol=0)  # so the steps agree too
    assert direct.state[f.w]["curvature.updates"] == 7


def test_powell_guard_equals_scipy_damped_update() -> None:
    f = Bumpy(seed=1, bumps=0.6)  # strongly non-convex: pairs with y's < 0.2 s'Bs occur
    opt = precond.build(recipe(update="bfgs", form="direct", guard="powell"), f)
    points, matrices = trajectory(opt, f, 12)
    ref = BFGS(exception_strategy="damp_update", init_scale=1.0)
    ref.initialize(7, "hess")
    damped = 0
    for k, (s, y) in enumerate(pairs_of(f, points)):
        b = ref.get_matrix().copy()
        damped += int(s @ y <= 0.2 * s @ b @ s)
        ref.update(s, y)
        np.testing.assert_allclose(matrices[k + 1].numpy(), ref.get_matrix(), atol=1e-10, rtol=0)
        assert np.linalg.eigvalsh(ref.get_matrix()).min() > 0  # damping keeps B positive definite
    assert damped >= 1


def test_auto_initial_scale_equals_scipy() -> None:
    f = Bumpy(seed=3)
    opt = precond.build(recipe(update="bfgs", init_scale="auto"), f)
    points, matrices = trajectory(opt, f, 6)
    ref = BFGS()  # init_scale='auto': (y's / y'y) I before the first update
    ref.initialize(7, "inv_hess")
    for k, (s, y) in enumerate(pairs_of(f, points)):
        ref.update(s, y)
        np.testing.assert_allclose(matrices[k + 1].numpy(), ref.get_matrix(), atol=1e-10, rtol=0)


def test_first_step_scale_and_bfgs_direction() -> None:
    f = Bumpy(seed=4)
    x0 = f.flat().detach().clone()
    g0 = f.grad(x0)
    opt = precond.build(recipe(update="bfgs", first_step="l1"), f)
    opt.step(f.loss)
    c0 = min(1.0, 1.0 / float(g0.abs().sum()))
    assert torch.allclose(f.flat(), x0 - 0.2 * c0 * g0, atol=1e-15, rtol=0)
    x1 = f.flat().detach().clone()
    opt.step(f.loss)
    h = opt.state[f.w]["structure.matrix"]
    assert torch.allclose(f.flat(), x1 - 0.2 * h @ f.grad(x1), atol=1e-14, rtol=0)


def test_secant_validation_and_messages() -> None:
    with pytest.raises(RecipeError, match="inverse SR1"):
        precond.build(recipe(update="sherman_morrison", form="direct"), Bumpy())
    with pytest.raises(PipelineError, match="successive optimizer steps"):
        precond.estimate("secant", Bumpy(), lambda: Bumpy().loss(), structure="full")
    lbfgs_sr1 = {**recipe(update="sr1"), "structure": {"type": "history"}}
    with pytest.raises(PipelineError, match="needs structure 'full'"):
        precond.build(lbfgs_sr1, Bumpy())


# --- history (L-BFGS) ---------------------------------------------------------------------------


def lbfgs(memory: int) -> dict:
    return {
        "name": "l",
        "lr": 0.2,
        "curvature": {"type": "secant"},
        "structure": {"type": "history", "memory": memory},
        "transform": {"type": "inverse"},
        "step": {"type": "lr"},
    }


def test_two_loop_direction_equals_dense_bfgs_from_the_same_pairs() -> None:
    """Each step's direction is −H g with H built by dense BFGS from (sᵀy/yᵀy)·I of the newest pair
    through the stored pairs, oldest first; the FIFO keeps the newest ``memory`` pairs with y's > 1e-10."""
    f = Bumpy(seed=3, bumps=0.8)  # two of the 13 pairs have y's < 0
    memory = 4
    opt = precond.build(lbfgs(memory), f)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    rejected = 0
    prev = None
    for step in range(14):
        x = f.flat().detach().clone()
        g = f.grad(x)
        if prev is not None:
            s, y = (x - prev[0]).numpy(), (g - prev[1]).numpy()
            if y @ s > 1e-10:
                kept = (kept + [(s, y)])[-memory:]
            else:
                rejected += 1
        opt.step(f.loss)
        direction = ((x - f.flat().detach()) / 0.2).numpy()
        if kept:
            s_last, y_last = kept[-1]
            ref = BFGS(init_scale=float(s_last @ y_last / (y_last @ y_last)), exception_strategy="skip_update", min_curvature=0.0)
            ref.initialize(7, "inv_hess")
            for s, y in kept:
                ref.update(s, y)
            np.testing.assert_allclose(direction, ref.get_matrix() @ g.numpy(), atol=1e-10, rtol=0)
            stored = opt.state[f.w]
            assert stored["structure.s"].shape[0] == len(kept)
        prev = (x, g)
    assert rejected == 2 and len(kept) == memory


def test_history_checkpoint_keeps_the_ring_buffer_order() -> None:
    f, g = Bumpy(seed=6), Bumpy(seed=6)
    a = precond.build(lbfgs(3), f)
    for _ in range(7):
        a.step(f.loss)
    b = precond.build(lbfgs(3), g)
    g.load_state_dict(f.state_dict())
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        a.step(f.loss)
        b.step(g.loss)
    assert torch.equal(f.flat(), g.flat())
