"""Kronecker damping forms, Shampoo, blocking and KL clipping: the kernels the kronecker structure calls,
against dense closed forms."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from precond.linalg.kron import (
    block_partition,
    kl_clip_scale,
    kron_precondition_exact,
    kron_spectrum,
    merge_small_dims,
    mode_products,
    pi_adjusted_damping,
    reassemble_blocks,
    shampoo_statistics,
    split_into_blocks,
    tracenorm_pi,
)
from precond.linalg.spectral import inverse_root, robust_eigh

D = torch.float64


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def psd(n: int, seed: int, rank: int | None = None, batch: tuple[int, ...] = ()) -> torch.Tensor:
    x = rand(*batch, n, rank or 2 * n, seed=seed)
    return x @ x.mT / x.shape[-1]


def assert_rel(out, ref, tol: float = 1e-10) -> None:
    """max |out − ref| <= tol · max(1, max |ref|)  (solutions of a 1e-3-damped system are O(1e3))."""
    out = out.numpy() if isinstance(out, torch.Tensor) else out
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(out - ref).max() <= tol * scale, (np.abs(out - ref).max(), scale)


def np_power(m: np.ndarray, e: float, eps: float = 0.0) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * (np.clip(w, 0, None) + eps) ** e) @ v.T


def exact(V, eig_a, eig_g, lam):
    """The exact damping form as the structure computes it: ``f(λ_C)`` at a refresh, applied in the eigenbasis."""
    (da, qa), (dg, qg) = eig_a[:2], eig_g[:2]
    return kron_precondition_exact(V, [qg, qa], 1.0 / (kron_spectrum([dg, da]) + lam))


def roots(V, factors, damping, p=1.0, position="inside"):
    """The per-factor forms as the structure computes them: one damped root per factor, then mode products."""
    return mode_products(V, [inverse_root(f, p, d, position) for f, d in zip(factors, damping)])


# --------------------------------------------------------------------------- conventions


def test_vec_conventions():
    A, G, V = psd(4, 0), psd(3, 1), rand(3, 4, seed=2)
    out = mode_products(V, [G, A])  # the curvature's action G V Aᵀ
    # row-major (torch .flatten()):  kron(G, A)
    np.testing.assert_allclose(out.flatten().numpy(), np.kron(G, A) @ V.flatten().numpy(), atol=1e-13)
    # column-major (paper's vec):  kron(A, G) = A ⊗ G
    np.testing.assert_allclose(
        out.numpy().flatten(order="F"), np.kron(A, G) @ V.numpy().flatten(order="F"), atol=1e-13
    )


# --------------------------------------------------------------------------- K-FAC damping


@pytest.mark.parametrize("lam", [1e-3, 0.1, 2.0])
def test_exact_kronecker_damping_equals_dense_solve(lam):
    A, G, V = psd(5, 3, rank=3), psd(4, 4), rand(4, 5, seed=5)  # A singular on purpose
    ref = np.linalg.solve(np.kron(G, A) + lam * np.eye(20), V.flatten().numpy()).reshape(4, 5)
    ref_f = np.linalg.solve(np.kron(A, G) + lam * np.eye(20), V.numpy().flatten(order="F"))
    assert_rel(ref.flatten(order="F"), ref_f)  # the same system in the other vec order
    for eig_a, eig_g in [
        (robust_eigh(A), robust_eigh(G)),
        (tuple(torch.linalg.eigh(A)), tuple(torch.linalg.eigh(G))),
    ]:
        out = exact(V, eig_a, eig_g, lam)
        assert_rel(out, ref)
    # it really inverts the damped curvature
    torch.testing.assert_close(mode_products(out, [G, A]) + lam * out, V, rtol=0, atol=1e-9)


def test_exact_form_of_three_factors_and_a_root():
    """Order 3 with share 3 (Shampoo's C = (F_1 ⊗ F_2 ⊗ F_3)^(1/3)) and f(λ) = λ^(-1/2): the dense C^(-1/2)."""
    fs, X = [psd(n, 40 + n) for n in (2, 3, 4)], rand(2, 3, 4, seed=44)
    eigs = [robust_eigh(f) for f in fs]
    scale = kron_spectrum([e.eigenvalues for e in eigs], share=3) ** -0.5
    assert scale.shape == (2, 3, 4)
    out = kron_precondition_exact(X, [e.eigenvectors for e in eigs], scale)
    dense = np.kron(np.kron(fs[0].numpy(), fs[1].numpy()), fs[2].numpy())  # row-major vec of X
    ref = np_power(np_power(dense, 1.0 / 3.0), -0.5) @ X.flatten().numpy()
    np.testing.assert_allclose(out.flatten().numpy(), ref, rtol=0, atol=1e-9)


def test_exact_kronecker_damping_batched():
    A, G, V = psd(3, 6, batch=(4,)), psd(2, 7, batch=(4,)), rand(4, 2, 3, seed=8)
    out = exact(V, robust_eigh(A), robust_eigh(G), 0.01)
    for i in range(4):
        ref = np.linalg.solve(np.kron(G[i], A[i]) + 0.01 * np.eye(6), V[i].flatten().numpy())
        np.testing.assert_allclose(out[i].flatten().numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("pi", ["tracenorm", 1.0, 0.3])
def test_factored_damping_closed_form(pi):
    A, G, V, lam = psd(5, 9) * 3.0, psd(3, 10) * 0.2, rand(3, 5, seed=11), 0.05
    a, g = A.numpy(), G.numpy()
    p = math.sqrt((np.trace(a) / 5) / (np.trace(g) / 3)) if pi == "tracenorm" else pi
    assert pi != "tracenorm" or abs(p - 1.0) > 0.5  # the factors are scaled differently
    fa = a + p * math.sqrt(lam) * np.eye(5)
    fg = g + math.sqrt(lam) / p * np.eye(3)
    ref = np.linalg.solve(np.kron(fg, fa), V.flatten().numpy()).reshape(3, 5)
    np.testing.assert_allclose(
        np.linalg.inv(fg) @ V.numpy() @ np.linalg.inv(fa), ref, atol=1e-10
    )  # closed form of the Kronecker solve
    for fa_in, fg_in in [(A, G), (robust_eigh(A), robust_eigh(G))]:
        da, dg = pi_adjusted_damping([fa_in, fg_in], lam, pi)
        out = roots(V, [fg_in, fa_in], [dg, da])
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
    assert float(da) == pytest.approx(p * math.sqrt(lam), rel=1e-12)
    assert float(dg) == pytest.approx(math.sqrt(lam) / p, rel=1e-12)
    # The factored approximation is not the exact damping.
    assert (out - exact(V, robust_eigh(A), robust_eigh(G), lam)).abs().max() > 1e-3


def test_factored_damping_of_three_factors():
    """π_i = t_i / (Π_j t_j)^(1/3): the product of the π_i is 1 and factor i gets π_i λ^(1/3)."""
    fs, lam = [psd(3, 60) * 5.0, psd(4, 61), psd(2, 62) * 0.1], 0.2
    t = [float(f.trace()) / f.shape[0] for f in fs]
    mean = math.prod(t) ** (1.0 / 3.0)
    damping = pi_adjusted_damping([robust_eigh(f) for f in fs], lam)
    for d, ti in zip(damping, t):
        assert float(d) == pytest.approx(ti / mean * lam ** (1.0 / 3.0), rel=1e-12)
    assert math.prod(float(p) for p in tracenorm_pi(fs)) == pytest.approx(1.0, rel=1e-12)


def test_tracenorm_pi_batched_and_degenerate():
    A, G = psd(4, 12, batch=(3,)), psd(2, 13, batch=(3,))
    A[1] = 0.0  # no statistics yet
    pi, pi_g = tracenorm_pi([A, G])
    assert pi.shape == (3,)
    for i in (0, 2):
        ref = math.sqrt((A[i].trace().item() / 4) / (G[i].trace().item() / 2))
        assert pi[i].item() == pytest.approx(ref, rel=1e-12)
        assert pi_g[i].item() == pytest.approx(1.0 / ref, rel=1e-12)
    assert pi[1].item() == 1.0 and pi_g[1].item() == 1.0
    da, dg = pi_adjusted_damping([A, G], 0.1)
    for i in range(3):
        one = pi_adjusted_damping([A[i], G[i]], 0.1)
        torch.testing.assert_close(torch.stack([da[i], dg[i]]), torch.stack(one), rtol=1e-14, atol=0)
    from_eig = pi_adjusted_damping([robust_eigh(A), robust_eigh(G)], 0.1)
    torch.testing.assert_close(torch.stack(from_eig), torch.stack([da, dg]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        pi_adjusted_damping([A, G], 0.1, pi=-1.0)


def test_per_factor_damping_closed_form_and_differs_from_exact():
    A, G, V, lam = psd(4, 15), psd(3, 16), rand(3, 4, seed=17), 0.1
    ref = np.linalg.inv(G.numpy() + lam * np.eye(3)) @ V.numpy() @ np.linalg.inv(A.numpy() + lam * np.eye(4))
    for fa, fg in [(A, G), (robust_eigh(A), robust_eigh(G))]:
        out = roots(V, [fg, fa], [lam, lam])
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
    assert (out - exact(V, robust_eigh(A), robust_eigh(G), lam)).abs().max() > 1e-2


# --------------------------------------------------------------------------- Shampoo


def test_shampoo_statistics_are_mode_gram_matrices():
    g = rand(3, 4, 5, seed=18)
    stats = shampoo_statistics(g)
    a = g.numpy()
    for i, s in enumerate(stats):
        unfold = np.moveaxis(a, i, 0).reshape(a.shape[i], -1)
        np.testing.assert_allclose(s.numpy(), unfold @ unfold.T, atol=1e-12)
    m = rand(3, 4, seed=19)
    left, right = shampoo_statistics(m)
    torch.testing.assert_close(left, m @ m.T)
    torch.testing.assert_close(right, m.T @ m)
    v = rand(4, seed=20)
    torch.testing.assert_close(shampoo_statistics(v)[0], torch.outer(v, v))
    assert shampoo_statistics(torch.tensor(1.0)) == []


def test_shampoo_one_step_matrix_equals_numpy_reference():
    eps = 1e-4
    grads = [rand(4, 6, seed=21 + t) for t in range(3)]
    L = eps * torch.eye(4, dtype=D)
    R = eps * torch.eye(6, dtype=D)
    for gt in grads:  # Algorithm 1: L_t = L_{t-1} + G Gᵀ, R_t = R_{t-1} + Gᵀ G
        sl, sr = shampoo_statistics(gt)
        L, R = L + sl, R + sr
    g = grads[-1]
    out = roots(g, [robust_eigh(L), robust_eigh(R)], [0.0, 0.0], p=4)  # per factor -1/(p·k) = -1/4
    ref = np_power(L.numpy(), -0.25) @ g.numpy() @ np_power(R.numpy(), -0.25)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
    # the same as (R^{-1/4} ⊗ L^{-1/4}) vec(G), column-major
    kron_ref = np.kron(np_power(R.numpy(), -0.25), np_power(L.numpy(), -0.25)) @ g.numpy().flatten(order="F")
    np.testing.assert_allclose(out.numpy().flatten(order="F"), kron_ref, atol=1e-10)
    # damping added before the root == starting from eps*I
    L0, R0 = L - eps * torch.eye(4, dtype=D), R - eps * torch.eye(6, dtype=D)
    out_d = roots(g, [robust_eigh(L0), robust_eigh(R0)], [eps, eps], p=4)
    np.testing.assert_allclose(out_d.numpy(), ref, rtol=0, atol=1e-8)


def test_shampoo_3d_tensor_with_minus_one_sixth():
    g = rand(3, 4, 2, seed=30)
    stats = [s + 1e-3 * torch.eye(s.shape[0], dtype=D) for s in shampoo_statistics(g)]
    out = roots(g, [robust_eigh(s) for s in stats], [0.0] * 3, p=6)
    p = [np_power(s.numpy(), -1.0 / 6.0) for s in stats]
    ref = np.einsum("ai,bj,ck,ijk->abc", p[0], p[1], p[2], g.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
    # per-factor exponents and a skipped (None) dimension
    out2 = mode_products(g, [inverse_root(robust_eigh(stats[0]), 2), None, inverse_root(robust_eigh(stats[2]), 4)])
    ref2 = np.einsum("ai,ck,ijk->ajc", np_power(stats[0].numpy(), -0.5), np_power(stats[2].numpy(), -0.25), g.numpy())
    np.testing.assert_allclose(out2.numpy(), ref2, rtol=0, atol=1e-10)


def test_shampoo_vector_is_full_matrix_adagrad():
    eps = 1e-3
    gs = [rand(5, seed=40 + t) for t in range(4)]
    H = sum(shampoo_statistics(gt)[0] for gt in gs)
    g = gs[-1]
    out = roots(g, [robust_eigh(H)], [eps], p=2)  # k = 1: exponent -1/2
    gg = sum(np.outer(x.numpy(), x.numpy()) for x in gs)
    ref = np_power(gg + eps * np.eye(5), -0.5) @ g.numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)


def test_mode_products_argument_checks():
    t = rand(2, 3, seed=50)
    m0, m1 = rand(4, 2, seed=51), rand(5, 3, seed=52)  # non-square: checks the index order
    torch.testing.assert_close(mode_products(t, [m0, m1]), m0 @ t @ m1.T)
    torch.testing.assert_close(mode_products(t, [None, m1]), t @ m1.T)
    torch.testing.assert_close(mode_products(t, [None, None]), t)
    t3, m2 = rand(2, 3, 4, seed=53), rand(3, 4, seed=54)
    ref = np.einsum("ai,bj,ck,ijk->abc", m0.numpy(), m1.numpy(), m2.numpy(), t3.numpy())
    np.testing.assert_allclose(mode_products(t3, [m0, m1, m2]).numpy(), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        mode_products(t, [m0])
    s = torch.tensor(2.0, dtype=D)
    torch.testing.assert_close(mode_products(s, []), s)


# --------------------------------------------------------------------------- blocking


def test_merge_small_dims():
    assert merge_small_dims((1, 3, 1, 5, 7), 1024) == (105,)
    assert merge_small_dims((64, 32, 3, 3), 1024) == (64, 288)
    assert merge_small_dims((4096, 4096), 1024) == (4096, 4096)
    assert merge_small_dims((), 1024) == (1,)
    assert merge_small_dims((1, 1), 8) == (1,)
    assert merge_small_dims((2, 2, 2, 2), 8) == (8, 2)


def test_block_partition_4096_square():
    part = block_partition((4096, 4096), 1024)  # shapes only, nothing allocated
    assert part.merged_shape == (4096, 4096)
    assert part.num_blocks == 16
    assert part.block_shapes == [(1024, 1024)] * 16
    assert max(part.factor_dims) <= 1024 and len(part.factor_dims) == 32


@pytest.mark.parametrize("seed", range(5))
def test_block_partition_never_exceeds_max_dim(seed):
    rng = random.Random(seed)
    for _ in range(50):
        shape = tuple(rng.choice([1, 2, 3, 7, 64, 100, 1000, 1025, 5000]) for _ in range(rng.randint(0, 4)))
        max_dim = rng.choice([1, 4, 128, 1024])
        for merge in (True, False):
            part = block_partition(shape, max_dim, merge_dims=merge)
            assert math.prod(part.merged_shape) == math.prod(shape)
            assert part.num_blocks == math.prod(len(c) for c in part.splits)
            for d, chunks in zip(part.merged_shape, part.splits):
                assert sum(chunks) == d and all(c == max_dim for c in chunks[:-1])
                assert all(c <= max_dim for c in chunks)
            if part.num_blocks <= 10_000:  # enumerate only small partitions
                assert all(d <= max_dim for b in part.block_shapes for d in b)
                assert sum(math.prod(b) for b in part.block_shapes) == math.prod(shape)
                assert len(part.block_shapes) == part.num_blocks


@pytest.mark.parametrize(
    "shape,max_dim,merge",
    [((10, 3, 7), 4, True), ((10, 3, 7), 4, False), ((1,), 4, True), ((), 4, True), ((), 4, False),
     ((5, 1, 9), 4, True), ((0, 3), 4, True), ((13,), 5, False), ((6, 6), 6, True)],
)
def test_split_and_reassemble_round_trip(shape, max_dim, merge):
    t = torch.arange(math.prod(shape), dtype=D).reshape(shape)
    part = block_partition(shape, max_dim, merge_dims=merge)
    blocks = split_into_blocks(t, part)
    assert [tuple(b.shape) for b in blocks] == part.block_shapes
    back = reassemble_blocks(blocks, part)
    assert back.shape == t.shape and torch.equal(back, t)
    # blocks modified independently come back in place
    back2 = reassemble_blocks([b * (i + 1) for i, b in enumerate(blocks)], part)
    assert back2.shape == t.shape


def test_block_contents_row_major_order():
    t = rand(10, 7, seed=60)
    part = block_partition((10, 7), 4, merge_dims=False)
    assert part.splits == ((4, 4, 2), (4, 3))
    blocks = split_into_blocks(t, part)
    assert torch.equal(blocks[1], t[0:4, 4:7])
    assert torch.equal(blocks[4], t[8:10, 0:4])
    scaled = reassemble_blocks([b * (i + 1) for i, b in enumerate(blocks)], part)
    assert torch.equal(scaled[8:10, 4:7], 6 * t[8:10, 4:7])
    with pytest.raises(ValueError):
        split_into_blocks(t.T, part)
    with pytest.raises(ValueError):
        reassemble_blocks(blocks[:-1], part)
    with pytest.raises(ValueError):
        block_partition((3,), 0)


# --------------------------------------------------------------------------- KL clipping


def test_kl_clip_scale_hand_example():
    # lr² · vg = 0.01 · 2 = 0.02 ; c / 0.02 = 0.05 ; ν = sqrt(0.05)
    assert kl_clip_scale(2.0, 0.1, 1e-3) == pytest.approx(math.sqrt(0.05), rel=1e-15)
    assert kl_clip_scale(0.01, 0.1, 1.0) == 1.0  # 1e-4 < c: inactive
    assert kl_clip_scale(0.0, 0.1, 1e-3) == 1.0
    assert kl_clip_scale(-3.0, 0.1, 1e-3) == 1.0
    assert kl_clip_scale(2.0, 0.0, 1e-3) == 1.0
    t = kl_clip_scale(torch.tensor([2.0, 0.01, 0.0, -1.0], dtype=D), 0.1, 1e-3)
    np.testing.assert_allclose(t.numpy(), [math.sqrt(0.05), 1.0, 1.0, 1.0])


@pytest.mark.parametrize("lr,c,active", [(0.5, 1e-3, True), (1e-3, 10.0, False)])
def test_kl_clipped_step_has_fisher_norm_c(lr, c, active):
    # Two K-FAC layers, F̂ = blockdiag(kron(G, A) + λI): v = F̂⁻¹ g, step = ν·lr·v.
    lam, blocks, vg = 0.01, [], 0.0
    for k, (dout, din) in enumerate([(3, 4), (2, 3)]):
        A, G, g = psd(din, 70 + k), psd(dout, 80 + k), rand(dout, din, seed=90 + k)
        v = exact(g, robust_eigh(A), robust_eigh(G), lam)
        vg += float((v * g).sum())  # the quantity kl_clip_scale takes
        blocks.append((A, G, g, v))
    nu = kl_clip_scale(vg, lr, c)
    fnorm = 0.0
    for A, G, g, v in blocks:
        F = np.kron(G, A) + lam * np.eye(g.numel())
        step = nu * lr * v.flatten().numpy()
        fnorm += step @ F @ step
        np.testing.assert_allclose(F @ v.flatten().numpy(), g.flatten().numpy(), atol=1e-10)
    if active:
        assert nu < 1 and fnorm == pytest.approx(c, rel=1e-10)  # stepᵀF̂step = lr²ν²·vg = c
    else:
        assert nu == 1.0 and fnorm < c
