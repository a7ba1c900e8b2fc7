"""SOAP: the power-iteration + QR refresh of the eigenbasis (with the second moment permuted), the
directions that share one second moment and the relative epsilon of the ``soap`` recipe, against the
equations transcribed here (float64, small shapes), and the continuity they buy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import precond
from precond.errors import PipelineError, RecipeError
from precond.linalg.spectral import power_qr, power_qr_many

D = torch.float64


def grads_stream(shape, n, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(*shape, generator=g, dtype=D)
        if rank is not None:  # a low-rank gradient: rank-deficient early factors
            x = torch.randn(shape[0], rank, generator=g, dtype=D) @ torch.randn(rank, shape[1], generator=g, dtype=D)
        out.append(x)
    return out


def run(recipe, shape, grads, **kw):
    w = torch.nn.Parameter(torch.zeros(shape, dtype=D))
    opt = precond.build(recipe, [w], **kw)
    steps = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        steps.append((before - w.detach()).numpy())
    return steps, opt, w


# --- the kernel -----------------------------------------------------------------------------------


def spd(n, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    lam = torch.logspace(0, -spread, n, dtype=D)
    return q @ torch.diag(lam) @ q.T, q, lam


def off_diagonal(m, q):
    b = q.T @ m @ q
    return float(torch.linalg.matrix_norm(b - torch.diag(torch.diag(b))) / torch.linalg.matrix_norm(b))


def test_power_qr_keeps_an_exact_eigenbasis_and_sorts_descending() -> None:
    m, q, lam = spd(8, 0)
    shuffled = q[:, torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    res = power_qr(m, shuffled)
    assert res is not None
    assert torch.allclose(res.eigenvalues, lam, rtol=0, atol=1e-12)  # estimates, descending
    assert torch.equal(shuffled[:, res.order], q)  # the permutation that sorted the columns
    assert torch.allclose(res.eigenvectors.abs(), q.abs(), atol=1e-10)  # the same basis up to column signs


def test_power_qr_contracts_a_perturbed_basis_and_ascending_order_does_not() -> None:
    """One step of simultaneous iteration from a basis perturbed by 1e-4: the off-diagonal part of
    Qᵀ M Q shrinks. Fed in ascending order without sorting (one unshifted QR step, Distributed Shampoo's
    order) it grows, which is why the columns are sorted descending first."""
    m, q, _ = spd(16, 2)
    noise = 1e-4 * torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=D)
    start, _ = torch.linalg.qr(q + noise)
    res = power_qr(m, start.flip(-1))  # given ascending: power_qr sorts it
    assert res is not None
    assert off_diagonal(m, res.eigenvectors) < 0.5 * off_diagonal(m, start)
    ascending, _ = torch.linalg.qr(m @ start.flip(-1))  # the same step without sorting
    assert off_diagonal(m, ascending) > 10 * off_diagonal(m, start)


def test_power_qr_many_batches_by_size_and_fails_alone() -> None:
    mats = [spd(4, 4)[0], spd(6, 5)[0], spd(4, 6)[0], torch.full((4, 4), float("nan"), dtype=D)]
    bases = [torch.eye(m.shape[-1], dtype=D) for m in mats]
    out = power_qr_many(mats, bases)
    assert out[3] is None
    for m, b, r in zip(mats[:3], bases[:3], out[:3]):
        one = power_qr(m, b)
        assert r is not None and one is not None
        assert torch.allclose(r.eigenvectors, one.eigenvectors, atol=1e-12) and torch.equal(r.order, one.order)


# --- the refresh and the second moment, against the transcribed equations ------------------------------


def fibres(v: torch.Tensor, small: list[torch.Tensor], mean: bool) -> torch.Tensor:
    """A matrix ``v``: rows in the left factor's null space replaced, column by column, by their sum (mean)
    over those rows; then columns in the right factor's null space, row by row, by their sum (mean)."""
    v = v.clone()
    rows, cols = small
    if rows.any():
        part = v[rows, :].sum(0)
        v[rows, :] = part / (rows.sum() if mean else 1)
    if cols.any():
        part = v[:, cols].sum(1, keepdim=True)
        v[:, cols] = part / (cols.sum() if mean else 1)
    return v


