"""structure psgd_kron and recipe psgd_kron against PSGD-Kron's equations transcribed here with explicit matrices
(float64): one fit of the factors (triangular and diagonal), the preconditioned gradient as a Kronecker product, the
spectral-norm bound, the update-probability schedule and its counter, the whitening fixed points, the update RMS clip,
a short training run, seeds and a resumed run."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond.errors import RecipeError
from precond.structure.psgd_kron import (
    PSGDKron,
    balance,
    fit_factors,
    norm_lower_bound,
    precondition,
    triangular_dims,
    update_probability,
)

D = torch.float64
NOISE = math.sqrt(torch.finfo(torch.float32).eps)


def upper(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned upper-triangular factor with a positive diagonal."""
    return torch.eye(n, dtype=D) + 0.3 * torch.randn(n, n, generator=gen, dtype=D).triu(1) + 0.2 * torch.rand(n, generator=gen, dtype=D).diag()


def lower_bound_by_hand(s: torch.Tensor) -> float:
    """kron_torch's ``_lb`` for a symmetric matrix, written out: scale by the largest entry, take the row of
    largest norm ``r``, ``x = S r / ‖S r‖``, bound ``max|S| ‖Sᵀ x‖``."""
    m = s.abs().max()
    a = s / m
    j = int((a * a).sum(1).argmax())
    x = a @ a[j]
    x = x / x.norm()
    return float(m * (a.T @ x).norm())


