"""Tests for precond.autodiff against independent dense references (float64).

References are built directly from torch.func.hessian / torch.func.jacrev on a
flat-parameter function written here (not with precond.autodiff helpers), and from
torch's own F.cross_entropy / F.mse_loss.
"""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import autodiff as ad
from precond.likelihood import Categorical, Gaussian, get_likelihood

# torch.func.jvp scripts its decompositions on first use, which emits this warning in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
TOL = dict(rtol=0.0, atol=1e-10)
NAMES = ["categorical", "gaussian"]


# --------------------------------------------------------------------------- fixtures / references


def mlp(seed: int = 0, d_in: int = 3, hidden: int = 4, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


def data(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def targets_for(name: str, out_shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "categorical":
        return torch.randint(0, out_shape[-1], out_shape[:-1], generator=g)
    return torch.randn(out_shape, generator=g, dtype=DT)


def torch_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss exactly as a user writes it with torch."""
    if name == "categorical":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.mse_loss(out, y)


def flat_model(model: nn.Module):
    """(theta0, call(theta, x)) over trainable parameters flattened in parameters() order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def call(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        state = {n: c.reshape(p.shape) for (n, p), c in zip(named, chunks)}
        state.update({n: b.clone() for n, b in model.named_buffers()})  # BatchNorm may write to them
        return torch.func.functional_call(model, state, (x,))

    return theta0, call


def dense_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(*out_shape, P)."""
    theta0, call = flat_model(model)
    return torch.func.jacrev(lambda th: call(th, x))(theta0)


def random_vec(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def explicit_ggn(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """(1/M) Σ_m J_mᵀ H_m J_m with H_m = torch.func.hessian of the per-sample loss."""
    lik = get_likelihood(name)
    out = model(x).detach()
    c = out.shape[-1]
    jac = dense_jacobian(model, x).reshape(-1, c, dense_p(model))
    flat_out = out.reshape(-1, c)
    y = targets_for(name, out.shape).reshape(-1, c) if name == "gaussian" else targets_for(name, out.shape).reshape(-1)
    m = flat_out.shape[0]
    g = torch.zeros(dense_p(model), dense_p(model), dtype=DT)
    for i in range(m):
        h = torch.func.hessian(lik.per_sample_loss)(flat_out[i], y[i])  # independent of y for both
        g += jac[i].T @ h @ jac[i]
    return g / m


def dense_p(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- flatten


def test_flatten_unflatten_round_trip() -> None:
    ts = [data((2, 3), 1), data((4,), 2), data((1, 2, 2), 3)]
    v = ad.flatten(ts)
    assert v.shape == (14,)
    back = ad.unflatten(v, ts)
    for a, b in zip(back, ts):
        assert torch.equal(a, b)
    assert back[0].data_ptr() == v.data_ptr()  # views, no copy
    with pytest.raises(ValueError):
        ad.unflatten(v[:-1], ts)
    with pytest.raises(ValueError):
        ad.unflatten(v.reshape(2, 7), ts)


# --------------------------------------------------------------------------- Hessian-vector products


@pytest.mark.parametrize("name", NAMES)
def test_hvp_matches_dense_hessian(name: str) -> None:
    model = mlp()
    x = data((5, 3))
    y = targets_for(name, (5, 3))
    theta0, call = flat_model(model)
    h_ref = torch.func.hessian(lambda th: torch_loss(name, call(th, x), y))(theta0)
    params = list(model.parameters())
    v = random_vec(model, 11)
    hv_ref = h_ref @ ad.flatten(v)

    loss = torch_loss(name, model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv1 = ad.hvp(grads, params, v)  # retain_graph=True: the graph can be reused
    hv2 = ad.hvp(grads, params, [2 * t for t in v], retain_graph=False)
    torch.testing.assert_close(ad.flatten(hv1), hv_ref, **TOL)
    torch.testing.assert_close(ad.flatten(hv2), 2 * hv_ref, **TOL)
    with pytest.raises(RuntimeError):  # retain_graph=False really released it
        ad.hvp(grads, params, v)

    hv3 = ad.hvp_fn(lambda: torch_loss(name, model(x), y), params, v)
    torch.testing.assert_close(ad.flatten(hv3), hv_ref, **TOL)
    # closures returning (loss, outputs) are accepted
    hv4 = ad.hvp_fn(lambda: (torch_loss(name, model(x), y), None), params, v)
    torch.testing.assert_close(ad.flatten(hv4), hv_ref, **TOL)

    h = ad.dense_hessian(lambda: torch_loss(name, model(x), y), params)
    torch.testing.assert_close(h, h_ref, **TOL)

    for t in [*hv1, *hv3, h]:
        assert not t.requires_grad and t.grad_fn is None


class _Holder:
    """What saved-tensor hooks pack: lives exactly as long as the autograd graph."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _hvp_with_tracked_graph(model, x, y, v, leak: list | None):
    holders: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Holder:
        h = _Holder(t)
        holders.append(weakref.ref(h))
        return h

    def unpack(h: _Holder) -> torch.Tensor:
        return h.t

    params = list(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if leak is None:
            out = ad.hvp_fn(lambda: F.cross_entropy(model(x), y), params, v)
        else:  # control: keep the create_graph gradients alive, as a leaky implementation would
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
            out = ad.hvp(grads, params, v)
            leak.append(grads)
    gc.collect()
    return out, holders


def test_hvp_fn_frees_the_graph() -> None:
    model = mlp()
    x, y = data((5, 3)), targets_for("categorical", (5, 3))
    v = random_vec(model, 3)
    out, holders = _hvp_with_tracked_graph(model, x, y, v, leak=None)
    assert len(holders) > 0
    assert all(ref() is None for ref in holders), "hvp_fn left part of the autograd graph alive"
    assert all(not t.requires_grad and t.grad_fn is None for t in out)
    # control: the probe does detect a graph kept alive through create_graph gradients
    leak: list = []
    _, holders_leak = _hvp_with_tracked_graph(model, x, y, v, leak=leak)
    assert any(ref() is not None for ref in holders_leak)
    # (the leaked graph is not collected even after `leak.clear()`: a holder that stores a
    # node's own output forms a cycle through C++ that gc cannot see. This makes the probe
    # stricter than plain autograd, never more lenient.)
    leak.clear()


def test_hvp_unused_and_linear_parameters_give_zeros() -> None:
    a = torch.randn(3, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)  # unused
    c = torch.randn(3, dtype=DT, requires_grad=True)  # enters linearly
    v = [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT), torch.ones(3, dtype=DT)]

    def loss() -> torch.Tensor:
        return (a**3).sum() + (c * 2).sum()

    hv = ad.hvp_fn(loss, [a, b, c], v)
    torch.testing.assert_close(hv[0], 6 * a.detach(), **TOL)
    assert torch.equal(hv[1], torch.zeros(2, dtype=DT)) and torch.equal(hv[2], torch.zeros(3, dtype=DT))
    # a loss linear in every parameter: H = 0
    hv_lin = ad.hvp_fn(lambda: (3 * c).sum(), [c], [torch.ones(3, dtype=DT)])
    assert torch.equal(hv_lin[0], torch.zeros(3, dtype=DT))
    h = ad.dense_hessian(loss, [a, b, c])
    ref = torch.zeros(8, 8, dtype=DT)
    ref[:3, :3] = torch.diag(6 * a.detach())
    torch.testing.assert_close(h, ref, **TOL)
    with pytest.raises(ValueError):
        ad.hvp_fn(loss, [a, b, c], v[:2])
    with pytest.raises(ValueError):
        ad.hvp_fn(loss, [a, b, c], [v[1], v[0], v[2]])


# --------------------------------------------------------------------------- functional model, JVP, VJP


def test_functional_model_matches_module_and_skips_frozen_parameters() -> None:
    model = mlp()
    model[2].bias.requires_grad_(False)
    names, params, fn = ad.functional_model(model)
    assert names == ("0.weight", "0.bias", "2.weight")
    assert all(not p.requires_grad for p in params)
    assert params[0].data_ptr() == model[0].weight.data_ptr()
    x = data((5, 3))
    torch.testing.assert_close(fn(params, x), model(x), rtol=0, atol=0)
    other = tuple(p + 0.1 for p in params)
    ref = mlp()
    with torch.no_grad():
        for p, q in zip([ref[0].weight, ref[0].bias, ref[2].weight], other):
            p.copy_(q)
        ref[2].bias.copy_(model[2].bias)
    torch.testing.assert_close(fn(other, x), ref(x), rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        fn(params[:2], x)


def test_functional_model_does_not_mutate_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT).train()
    x = data((6, 3))
    mean0 = model[1].running_mean.clone()
    v = random_vec(model, 1)
    ad.jvp_outputs(model, x, v)
    ad.vjp_outputs(model, x, data((6, 3), 4))
    gv = ad.ggn_vp(model, x, "categorical", v)
    assert torch.equal(model[1].running_mean, mean0) and int(model[1].num_batches_tracked) == 0
    # still the train-mode (batch statistics) function
    g_ref = explicit_ggn(model, x, "categorical")
    torch.testing.assert_close(ad.flatten(gv), g_ref @ ad.flatten(v), **TOL)


@pytest.mark.parametrize("out_shape", [(5, 3), (2, 4, 3)])
def test_jvp_and_vjp_match_dense_jacobian(out_shape: tuple[int, ...]) -> None:
    model = mlp()
    x = data((*out_shape[:-1], 3))
    jac = dense_jacobian(model, x).reshape(-1, dense_p(model))
    v = random_vec(model, 5)
    out, jv = ad.jvp_outputs(model, x, v)
    assert out.shape == out_shape and jv.shape == out_shape
    torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(jv.reshape(-1), jac @ ad.flatten(v), **TOL)
    u = data(out_shape, 6)
    jtu = ad.vjp_outputs(model, x, u)
    assert [t.shape for t in jtu] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(ad.flatten(jtu), jac.T @ u.reshape(-1), **TOL)
    for t in [out, jv, *jtu]:
        assert not t.requires_grad
    with pytest.raises(ValueError):
        ad.vjp_outputs(model, x, u.reshape(-1))
    with pytest.raises(ValueError):
        ad.jvp_outputs(model, x, v[:-1])


def test_explicit_params_evaluate_elsewhere() -> None:
    model = mlp()
    x = data((5, 3))
    params = [p.detach() * 0.7 + 0.05 for p in model.parameters()]
    moved = mlp()
    with torch.no_grad():
        for p, q in zip(moved.parameters(), params):
            p.copy_(q)
    v = random_vec(model, 9)
    u = data((5, 3), 10)
    for name in NAMES:
        torch.testing.assert_close(
            ad.flatten(ad.ggn_vp(model, x, name, v, params=params)), ad.flatten(ad.ggn_vp(moved, x, name, v)), **TOL
        )
    torch.testing.assert_close(ad.jvp_outputs(model, x, v, params=params)[1], ad.jvp_outputs(moved, x, v)[1], **TOL)
    torch.testing.assert_close(
        ad.flatten(ad.vjp_outputs(model, x, u, params=params)), ad.flatten(ad.vjp_outputs(moved, x, u)), **TOL
    )
    torch.testing.assert_close(ad.dense_ggn(model, x, "gaussian", params=params), ad.dense_ggn(moved, x, "gaussian"), **TOL)
    with pytest.raises(ValueError):
        ad.ggn_vp(model, x, "gaussian", v, params=params[:1])


# --------------------------------------------------------------------------- Gauss-Newton


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("out_shape", [(5, 3), (2, 4, 3)])
def test_ggn_vp_matches_explicit_sum(name: str, out_shape: tuple[int, ...]) -> None:
    model = mlp()
    x = data((*out_shape[:-1], 3))
    v = random_vec(model, 21)
    g_ref = explicit_ggn(model, x, name)
    gv = ad.ggn_vp(model, x, name, v)
    assert [t.shape for t in gv] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(ad.flatten(gv), g_ref @ ad.flatten(v), **TOL)
    # dense_ggn builds the same matrix
    torch.testing.assert_close(ad.dense_ggn(model, x, get_likelihood(name)), g_ref, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_ggn_uses_the_hessian_of_torchs_batch_mean_loss(name: str) -> None:
    """G = Jᵀ (∇²_f L) J with L = F.cross_entropy(out.reshape(-1, C), y.reshape(-1)) or
    F.mse_loss over the whole (N, T, C) output: fixes the 1/(N·T) normalisation."""
    model = mlp()
    x = data((2, 4, 3))
    out = model(x).detach()
    y = targets_for(name, out.shape)
    h_out = torch.func.hessian(lambda f: torch_loss(name, f, y))(out).reshape(out.numel(), out.numel())
    jac = dense_jacobian(model, x).reshape(out.numel(), -1)
    v = random_vec(model, 4)
    ref = jac.T @ h_out @ jac @ ad.flatten(v)
    torch.testing.assert_close(ad.flatten(ad.ggn_vp(model, x, name, v)), ref, **TOL)


def test_ggn_equals_hessian_for_linear_least_squares() -> None:
    torch.manual_seed(3)
    model = nn.Linear(4, 2).to(DT)
    x = data((7, 4))
    y = targets_for("gaussian", (7, 2))
    g = ad.dense_ggn(model, x, "gaussian")
    h = ad.dense_hessian(lambda: F.mse_loss(model(x), y), list(model.parameters()))
    torch.testing.assert_close(g, h, **TOL)
    # the block of the first output row's weights is (2/(N·D)) Σ_n x_n x_nᵀ, N = 7, D = 2
    torch.testing.assert_close(g[0:4, 0:4], (2.0 / 14) * x.T @ x, **TOL)


def test_ggn_with_dropout_uses_one_mask() -> None:
    """In training mode dropout draws a mask per forward; ggn_vp runs two forwards (jvp, vjp)
    and must replay the RNG so both see the same mask, otherwise G = J₁ᵀ H J₂ is not
    symmetric. Also: the global RNG advances as if by one forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    x = data((5, 3))
    u, v = random_vec(model, 1), random_vec(model, 2)
    torch.manual_seed(123)
    gv = ad.flatten(ad.ggn_vp(model, x, "categorical", v))
    torch.manual_seed(123)
    gu = ad.flatten(ad.ggn_vp(model, x, "categorical", u))
    asym = (ad.flatten(u) @ gv - ad.flatten(v) @ gu).abs()
    assert asym < 1e-12 * max(1.0, float(gv.norm() * gu.norm()))
    # same mask as a single plain forward from the same seed
    torch.manual_seed(123)
    model(x)
    after_forward = torch.get_rng_state()
    torch.manual_seed(123)
    ad.ggn_vp(model, x, "categorical", v)
    assert torch.equal(torch.get_rng_state(), after_forward)


# --------------------------------------------------------------------------- per-sample gradients


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_grads_match_loop(name: str) -> None:
    model = mlp()
    x = data((5, 3))
    y = targets_for(name, (5, 3))
    lik = get_likelihood(name)
    psg = ad.per_sample_grads(model, lik.per_sample_loss, x, y)
    assert [t.shape for t in psg] == [(5, *p.shape) for p in model.parameters()]
    params = list(model.parameters())
    for n in range(5):
        loss_n = lik.per_sample_loss(model(x[n : n + 1])[0], y[n])
        ref = torch.autograd.grad(loss_n, params)
        for a, b in zip(psg, ref):
            torch.testing.assert_close(a[n], b, **TOL)
    # their mean is the gradient of the batch-mean loss
    batch = torch.autograd.grad(torch_loss(name, model(x), y), params)
    for a, b in zip(psg, batch):
        torch.testing.assert_close(a.mean(0), b, **TOL)
    assert all(not t.requires_grad for t in psg)


def test_per_sample_grads_sequence_with_likelihood() -> None:
    """With a likelihood as loss, per-sequence loss = mean over its tokens, so the mean over
    sequences is the gradient of F.cross_entropy over all N·T tokens."""
    model = mlp()
    x = data((4, 6, 3))
    y = targets_for("categorical", (4, 6, 3))
    psg = ad.per_sample_grads(model, "categorical", x, y)
    params = list(model.parameters())
    batch = torch.autograd.grad(torch_loss("categorical", model(x), y), params)
    for a, b in zip(psg, batch):
        assert a.shape[0] == 4
        torch.testing.assert_close(a.mean(0), b, **TOL)
    ref1 = torch.autograd.grad(F.cross_entropy(model(x[1]), y[1]), params)
    for a, b in zip(psg, ref1):
        torch.testing.assert_close(a[1], b, **TOL)


# --------------------------------------------------------------------------- GGN == Fisher


def test_ggn_equals_label_enumerated_fisher_for_softmax() -> None:
    """(1/N) Σ_n Σ_c p_nc g_nc g_ncᵀ, g_nc = per-sample gradient with label c, equals the GGN."""
    model = mlp()
    x = data((5, 3))
    lik = Categorical()
    p = torch.softmax(model(x).detach(), -1)
    n_cls = p.shape[-1]
    fisher = torch.zeros(dense_p(model), dense_p(model), dtype=DT)
    for c in range(n_cls):
        g = ad.per_sample_grads(model, lik.per_sample_loss, x, torch.full((5,), c))
        g = torch.cat([t.reshape(5, -1) for t in g], 1)  # (N, P)
        fisher += (g * p[:, c : c + 1]).T @ g
    fisher /= 5
    torch.testing.assert_close(fisher, ad.dense_ggn(model, x, lik), **TOL)


def test_scaled_outer_product_of_sampled_batch_gradient_is_unbiased_for_ggn() -> None:
    """Sophia's GNB estimator: ĝ = ∇ (1/N) Σ_n ℓ(f_n, ŷ_n) with ŷ_n ~ softmax(f_n);
    E[N · ĝ ĝᵀ] = GGN, checked exactly by enumerating every label tuple (3^3 = 27)."""
    model = mlp()
    x = data((3, 3))
    lik = Categorical()
    p = torch.softmax(model(x).detach(), -1)
    per_label = []
    for c in range(3):
        g = ad.per_sample_grads(model, lik, x, torch.full((3,), c))
        per_label.append(torch.cat([t.reshape(3, -1) for t in g], 1))
    per_label_t = torch.stack(per_label, 1)  # (N, C, P)
    expect = torch.zeros(dense_p(model), dense_p(model), dtype=DT)
    for labels in itertools.product(range(3), repeat=3):
        prob = torch.prod(torch.stack([p[n, c] for n, c in enumerate(labels)]))
        g_hat = torch.stack([per_label_t[n, c] for n, c in enumerate(labels)]).mean(0)
        expect += prob * torch.outer(g_hat, g_hat)
    torch.testing.assert_close(3 * expect, ad.dense_ggn(model, x, lik), **TOL)


def test_gaussian_ggn_is_two_over_nd_jtj() -> None:
    model = mlp()
    x = data((5, 3))
    jac = dense_jacobian(model, x).reshape(15, -1)
    torch.testing.assert_close(ad.dense_ggn(model, x, Gaussian()), (2.0 / 15) * jac.T @ jac, **TOL)


def test_float32_ggn_vp_runs_and_agrees() -> None:
    model64 = mlp()
    model32 = mlp().float()
    x = data((5, 3))
    v = random_vec(model64, 3)
    g64 = ad.flatten(ad.ggn_vp(model64, x, "categorical", v))
    g32 = ad.flatten(ad.ggn_vp(model32, x.float(), "categorical", [t.float() for t in v]))
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)


def test_dense_hessian_falls_back_to_row_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """If batched double backward is unavailable, rows are computed one by one: same matrix."""
    model = mlp()
    x, y = data((5, 3)), targets_for("categorical", (5, 3))
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    batched = ad.dense_hessian(loss, params)
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    torch.testing.assert_close(ad.dense_hessian(loss, params), batched, **TOL)
