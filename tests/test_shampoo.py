"""Shampoo (structure kronecker, factors: gradient), grafting, SOAP and the Muon limit against numpy
references built from the accumulated statistics (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import precond
from precond.errors import PipelineError

D = torch.float64
EPS = 1e-4  # the shampoo recipe's init eps


def grads_stream(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=D) for _ in range(n)]


def run(recipe, shape, grads, **kw):
    """Feed ``grads`` to a single parameter (the plain idiom); return the steps Δθ_t = θ_{t-1} - θ_t."""
    w = torch.nn.Parameter(torch.zeros(shape, dtype=D))
    opt = precond.build(recipe, [w], **kw)
    steps = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        steps.append((before - w.detach()).numpy())
    return steps, opt, w


def npower(m: np.ndarray, e: float, damping: float = 0.0) -> np.ndarray:
    w, q = np.linalg.eigh(m)
    return q @ np.diag((np.clip(w, 0, None) + damping) ** e) @ q.T


def test_matrix_step_equals_paper_shampoo_from_numpy_eigh() -> None:
    gs = grads_stream((4, 6), 4)
    steps, opt, _ = run("shampoo", (4, 6), gs, set={"transform.0.every": 1})
    lr = opt.param_groups[0]["lr"]
    left, right = EPS * np.eye(4), EPS * np.eye(6)
    for g, step in zip(gs, steps):
        g = g.numpy()
        left, right = left + g @ g.T, right + g.T @ g
        ref = npower(left, -0.25) @ g @ npower(right, -0.25)
        assert np.abs(step / lr - ref).max() < 1e-10


def test_exact_damping_form_agrees_without_damping() -> None:
    gs = grads_stream((4, 6), 3)
    a, _, _ = run("shampoo", (4, 6), gs, set={"transform.0.every": 1})
    b, _, _ = run("shampoo", (4, 6), gs, set={"transform.0.every": 1, "structure.damping_form": "exact"})
    for x, y in zip(a, b):
        assert np.abs(x - y).max() < 1e-12


def test_order_three_tensor_uses_minus_one_sixth() -> None:
    gs = grads_stream((3, 4, 5), 3, seed=1)
    steps, opt, _ = run("shampoo", (3, 4, 5), gs, set={"transform.0.every": 1})
    lr = opt.param_groups[0]["lr"]
    h = [EPS * np.eye(n) for n in (3, 4, 5)]
    for g, step in zip(gs, steps):
        g = g.numpy()
        h[0] += np.einsum("ijk,ljk->il", g, g)
        h[1] += np.einsum("ijk,ilk->jl", g, g)
        h[2] += np.einsum("ijk,ijl->kl", g, g)
        p = [npower(m, -1.0 / 6.0) for m in h]
        ref = np.einsum("ai,bj,ck,ijk->abc", p[0], p[1], p[2], g)
        assert np.abs(step / lr - ref).max() < 1e-10


def test_vector_is_full_matrix_adagrad() -> None:
    gs = grads_stream((5,), 4, seed=2)
    steps, opt, _ = run("shampoo", (5,), gs, set={"transform.0.every": 1})
    lr = opt.param_groups[0]["lr"]
    acc = EPS * np.eye(5)
    for g, step in zip(gs, steps):
        g = g.numpy()
        acc += np.outer(g, g)
        assert np.abs(step / lr - npower(acc, -0.5) @ g).max() < 1e-10


def test_blocking_at_max_dim_and_dropping_size_one_dims() -> None:
    gs = grads_stream((1, 10, 1, 6), 3, seed=3)
    steps, opt, w = run("shampoo", (1, 10, 1, 6), gs, set={"transform.0.every": 1, "structure.max_dim": 4})
    lr = opt.param_groups[0]["lr"]
    factors = [v for k, v in opt.state[w].items() if k.startswith("structure.factor.")]
    assert sorted(f.shape[0] for f in factors) == [2] * 5 + [4] * 7  # blocks (4|4|2) x (4|2): 2 factors each
    rows, cols = [(0, 4), (4, 8), (8, 10)], [(0, 4), (4, 6)]
    stats = {(r, c): [EPS * np.eye(r[1] - r[0]), EPS * np.eye(c[1] - c[0])] for r in rows for c in cols}
    for g, step in zip(gs, steps):
        g, step = g.numpy().reshape(10, 6), step.reshape(10, 6)
        for (r, c), (left, right) in stats.items():
            blk = g[r[0] : r[1], c[0] : c[1]]
            left += blk @ blk.T
            right += blk.T @ blk
            ref = npower(left, -0.25) @ blk @ npower(right, -0.25)
            assert np.abs(step[r[0] : r[1], c[0] : c[1]] / lr - ref).max() < 1e-10


def test_a_block_without_a_preconditioner_passes_while_the_others_are_preconditioned(monkeypatch) -> None:
    """Blocks (4, 3) and (2, 3) of a (6, 3) gradient: every eigendecomposition of a 2x2 factor fails, so the
    second block never gets a preconditioner and passes unchanged; the first block is preconditioned."""
    real = torch.linalg.eigh

    def eigh(m, *args, **kwargs):
        if m.shape[-1] == 2:
            raise torch.linalg.LinAlgError("forced failure")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    gs = grads_stream((6, 3), 2, seed=5)
    steps, opt, w = run("shampoo", (6, 3), gs, set={"transform.0.every": 1, "structure.max_dim": 4})
    lr = opt.param_groups[0]["lr"]
    left, right = EPS * np.eye(4), EPS * np.eye(3)
    for g, step in zip(gs, steps):
        blk = g.numpy()[:4]
        left, right = left + blk @ blk.T, right + blk.T @ blk
        np.testing.assert_allclose(step[:4] / lr, npower(left, -0.25) @ blk @ npower(right, -0.25), rtol=0, atol=1e-10)
        np.testing.assert_allclose(step[4:] / lr, g.numpy()[4:], rtol=0, atol=1e-12)
    assert opt.state[w]["structure.failures.1"] == 2 and "structure.refreshed.1" not in opt.state[w]


def test_merge_dims_merges_small_neighbours() -> None:
    _, opt, w = run({"name": "t", "curvature": {"type": "empirical_fisher"},
                     "structure": {"type": "kronecker", "factors": "gradient", "accumulate": "sum", "init": 1e-3, "merge_dims": True, "max_dim": 1024},
                     "transform": {"type": "inverse_root"}}, (8, 4, 3, 3), grads_stream((8, 4, 3, 3), 1))
    assert [v.shape for k, v in opt.state[w].items() if k.startswith("structure.factor.")] == [(288, 288)]


def test_ema_factors_with_bias_correction_and_per_factor_epsilon() -> None:
    gs = grads_stream((3, 5), 4, seed=4)
    recipe = {"name": "t", "lr": 0.1, "curvature": {"type": "empirical_fisher"},
              "structure": {"type": "kronecker", "factors": "gradient", "accumulate": "ema", "beta": 0.9, "bias_correction": True,
                            "damping_form": "per_factor"},
              "transform": {"type": "inverse_root", "p": 2, "damping": 1e-3}}
    steps, _, _ = run(recipe, (3, 5), gs)
    left, right = np.zeros((3, 3)), np.zeros((5, 5))
    for t, (g, step) in enumerate(zip(gs, steps), 1):
        g = g.numpy()
        left, right = 0.9 * left + 0.1 * g @ g.T, 0.9 * right + 0.1 * g.T @ g
        bc = 1 - 0.9**t
        ref = npower(left / bc, -0.25, 1e-3) @ g @ npower(right / bc, -0.25, 1e-3)
        assert np.abs(step / 0.1 - ref).max() < 1e-10


def test_amortised_roots_are_recomputed_every_k_steps_only() -> None:
    gs = grads_stream((4, 3), 5, seed=5)
    steps, opt, _ = run("shampoo", (4, 3), gs, set={"transform.0.every": 3})
    lr = opt.param_groups[0]["lr"]
    left, right = EPS * np.eye(4), EPS * np.eye(3)
    roots = None
    for t, (g, step) in enumerate(zip(gs, steps), 1):
        g = g.numpy()
        left, right = left + g @ g.T, right + g.T @ g
        if t in (1, 4):
            roots = npower(left, -0.25), npower(right, -0.25)
        assert np.abs(step / lr - roots[0] @ g @ roots[1]).max() < 1e-10


def test_muon_limit_is_the_orthogonal_polar_factor() -> None:
    """No accumulation and inverse_root(2): (G Gᵀ)^(-1/4) G (Gᵀ G)^(-1/4) = U Vᵀ."""
    recipe = {"name": "muon_like", "lr": 1.0, "curvature": {"type": "empirical_fisher"},
              "structure": {"type": "kronecker", "factors": "gradient", "accumulate": "none", "damping_form": "per_factor"},
              "transform": {"type": "inverse_root", "p": 2, "damping": 1e-12}}
    gs = grads_stream((4, 6), 2, seed=6)
    steps, _, _ = run(recipe, (4, 6), gs)
    for g, step in zip(gs, steps):
        u, _, vt = np.linalg.svd(g.numpy(), full_matrices=False)
        assert np.abs(step - u @ vt).max() < 1e-8


# --- grafting ----------------------------------------------------------------------------------


def test_adam_grafting_takes_adams_step_norm_and_shampoos_direction() -> None:
    gs = grads_stream((4, 5), 5, seed=7)
    steps, opt, _ = run("shampoo_grafted", (4, 5), gs, weight_decay=0.0,
                        set={"momentum": None, "transform.0.every": 1, "transform.0.start": 1, "transform.1.start": 1})
    lr = opt.param_groups[0]["lr"]
    w = torch.nn.Parameter(torch.zeros(4, 5, dtype=D))
    adam = torch.optim.Adam([w], lr=lr, betas=(0.0, 0.999), eps=1e-8)
    left, right = np.zeros((4, 4)), np.zeros((5, 5))
    for t, (g, step) in enumerate(zip(gs, steps), 1):
        before = w.detach().clone()
        w.grad = g.clone()
        adam.step()
        adam_norm = float((before - w.detach()).norm())
        assert np.linalg.norm(step) == pytest.approx(adam_norm, rel=1e-12)
        gn = g.numpy()
        left, right = 0.999 * left + 0.001 * gn @ gn.T, 0.999 * right + 0.001 * gn.T @ gn
        bc = 1 - 0.999**t
        direction = npower(left / bc, -0.25, 1e-12) @ gn @ npower(right / bc, -0.25, 1e-12)
        assert np.abs(step / np.linalg.norm(step) - direction / np.linalg.norm(direction)).max() < 1e-8


@pytest.mark.parametrize("source", ["sgd", "adagrad"])
def test_sgd_and_adagrad_grafting_norms(source: str) -> None:
    gs = grads_stream((3, 4), 4, seed=8)
    recipe = {"name": "t", "lr": 0.05, "curvature": {"type": "empirical_fisher"},
              "structure": {"type": "kronecker", "factors": "gradient", "accumulate": "sum", "init": 1e-4, "damping_form": "per_factor"},
              "transform": [{"type": "inverse_root"}, {"type": "graft", "source": source, "eps": 1e-10}]}
    steps, _, _ = run(recipe, (3, 4), gs)
    w = torch.nn.Parameter(torch.zeros(3, 4, dtype=D))
    ref = torch.optim.SGD([w], lr=0.05) if source == "sgd" else torch.optim.Adagrad([w], lr=0.05, eps=1e-10)
    for g, step in zip(gs, steps):
        before = w.detach().clone()
        w.grad = g.clone()
        ref.step()
        assert np.linalg.norm(step) == pytest.approx(float((before - w.detach()).norm()), rel=1e-12)


# --- SOAP: Adam in Shampoo's eigenbasis ----------------------------------------------------------


def test_soap_equals_adam_in_the_eigenbasis_of_ema_factors() -> None:
    """The official step with ``refresh: eigh`` (the power-iteration refresh: tests/test_soap.py)."""
    gs = grads_stream((5, 5), 13, seed=9)
    steps, opt, _ = run("soap_official", (5, 5), gs, set={"structure.refresh": "eigh"})
    lr, wd = 3e-3, 0.01
    w = torch.zeros(5, 5, dtype=D)
    left, right = torch.zeros(5, 5, dtype=D), torch.zeros(5, 5, dtype=D)
    m, v = torch.zeros(5, 5, dtype=D), torch.zeros(5, 5, dtype=D)
    for t, (g, step) in enumerate(zip(gs, steps), 1):
        before = w.clone()
        left, right = 0.95 * left + 0.05 * g @ g.T, 0.95 * right + 0.05 * g.T @ g
        if t % 10 == 1:  # eigenbases on steps 1, 11, ...
            ql, qr = torch.linalg.eigh(left)[1], torch.linalg.eigh(right)[1]
        m = 0.95 * m + 0.05 * g
        v = 0.95 * v + 0.05 * (ql.T @ g @ qr) ** 2
        m_hat, v_hat = m / (1 - 0.95**t), v / (1 - 0.95**t)
        update = ql @ ((ql.T @ m_hat @ qr) / (v_hat.sqrt() + 1e-8)) @ qr.T
        w = w * (1 - lr * wd) - lr * update
        assert np.abs(step - (before - w).numpy()).max() < 1e-8  # Adam's first steps amplify eigh round-off


def test_sampled_fisher_cannot_fill_gradient_factors() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=D))
    with pytest.raises(PipelineError, match="use curvature empirical_fisher"):
        precond.build({"name": "t", "curvature": {"type": "gauss_newton"}, "structure": {"type": "kronecker", "factors": "gradient"},
                       "transform": {"type": "inverse_root"}}, [w])


def test_float32_shampoo_trains_an_mlp() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    for name in ("shampoo", "shampoo_grafted", "soap"):
        m = torch.nn.Sequential(*[torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)])
        m.load_state_dict(model.state_dict())
        opt = precond.build(name, m, lr=3e-2)
        losses = []
        for _ in range(40):
            losses.append(float(opt.step(lambda: torch.nn.functional.cross_entropy(m(x), y))))
        assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0], (name, losses[::10])


def test_float32_factors_with_round_off_eigenvalues_stay_finite() -> None:
    """A wide float32 gradient summed from a tiny eps: eigenvalues at round-off level are floored, not inverted to inf."""
    gs = [g.float() * 100 for g in grads_stream((10, 300), 4, seed=10)]
    recipe = {"name": "t", "lr": 1e-3, "curvature": {"type": "empirical_fisher"},
              "structure": {"type": "kronecker", "factors": "gradient", "accumulate": "sum", "init": 1e-12, "damping_form": "per_factor"},
              "transform": {"type": "inverse_root", "p": 2, "damping": 0.0}}
    w = torch.nn.Parameter(torch.zeros(10, 300))
    opt = precond.build(recipe, [w])
    for g in gs:
        w.grad = g.clone()
        opt.step()
    assert torch.isfinite(w).all() and w.abs().max() > 0
    assert opt.state[w].get("structure.failures_total", 0) == 0


def test_float64_eigendecomposition_of_float32_factors() -> None:
    gs = grads_stream((4, 6), 3, seed=11)
    steps64, _, _ = run("shampoo", (4, 6), gs, set={"transform.0.every": 1})
    w = torch.nn.Parameter(torch.zeros(4, 6))
    opt = precond.build("shampoo", [w], set={"transform.0.every": 1, "structure.float64": True})
    for g, ref in zip(gs, steps64):
        before = w.detach().clone()
        w.grad = g.float()
        opt.step()
        assert opt.state[w]["structure.root.0.0"].dtype == torch.float32
        assert np.abs((before - w.detach()).double().numpy() - ref).max() < 1e-5


def test_distributed_shampoo_start_frequency_and_grafting_against_the_equations() -> None:
    """Distributed Shampoo's start_preconditioning_step = 4 and precondition_frequency = 2, Adam grafting,
    betas (0, 0.999), epsilon 1e-12, no weight decay, transcribed: before step 4 the grafted Adam step alone
    (its statistic from step 1, the factors too); from step 4 ``L̂^(-1/4) G R̂^(-1/4)`` with the roots of the
    bias-corrected EMA factors plus epsilon recomputed on steps 4, 6, 8, rescaled to the norm of Adam's step."""
    gs = grads_stream((4, 5), 9, seed=12)
    steps, opt, _ = run("shampoo_grafted", (4, 5), gs, weight_decay=0.0,
                        set={"momentum": None, "transform.0.every": 2, "transform.0.start": 4, "transform.1.start": 4})
    lr, b2, eps, graft_eps = 1e-3, 0.999, 1e-12, 1e-8
    left, right, v = np.zeros((4, 4)), np.zeros((5, 5)), np.zeros((4, 5))
    roots = None
    for t, (g, step) in enumerate(zip(gs, steps), 1):
        g = g.numpy()
        left, right = b2 * left + (1 - b2) * g @ g.T, b2 * right + (1 - b2) * g.T @ g
        v = b2 * v + (1 - b2) * g**2
        u = g / (np.sqrt(v / (1 - b2**t)) + graft_eps)
        if t == 4 or (t > 4 and t % 2 == 0):
            bc = 1 - b2**t
            roots = (npower(left / bc, -0.25, eps), npower(right / bc, -0.25, eps))
        if t < 4:
            ref = u
        else:
            d = roots[0] @ g @ roots[1]
            ref = d * np.linalg.norm(u) / np.linalg.norm(d)
        assert np.abs(step / lr - ref).max() < 1e-9 * np.abs(ref).max(), t


def test_graft_and_its_preconditioner_start_together() -> None:
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(PipelineError, match="same start"):
        precond.build("shampoo_grafted", [w], set={"transform.0.start": 4})