def fit_by_hand(q1: torch.Tensor, q2: torch.Tensor, h: torch.Tensor, v: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``dQ = E·Q`` fit of a matrix's two triangular factors, with explicit inverses."""
    a = q1 @ h @ q2.T
    b = torch.linalg.inv(q1).T @ v @ torch.linalg.inv(q2)
    out = []
    for q, t1, t2 in ((q1, a @ a.T, b @ b.T), (q2, a.T @ a, b.T @ b)):
        out.append(q - mu / lower_bound_by_hand(t1 + t2) * torch.triu(t1 - t2) @ q)
    return out[0], out[1]


# --- the kernels ------------------------------------------------------------------------------------------


def test_one_fit_of_triangular_factors_equals_the_equations() -> None:
    gen = torch.Generator().manual_seed(0)
    q1, q2 = upper(4, gen), upper(3, gen)
    h, v = torch.randn(4, 3, generator=gen, dtype=D), torch.randn(4, 3, generator=gen, dtype=D)
    e1, e2 = fit_by_hand(q1, q2, h, v, 0.1)
    n1, n2 = fit_factors([q1[None], q2[None]], h[None], v[None], 0.1)
    torch.testing.assert_close(n1[0], e1, rtol=0, atol=1e-13)
    torch.testing.assert_close(n2[0], e2, rtol=0, atol=1e-13)
    assert torch.equal(n1[0], n1[0].triu()) and not torch.allclose(n1[0], q1)  # stays triangular, moved


def test_one_fit_of_a_diagonal_factor_equals_the_equations() -> None:
    """A vector: q ← q − μ (h² − v²) ⊙ q / max|h² + v²| (ALGORITHMS-style hand step, from q = 1 and from a random q)."""
    gen = torch.Generator().manual_seed(1)
    h, v = torch.randn(6, generator=gen, dtype=D), torch.randn(6, generator=gen, dtype=D)
    for q in (torch.ones(6, dtype=D), 0.5 + torch.rand(6, generator=gen, dtype=D)):
        a, b = q * h, v / q
        expected = q - 0.1 * (a * a - b * b) * q / (a * a + b * b).abs().max()
        (new,) = fit_factors([q[None]], h[None], v[None], 0.1)
        torch.testing.assert_close(new[0], expected, rtol=0, atol=1e-15)


def test_mixed_factors_of_a_3d_tensor_equal_the_kronecker_product() -> None:
    """Shape (2, 3, 5) with the last dim diagonal: P g = (P_1 ⊗ P_2 ⊗ P_3) vec(g), and A, B of the fit as
    Kronecker products acting on vec(h) and vec(v)."""
    gen = torch.Generator().manual_seed(2)
    q = [upper(2, gen), upper(3, gen), 0.5 + torch.rand(5, generator=gen, dtype=D)]
    dense = [q[0], q[1], q[2].diag()]
    kron = torch.kron(torch.kron(dense[0], dense[1]), dense[2])
    g = torch.randn(2, 3, 5, generator=gen, dtype=D)
    expected = (kron.T @ kron @ g.flatten()).reshape(2, 3, 5)
    torch.testing.assert_close(precondition([f[None] for f in q], g[None])[0], expected, rtol=0, atol=1e-13)
    # the fit, with A = Q vec(h), B = Q^-T vec(v) and the mode-i Gram matrices written out
    h, v = torch.randn(2, 3, 5, generator=gen, dtype=D), torch.randn(2, 3, 5, generator=gen, dtype=D)
    a = (kron @ h.flatten()).reshape(2, 3, 5)
    b = (torch.linalg.inv(kron).T @ v.flatten()).reshape(2, 3, 5)
    new = fit_factors([f[None] for f in q], h[None], v[None], 0.1)
    for i in range(2):
        am, bm = a.movedim(i, 0).reshape(a.shape[i], -1), b.movedim(i, 0).reshape(b.shape[i], -1)
        t1, t2 = am @ am.T, bm @ bm.T
        torch.testing.assert_close(new[i][0], q[i] - 0.1 / lower_bound_by_hand(t1 + t2) * torch.triu(t1 - t2) @ q[i], rtol=0, atol=1e-13)
    t1, t2 = (a * a).sum((0, 1)), (b * b).sum((0, 1))
    torch.testing.assert_close(new[2][0], q[2] - 0.1 * (t1 - t2) * q[2] / (t1 + t2).abs().max(), rtol=0, atol=1e-14)


def test_preconditioned_gradient_of_a_matrix() -> None:
    gen = torch.Generator().manual_seed(3)
    q1, q2 = upper(4, gen), upper(3, gen)
    g = torch.randn(2, 4, 3, generator=gen, dtype=D)  # a batch of two
    out = precondition([torch.stack([q1, q1]), torch.stack([q2, q2])], g)
    for n in range(2):
        torch.testing.assert_close(out[n], q1.T @ q1 @ g[n] @ q2.T @ q2, rtol=0, atol=1e-13)


def test_norm_lower_bound() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 7, generator=gen, dtype=D)
    s = x @ x.mT
    bound = norm_lower_bound(s)
    true = torch.linalg.matrix_norm(s, ord=2)
    for n in range(5):
        assert bound[n].item() == pytest.approx(lower_bound_by_hand(s[n]), rel=1e-13)
    assert torch.all(bound <= true * (1 + 1e-12)) and torch.all(bound >= true / math.sqrt(7))
    assert norm_lower_bound(torch.zeros(1, 3, 3, dtype=D)).item() == 0.0


def test_balance_keeps_the_product_and_equalises_the_scales() -> None:
    gen = torch.Generator().manual_seed(10)
    q = [(50 * upper(3, gen))[None], (0.02 * upper(2, gen))[None], (3 + torch.rand(4, generator=gen, dtype=D))[None]]
    before = torch.kron(torch.kron(q[0][0], q[1][0]), q[2][0].diag())
    balance(q)
    torch.testing.assert_close(torch.kron(torch.kron(q[0][0], q[1][0]), q[2][0].diag()), before, rtol=1e-13, atol=0)
    scales = torch.stack([f.abs().max() for f in q])
    torch.testing.assert_close(scales, scales.mean().expand(3), rtol=1e-13, atol=0)


# --- the schedule and the dims ----------------------------------------------------------------------------


def test_update_probability_schedule() -> None:
    assert all(update_probability(n) == 1.0 for n in range(501))
    assert update_probability(1000) == pytest.approx(math.exp(-0.5), rel=1e-15)
    assert update_probability(4006) > 0.03 and update_probability(4007) == 0.03 and update_probability(10**6) == 0.03


