"""Tests for precond.likelihood: losses, output Hessians, the Fisher identity, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from precond.likelihood import (
    LIKELIHOODS,
    Categorical,
    Gaussian,
    Likelihood,
    get_likelihood,
    num_samples,
)

# torch.func.jvp scripts its decompositions on first use, which emits this warning in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
NAMES = ["categorical", "gaussian"]


def _outputs(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 1.5


def _targets(name: str, outputs: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "categorical":
        return torch.randint(0, outputs.shape[-1], outputs.shape[:-1], generator=g)
    return torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)


# --------------------------------------------------------------------------- registry


def test_registry_and_lookup() -> None:
    assert set(LIKELIHOODS) == {"categorical", "gaussian"}
    assert isinstance(get_likelihood("categorical"), Categorical)
    assert isinstance(get_likelihood("gaussian"), Gaussian)
    inst = Gaussian()
    assert get_likelihood(inst) is inst
    assert get_likelihood("categorical") == Categorical()
    with pytest.raises(ValueError) as err:
        get_likelihood("poisson")
    msg = str(err.value)
    assert "poisson" in msg and "'categorical'" in msg and "'gaussian'" in msg


def test_num_samples() -> None:
    assert num_samples(torch.zeros(5, 3)) == 5
    assert num_samples(torch.zeros(2, 7, 3)) == 14
    assert num_samples(torch.zeros(4)) == 1
    with pytest.raises(ValueError):
        num_samples(torch.zeros(()))


# --------------------------------------------------------------------------- losses


def test_categorical_loss_matches_cross_entropy() -> None:
    lik = get_likelihood("categorical")
    out = _outputs((5, 4))
    y = _targets("categorical", out)
    assert torch.equal(lik.loss(out, y), F.cross_entropy(out, y))
    # sequence logits (N, T, C): class dimension last, mean over all N*T tokens
    out3 = _outputs((2, 3, 4))
    y3 = _targets("categorical", out3)
    ref = F.cross_entropy(out3.reshape(-1, 4), y3.reshape(-1))
    torch.testing.assert_close(lik.loss(out3, y3), ref, rtol=0, atol=1e-15)
    # per-sample loss is -log softmax[y] and its mean is the batch loss
    ps = lik.per_sample_loss(out3, y3)
    assert ps.shape == (2, 3)
    ref_ps = F.cross_entropy(out3.reshape(-1, 4), y3.reshape(-1), reduction="none").reshape(2, 3)
    torch.testing.assert_close(ps, ref_ps, rtol=0, atol=1e-14)
    torch.testing.assert_close(ps.mean(), lik.loss(out3, y3), rtol=0, atol=1e-15)


def test_gaussian_loss_matches_mse() -> None:
    lik = get_likelihood("gaussian")
    for shape in [(5, 3), (2, 3, 4)]:
        out = _outputs(shape)
        y = _targets("gaussian", out)
        assert torch.equal(lik.loss(out, y), F.mse_loss(out, y))
        ps = lik.per_sample_loss(out, y)
        assert ps.shape == shape[:-1]
        torch.testing.assert_close(ps.mean(), F.mse_loss(out, y), rtol=0, atol=1e-15)


def test_target_shape_is_checked() -> None:
    cat, gau = Categorical(), Gaussian()
    out = _outputs((2, 3, 3))
    # torch's class-dim-1 convention would pass targets of shape (N, T) = (2, 3) for
    # logits (N, C, T); here the class dimension is last, so only (2, 3) is accepted and
    # a (3, 2) target (the transposed layout) is refused instead of silently misread.
    with pytest.raises(ValueError, match="class dimension last"):
        cat.loss(out, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cat.loss(out, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape of the outputs"):
        gau.loss(_outputs((5, 3)), torch.zeros(5, 1, dtype=DT))


# --------------------------------------------------------------------------- Hessians


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (4,)])
def test_hessian_equals_autodiff_hessian_of_per_sample_loss(name: str, shape: tuple[int, ...]) -> None:
    lik = get_likelihood(name)
    out = _outputs(shape)
    y = _targets(name, out)
    c = shape[-1]
    flat_out, flat_y = out.reshape(-1, c), y.reshape(-1, c) if name == "gaussian" else y.reshape(-1)
    ref = torch.stack(
        [torch.func.hessian(lik.per_sample_loss)(flat_out[i], flat_y[i]) for i in range(flat_out.shape[0])]
    ).reshape(*shape[:-1], c, c)
    h = lik.hessian(out)
    assert h.shape == (*shape[:-1], c, c)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_batch_loss_hessian_is_block_diagonal_over_samples(name: str) -> None:
    """∇²_f of the batch-mean loss (taken with torch's own F.cross_entropy / F.mse_loss)
    is block diagonal with blocks hessian(f)[m] / M, M = N*T samples."""
    lik = get_likelihood(name)
    out = _outputs((2, 3, 4))
    y = _targets(name, out)
    if name == "categorical":

        def batch_loss(f: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(f.reshape(-1, 4), y.reshape(-1))
    else:

        def batch_loss(f: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(f, y)

    full = torch.func.hessian(batch_loss)(out).reshape(6 * 4, 6 * 4)
    blocks = lik.hessian(out).reshape(6, 4, 4) / 6
    torch.testing.assert_close(full, torch.block_diag(*blocks), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_hessian_sqrt_and_hessian_vp(name: str) -> None:
    lik = get_likelihood(name)
    out = _outputs((2, 5, 4), seed=3)
    h = lik.hessian(out)
    s = lik.hessian_sqrt(out)
    assert s.shape == (2, 5, 4, 4)
    torch.testing.assert_close(s @ s.transpose(-1, -2), h, rtol=0, atol=1e-14)
    v = _outputs((2, 5, 4), seed=4)
    torch.testing.assert_close(lik.hessian_vp(out, v), (h @ v.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-14)


def test_gaussian_hessian_value() -> None:
    lik = Gaussian()
    h = lik.hessian(_outputs((3, 5)))
    torch.testing.assert_close(h, (2.0 / 5) * torch.eye(5, dtype=DT).expand(3, 5, 5), rtol=0, atol=0)


# --------------------------------------------------------------------------- Fisher identity


def test_categorical_fisher_identity_exact() -> None:
    """Σ_c p_c ∇ℓ(f, c) ∇ℓ(f, c)ᵀ == ∇²ℓ: enumerate every label, weighted by softmax."""
    lik = Categorical()
    out = _outputs((6, 5), seed=7)
    p = torch.softmax(out, dim=-1)
    grad = torch.func.grad(lik.per_sample_loss)
    for i in range(out.shape[0]):
        fisher = torch.zeros(5, 5, dtype=DT)
        for c in range(5):
            g = grad(out[i], torch.tensor(c))
            fisher += p[i, c] * torch.outer(g, g)
        torch.testing.assert_close(fisher, lik.hessian(out[i]), rtol=0, atol=1e-12)


def test_gaussian_fisher_identity_monte_carlo() -> None:
    """E_ŷ[∇ℓ ∇ℓᵀ] -> (2/D) I. With ŷ = f + √(D/2) ε, ∇_f ℓ = -√(2/D) ε, so each entry of
    the S-sample average has standard deviation ≤ (2/D)·√2/√S; with S = 200 000, D = 3 this
    is 2.1e-3 and the 0.015 tolerance is > 7 standard deviations (a wrong scale, e.g.
    √D instead of √(D/2), would be off by 0.67)."""
    lik = Gaussian()
    f = _outputs((3,), seed=2)
    gen = torch.Generator().manual_seed(123)
    ys = lik.sample(f, gen, samples=200_000)
    assert ys.shape == (200_000, 3)
    grads = torch.func.vmap(torch.func.grad(lik.per_sample_loss), in_dims=(None, 0))(f, ys)
    fisher = grads.T @ grads / grads.shape[0]
    torch.testing.assert_close(fisher, lik.hessian(f), rtol=0, atol=0.015)
    torch.testing.assert_close(ys.mean(0), f, rtol=0, atol=0.02)  # std 1.22/447 = 2.7e-3


def test_categorical_sampling_frequencies() -> None:
    """Empirical label frequencies from 100 000 draws match softmax; each frequency has
    std ≤ 0.5/√1e5 = 1.6e-3, tolerance 0.01 > 6 std."""
    lik = Categorical()
    out = _outputs((2, 4), seed=5)
    gen = torch.Generator().manual_seed(0)
    ys = lik.sample(out, gen, samples=100_000)
    assert ys.shape == (100_000, 2) and ys.dtype == torch.long
    freq = torch.stack([F.one_hot(ys[:, i], 4).to(DT).mean(0) for i in range(2)])
    torch.testing.assert_close(freq, torch.softmax(out, -1), rtol=0, atol=0.01)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", NAMES)
def test_sampling_uses_only_the_given_generator(name: str) -> None:
    lik = get_likelihood(name)
    out = _outputs((4, 3, 5))
    torch.manual_seed(0)
    a = lik.sample(out, torch.Generator().manual_seed(42), samples=3)
    torch.manual_seed(999)
    _ = torch.rand(17)  # move the global RNG
    b = lik.sample(out, torch.Generator().manual_seed(42), samples=3)
    assert torch.equal(a, b)
    # the global RNG is neither read nor advanced
    state = torch.get_rng_state()
    lik.sample(out, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    # the generator does advance: successive draws differ
    gen = torch.Generator().manual_seed(7)
    assert not torch.equal(lik.sample(out, gen, samples=2), lik.sample(out, gen, samples=2))
    with pytest.raises(TypeError, match="Generator"):
        lik.sample(out, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_sample_shapes_dtypes_and_detached(name: str) -> None:
    lik = get_likelihood(name)
    out = _outputs((4, 3, 5)).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    one = lik.sample(out, gen)
    many = lik.sample(out, gen, samples=6)
    single = lik.sample(out, gen, samples=1)
    batch = (4, 3) if name == "categorical" else (4, 3, 5)
    assert one.shape == batch
    assert many.shape == (6, *batch)
    assert single.shape == (1, *batch)
    for t in (one, many):
        assert not t.requires_grad and t.grad_fn is None
    if name == "categorical":
        assert one.dtype == torch.long and int(many.min()) >= 0 and int(many.max()) < 5
    else:
        assert one.dtype == DT
    # drawn targets are valid inputs for the loss
    assert torch.isfinite(lik.loss(out, one))
    with pytest.raises(ValueError):
        lik.sample(out, gen, samples=0)


def test_samples_k_are_k_single_draws_in_order() -> None:
    """samples=k stacks draws along a new leading dimension, one per draw (independent
    across the k slots): the per-slot empirical means are all close to f."""
    lik = Gaussian()
    f = _outputs((2,), seed=1)
    draws = lik.sample(f, torch.Generator().manual_seed(3), samples=4000)
    assert draws.shape == (4000, 2)
    assert draws.std(0).sub(1.0).abs().max() < 0.05  # √(D/2) = 1 for D = 2; std err 0.011


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name: str) -> None:
    lik = get_likelihood(name)
    out64 = _outputs((5, 4))
    out32 = out64.float()
    v = _outputs((5, 4), seed=2)
    assert lik.hessian(out32).dtype == torch.float32
    torch.testing.assert_close(lik.hessian(out32).double(), lik.hessian(out64), rtol=0, atol=1e-6)
    torch.testing.assert_close(lik.hessian_sqrt(out32).double(), lik.hessian_sqrt(out64), rtol=0, atol=1e-6)
    torch.testing.assert_close(lik.hessian_vp(out32, v.float()).double(), lik.hessian_vp(out64, v), rtol=0, atol=1e-5)
    y = _targets(name, out64)
    y32 = y if name == "categorical" else y.float()
    torch.testing.assert_close(lik.loss(out32, y32).double(), lik.loss(out64, y), rtol=1e-6, atol=1e-6)
    assert lik.sample(out32, torch.Generator().manual_seed(0)).dtype == (
        torch.long if name == "categorical" else torch.float32
    )


def test_categorical_numerically_stable_for_huge_logits() -> None:
    lik = Categorical()
    out = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, -5.0]], dtype=torch.float32)
    y = torch.tensor([1, 0])
    for t in (lik.hessian(out), lik.hessian_sqrt(out), lik.per_sample_loss(out, y), lik.loss(out, y)):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(lik.per_sample_loss(out, y), torch.tensor([1e4, 0.6931472]), rtol=1e-6, atol=1e-6)
    h = lik.hessian(out)
    torch.testing.assert_close(h[1], torch.tensor([[0.25, -0.25, 0.0], [-0.25, 0.25, 0.0], [0.0, 0.0, 0.0]]))
    ys = lik.sample(out, torch.Generator().manual_seed(0), samples=50)
    assert (ys[:, 0] == 0).all() and (ys[:, 1] != 2).all()


def test_likelihood_is_abstract() -> None:
    with pytest.raises(TypeError):
        Likelihood()  # type: ignore[abstract]


@pytest.mark.parametrize("lik", [Categorical(), Gaussian()], ids=["categorical", "gaussian"])
def test_rows_of_a_batch_draw_what_the_whole_batch_draws(lik) -> None:
    """Processes holding parts of a batch draw exactly the whole batch's targets (distributed sampling)."""
    out = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = lik.sample(out, torch.Generator().manual_seed(3), samples=2)
    for parts in ([0, 12], [0, 6, 12], [0, 3, 6, 9, 12], [0, 5, 12]):
        pieces = [lik.sample(out[a:b], torch.Generator().manual_seed(3), samples=2, rows=(a, 12)) for a, b in zip(parts, parts[1:])]
        assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert torch.equal(lik.sample(out, torch.Generator().manual_seed(3), samples=2, rows=(0, 12)), whole)
    with pytest.raises(ValueError, match="do not fit"):
        lik.sample(out[:6], torch.Generator().manual_seed(3), rows=(8, 12))