def reference_soap(grads, null_threshold=0.0, relative_eps=0.0, lr=3e-3, wd=0.01, beta=0.95, eps=1e-8, every=10):
    """The soap recipes step by step (precond's order: the factors take this step's gradient, the basis is
    refreshed if due, the second moment is updated, then the direction).

    Refresh (steps 1, 11, 21, ...): step 1 ``eigh`` with the columns in descending order; later ``est =
    diag(Qᵀ F Q)`` with the new factor, ``idx = argsort(est, descending)``, ``Q ← Q[:, idx]``, ``v`` permuted
    along that dimension by ``idx``, ``Q ← qr(F Q).Q`` (official SOAP's get_orthogonal_matrix_QR)."""
    m_, n_ = grads[0].shape
    w = torch.zeros(m_, n_, dtype=D)
    factors = [torch.zeros(m_, m_, dtype=D), torch.zeros(n_, n_, dtype=D)]
    bases: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    m, v = torch.zeros(m_, n_, dtype=D), torch.zeros(m_, n_, dtype=D)
    steps, permuted = [], 0
    for t, g in enumerate(grads, 1):
        before = w.clone()
        factors = [beta * factors[0] + (1 - beta) * g @ g.T, beta * factors[1] + (1 - beta) * g.T @ g]
        if t == 1:
            eig = [torch.linalg.eigh(f) for f in factors]
            bases = [e.eigenvectors.flip(-1) for e in eig]
            values = [e.eigenvalues.flip(-1) for e in eig]
        elif (t - 1) % every == 0:
            if null_threshold > 0:  # along each null space the second moment becomes its mean there
                v = fibres(v, [vals < null_threshold * vals.max() for vals in values], mean=True)
            for j, f in enumerate(factors):
                if null_threshold > 0 and (values[j] < null_threshold * values[j].max()).any():
                    # a basis with a null space is decomposed again (eigh, descending; v kept as it is)
                    e = torch.linalg.eigh(f)
                    bases[j], values[j] = e.eigenvectors.flip(-1), e.eigenvalues.flip(-1)
                    continue
                est = torch.diag(bases[j].T @ f @ bases[j])
                idx = torch.argsort(est, descending=True)
                permuted += int(not torch.equal(idx, torch.arange(len(idx))))
                v = v.index_select(j, idx)
                bases[j] = torch.linalg.qr(f @ bases[j][:, idx]).Q
                values[j] = est[idx]
        ql, qr = bases
        m = beta * m + (1 - beta) * g
        v = beta * v + (1 - beta) * (ql.T @ g @ qr) ** 2
        m_hat, v_hat = m / (1 - beta**t), v / (1 - beta**t)
        top = v_hat.max()
        if null_threshold > 0:  # along each null space the entries share their sum
            v_hat = fibres(v_hat, [vals < null_threshold * vals.max() for vals in values], mean=False)
        v_hat = torch.maximum(v_hat, top * relative_eps**2)
        scale = 1.0 / (v_hat.sqrt() + eps)
        update = ql @ ((ql.T @ m_hat @ qr) * scale) @ qr.T
        w = w * (1 - lr * wd) - lr * update
        steps.append((before - w).numpy())
    return steps, permuted


@pytest.mark.parametrize("recipe", ["soap_official", "soap"])
def test_soap_refresh_is_power_iteration_and_qr_with_the_second_moment_permuted(recipe: str) -> None:
    gs = grads_stream((5, 4), 23, seed=9)
    steps, opt, w = run(recipe, (5, 4), gs)
    kw = {} if recipe == "soap_official" else {"null_threshold": 1e-5, "relative_eps": 3e-3}
    ref, permuted = reference_soap(gs, **kw)
    assert permuted > 0  # the estimates did reorder: the permutation of v is exercised
    # the official form normalises the round-off of eigh (step 1: Q_Lᵀ G Q_R is diagonal up to it) into
    # steps of ~1e-10 that differ between two float64 eigh calls; the soap recipe does not
    tol = 1e-8 if recipe == "soap_official" else 1e-12
    for t, (a, b) in enumerate(zip(steps, ref), 1):
        assert np.abs(a - b).max() < tol, t
    assert not any(k.startswith("structure.order") for k in opt.state[w])  # the permutation is not kept