def test_fits_follow_the_counter() -> None:
    """kron_torch's deterministic counter: fit when ``counter ≥ 1/p(n)``; every step for the first 501 steps,
    then spaced ⌈1/p⌉ apart. Checked with a fast schedule (flat_start 3, decay 0.5, min_prob 0.2) over 30 steps."""
    p = nn.Parameter(torch.zeros(3, 2, dtype=D))
    structure = {"type": "psgd_kron", "flat_start": 3, "decay": 0.5, "min_prob": 0.2}
    opt = precond.build({"name": "x", "lr": 1e-3, "curvature": {"type": "empirical_fisher"}, "structure": structure,
                         "transform": {"type": "inverse_root", "p": 2}}, [p])
    counter, fits, expected = 0, 0, []
    for n in range(30):
        prob = min(1.0, max(0.2, math.exp(-0.5 * (n - 3))))
        counter += 1
        if counter >= 1 / prob:
            counter, fits = 0, fits + 1
        expected.append(fits)
    got = []
    for _ in range(30):
        p.grad = torch.ones_like(p)
        opt.step()
        got.append(opt.state[p]["structure.fits"])
    assert got == expected and expected[-1] < 30


def test_triangular_or_diagonal_dims() -> None:
    assert triangular_dims((5,), 8192, 2, None) == (False,)
    assert triangular_dims((), 8192, 2, None) == (False,)
    assert triangular_dims((4, 1, 9000), 8192, 2, None) == (True, False, False)
    assert triangular_dims((4, 6), 8192, 2, "one_diag") == (True, False)
    assert triangular_dims((6, 6), 8192, 2, "smart_one_diag") == (True, True)
    assert triangular_dims((4, 6), 8192, 2, "smart_one_diag") == (True, False)
    assert triangular_dims((4, 6), 8192, 2, "all_diag") == (False, False)
    assert triangular_dims((4, 6), 5, 2, None) == (True, False)


# --- through the optimizer --------------------------------------------------------------------------------


def recipe(**structure) -> dict:
    return {
        "name": "psgd",
        "lr": 0.05,
        "curvature": {"type": "empirical_fisher"},
        "structure": {"type": "psgd_kron", **structure},
        "transform": [{"type": "inverse_root", "p": 2}, {"type": "clip", "mode": "rms", "threshold": 1.1}],
        "momentum": {"type": "ema", "beta": 0.9, "bias_correction": True},
        "decay": {"type": "decoupled"},
    }


@pytest.mark.parametrize("shape", [(4, 3), (5,)], ids=["matrix", "vector"])
def test_first_step_by_hand(shape: tuple[int, ...]) -> None:
    """Step 1: the probe v is the optimizer generator's first draw, h = g + noise·mean|g|·v, the factors fitted from
    Q = I, then θ ← θ(1 − lr·wd) − lr · clip_rms(P g) (the bias-corrected EMA of one gradient is g)."""
    gen = torch.Generator().manual_seed(5)
    theta0 = torch.randn(shape, generator=gen, dtype=D)
    g = torch.randn(shape, generator=gen, dtype=D)
    p = nn.Parameter(theta0.clone())
    opt = precond.build(recipe(), [p], seed=7, weight_decay=0.1)
    v = torch.randn((1, *shape), generator=torch.Generator().manual_seed(7), dtype=D)[0]
    p.grad = g.clone()
    opt.step()
    h = g + NOISE * g.abs().mean() * v
    if len(shape) == 2:
        q1, q2 = fit_by_hand(torch.eye(4, dtype=D), torch.eye(3, dtype=D), h, v, 0.1)
        u = q1.T @ q1 @ g @ q2.T @ q2
        torch.testing.assert_close(opt.state[p]["structure.q0"], q1, rtol=0, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["structure.q1"], q2, rtol=0, atol=1e-14)
    else:
        q = 1 - 0.1 * (h * h - v * v) / (h * h + v * v).abs().max()
        u = q * q * g
        torch.testing.assert_close(opt.state[p]["structure.q0"], q, rtol=0, atol=1e-15)
    u = u * min(1.0, 1.1 / (u.pow(2).mean().sqrt().item() + 1e-12))
    torch.testing.assert_close(p.detach(), theta0 * (1 - 0.05 * 0.1) - 0.05 * u, rtol=0, atol=1e-14)


