"""robust_eigh, spectral functions, inverse roots and the decomposition cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from precond.linalg import spectral
from precond.linalg.spectral import (
    EighFailureError,
    EighResult,
    SpectralCache,
    inverse_root,
    matrix_function,
    matrix_power,
    robust_eigh,
)

D = torch.float64


def spd(n: int, seed: int, batch: tuple[int, ...] = (), cond: float = 1e3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=D))
    lam = torch.logspace(0, float(np.log10(cond)), n, dtype=D) / cond
    return (q * lam) @ q.mT


def np_power(m: np.ndarray, e: float, eps: float = 0.0) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * (np.clip(w, 0, None) + eps) ** e) @ v.T


# --------------------------------------------------------------------------- robust_eigh


def test_robust_eigh_reconstructs_batched_symmetric_part():
    m = spd(6, 0, batch=(3,))
    skew = torch.randn(3, 6, 6, dtype=D)
    skew = skew - skew.mT  # only the symmetric part must be decomposed
    res = robust_eigh(m + skew)
    assert isinstance(res, EighResult) and not res.retried
    vals, vecs, _ = res
    assert vals.shape == (3, 6) and vecs.shape == (3, 6, 6)
    torch.testing.assert_close((vecs * vals.unsqueeze(-2)) @ vecs.mT, m, rtol=0, atol=1e-13)
    ref = np.linalg.eigvalsh(m.numpy())
    np.testing.assert_allclose(vals.numpy(), ref, atol=1e-13)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_robust_eigh_non_finite_input_fails(bad):
    m = spd(4, 1).clone()
    m[1, 2] = bad
    assert robust_eigh(m) is None
    mb = spd(4, 1, batch=(2,)).clone()
    mb[1, 0, 0] = bad
    assert robust_eigh(mb) is None  # a batch fails as a whole


def test_robust_eigh_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky(a, *args, **kw):
        calls.append(a.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("forced failure")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = spd(5, 2).float()
    res = robust_eigh(m)
    assert calls == [torch.float32, torch.float64]
    assert res is not None and res.retried
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    rec = (res.eigenvectors * res.eigenvalues) @ res.eigenvectors.T
    torch.testing.assert_close(rec, m, rtol=0, atol=1e-5)


def test_robust_eigh_non_finite_output_triggers_retry(monkeypatch):
    real = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def nan_once(a, *args, **kw):
        calls.append(a.dtype)
        vals, vecs = real(a, *args, **kw)
        if len(calls) == 1:
            vals = vals * float("nan")
        return vals, vecs

    monkeypatch.setattr(torch.linalg, "eigh", nan_once)
    res = robust_eigh(spd(4, 3).float())
    assert calls == [torch.float32, torch.float64] and res is not None and res.retried
    assert torch.isfinite(res.eigenvalues).all()


def test_robust_eigh_failure_without_retry(monkeypatch):
    def broken(a, *args, **kw):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    assert robust_eigh(spd(4, 4)) is None  # float64: nothing to retry in
    assert robust_eigh(spd(4, 4).float(), float64_retry=False) is None
    assert robust_eigh(spd(4, 4).float()) is None  # retry also fails


def test_robust_eigh_half_precision_input():
    m = spd(4, 5, cond=10.0)
    res = robust_eigh(m.to(torch.bfloat16))
    assert res is not None and res.eigenvalues.dtype == torch.bfloat16
    np.testing.assert_allclose(
        res.eigenvalues.double().numpy(), np.linalg.eigvalsh(m.numpy()), rtol=0, atol=2e-2
    )


def test_robust_eigh_rejects_non_square():
    with pytest.raises(ValueError, match="n, n"):
        robust_eigh(torch.zeros(3, 4))


# --------------------------------------------------------------------------- spectral functions


def test_matrix_function_exp_equals_expm():
    m = spd(5, 6, cond=10.0)
    vals, vecs, _ = robust_eigh(m)
    out = matrix_function(vals, vecs, torch.exp)
    np.testing.assert_allclose(out.numpy(), scipy.linalg.expm(m.numpy()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 4, 6])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_inverse_root_inside_equals_fractional_matrix_power(p, eps):
    m = spd(6, 7, cond=1e2)
    ref = scipy.linalg.fractional_matrix_power(m.numpy() + eps * np.eye(6), -1.0 / p)
    out = inverse_root(m, p, eps)  # from the matrix
    np.testing.assert_allclose(out.numpy(), np.real(ref), rtol=0, atol=1e-10)
    out2 = inverse_root(robust_eigh(m), p, eps, "inside")  # from a decomposition
    np.testing.assert_allclose(out2.numpy(), out.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [2, 4])
def test_inverse_root_outside_and_inside_differ_as_specified(p):
    m = spd(5, 8, cond=1e2)
    eps = 0.05
    root = np.real(scipy.linalg.fractional_matrix_power(m.numpy(), 1.0 / p))
    ref_out = np.linalg.inv(root + eps * np.eye(5))
    ref_in = np.real(scipy.linalg.fractional_matrix_power(m.numpy() + eps * np.eye(5), -1.0 / p))
    out = inverse_root(m, p, eps, damping_position="outside")
    inside = inverse_root(m, p, eps, damping_position="inside")
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(inside.numpy(), ref_in, rtol=0, atol=1e-10)
    assert np.abs(out.numpy() - inside.numpy()).max() > 1e-2
    # p = 1 (plain inverse) and eps = 0: both placements coincide.
    torch.testing.assert_close(
        inverse_root(m, 1, eps, "outside"), inverse_root(m, 1, eps, "inside"), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        inverse_root(m, p, 0.0, "outside"), inverse_root(m, p, 0.0, "inside"), rtol=0, atol=1e-8
    )


def test_inverse_root_clamps_round_off_negative_eigenvalues():
    v = torch.randn(6, 2, dtype=D, generator=torch.Generator().manual_seed(9))
    m = v @ v.T  # rank 2: four eigenvalues are ~±1e-16
    vals, vecs, _ = robust_eigh(m)
    assert (vals < 0).any(), "test needs a round-off negative eigenvalue"
    out = inverse_root(m, 2, 1e-2, damping_position="outside")  # sqrt(negative) would be NaN
    assert torch.isfinite(out).all()
    ref = (vecs.numpy() * (1.0 / (np.sqrt(np.clip(vals.numpy(), 0, None)) + 1e-2))) @ vecs.numpy().T
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    inside = inverse_root(m, 4, 1e-3)
    np.testing.assert_allclose(inside.numpy(), np_power(m.numpy(), -0.25, 1e-3), atol=1e-10)


def test_inverse_root_batched_and_matrix_power():
    mb = spd(4, 10, batch=(2, 3))
    out = inverse_root(mb, 2, 1e-3)
    for i in range(2):
        for j in range(3):
            ref = np_power(mb[i, j].numpy(), -0.5, 1e-3)
            np.testing.assert_allclose(out[i, j].numpy(), ref, rtol=0, atol=1e-10)
    m = spd(4, 11)
    np.testing.assert_allclose(matrix_power(m, 1.5).numpy(), np_power(m.numpy(), 1.5), atol=1e-12)


def test_inverse_root_errors():
    m = spd(3, 12).clone()
    with pytest.raises(ValueError):
        inverse_root(m, 0)
    with pytest.raises(ValueError):
        inverse_root(m, 2, 0.1, damping_position="middle")  # type: ignore[arg-type]
    m[0, 0] = float("nan")
    with pytest.raises(EighFailureError):
        inverse_root(m, 2, 0.1)


# --------------------------------------------------------------------------- cache


def test_spectral_cache_keeps_previous_and_raises_after_limit():
    cache = SpectralCache(max_failures=3)
    good = spd(4, 13)
    bad = good.clone()
    bad[0, 1] = float("nan")

    assert cache.refresh(bad) is None  # never succeeded: nothing to keep
    assert (cache.consecutive_failures, cache.total_failures) == (1, 1)
    first = cache.refresh(good)
    assert first is not None and cache.consecutive_failures == 0 and cache.total_failures == 1

    kept = cache.refresh(bad)
    assert kept is first and cache.result is first
    assert (cache.consecutive_failures, cache.total_failures) == (1, 2)
    assert cache.refresh(bad) is first
    with pytest.raises(EighFailureError, match=r"consecutive_failures=3.*max_failures=3"):
        cache.refresh(bad)
    assert cache.total_failures == 4 and cache.result is first

    # A success resets the consecutive counter, not the total.
    second = cache.refresh(2 * good)
    torch.testing.assert_close(second.eigenvalues, 2 * first.eigenvalues)
    assert (cache.consecutive_failures, cache.total_failures) == (0, 4)


def test_spectral_cache_unlimited_and_state_dict():
    cache = SpectralCache(max_failures=None)
    bad = torch.full((3, 3), float("nan"), dtype=D)
    for _ in range(10):
        cache.refresh(bad)
    assert cache.consecutive_failures == 10
    cache.refresh(spd(3, 14))
    other = SpectralCache()
    other.load_state_dict(cache.state_dict())
    assert other.total_failures == 10 and other.consecutive_failures == 0
    torch.testing.assert_close(other.result.eigenvectors, cache.result.eigenvectors)


def test_module_calls_eigh_through_torch_linalg():
    # The retry test relies on robust_eigh looking torch.linalg.eigh up at call time.
    assert "eigh" not in vars(spectral)
