"""Every estimator against exact curvature built independently with torch.func (float64)."""

from __future__ import annotations

import gc
import itertools
import math
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F

import precond
from precond.curvature.hutchinson import Hutchinson
from precond.errors import PipelineError, RecipeError
from precond.likelihood import Categorical, Gaussian

D = torch.float64


def mlp(out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(D)


class SeqModel(nn.Module):
    """Outputs (N, T, C): a per-token linear map after a tanh mixing layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(3, 4).to(D)
        self.b = nn.Linear(4, 3).to(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def data(n: int = 5, seed: int = 2, seq: int | None = None, c: int = 3, gaussian: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, seq, 3) if seq else (n, 3)
    x = torch.randn(*shape, generator=g, dtype=D)
    if gaussian:
        y = torch.randn(*shape[:-1], c, generator=g, dtype=D)
    else:
        y = torch.randint(0, c, shape[:-1], generator=g)
    return x, y


def loss_fn(lik: str):
    if lik == "categorical":
        return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return lambda out, y: F.mse_loss(out, y)


def closure_for(model, x, y, lik="categorical"):
    def closure():
        out = model(x)
        return loss_fn(lik)(out, y), out

    return closure


def flat_params(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = v[i : i + k].reshape(s)
            i += k
        return out

    return flat, unflat


def exact_hessian(model, x, y, lik="categorical"):
    flat, unflat = flat_params(model)
    return hessian(lambda v: loss_fn(lik)(functional_call(model, unflat(v), (x,)), y))(flat)


def exact_ggn(model, x, lik="categorical"):
    """(1/M) Σ_m J_mᵀ H_m J_m with J from jacrev and H_m from torch.func.hessian of the per-sample loss."""
    flat, unflat = flat_params(model)
    out = model(x).detach()
    c = out.shape[-1]
    jac = jacrev(lambda v: functional_call(model, unflat(v), (x,)))(flat).reshape(-1, c, flat.numel())
    outs = out.reshape(-1, c)
    m = outs.shape[0]
    total = torch.zeros(flat.numel(), flat.numel(), dtype=D)
    for i in range(m):
        if lik == "categorical":
            h = hessian(lambda f: -torch.log_softmax(f, -1)[0])(outs[i])  # label-independent for CE
        else:
            h = hessian(lambda f: ((f - 0.3) ** 2).mean())(outs[i])
        total += jac[i].T @ h @ jac[i]
    return total / m


def per_param(vector, model):
    return list(torch.split(vector, [p.numel() for p in model.parameters()]))


# --- full matrices -------------------------------------------------------------------------


def test_exact_hessian_equals_torch_func() -> None:
    model, (x, y) = mlp(), data()
    est = precond.estimate("hessian", model, closure_for(model, x, y), structure="full")
    assert torch.allclose(est, exact_hessian(model, x, y), atol=1e-10, rtol=0)


@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_exact_gauss_newton_equals_explicit_jt_h_j(lik: str) -> None:
    model = mlp()
    x, y = data(gaussian=lik == "gaussian")
    est = precond.estimate("gauss_newton", model, closure_for(model, x, y, lik), structure="full", likelihood=lik)
    ref = exact_ggn(model, x, lik)
    assert ref.abs().max() > 1e-3
    assert torch.allclose(est, ref, atol=1e-10, rtol=0)


def test_gauss_newton_for_sequence_outputs() -> None:
    model = SeqModel()
    x, y = data(n=2, seq=3)
    est = precond.estimate("gauss_newton", model, closure_for(model, x, y), structure="full")
    assert torch.allclose(est, exact_ggn(model, x), atol=1e-10, rtol=0)


def test_gauss_newton_of_linear_least_squares_is_xtx() -> None:
    """Closed form: for f = Xw and the mean squared error, the GGN is the Hessian 2 XᵀX / (N·D)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 1, bias=False).to(D)
    x, _ = data(n=7)
    x = torch.cat([x, x[:, :1]], dim=1)
    y = torch.randn(7, 1, dtype=D)
    est = precond.estimate("gauss_newton", lin, closure_for(lin, x, y, "gaussian"), structure="full", likelihood="gaussian")
    assert torch.allclose(est, 2 * x.T @ x / 7, atol=1e-12, rtol=0)
    assert torch.allclose(est, exact_hessian(lin, x, y, "gaussian"), atol=1e-12, rtol=0)