def test_rms_clip() -> None:
    from precond.transform.clip import Clip
    from precond.transform.identity import Identity  # noqa: F401  (compose needs a transform list)

    big, small = nn.Parameter(torch.zeros(10, dtype=D)), nn.Parameter(torch.zeros(4, dtype=D))
    opt = precond.compose([big, small], transform=Clip(mode="rms", threshold=1.1), lr=1.0)
    gb, gs = torch.full((10,), 3.0, dtype=D), torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=D)
    big.grad, small.grad = gb.clone(), gs.clone()
    opt.step()
    torch.testing.assert_close(-big.detach(), gb * 1.1 / (3.0 + 1e-12), rtol=0, atol=1e-15)  # RMS 3 -> 1.1
    assert torch.equal(-small.detach(), gs)  # RMS below 1.1: unchanged


def test_whitening_fixed_point_of_a_matrix() -> None:
    """G = C_1^(1/2) Z C_2^(1/2): after many fits P_1 = Q_1ᵀQ_1 ∝ C_1^(-1/2) (the scale is shared between factors)."""
    gen = torch.Generator().manual_seed(6)
    c1 = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=D)
    c2 = torch.diag(torch.tensor([1.5, 0.4], dtype=D))

    def root(c: torch.Tensor, power: float) -> torch.Tensor:
        w, u = torch.linalg.eigh(c)
        return u @ torch.diag(w**power) @ u.T

    factors = [torch.eye(3, dtype=D)[None], torch.eye(2, dtype=D)[None]]
    n = 64  # independent chains of the same fit, averaged at the end (less noise for the same time)
    factors = [f.expand(n, -1, -1).clone() for f in factors]
    for _ in range(1500):
        z = torch.randn(n, 3, 2, generator=gen, dtype=D)
        g = root(c1, 0.5) @ z @ root(c2, 0.5)
        factors = fit_factors(factors, g, torch.randn(n, 3, 2, generator=gen, dtype=D), 0.02)
    p1 = (factors[0].mT @ factors[0]).mean(0)
    p2 = (factors[1].mT @ factors[1]).mean(0)
    for p, c in ((p1, c1), (p2, c2)):
        target = root(c, -0.5)
        torch.testing.assert_close(p / p.norm(), target / target.norm(), rtol=0, atol=0.05)


def test_whitening_fixed_point_of_a_vector() -> None:
    """A 1-D parameter with g_i ~ N(0, σ_i²): q_i² → 1/σ_i. (The step is normalised by the largest entry, so
    an entry whose fixed point is far from the others converges slowly: σ spans only 1.5 decades here.)"""
    gen = torch.Generator().manual_seed(8)
    sigma = torch.tensor([0.3, 1.0, 3.0, 10.0], dtype=D)
    q = [torch.ones(64, 4, dtype=D)]
    for _ in range(3000):
        q = fit_factors(q, sigma * torch.randn(64, 4, generator=gen, dtype=D), torch.randn(64, 4, generator=gen, dtype=D), 0.02)
    torch.testing.assert_close((q[0] ** 2).mean(0) * sigma, torch.ones(4, dtype=D), rtol=0.1, atol=0)


