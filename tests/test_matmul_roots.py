"""Matrix functions by matrix products only (precond.linalg.newton) against scipy and eigh, and the
kronecker structure's ``root_method: coupled_newton`` against its ``eigh`` results."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import precond
from precond.errors import PipelineError, RecipeError
from precond.linalg.newton import coupled_newton, inverse_roots_many, newton_schulz, polar

D = torch.float64


def spd(n: int, cond: float, seed: int = 0, dtype=D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    lam = torch.logspace(0, -np.log10(cond), n, dtype=D)
    return (q @ torch.diag(lam) @ q.T).to(dtype)


def eigh_root(a: torch.Tensor, p: int, damping: float = 0.0) -> torch.Tensor:
    lam, q = torch.linalg.eigh(a.double())
    return q @ torch.diag((lam.clamp_min(0) + damping) ** (-1.0 / p)) @ q.T


# Iteration counts from the scalar model m ← ((p+1−m)/p)^p m started at m₀ = λ_min/(2‖A‖_F/(p+1)): ~log(cond).
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("cond, iterations", [(1e2, 14), (1e4, 20), (1e6, 27)])
def test_coupled_newton_equals_scipy_fractional_power_in_float64(p: int, cond: float, iterations: int) -> None:
    """float64, tol 1e-10 on max|M − I|: within 1e-9 (relative to the largest entry) of
    scipy.linalg.fractional_matrix_power and of the eigh root, in at most ``iterations`` iterations."""
    a = spd(16, cond, seed=p)
    ref = scipy.linalg.fractional_matrix_power(a.numpy(), -1.0 / p).real
    res = coupled_newton(a, p, tol=1e-10)
    scale = np.abs(ref).max()
    assert res.iterations <= iterations
    assert np.abs(res.root.numpy() - ref).max() / scale < 1e-9
    assert float((res.root - eigh_root(a, p)).abs().max()) / scale < 1e-9


@pytest.mark.parametrize("p", [1, 2, 4])
def test_coupled_newton_float32_and_damping(p: int) -> None:
    """float32 (the default working precision), condition 1e3, damping 1e-3 inside: within 2e-4 of the float64
    eigh root of ``A + 1e-3 I`` (float32 eigh is no better: its error lands on the small eigenvalues too)."""
    a = spd(32, 1e3, seed=5)
    res = coupled_newton(a.float(), p, damping=1e-3)
    ref = eigh_root(a, p, damping=1e-3)
    assert res.root.dtype == torch.float32 and float(res.error) < 1e-6
    assert float((res.root.double() - ref).abs().max() / ref.abs().max()) < 2e-4


def test_batched_roots_equal_single_ones_and_failures_fall_back_to_float64() -> None:
    mats = [spd(8, 1e2, seed=s, dtype=torch.float32) for s in range(3)] + [spd(5, 1e2, seed=9, dtype=torch.float32)]
    mats.append(torch.full((8, 8), float("nan")))
    out = inverse_roots_many(mats, [4, 4, 2, 4, 4], [0.0, 1e-3, 0.0, 0.0, 0.0])
    assert out[4] is None  # NaN: fails alone
    for m, r, d, got in zip(mats[:4], [4, 4, 2, 4], [0.0, 1e-3, 0.0, 0.0], out[:4]):
        assert got is not None and got.dtype == torch.float32
        assert torch.allclose(got, coupled_newton(m, r, damping=d).root, rtol=1e-5, atol=1e-6)
    # a tolerance float32 cannot reach: every matrix converges in the float64 retry, returned in float32
    tight = inverse_roots_many(mats[:2], [4, 4], [0.0, 0.0], tol=1e-12)
    for m, got in zip(mats[:2], tight):
        assert got is not None and got.dtype == torch.float32
        assert float((got.double() - eigh_root(m, 4)).abs().max() / eigh_root(m, 4).abs().max()) < 1e-6


def test_polar_factor_by_newton_schulz_equals_scipy_polar() -> None:
    """The cubic Newton–Schulz iteration (the newton_schulz kernel with (3/2, −1/2, 0)), 40 steps, float64, on a
    6x4 matrix with singular values in [0.5, 2]: within 1e-12 of scipy.linalg.polar."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=D))
    a = u @ torch.diag(torch.tensor([2.0, 1.3, 0.8, 0.5], dtype=D)) @ v.T
    ref = scipy.linalg.polar(a.numpy())[0]
    assert np.abs(polar(a, steps=40).numpy() - ref).max() < 1e-12
    batch = torch.stack([a, 2 * a])
    assert torch.allclose(newton_schulz(batch, (1.5, -0.5, 0.0), 40, 1e-30, None)[1], torch.from_numpy(ref), atol=1e-12)


# --- in the kronecker structure ------------------------------------------------------------------


def steps_of(recipe, shape, grads, **kw):
    w = torch.nn.Parameter(torch.zeros(shape, dtype=D))
    opt = precond.build(recipe, [w], **kw)
    out = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        out.append(before - w.detach())
    return out


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 5), (7,)])
def test_shampoo_with_coupled_newton_roots_equals_eigh(shape) -> None:
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(*shape, generator=g, dtype=D) for _ in range(4)]
    kw = {"set": {"transform.0.every": 1}}
    ref = steps_of("shampoo", shape, grads, **kw)
    got = steps_of("shampoo", shape, grads, set={"transform.0.every": 1, "structure.root_method": "coupled_newton",
                                                  "structure.newton_tol": 1e-10})
    for a, b in zip(got, ref):
        assert float((a - b).abs().max()) < 1e-9 * float(b.abs().max())


def test_kfac_per_factor_inverses_by_coupled_newton_equal_eigh() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(32, 5, dtype=D), torch.randint(0, 3, (32,))
    out = []
    for method in ("eigh", "coupled_newton"):
        m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        m.load_state_dict(model.state_dict())
        opt = precond.build("kfac", m, likelihood="categorical", seed=0, set={"structure.damping_form": "factored", "structure.root_method": method,
                                                     "structure.newton_tol": 1e-10, "transform.0.every": 1})
        def closure():
            outputs = m(x)
            return torch.nn.functional.cross_entropy(outputs, y), outputs

        for _ in range(3):
            opt.step(closure)
        out.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert float((out[0] - out[1]).abs().max()) < 1e-9


def test_coupled_newton_is_refused_where_it_cannot_compute_the_root() -> None:
    w = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises((RecipeError, PipelineError), match="root_method"):
        precond.build("kfac", torch.nn.Linear(3, 3), likelihood="categorical", set={"structure.root_method": "coupled_newton"})  # exact damping
    with pytest.raises(PipelineError, match="outside"):
        precond.build("shampoo", w, set={"structure.root_method": "coupled_newton", "transform.0.damping_position": "outside"})
    with pytest.raises(PipelineError, match="integer r"):  # p = 0.3 on a matrix: r = 0.6
        precond.build("shampoo", w, set={"structure.root_method": "coupled_newton", "transform.0.p": 0.3})