def enumerate_expectation(monkeypatch, model, x, y, structure, **options):
    """E over all label vectors (each sample's label drawn from softmax) of the sampled-Fisher estimate."""
    probs = torch.softmax(model(x).detach(), -1)
    m, c = probs.shape
    total = None
    for labels in itertools.product(range(c), repeat=m):
        lab = torch.tensor(labels)
        weight = torch.prod(probs[torch.arange(m), lab])
        monkeypatch.setattr(Categorical, "sample", lambda self, out, gen, samples=None, lab=lab: lab.unsqueeze(0))
        est = precond.estimate("sampled_fisher", model, closure_for(model, x, y), structure=structure, **options)
        est = est if structure == "full" else torch.cat([v.reshape(-1) for v in est.values()])
        total = weight * est if total is None else total + weight * est
    return total


@pytest.mark.parametrize("form", ["batch", "per_sample"])
def test_sampled_fisher_expectation_equals_ggn_for_softmax(monkeypatch, form: str) -> None:
    model, (x, y) = mlp(), data(n=3)
    expected = enumerate_expectation(monkeypatch, model, x, y, "full", form=form)
    assert torch.allclose(expected, exact_ggn(model, x), atol=1e-12, rtol=0)


def test_sampled_fisher_diagonal_expectation_equals_ggn_diagonal(monkeypatch) -> None:
    model, (x, y) = mlp(), data(n=3)
    expected = enumerate_expectation(monkeypatch, model, x, y, "diagonal")
    assert torch.allclose(expected, torch.diagonal(exact_ggn(model, x)), atol=1e-12, rtol=0)


def test_per_sample_empirical_fisher_is_mean_of_outer_products() -> None:
    model, (x, y) = mlp(), data()
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(rows)
    ref = g.T @ g / len(rows)
    est = precond.estimate("empirical_fisher", model, closure_for(model, x, y), structure="full", form="per_sample")
    assert torch.allclose(est, ref, atol=1e-12, rtol=0)
    diag = precond.estimate("empirical_fisher", model, closure_for(model, x, y), form="per_sample")
    assert torch.allclose(torch.cat([v.reshape(-1) for v in diag.values()]), torch.diagonal(ref), atol=1e-12, rtol=0)
    batch = precond.estimate("empirical_fisher", model, closure_for(model, x, y), structure="full")
    gbar = g.mean(0)
    assert torch.allclose(batch, torch.outer(gbar, gbar), atol=1e-12, rtol=0)


# --- diagonals ------------------------------------------------------------------------------


@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_exact_diagonals(lik: str) -> None:
    model = mlp()
    x, y = data(gaussian=lik == "gaussian")
    cl = closure_for(model, x, y, lik)
    ggn = precond.estimate("gauss_newton", model, cl, likelihood=lik)
    hes = precond.estimate("hessian", model, cl, likelihood=lik)
    assert list(ggn) == [n for n, _ in model.named_parameters()]
    for (name, p), g, h in zip(model.named_parameters(), per_param(torch.diagonal(exact_ggn(model, x, lik)), model),
                               per_param(torch.diagonal(exact_hessian(model, x, y, lik)), model)):
        assert ggn[name].shape == p.shape
        assert torch.allclose(ggn[name].reshape(-1), g, atol=1e-12, rtol=0)
        assert torch.allclose(hes[name].reshape(-1), h, atol=1e-12, rtol=0)


def tiny_quadratic_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh(), nn.Linear(2, 1, bias=False)).to(D)