def test_trains_a_badly_scaled_regression() -> None:
    """A short run: on inputs scaled over three decades psgd_kron gets far lower than SGD at its best stable lr."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(256, 6, generator=gen) * torch.tensor([30.0, 10.0, 3.0, 1.0, 0.3, 0.03])
    w = torch.randn(6, 2, generator=gen)
    y = x @ w

    def run(name: str, lr: float) -> float:
        torch.manual_seed(0)
        model = nn.Linear(6, 2, bias=False)
        opt = precond.build(name, model, lr=lr)
        for _ in range(300):
            opt.step(lambda: F.mse_loss(model(x), y))
        return F.mse_loss(model(x), y).item()

    start = F.mse_loss(x @ torch.zeros(6, 2), y).item()
    psgd = run("psgd_kron", 0.02)
    assert psgd < 1e-3 * start
    assert psgd < 0.1 * run("sgd", 1e-3)  # 1e-3 is about SGD's stability limit here (1/λ_max ≈ 1/900)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(12)]
    return model, data


def test_seed_reproduces_and_changes_the_run() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        model, data = model_and_data()
        opt = precond.build("psgd_kron", model, lr=1e-2, seed=seed)
        for x, y in data:
            opt.step(lambda: F.cross_entropy(model(x), y))  # noqa: B023
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_resume_is_bitwise() -> None:
    model, data = model_and_data()
    opt = precond.build("psgd_kron", model, lr=1e-2, set={"structure.flat_start": 2, "structure.decay": 0.3})
    half = copy.deepcopy(model)
    for x, y in data:
        opt.step(lambda: F.cross_entropy(model(x), y))  # noqa: B023
    opt1 = precond.build("psgd_kron", half, lr=1e-2, set={"structure.flat_start": 2, "structure.decay": 0.3})
    for x, y in data[:6]:
        opt1.step(lambda: F.cross_entropy(half(x), y))  # noqa: B023
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh, _ = model_and_data()
    fresh.load_state_dict(ckpt["model"])
    opt2 = precond.build("psgd_kron", fresh, lr=1e-2, set={"structure.flat_start": 2, "structure.decay": 0.3})
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[6:]:
        opt2.step(lambda: F.cross_entropy(fresh(x), y))  # noqa: B023
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    st = opt2.state[fresh[0].weight]
    assert st["structure.fits"] < 12 and st["structure.q0"].shape == (8, 8) and st["structure.q1"].shape == (6, 6)


def test_validation_refuses_what_it_cannot_do() -> None:
    p = [nn.Parameter(torch.zeros(2, 2))]
    damped = {**recipe(), "transform": {"type": "inverse_root", "p": 2, "damping": 1e-8}}
    with pytest.raises(RecipeError, match=r"cannot apply transform 'inverse_root': psgd_kron fits .* p: 2\} \(no damping\)"):
        precond.build(damped, p)
    with pytest.raises(RecipeError, match="cannot apply transform 'inverse'"):
        precond.build({**recipe(), "transform": {"type": "inverse"}}, p)
    with pytest.raises(RecipeError, match="cannot fill a 'probe' structure.*Curvatures that fill 'probe': empirical_fisher"):
        precond.build({**recipe(), "curvature": {"type": "hessian"}}, p)
    assert PSGDKron().form == "probe"


def test_a_fit_that_overflows_keeps_the_factors() -> None:
    """Factors at 1e100 and a gradient entry of 1e120: (q h)² overflows float64 and that fit is not finite, so the
    parameter keeps its factors (decided without a host sync); the other parameter's fit goes on."""
    big, fine = nn.Parameter(torch.zeros(3, dtype=D)), nn.Parameter(torch.zeros(3, dtype=D))
    opt = precond.build(recipe(init_scale=1e100), [big, fine])
    big.grad = torch.tensor([1e120, 1.0, -1.0], dtype=D)
    fine.grad = torch.tensor([1e-100, 2e-100, -1e-100], dtype=D)
    opt.step()
    assert torch.equal(opt.state[big]["structure.q0"], torch.full((3,), 1e100, dtype=D))
    q = opt.state[fine]["structure.q0"]
    assert torch.isfinite(q).all() and not torch.equal(q, torch.full((3,), 1e100, dtype=D))
