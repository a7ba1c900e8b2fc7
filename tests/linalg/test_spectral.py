"""robust_eigh (one matrix and many), spectral functions, inverse roots and keep-last-good bookkeeping."""

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
    eigh_many,
    floor_eigenvalues,
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


def test_eigh_many_batches_by_size_and_fails_one_matrix_alone():
    a, b, c = spd(4, 20), spd(3, 21), spd(4, 22)
    bad = spd(4, 23)
    bad[1, 2] = float("nan")
    out = eigh_many([a, b, bad, c])
    assert out[2] is None  # its batch failed, then it failed alone
    for m, res in zip([a, b, c], [out[0], out[1], out[3]]):
        vals, vecs, _ = res
        torch.testing.assert_close((vecs * vals) @ vecs.T, m, rtol=0, atol=1e-12)
        torch.testing.assert_close(vals, torch.linalg.eigvalsh(m), rtol=0, atol=1e-12)
    low = eigh_many([a.float(), b.float()], float64=True)  # decomposed in float64, returned in float32
    assert all(r.eigenvalues.dtype == torch.float32 for r in low)
    torch.testing.assert_close(low[0].eigenvalues.double(), out[0].eigenvalues, rtol=0, atol=1e-6)  # float32 input
    assert eigh_many([]) == []


def test_floor_eigenvalues_raises_round_off_to_eps_times_the_largest():
    lam = torch.tensor([-1e-17, 0.0, 1e-20, 0.5, 2.0], dtype=D)
    floor = 2.0 * torch.finfo(D).eps
    torch.testing.assert_close(floor_eigenvalues(lam), torch.tensor([floor, floor, floor, 0.5, 2.0], dtype=D), rtol=0, atol=0)
    assert torch.equal(floor_eigenvalues(torch.zeros(3)), torch.zeros(3))  # nothing to scale by


def _refresh(cache: SpectralCache, state: dict, mat: torch.Tensor, step: int) -> bool:
    res = robust_eigh(mat)
    return cache.refresh(state, None if res is None else {"vals": res.eigenvalues, "vecs": res.eigenvectors}, step)


def test_spectral_cache_keeps_previous_and_reports_after_limit():
    cache = SpectralCache(failures="f", total="t", refreshed="at", max_failures=3)
    state: dict = {}
    good = spd(4, 13)
    bad = good.clone()
    bad[0, 1] = float("nan")

    assert not _refresh(cache, state, bad, 1) and "vals" not in state  # never succeeded: nothing to keep
    assert (state["f"], state["t"]) == (1, 1)
    assert not _refresh(cache, state, good, 2)
    first = state["vals"], state["vecs"]
    torch.testing.assert_close((first[1] * first[0]) @ first[1].T, good, rtol=0, atol=1e-12)
    assert (state["f"], state["t"], state["at"]) == (0, 1, 2)

    assert not _refresh(cache, state, bad, 3)
    assert state["vals"] is first[0] and state["at"] == 2  # the last good result stays
    assert (state["f"], state["t"]) == (1, 2)
    assert not _refresh(cache, state, bad, 4)
    assert _refresh(cache, state, bad, 5)  # the third in a row: the caller raises
    with pytest.raises(EighFailureError, match=r"factor 0 failed 3 times in a row \(max_failures=3\): raise the damping"):
        raise cache.error("factor 0", "raise the damping")
    assert state["t"] == 4 and state["vals"] is first[0]

    # A success resets the consecutive counter, not the total.
    assert not _refresh(cache, state, 2 * good, 6)
    torch.testing.assert_close(state["vals"], 2 * first[0])
    assert (state["f"], state["t"], state["at"]) == (0, 4, 6)


def test_spectral_cache_unlimited():
    cache = SpectralCache(max_failures=None)
    state: dict = {}
    bad = torch.full((3, 3), float("nan"), dtype=D)
    assert not any(_refresh(cache, state, bad, i) for i in range(10))
    assert state["failures"] == 10 and state["failures_total"] == 10
    _refresh(cache, state, spd(3, 14), 11)
    assert state["failures"] == 0 and state["failures_total"] == 10


def test_module_calls_eigh_through_torch_linalg():
    # The retry test relies on robust_eigh looking torch.linalg.eigh up at call time.
    assert "eigh" not in vars(spectral)
