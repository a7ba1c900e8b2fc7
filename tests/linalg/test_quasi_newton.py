"""BFGS / DFP / SR1 updates vs scipy, L-BFGS two-loop, K-BFGS double damping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import BFGS, SR1

from precond.linalg.quasi_newton import (
    bfgs_direct_update,
    bfgs_inverse_update,
    dfp_direct_update,
    dfp_inverse_update,
    double_damping,
    initial_scale,
    lm_damping_pair,
    powell_damping,
    sherman_morrison_update,
    sr1_direct_update,
    sr1_inverse_update,
    two_loop,
)

D = torch.float64
N = 6


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def spd(n: int, seed: int) -> torch.Tensor:
    """Exactly symmetric: ``x @ x.T`` is symmetric only up to round-off (BLAS may sum the two triangles in
    different orders), and scipy (>= 1.15) refuses an ``init_scale`` array that fails ``issymmetric``."""
    x = rand(n, 2 * n, seed=seed)
    m = x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=D)
    return (m + m.T) / 2


def pairs(k: int, seed: int, curvature: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(s, y = A s) pairs of a convex quadratic: all satisfy yᵀs > 0."""
    A = spd(N, seed) if curvature is None else curvature
    out = []
    for j in range(k):
        s = rand(N, seed=1000 * seed + j)
        out.append((s, A @ s))
    return out


def scipy_run(strategy, approx_type: str, pair_list, swap: bool = False) -> list[np.ndarray]:
    strategy.initialize(N, approx_type)
    mats = []
    for s, y in pair_list:
        a, b = (y, s) if swap else (s, y)
        strategy.update(a.numpy(), b.numpy())
        mats.append(strategy.get_matrix())
    return mats


def run(update, M0: torch.Tensor, pair_list, **kw):
    M, mats, statuses = M0, [], []
    for s, y in pair_list:
        M, status, _ = update(M, s, y, **kw)
        mats.append(M.numpy().copy())
        statuses.append(status)
    return mats, statuses


TOL = dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- vs scipy


def test_bfgs_inverse_equals_scipy_and_secant():
    ps = pairs(5, 1)
    mats, statuses = run(bfgs_inverse_update, torch.eye(N, dtype=D), ps)
    ref = scipy_run(BFGS(init_scale=1.0), "inv_hess", ps)
    assert statuses == ["updated"] * 5
    for m, r, (s, y) in zip(mats, ref, ps):
        np.testing.assert_allclose(m, r, **TOL)
        np.testing.assert_allclose(m @ y.numpy(), s.numpy(), rtol=0, atol=1e-10)  # H₊ y = s
        np.testing.assert_allclose(m, m.T, rtol=0, atol=0)


def test_bfgs_direct_equals_scipy_and_secant():
    ps = pairs(5, 2)
    mats, _ = run(bfgs_direct_update, torch.eye(N, dtype=D), ps)
    ref = scipy_run(BFGS(init_scale=1.0), "hess", ps)
    for m, r, (s, y) in zip(mats, ref, ps):
        np.testing.assert_allclose(m, r, **TOL)
        np.testing.assert_allclose(m @ s.numpy(), y.numpy(), rtol=0, atol=1e-10)  # B₊ s = y


def test_dfp_inverse_equals_scipy_bfgs_hess_with_s_y_swapped():
    ps = pairs(5, 3)
    mats, _ = run(dfp_inverse_update, torch.eye(N, dtype=D), ps)
    ref = scipy_run(BFGS(init_scale=1.0), "hess", ps, swap=True)
    for m, r, (s, y) in zip(mats, ref, ps):
        np.testing.assert_allclose(m, r, **TOL)
        np.testing.assert_allclose(m @ y.numpy(), s.numpy(), rtol=0, atol=1e-10)


