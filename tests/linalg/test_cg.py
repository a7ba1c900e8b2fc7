"""Conjugate gradients, the Martens stop rule and LM damping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from precond.linalg.cg import cg, lm_damping_update

D = torch.float64


def spd(n: int, seed: int, cond: float = 1e2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    lam = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (q * lam) @ q.T


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def test_cg_equals_scipy_cg():
    A, b = spd(30, 0), rand(30, seed=1)
    res = cg(lambda v: A @ v, b, max_iter=200, tol=1e-12)
    scipy_iters = []
    ref, info = scipy.sparse.linalg.cg(
        A.numpy(), b.numpy(), rtol=1e-12, maxiter=200, callback=scipy_iters.append
    )
    assert info == 0 and res.stop_reason == "residual" and not res.negative_curvature_flag
    assert abs(res.iterations - len(scipy_iters)) <= 1
    scale = np.abs(ref).max()
    assert np.abs(res.x.numpy() - ref).max() <= 1e-8 * scale
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(A.numpy(), b.numpy()), rtol=0, atol=1e-8 * scale)
    # bookkeeping: residual history and the quadratic objective
    assert len(res.residuals) == res.iterations + 1 == len(res.objective_values)
    assert res.residuals[0] == pytest.approx(float(b.norm()), rel=1e-14)
    assert res.residuals[-1] <= 1e-12 * float(b.norm())
    x = res.x
    phi = 0.5 * float(x @ A @ x) - float(b @ x)
    assert res.objective_values[-1] == pytest.approx(phi, rel=1e-10)
    assert all(p1 <= p0 + 1e-12 for p0, p1 in zip(res.objective_values, res.objective_values[1:]))


def test_cg_on_parameter_lists_equals_flat():
    A, b = spd(17, 2), rand(17, seed=3)
    shapes = [(3, 4), (5,)]

    def split(v):
        return [v[:12].reshape(3, 4), v[12:]]

    def join(vs):
        return torch.cat([t.reshape(-1) for t in vs])

    res_list = cg(lambda vs: split(A @ join(vs)), split(b), max_iter=100, tol=1e-12)
    res_flat = cg(lambda v: A @ v, b, max_iter=100, tol=1e-12)
    assert isinstance(res_list.x, list) and [tuple(t.shape) for t in res_list.x] == shapes
    torch.testing.assert_close(join(res_list.x), res_flat.x, rtol=0, atol=1e-12)
    assert res_list.iterations == res_flat.iterations


def test_preconditioned_cg_equals_scipy_with_M():
    n = 40
    d = torch.logspace(0, 4, n, dtype=D)
    A = torch.diag(d) + 0.1 * spd(n, 4, cond=10.0)  # badly scaled, SPD
    b = rand(n, seed=5)
    jacobi = 1.0 / torch.diagonal(A)
    plain = cg(lambda v: A @ v, b, max_iter=500, tol=1e-10)
    pre = cg(lambda v: A @ v, b, max_iter=500, tol=1e-10, preconditioner=lambda r: jacobi * r)
    M = scipy.sparse.linalg.LinearOperator((n, n), matvec=lambda r: jacobi.numpy() * r)
    ref, info = scipy.sparse.linalg.cg(A.numpy(), b.numpy(), rtol=1e-12, maxiter=500, M=M)
    assert info == 0
    scale = np.abs(ref).max()
    assert np.abs(pre.x.numpy() - ref).max() <= 1e-8 * scale
    assert pre.iterations < plain.iterations


def test_warm_start_and_zero_rhs():
    A, b = spd(10, 6), rand(10, seed=7)
    xstar = torch.linalg.solve(A, b)
    res = cg(lambda v: A @ v, b, x0=xstar, max_iter=50, tol=1e-10)
    assert res.iterations == 0 and res.stop_reason == "residual"
    assert res.x is not xstar and torch.equal(res.x, xstar)
    assert res.objective_values[0] == pytest.approx(-0.5 * float(b @ xstar), rel=1e-12)
    x0 = 0.95 * xstar  # HF warm start
    res = cg(lambda v: A @ v, b, x0=x0, max_iter=50, tol=1e-12)
    torch.testing.assert_close(res.x, xstar, rtol=0, atol=1e-9)
    assert torch.equal(x0, 0.95 * xstar)  # x0 untouched
    res0 = cg(lambda v: A @ v, torch.zeros(10, dtype=D), max_iter=5)
    assert res0.iterations == 0 and torch.equal(res0.x, torch.zeros(10, dtype=D))


def martens_test(phis: list[float], i: int, eps: float) -> bool:
    k = max(10, math.ceil(0.1 * i))
    return i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps


def test_martens_stop_triggers_on_designed_case():
    # Wide spectrum and b = A z: φ* = −½ Σ λ_j (q_jᵀz)² is dominated by the large
    # eigenvalues, which CG resolves first, so progress on φ flattens long before
    # the residual is small.
    n = 200
    g = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    lam = torch.logspace(-6, 0, n, dtype=D)
    A = (q * lam) @ q.T
    b = A @ rand(n, seed=9)
    res = cg(lambda v: A @ v, b, max_iter=n, tol=0.0, stop="martens", martens_eps=5e-4)
    assert res.stop_reason == "martens" and 10 < res.iterations < n
    phis = res.objective_values
    assert martens_test(phis, res.iterations, 5e-4)
    assert not any(martens_test(phis, i, 5e-4) for i in range(1, res.iterations))
    assert res.residuals[-1] > 1e-3 * res.residuals[0]  # not a residual stop in disguise
    # The residual rule alone keeps going.
    full = cg(lambda v: A @ v, b, max_iter=res.iterations + 20, tol=0.0, stop="residual")
    assert full.iterations == res.iterations + 20 and full.stop_reason == "max_iter"
    assert full.objective_values[: res.iterations + 1] == pytest.approx(phis, rel=1e-12)
    # A looser eps stops earlier.
    loose = cg(lambda v: A @ v, b, max_iter=n, tol=0.0, stop="martens", martens_eps=5e-2)
    assert loose.iterations < res.iterations


def test_martens_stop_needs_negative_objective():
    # A bad warm start keeps φ_i > 0; the relative-progress ratio is then negative
    # and would pass "< k·eps" at i = 11 if the φ_i < 0 condition were missing.
    n = 60
    A = torch.diag(torch.logspace(-4, 0, n, dtype=D))
    z = rand(n, seed=12)
    x0 = z + 1e3 * torch.ones(n, dtype=D)
    res = cg(lambda v: A @ v, A @ z, x0=x0, max_iter=40, tol=0.0, stop="martens")
    assert all(p > 0 for p in res.objective_values)
    assert res.stop_reason == "max_iter" and res.iterations == 40


def test_negative_curvature_detected():
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=D))
    b = torch.ones(4, dtype=D)
    res = cg(lambda v: A @ v, b, max_iter=10, tol=1e-12)
    assert res.negative_curvature_flag and res.stop_reason == "negative_curvature"
    assert res.iterations >= 1 and torch.isfinite(res.x).all()
    # at the first direction: x stays x0
    res = cg(lambda v: -v, b, max_iter=10)
    assert res.negative_curvature_flag and res.iterations == 0
    assert torch.equal(res.x, torch.zeros(4, dtype=D))
    # zero curvature along p counts too
    res = cg(lambda v: torch.zeros_like(v), b, max_iter=10)
    assert res.negative_curvature_flag


def test_lm_damping_update():
    assert lm_damping_update(1.0, 0.1) == pytest.approx(1.5)
    assert lm_damping_update(1.0, 0.9) == pytest.approx(2.0 / 3.0)
    assert lm_damping_update(1.0, 0.5) == 1.0
    assert lm_damping_update(1.0, 0.25) == 1.0 and lm_damping_update(1.0, 0.75) == 1.0
    assert lm_damping_update(1.0, -3.0) == pytest.approx(1.5)
    assert lm_damping_update(1.0, float("nan")) == pytest.approx(1.5)
    assert lm_damping_update(1e-9, 0.9, min_damping=1e-8) == 1e-8
    assert lm_damping_update(10.0, 0.0, max_damping=12.0) == 12.0
    assert lm_damping_update(2.0, 0.1, increase=3.0) == pytest.approx(6.0)


def test_cg_rejects_unknown_stop_rule():
    with pytest.raises(ValueError):
        cg(lambda v: v, torch.ones(2), max_iter=1, stop="sometimes")  # type: ignore[arg-type]