def test_soap_shared_second_moment_of_rank_deficient_factors_against_the_equations() -> None:
    """Rank-2 gradients of a 6x5 weight: the factors have null spaces, along which the second moment is
    shared (the soap recipe); against the transcription."""
    gs = grads_stream((6, 5), 14, seed=4, rank=2)
    steps, _, _ = run("soap", (6, 5), gs)
    ref, _ = reference_soap(gs, null_threshold=1e-5, relative_eps=3e-3)
    for t, (a, b) in enumerate(zip(steps, ref), 1):
        assert np.abs(a - b).max() < 1e-12, t


def reference_adam(grads, lr=3e-3, wd=0.01, beta=0.95, eps=1e-8):
    """The official SOAP's step of a 1-D tensor (precondition_1d=False: the identity as its basis), in precond's
    order (a step from step 1, eps after the bias correction): Adam with betas (0.95, 0.95) and decoupled decay."""
    w = torch.zeros_like(grads[0])
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    steps = []
    for t, g in enumerate(grads, 1):
        before = w.clone()
        m = beta * m + (1 - beta) * g
        v = beta * v + (1 - beta) * g**2
        update = (m / (1 - beta**t)) / ((v / (1 - beta**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * update
        steps.append((before - w).numpy())
    return steps


@pytest.mark.parametrize("recipe", ["soap_official", "soap"])
def test_soap_keeps_vectors_diagonal_as_the_official_precondition_1d_false(recipe: str) -> None:
    """``precondition_1d: false`` (both recipes): a weight and a bias stepped together; the weight as the transcribed
    SOAP equations, the bias (and a scalar) as Adam in its own coordinates, with no factor kept for them."""
    gw = grads_stream((5, 4), 23, seed=9)
    gb = [g[:, 0].clone() for g in grads_stream((6, 1), 23, seed=3)]
    gs = [torch.randn((), generator=torch.Generator().manual_seed(t), dtype=D) for t in range(23)]
    w, b, s = (torch.nn.Parameter(torch.zeros(shape, dtype=D)) for shape in ((5, 4), (6,), ()))
    opt = precond.build(recipe, [w, b, s])
    steps: dict[str, list] = {"w": [], "b": [], "s": []}
    for t in range(23):
        before = {k: p.detach().clone() for k, p in zip("wbs", (w, b, s))}
        w.grad, b.grad, s.grad = gw[t].clone(), gb[t].clone(), gs[t].clone()
        opt.step()
        for k, p in zip("wbs", (w, b, s)):
            steps[k].append((before[k] - p.detach()).numpy())
    kw = {} if recipe == "soap_official" else {"null_threshold": 1e-5, "relative_eps": 3e-3}
    tol = 1e-8 if recipe == "soap_official" else 1e-12
    for a, r in zip(steps["w"], reference_soap(gw, **kw)[0]):
        assert np.abs(a - r).max() < tol
    for k, grads in (("b", gb), ("s", gs)):
        for t, (a, r) in enumerate(zip(steps[k], reference_adam(grads)), 1):
            assert np.abs(a - r).max() < 1e-15, (k, t)
    assert not any(key.startswith(("structure.factor", "structure.basis")) for key in opt.state[b])
    assert any(key.startswith("structure.factor") for key in opt.state[w])


def test_precondition_1d_true_gives_vectors_an_eigenbasis() -> None:
    b = torch.nn.Parameter(torch.zeros(6, dtype=D))
    opt = precond.build("soap", [b], set={"structure.precondition_1d": True})
    for g in grads_stream((6, 1), 3, seed=3):
        b.grad = g[:, 0].clone()
        opt.step()
    assert opt.state[b]["structure.basis.0.0"].shape == (6, 6)


def test_precondition_1d_false_is_refused_with_layer_factors() -> None:
    with pytest.raises((RecipeError, PipelineError), match="precondition_1d"):
        precond.build("ekfac", torch.nn.Sequential(torch.nn.Linear(3, 2)), set={"structure.precondition_1d": False})


def test_eigenbasis_fields_are_refused_outside_the_eigenbasis_mode() -> None:
    with pytest.raises((RecipeError, PipelineError), match="eigenbasis mode only"):
        precond.build("shampoo", [torch.nn.Parameter(torch.zeros(3, 3))], set={"structure.refresh": "power_qr"})


# --- continuity -------------------------------------------------------------------------------------


def _mlp_params(recipe: str, scale: float, steps: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
    opt = precond.build(recipe, model)
    for _ in range(steps):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y) * scale)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_soap_does_not_amplify_round_off() -> None:
    """Every gradient times (1 + 1e-7), 12 float32 steps of a 10-32-4 MLP: soap moves the parameters by
    at most 1e-4; the official form by more than 1e-3 (round-off components normalised to full steps)."""
    moved = {r: float((_mlp_params(r, 1.0) - _mlp_params(r, 1.0 + 1e-7)).abs().max()) for r in ("soap", "soap_official")}
    assert moved["soap"] <= 1e-4, moved
    assert moved["soap_official"] > 1e-3, moved


# --- the first moment in the eigenbasis ---------------------------------------------------------------

_MOMENTUM_OUTSIDE = {
    "structure.first_moment": "none",
    "momentum": {"type": "ema", "beta": 0.95, "bias_correction": True, "position": "pre"},
}


def _mlp64(recipe: str, overrides: dict, steps: int = 25) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    opt = precond.build(recipe, model, set=overrides)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=D), torch.randn(32, 3, generator=g, dtype=D)
    for t in range(steps):
        xt = x + 0.1 * t * torch.sin(x)  # the gradients keep changing: the bases turn on every refresh
        opt.step(lambda: ((model(xt) - y) ** 2).mean())  # noqa: B023
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("refresh", ["power_qr", "eigh"])
@pytest.mark.parametrize("recipe", ["soap", "soap_official"])
def test_first_moment_in_the_eigenbasis_equals_momentum_outside(recipe: str, refresh: str) -> None:
    """``first_moment: eigenbasis`` (the recipes' own: an EMA of ``Qᵀ G Q``, re-projected from the old basis into
    the new one on a refresh) against a momentum block in the parameters' coordinates rotated every step: 25
    float64 steps, refreshes at 1, 11, 21 (power-QR permuting the columns, or eigh), the same parameters."""
    start = _mlp64(recipe, {}, steps=0)
    inside = _mlp64(recipe, {"structure.refresh": refresh})
    outside = _mlp64(recipe, {"structure.refresh": refresh, **_MOMENTUM_OUTSIDE})
    assert float((inside - outside).norm() / (outside - start).norm()) < 1e-6


def test_first_moment_in_the_eigenbasis_refuses_a_second_average() -> None:
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(PipelineError, match="remove the momentum block"):
        precond.build("soap", [w], set={"momentum": {"type": "ema", "beta": 0.9, "position": "pre"}})
    with pytest.raises((RecipeError, PipelineError), match="eigenbasis mode only"):
        precond.build("shampoo", [w], set={"structure.first_moment": "eigenbasis"})


def test_first_moment_before_the_first_basis_is_the_momentum() -> None:
    """Before the transform's ``start`` no unit has a basis: the first moment is kept in the parameter's
    coordinates and the direction is the bias-corrected average, as with a momentum block; the first basis then
    takes it over (the same parameters as the momentum block after 14 steps, start 5)."""
    over = {"transform.start": 5}
    start = _mlp64("soap", {}, steps=0)
    inside = _mlp64("soap", over, steps=14)
    outside = _mlp64("soap", {**over, **_MOMENTUM_OUTSIDE}, steps=14)
    assert float((inside - outside).norm() / (outside - start).norm()) < 1e-6