def test_dfp_direct_equals_scipy_bfgs_inv_with_s_y_swapped_and_secant():
    ps = pairs(5, 4)
    mats, _ = run(dfp_direct_update, torch.eye(N, dtype=D), ps)
    ref = scipy_run(BFGS(init_scale=1.0), "inv_hess", ps, swap=True)
    for m, r, (s, y) in zip(mats, ref, ps):
        np.testing.assert_allclose(m, r, **TOL)
        np.testing.assert_allclose(m @ s.numpy(), y.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("direct,inverse", [(bfgs_direct_update, bfgs_inverse_update), (dfp_direct_update, dfp_inverse_update)])
def test_direct_and_inverse_forms_are_inverses(direct, inverse):
    B = spd(N, 5)
    for s, y in pairs(3, 6):
        Bn = direct(B, s, y).matrix
        Hn = inverse(torch.linalg.inv(B), s, y).matrix
        np.testing.assert_allclose(torch.linalg.inv(Bn).numpy(), Hn.numpy(), rtol=1e-10, atol=1e-10)
        B = Bn
    # and BFGS is not DFP
    s, y = pairs(1, 7)[0]
    assert (bfgs_direct_update(spd(N, 8), s, y).matrix - dfp_direct_update(spd(N, 8), s, y).matrix).abs().max() > 1e-3


def test_nonidentity_start_equals_scipy_array_init():
    B0 = spd(N, 9)
    ps = pairs(3, 10)
    mats, _ = run(bfgs_direct_update, B0, ps)
    ref = scipy_run(BFGS(init_scale=B0.numpy()), "hess", ps)
    for m, r in zip(mats, ref):
        np.testing.assert_allclose(m, r, **TOL)


@pytest.mark.parametrize("c", [1.0, 2.5])
def test_sr1_direct_and_inverse_equal_scipy(c):
    # an indefinite curvature: SR1 does not need yᵀs > 0
    A = torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5, -2.0, 1.5], dtype=D))
    ps = pairs(5, 11, curvature=A)
    dmats, dst = run(sr1_direct_update, c * torch.eye(N, dtype=D), ps)
    imats, ist = run(sr1_inverse_update, torch.eye(N, dtype=D) / c, ps)
    dref = scipy_run(SR1(init_scale=c), "hess", ps)
    iref = scipy_run(SR1(init_scale=1.0 / c), "inv_hess", ps)
    assert dst == ist == ["updated"] * 5
    for m, r, (s, y) in zip(dmats, dref, ps):
        np.testing.assert_allclose(m, r, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(m @ s.numpy(), y.numpy(), rtol=0, atol=1e-9)
    for m, r, (s, y) in zip(imats, iref, ps):
        np.testing.assert_allclose(m, r, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(m @ y.numpy(), s.numpy(), rtol=0, atol=1e-9)


def test_sr1_sherman_morrison_consistency():
    B = spd(N, 12)
    assert sherman_morrison_update is sr1_inverse_update
    for s, y in pairs(4, 13):
        Bn, st = sr1_direct_update(B, s, y)[:2]
        Hn = sherman_morrison_update(torch.linalg.inv(B), s, y).matrix
        assert st == "updated"
        np.testing.assert_allclose(torch.linalg.inv(Bn).numpy(), Hn.numpy(), rtol=1e-9, atol=1e-9)
        B = Bn


def test_sr1_skip_rule():
    B = torch.eye(2, dtype=D)
    s = torch.tensor([1.0, 0.0], dtype=D)
    y = torch.tensor([1.0, 1.0], dtype=D)  # y − Bs = (0, 1) ⟂ s: zero denominator
    out = sr1_direct_update(B, s, y)
    assert out.status == "skipped" and out.matrix is B
    ref = SR1(init_scale=1.0)
    ref.initialize(2, "hess")
    ref.update(s.numpy(), y.numpy())
    np.testing.assert_array_equal(ref.get_matrix(), np.eye(2))
    assert sr1_direct_update(B, s, s).status == "skipped"  # secant already holds
    assert sr1_direct_update(B, torch.zeros(2, dtype=D), y).status == "skipped"


# --------------------------------------------------------------------------- guards


@pytest.mark.parametrize("update,approx", [(bfgs_direct_update, "hess"), (bfgs_inverse_update, "inv_hess")])
def test_skip_guard_threshold(update, approx):
    M = spd(N, 14)
    s = rand(N, seed=15)
    # make wᵀz = t · wᵀMw exactly for t around min_curvature = 1e-8
    w_is_s = approx == "hess"
    w = s if w_is_s else rand(N, seed=16)
    wmw = float(w @ M @ w)
    perp = rand(N, seed=17)
    perp = perp - (perp @ w) / (w @ w) * w
    for t, expected in [(-0.5, "skipped"), (0.5e-8, "skipped"), (2e-8, "updated"), (0.3, "updated")]:
        z = t * wmw / float(w @ w) * w + perp
        s_, y_ = (w, z) if w_is_s else (z, w)
        out = update(M, s_, y_)
        assert out.status == expected, t
        ref = BFGS(init_scale=M.numpy())
        ref.initialize(N, approx)
        ref.update(s_.numpy(), y_.numpy())
        r = ref.get_matrix()
        # near the threshold the update is O(1/wᵀz) = O(1e15): compare relatively, with the round-off of the
        # inputs (~1e-16) amplified by the condition of the update, 1/t (measured: 1.5e-9 at t = 2e-8)
        assert np.abs(out.matrix.numpy() - r).max() <= max(1e-12, 1e-15 / abs(t)) * np.abs(r).max()
        if expected == "skipped":
            assert out.matrix is M


@pytest.mark.parametrize("update,approx", [(bfgs_direct_update, "hess"), (bfgs_inverse_update, "inv_hess")])
def test_powell_guard_equals_scipy_damp_update(update, approx):
    M = spd(N, 18)
    s = rand(N, seed=19)
    y = -0.3 * (M @ s if approx == "hess" else torch.linalg.solve(M, s)) + 0.01 * rand(N, seed=20)
    out = update(M, s, y, guard="powell")
    assert out.status == "damped"
    ref = BFGS(exception_strategy="damp_update", init_scale=M.numpy())
    ref.initialize(N, approx)
    ref.update(s.numpy(), y.numpy())
    np.testing.assert_allclose(out.matrix.numpy(), ref.get_matrix(), rtol=1e-10, atol=1e-10)
    # the damped pair satisfies the secant equation, and its curvature is 0.2·wᵀMw
    if approx == "hess":  # B₊ s = y_damped  ⇒  sᵀ y_damped = sᵀB₊s
        assert float(s @ out.matrix @ s) == pytest.approx(0.2 * float(s @ M @ s), rel=1e-10)
    else:  # H₊ y = s_damped  ⇒  yᵀ s_damped = yᵀH₊y
        assert float(y @ out.matrix @ y) == pytest.approx(0.2 * float(y @ M @ y), rel=1e-10)
    # inactive Powell guard: a plain update
    s2, y2 = pairs(1, 21)[0]
    assert update(M, s2, y2, guard="powell").status == "updated"
    torch.testing.assert_close(update(M, s2, y2, guard="powell").matrix, update(M, s2, y2).matrix)


def test_dfp_guards_use_the_same_curvature_test():
    M = spd(N, 22)
    s = rand(N, seed=23)
    y = -s
    assert dfp_direct_update(M, s, y).status == "skipped"
    assert dfp_inverse_update(M, s, y).status == "skipped"
    out = dfp_direct_update(M, s, y, guard="powell")
    assert out.status == "damped"
    assert float(s @ out.matrix @ s) == pytest.approx(0.2 * float(s @ M @ s), rel=1e-10)
    out = dfp_inverse_update(M, s, y, guard="powell")
    assert float(y @ out.matrix @ y) == pytest.approx(0.2 * float(y @ M @ y), rel=1e-10)
    with pytest.raises(ValueError):
        dfp_direct_update(M, s, y, guard="maybe")  # type: ignore[arg-type]


def test_guard_none_and_zero_vectors():
    M = torch.eye(3, dtype=D)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    y = torch.tensor([0.5, 1.0, 0.0], dtype=D)
    out = bfgs_inverse_update(M, s, y, guard="none", min_curvature=0.9)
    assert out.status == "updated"
    np.testing.assert_allclose((out.matrix @ y).numpy(), s.numpy(), atol=1e-12)
    assert bfgs_inverse_update(M, s, y, min_curvature=0.9).status == "skipped"
    z = torch.zeros(3, dtype=D)
    assert bfgs_direct_update(M, z, y).status == "skipped"
    assert bfgs_direct_update(M, s, z).status == "skipped"


def test_indefinite_matrix_is_reset_like_scipy():
    M = torch.diag(torch.tensor([1.0, -2.0, 1.0, 1.0, 1.0, 1.0], dtype=D))
    s = torch.zeros(N, dtype=D)
    s[1] = 1.0
    y = torch.tensor([0.1, 2.0, 0.3, 0.0, 0.2, 0.1], dtype=D)
    out = bfgs_direct_update(M, s, y)  # sᵀMs = −2 ≤ 0
    assert out.reset and out.status == "updated"
    ref = BFGS(init_scale=M.numpy())
    ref.initialize(N, "hess")
    ref.update(s.numpy(), y.numpy())
    np.testing.assert_allclose(out.matrix.numpy(), ref.get_matrix(), rtol=1e-12, atol=1e-12)
    assert bfgs_direct_update(M, s, y, reset_on_indefinite=False).status == "skipped"


@pytest.mark.parametrize("approx,form,update", [("hess", "direct", bfgs_direct_update), ("inv_hess", "inverse", bfgs_inverse_update)])
def test_initial_scale_matches_scipy_auto(approx, form, update):
    s, y = pairs(1, 24)[0]
    scale = initial_scale(s, y, form)
    expected = float(y @ y) / abs(float(y @ s)) if form == "direct" else abs(float(y @ s)) / float(y @ y)
    assert scale == pytest.approx(expected, rel=1e-15)
    out = update(scale * torch.eye(N, dtype=D), s, y)
    ref = BFGS()  # init_scale='auto'
    ref.initialize(N, approx)
    ref.update(s.numpy(), y.numpy())
    np.testing.assert_allclose(out.matrix.numpy(), ref.get_matrix(), rtol=1e-12, atol=1e-12)
    assert initial_scale(s, torch.zeros(N, dtype=D), form) == 1.0


# --------------------------------------------------------------------------- L-BFGS


def dense_bfgs_direction(g, ps, gamma):
    H = gamma * np.eye(len(g))
    for s, y in ps:
        s, y = s.numpy(), y.numpy()
        rho = 1.0 / (y @ s)
        V = np.eye(len(g)) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return -H @ g.numpy()


def test_two_loop_equals_dense_bfgs():
    ps = pairs(4, 25)
    g = rand(N, seed=26)
    S, Y = [p[0] for p in ps], [p[1] for p in ps]
    gamma = float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
    d = two_loop(g, S, Y)
    np.testing.assert_allclose(d.numpy(), dense_bfgs_direction(g, ps, gamma), rtol=0, atol=1e-12)
    d = two_loop(g, S, Y, rho_list=[1.0 / (y @ s) for s, y in ps], h_diag=0.7)
    np.testing.assert_allclose(d.numpy(), dense_bfgs_direction(g, ps, 0.7), rtol=0, atol=1e-12)
    # the same as our dense BFGS inverse kernel
    H = 0.7 * torch.eye(N, dtype=D)
    for s, y in ps:
        H = bfgs_inverse_update(H, s, y).matrix
    np.testing.assert_allclose(d.numpy(), (-H @ g).numpy(), rtol=0, atol=1e-12)
    torch.testing.assert_close(two_loop(g, [], []), -g)
    with pytest.raises(ValueError):
        two_loop(g, S, Y[:-1])


# --------------------------------------------------------------------------- K-BFGS damping


def test_powell_damping_tight_when_active_and_matches_bfgs_powell_guard():
    H = spd(N, 31)
    y = rand(N, seed=32)
    s = -0.1 * (H @ y) + 0.05 * rand(N, seed=33)
    yhy = float(y @ H @ y)
    assert float(s @ y) < 0.2 * yhy
    out = powell_damping(s, y, H, mu1=0.2)
    assert out.damped and out.y is y
    assert float(out.s @ y) == pytest.approx(0.2 * yhy, rel=1e-12)
    # θ from the paper's formula
    theta = 0.8 * yhy / (yhy - float(s @ y))
    torch.testing.assert_close(out.s, theta * s + (1 - theta) * (H @ y))
    # the BFGS inverse update with the damped pair == the Powell-guarded update
    plain = bfgs_inverse_update(H, out.s, y, guard="none").matrix
    guarded = bfgs_inverse_update(H, s, y, guard="powell", min_curvature=0.2)
    assert guarded.status == "damped"
    np.testing.assert_allclose(plain.numpy(), guarded.matrix.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose((plain @ y).numpy(), out.s.numpy(), atol=1e-10)  # H y = s_damped
    # inactive
    s_ok = H @ y
    res = powell_damping(s_ok, y, H)
    assert not res.damped and res.s is s_ok and res.y is y
    assert not powell_damping(s, torch.zeros(N, dtype=D), H).damped


@pytest.mark.parametrize("mu2", [0.3, 1.0, 1.7])
def test_lm_damping_pair_tight_when_active(mu2):
    s = rand(N, seed=34)
    y = 0.1 * s + 0.2 * rand(N, seed=35)
    ss = float(s @ s)
    assert float(s @ y) < mu2 * ss
    out = lm_damping_pair(s, y, mu2)
    assert out.damped and out.s is s
    assert float(s @ out.y) == pytest.approx(mu2 * ss, rel=1e-12)
    if mu2 != 1.0:
        theta = (1 - mu2) * ss / (ss - float(s @ y))
        torch.testing.assert_close(out.y, theta * y + (1 - theta) * s)
    y_ok = 2.0 * mu2 * s
    res = lm_damping_pair(s, y_ok, mu2)
    assert not res.damped and res.y is y_ok
    # degenerate sᵀy = sᵀs with mu2 > 1
    deg = lm_damping_pair(s, s.clone(), 1.5)
    assert deg.damped and float(s @ deg.y) == pytest.approx(1.5 * ss, rel=1e-12)


def test_double_damping_then_secant():
    H = spd(N, 36)
    y = rand(N, seed=37)
    s = -0.5 * (H @ y)  # negative curvature pair: both dampings fire
    mu2 = 0.3**0.5
    out = double_damping(s, y, H, mu1=0.2, mu2=mu2)
    assert out.damped
    assert float(out.s @ out.y) >= mu2 * float(out.s @ out.s) * (1 - 1e-12)
    Hn = bfgs_inverse_update(H, out.s, out.y, guard="none").matrix
    np.testing.assert_allclose((Hn @ out.y).numpy(), out.s.numpy(), rtol=0, atol=1e-10)
    # inactive on a well-behaved pair
    s_ok = H @ y
    y_ok = y
    if float(s_ok @ y_ok) >= mu2 * float(s_ok @ s_ok):
        res = double_damping(s_ok, y_ok, H, mu2=mu2)
        assert not res.damped and res.s is s_ok and res.y is y_ok
    good_s = rand(N, seed=38)
    good_y = 2.0 * good_s
    res = double_damping(good_s, good_y, 0.1 * torch.eye(N, dtype=D), mu2=mu2)
    assert not res.damped and res.s is good_s and res.y is good_y