def test_hutchinson_over_all_sign_vectors_is_exact(monkeypatch) -> None:
    model = tiny_quadratic_model()
    x, _ = data(n=4)
    x = x[:, :2]
    y = torch.randn(4, 1, dtype=D)
    n = sum(p.numel() for p in model.parameters())
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=D)  # (2^n, n)

    def all_signs(self, params, generator):
        return [s.reshape(len(signs), *p.shape) for s, p in zip(torch.split(signs, [p.numel() for p in params], 1), params)]

    monkeypatch.setattr(Hutchinson, "draw_probes", all_signs)
    est = precond.estimate("hutchinson", model, closure_for(model, x, y, "gaussian"), likelihood="gaussian", samples=len(signs))
    ref = torch.diagonal(exact_hessian(model, x, y, "gaussian"))
    assert ref.abs().min() > 1e-4
    assert torch.allclose(torch.cat([v.reshape(-1) for v in est.values()]), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_to_the_hessian_diagonal(distribution: str) -> None:
    model, (x, y) = mlp(), data()
    est = precond.estimate("hutchinson", model, closure_for(model, x, y), samples=20000, distribution=distribution)
    ref = torch.diagonal(exact_hessian(model, x, y))
    got = torch.cat([v.reshape(-1) for v in est.values()])
    # the estimator's standard deviation is ~sqrt(Σ_j H_ij²)/sqrt(samples); 5 sigma
    h = exact_hessian(model, x, y)
    sigma = (h.pow(2).sum(1) * (2 if distribution == "gaussian" else 1)).sqrt() / math.sqrt(20000)
    assert ((got - ref).abs() <= 5 * sigma + 1e-12).all()
    assert not torch.allclose(got, ref, atol=1e-9)  # really stochastic


def test_sampled_fisher_converges_to_ggn_diagonal() -> None:
    model, (x, y) = mlp(), data()
    est = precond.estimate("sampled_fisher", model, closure_for(model, x, y), samples=20000, form="per_sample")
    got = torch.cat([v.reshape(-1) for v in est.values()])
    ref = torch.diagonal(exact_ggn(model, x))
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    mc = precond.estimate("gauss_newton", model, closure_for(model, x, y), mc_samples=20000)
    got = torch.cat([v.reshape(-1) for v in mc.values()])
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_hutchinson_spatial_averaging_and_abs() -> None:
    """Kernel averaging replaces each entry by the mean |z ⊙ Hz| of its k×k kernel; blocks likewise."""
    h = Hutchinson(abs=True, average="kernel")
    d = torch.arange(2 * 3 * 2 * 2, dtype=D).reshape(1, 2, 3, 2, 2) - 5  # (samples, out, in, kh, kw)
    avg = h._average(d)
    assert torch.allclose(avg[0, 1, 2], d[0, 1, 2].mean().expand(2, 2))
    assert not torch.allclose(avg[0, 1, 2], avg[0, 0, 0])
    vec = torch.arange(5, dtype=D).reshape(1, 5)
    assert torch.equal(h._average(vec), vec)  # 1-D: no averaging
    b = Hutchinson(average="block", block_size=2)._average(torch.tensor([[1.0, 3.0, 5.0, 7.0, 10.0]], dtype=D))
    assert torch.equal(b, torch.tensor([[2.0, 2.0, 6.0, 6.0, 10.0]], dtype=D))


# --- plumbing -------------------------------------------------------------------------------


def test_estimators_do_not_touch_the_global_rng_and_are_seeded() -> None:
    model, (x, y) = mlp(), data()
    state = torch.get_rng_state()
    a = precond.estimate("hutchinson", model, closure_for(model, x, y), seed=5)
    b = precond.estimate("hutchinson", model, closure_for(model, x, y), seed=5)
    c = precond.estimate("hutchinson", model, closure_for(model, x, y), seed=6)
    s = precond.estimate("sampled_fisher", model, closure_for(model, x, y), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in s.values())


def test_structure_pairs_are_refused_with_what_works() -> None:
    model, (x, y) = mlp(), data()
    with pytest.raises(PipelineError, match="cannot fill a 'full' structure; it fills: diagonal"):
        precond.estimate("hutchinson", model, closure_for(model, x, y), structure="full")
    with pytest.raises(RecipeError, match="did you mean 'hessian'"):
        precond.estimate("hessain", model, closure_for(model, x, y))
    with pytest.raises(RecipeError, match="samples"):
        precond.estimate("hutchinson", model, closure_for(model, x, y), samples=0)


def test_hessian_refuses_large_models() -> None:
    model, (x, y) = mlp(), data()
    with pytest.raises(PipelineError, match="max_params=10"):
        precond.estimate("hessian", model, closure_for(model, x, y), max_params=10)


def test_estimators_need_outputs_and_likelihood() -> None:
    model, (x, y) = mlp(), data()
    with pytest.raises(PipelineError, match="outputs"):
        precond.estimate("gauss_newton", model, lambda: F.cross_entropy(model(x), y))
    with pytest.raises(PipelineError, match="likelihood='categorical'"):
        precond.estimate("sampled_fisher", model, closure_for(model, x, y), likelihood=None)


def test_the_graph_is_freed_after_a_step() -> None:
    """create_graph leaks are the most reported AdaHessian bug: nothing may keep the graph alive."""
    model, (x, y) = mlp(), data()
    opt = precond.build("adahessian", model)
    refs = []

    def closure():
        out = model(x)
        refs.append(weakref.ref(out))
        return F.cross_entropy(out, y), out

    for _ in range(3):
        opt.step(closure)
    gc.collect()
    assert all(r() is None for r in refs)
    assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in model.parameters())


def test_parameters_outside_the_graph_get_zero_curvature() -> None:
    """An unused parameter: zero rows and columns, in batched products too."""
    model = mlp()
    unused = nn.Parameter(torch.ones(2, dtype=D))
    model.register_parameter("unused", unused)
    x, y = data()
    cl = closure_for(model, x, y)
    params = list(model.parameters())
    start = sum(p.numel() for p in params[: [i for i, p in enumerate(params) if p is unused][0]])
    rows = slice(start, start + 2)
    h = precond.estimate("hessian", model, cl, structure="full")
    assert h.abs().sum() > 0
    assert not h[rows].any() and not h[:, rows].any()
    g = precond.estimate("gauss_newton", model, cl, structure="full")
    assert not g[rows].any() and not g[:, rows].any()
