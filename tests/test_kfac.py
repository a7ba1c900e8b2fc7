"""K-FAC (structure kronecker, factors: layer) against factors built by hand, exact curvature blocks,
closed-form damping, a transcription of alecwangcq's K-FAC step, and its failure modes (float64)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn import functional as F

import precond
from precond.errors import PipelineError
from precond.likelihood import Categorical
from precond.linalg.spectral import EighFailureError

D = torch.float64


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(D)


def batch(n: int = 8, seed: int = 1, d: int = 4, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


def ce_closure(model, x, y):
    def closure():
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), out

    return closure


def with_ones(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def block_index(model: nn.Module, layer: nn.Module) -> list[int]:
    """Positions of ``[W | b]`` flattened row-major inside the flat vector of ``model.parameters()``."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[p] = start
        start += p.numel()
    w = layer.weight
    d_out, d_in = w.shape[0], w[0].numel()
    idx = []
    for i in range(d_out):
        idx += [offsets[w] + i * d_in + j for j in range(d_in)]
        if layer.bias is not None:
            idx.append(offsets[layer.bias] + i)
    return idx


# --- factors ------------------------------------------------------------------------------------


class Seq(nn.Module):
    """Outputs (N, T, C): a Linear on 3-D input (the sequence dimension is folded into the batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(4, 6).to(D)
        self.b = nn.Linear(6, 3).to(D)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_linear_factors_equal_hand_built_factors_with_folded_sequence_dims() -> None:
    model = Seq()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 4, generator=g, dtype=D)  # N=3, T=4: R = M = 12 rows
    y = torch.randint(0, 3, (3, 4), generator=g)
    # by hand: inputs and output gradients of the mean loss, with an independent forward pass
    s1 = x @ model.a.weight.T + model.a.bias
    h = torch.tanh(s1)
    s2 = h @ model.b.weight.T + model.b.bias
    loss = F.cross_entropy(s2.reshape(-1, 3), y.reshape(-1))
    g1, g2 = torch.autograd.grad(loss, [s1, s2], retain_graph=True)
    m = 12
    ref = {
        "a": (with_ones(x.reshape(-1, 4)).T @ with_ones(x.reshape(-1, 4)) / m, m * g1.reshape(-1, 6).T @ g1.reshape(-1, 6)),
        "b": (with_ones(h.reshape(-1, 6)).T @ with_ones(h.reshape(-1, 6)) / m, m * g2.reshape(-1, 3).T @ g2.reshape(-1, 3)),
    }
    est = precond.estimate("empirical_fisher", model, ce_closure(model, x, y), structure="kronecker")
    assert set(est) == {"a", "b"}
    for name, (a, gg) in ref.items():
        assert torch.allclose(est[name][0], a.detach(), atol=1e-12, rtol=0)
        assert torch.allclose(est[name][1], gg.detach(), atol=1e-12, rtol=0)
    # sampled Fisher: the same with the gradient at labels drawn from the model (same generator)
    labels = Categorical().sample(s2.detach(), torch.Generator().manual_seed(11), samples=1)[0]
    loss_s = F.cross_entropy(s2.reshape(-1, 3), labels.reshape(-1))
    h1, h2 = torch.autograd.grad(loss_s, [s1, s2])
    est = precond.estimate("sampled_fisher", model, ce_closure(model, x, y), structure="kronecker", seed=11)
    assert torch.allclose(est["a"][1], m * h1.reshape(-1, 6).T @ h1.reshape(-1, 6), atol=1e-12, rtol=0)
    assert torch.allclose(est["b"][1], m * h2.reshape(-1, 3).T @ h2.reshape(-1, 3), atol=1e-12, rtol=0)
    assert torch.allclose(est["b"][0], ref["b"][0].detach(), atol=1e-12, rtol=0)


class ConvNet(nn.Module):
    def __init__(self, **conv) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, **conv).to(D)
        self.head = nn.LazyLinear(4).to(D)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def patches_by_hand(x: torch.Tensor, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """One row per example and output location: the receptive field, channel-major, with explicit loops."""
    xp = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    n, c, hh, ww = xp.shape
    oh, ow = (hh - dh * (kh - 1) - 1) // sh + 1, (ww - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                rows.append(torch.stack([xp[b, ch, i * sh + u * dh, j * sw + v * dw] for ch in range(c) for u in range(kh) for v in range(kw)]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "conv, pad",
    [
        ({"stride": 2, "padding": 1, "dilation": 1}, (1, 1, 1, 1)),
        ({"stride": 1, "padding": 0, "dilation": 2}, (0, 0, 0, 0)),
        ({"padding": "same", "padding_mode": "reflect"}, (1, 1, 1, 1)),
    ],
)
def test_conv2d_factors_equal_hand_built_kfc_factors(conv, pad) -> None:
    model = ConvNet(**conv)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 6, 6, generator=g, dtype=D)
    y = torch.randint(0, 4, (3,), generator=g)
    model(x)  # materialise the lazy head
    out = model.conv(x)
    s = out.detach().requires_grad_(True)
    loss = F.cross_entropy(model.head(torch.tanh(s).flatten(1)), y)
    (gs,) = torch.autograd.grad(loss, s)
    rows = with_ones(patches_by_hand(x, model.conv, pad))
    locations = out.shape[2] * out.shape[3]
    assert rows.shape[0] == 3 * locations
    a_ref = rows.T @ rows / rows.shape[0]  # E over examples and locations
    g_rows = gs.permute(0, 2, 3, 1).reshape(-1, 3)
    g_ref = 3 * g_rows.T @ g_rows  # M * sum over examples and locations (KFC's |T| in G)
    est = precond.estimate("empirical_fisher", model, ce_closure(model, x, y), structure="kronecker")
    a, gg = est["conv"]
    assert a.shape == (2 * 9 + 1, 2 * 9 + 1)
    assert torch.allclose(a, a_ref, atol=1e-12, rtol=0)
    assert torch.allclose(gg, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("estimator", ["gauss_newton", "empirical_fisher"])
def test_one_data_point_kron_equals_the_exact_layer_block(estimator: str) -> None:
    model = mlp()
    x, y = batch(n=1)
    closure = ce_closure(model, x, y)
    full = precond.estimate(estimator, model, closure, structure="full", **({"form": "per_sample"} if estimator == "empirical_fisher" else {}))
    factors = precond.estimate(estimator, model, closure, structure="kronecker")
    for name in ("0", "2"):
        a, g = factors[name]
        idx = block_index(model, model[int(name)])
        block = full[idx][:, idx]
        assert block.abs().max() > 1e-3
        assert torch.allclose(torch.kron(g, a), block, atol=1e-12, rtol=0)


def test_kflr_equals_block_diagonal_ggn_of_a_deep_linear_network() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)).to(D)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(7, 3, generator=g, dtype=D), torch.randn(7, 2, generator=g, dtype=D)

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    # the GGN (1/M) Σ J_mᵀ H J_m with J from torch.func and H the Hessian of the per-sample loss
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    jac = jacrev(lambda v: functional_call(model, unflat(v), (x,)))(flat)  # (N, C, P)
    h = hessian(lambda f: ((f - 0.1) ** 2).mean())(torch.zeros(2, dtype=D))
    ggn = sum(jac[i].T @ h @ jac[i] for i in range(7)) / 7
    est = precond.estimate("gauss_newton", model, closure, structure="kronecker", likelihood="gaussian")
    for i in (0, 1, 2):
        a, gg = est[str(i)]
        idx = block_index(model, model[i])
        assert torch.allclose(torch.kron(gg, a), ggn[idx][:, idx], atol=1e-12, rtol=0)


# --- one preconditioned step: damping forms against closed forms ----------------------------------


def one_step(structure: dict, transform: dict, model=None, x=None, y=None):
    """Δθ / lr for one plain step with this-step factors (accumulate none) from the exact GGN."""
    model = model or mlp()
    x, y = (x, y) if x is not None else batch()
    before = [p.detach().clone() for p in model.parameters()]
    recipe = {
        "name": "t",
        "lr": 0.5,
        "curvature": {"type": "gauss_newton"},
        "structure": {"type": "kronecker", "factors": "layer", "accumulate": "none", **structure},
        "transform": transform,
    }
    opt = precond.build(recipe, model, likelihood="categorical")
    factors = precond.estimate("gauss_newton", model, ce_closure(model, x, y), structure="kronecker")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step(ce_closure(model, x, y))
    steps = [(b - p.detach()) / 0.5 for b, p in zip(before, model.parameters())]
    return model, factors, grads, steps


def as_v(model, layer_idx, tensors):
    return torch.cat([tensors[2 * layer_idx], tensors[2 * layer_idx + 1][:, None]], dim=1)


def test_exact_damping_equals_solve_with_the_damped_kronecker_product() -> None:
    lam = 0.3
    model, factors, grads, steps = one_step({"damping_form": "exact"}, {"type": "inverse", "damping": lam})
    for k, name in enumerate(("0", "2")):
        a, g = (f.numpy() for f in factors[name])
        v = as_v(model, k, grads).numpy()
        ref = np.linalg.solve(np.kron(g, a) + lam * np.eye(a.shape[0] * g.shape[0]), v.reshape(-1)).reshape(v.shape)
        assert np.abs(as_v(model, k, steps).numpy() - ref).max() < 1e-10


def test_exact_inverse_root_on_a_kronecker_product_uses_its_eigenvalues() -> None:
    lam = 0.2
    model, factors, grads, steps = one_step({"damping_form": "exact"}, {"type": "inverse_root", "p": 2, "damping": lam})
    for k, name in enumerate(("0", "2")):
        a, g = (f.numpy() for f in factors[name])
        w, q = np.linalg.eigh(np.kron(g, a))
        root = q @ np.diag((np.clip(w, 0, None) + lam) ** -0.5) @ q.T
        v = as_v(model, k, grads).numpy()
        assert np.abs(as_v(model, k, steps).numpy() - (root @ v.reshape(-1)).reshape(v.shape)).max() < 1e-10


def test_factored_damping_equals_the_pi_adjusted_closed_form() -> None:
    lam = 0.05
    model, factors, grads, steps = one_step({"damping_form": "factored"}, {"type": "inverse", "damping": lam})
    for k, name in enumerate(("0", "2")):
        a, g = (f.numpy() for f in factors[name])
        pi = math.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        damped = np.kron(g + math.sqrt(lam) / pi * np.eye(g.shape[0]), a + pi * math.sqrt(lam) * np.eye(a.shape[0]))
        v = as_v(model, k, grads).numpy()
        ref = np.linalg.solve(damped, v.reshape(-1)).reshape(v.shape)
        assert np.abs(as_v(model, k, steps).numpy() - ref).max() < 1e-10
        exact = np.linalg.solve(np.kron(g, a) + lam * np.eye(a.shape[0] * g.shape[0]), v.reshape(-1)).reshape(v.shape)
        assert np.abs(ref - exact).max() > 1e-4  # the forms differ


def test_per_factor_damping_damps_each_factor() -> None:
    lam = 0.1
    model, factors, grads, steps = one_step({"damping_form": "per_factor"}, {"type": "inverse", "damping": lam})
    for k, name in enumerate(("0", "2")):
        a, g = (f.numpy() for f in factors[name])
        v = as_v(model, k, grads).numpy()
        ref = np.linalg.solve(g + lam * np.eye(g.shape[0]), v) @ np.linalg.inv(a + lam * np.eye(a.shape[0]))
        assert np.abs(as_v(model, k, steps).numpy() - ref).max() < 1e-10


def test_ekfac_second_moment_is_the_exact_fisher_diagonal_in_the_kronecker_eigenbasis() -> None:
    """With one row per sample, w Σ_r (Q_Gᵀg)²(Q_Aᵀa)² is diag(Qᵀ F Q) for the exact per-sample layer block."""
    model = mlp()
    x, y = batch(n=6)
    full = precond.estimate("gauss_newton", model, ce_closure(model, x, y), structure="full")
    recipe = {
        "name": "t",
        "curvature": {"type": "gauss_newton"},
        "structure": {"type": "kronecker", "accumulate": "none", "spectrum": "eigenbasis", "eigenbasis_beta": 0.0,
                      "eigenbasis_bias_correction": False},
        "transform": {"type": "inverse", "damping": 1e-3},
    }
    opt = precond.build(recipe, model, likelihood="categorical")
    opt.step(ce_closure(model, x, y))
    for i in (0, 2):
        st = opt.state[model[i].weight]
        q = torch.kron(st["structure.basis.0.0"], st["structure.basis.0.1"])
        block = full[block_index(model, model[i])][:, block_index(model, model[i])]
        assert torch.allclose(st["structure.moment.0"].reshape(-1), torch.diagonal(q.T @ block @ q), atol=1e-12, rtol=0)


# --- KL clipping --------------------------------------------------------------------------------


def test_kl_clip_scale_by_hand() -> None:
    """g = (1, 2), v = f(C)g = (3, 4), lr = 0.5: lr²⟨v, g⟩ = 2.75, so c = 0.11 gives ν = sqrt(0.04) = 0.2."""
    from precond.block import Direction, GroupStep
    from precond.step.kl_clip import KLClip

    p = torch.zeros(2, dtype=D)
    ctx = GroupStep({"lr": 0.5, "rule": "default"}, [p], [torch.tensor([1.0, 2.0], dtype=D)], [{}], [1], 1, None)  # type: ignore[arg-type]  # no evaluation: KL clipping reads none
    (d,) = KLClip(max_kl=0.11).scale([ctx], [Direction([torch.tensor([3.0, 4.0], dtype=D)])])
    assert d.coef == pytest.approx(0.2, rel=1e-14) and ctx.states[0]["step.kl_scale"] == d.coef
    (d,) = KLClip(max_kl=2.75).scale([ctx], [Direction([torch.tensor([3.0, 4.0], dtype=D)])])
    assert d.coef == 1.0  # at the budget: no clipping
    other = GroupStep({"lr": 0.5, "rule": "fallback"}, [p], [torch.ones(2, dtype=D)], [{}], [1], 1, None)  # type: ignore[arg-type]
    d1, d2 = KLClip(max_kl=0.11).scale([ctx, other], [Direction([torch.tensor([3.0, 4.0], dtype=D)]), Direction([torch.full((2,), 9.0, dtype=D)])])
    assert d1.coef == pytest.approx(0.2, rel=1e-14) and d2.coef == 1.0  # rules' groups are neither measured nor scaled


def test_kl_clipped_step_has_the_budgeted_fisher_norm() -> None:
    lam, c, lr = 1e-2, 1e-4, 0.7
    model = mlp()
    x, y = batch()
    recipe = {
        "name": "t",
        "lr": lr,
        "curvature": {"type": "gauss_newton"},
        "structure": {"type": "kronecker", "accumulate": "none"},
        "transform": {"type": "inverse", "damping": lam},
        "step": {"type": "kl_clip", "max_kl": c},
    }
    factors = precond.estimate("gauss_newton", model, ce_closure(model, x, y), structure="kronecker")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = precond.build(recipe, model, likelihood="categorical")
    opt.step(ce_closure(model, x, y))
    step = [p.detach() - b for p, b in zip(model.parameters(), before)]
    nu = opt.state[model[0].weight]["step.kl_scale"]
    assert 0 < nu < 1
    # the step's squared norm in the damped Kronecker metric is exactly the budget c
    quad, vg = 0.0, 0.0
    for k, name in enumerate(("0", "2")):
        a, g = factors[name]
        s = as_v(model, k, step).reshape(-1)
        quad += float(s @ (torch.kron(g, a) + lam * torch.eye(s.numel(), dtype=D)) @ s)
        vg += float((as_v(model, k, step) * as_v(model, k, grads)).sum())
    assert quad == pytest.approx(c, rel=1e-10)
    # ν by hand from the unclipped natural gradient v = -step / (lr ν)
    vg_unclipped = -vg / (lr * nu)
    assert nu == pytest.approx(math.sqrt(c / (lr**2 * vg_unclipped)), rel=1e-10)
    # a loose budget leaves the step alone
    loose = copy.deepcopy(recipe)
    loose["step"]["max_kl"] = 10 * lr**2 * vg_unclipped
    model2 = mlp()
    opt2 = precond.build(loose, model2, likelihood="categorical")
    opt2.step(ce_closure(model2, x, y))
    assert opt2.state[model2[0].weight]["step.kl_scale"] == 1.0
    for p, b, s in zip(model2.parameters(), before, step):
        assert torch.allclose(p.detach() - b, s / nu, atol=1e-12, rtol=0)


# --- K-FAC as alecwangcq/KFAC-Pytorch computes it (equations: docs/algorithms.md#k-fac) -------------


def kfac_reference(model, batches, steps, lr, damping, decay=0.95, momentum=0.9, kl_clip=1e-3, seed=0):
    """TCov = TInv = 1: factors from I by EMA, eigen damping, KL clip, heavy-ball momentum after."""
    gen = torch.Generator().manual_seed(seed)
    layers = [model[0], model[2]]
    m_aa = {l: torch.eye(l.weight.shape[1] + 1, dtype=D) for l in layers}
    m_gg = {l: torch.eye(l.weight.shape[0], dtype=D) for l in layers}
    buf = {}
    for x, y in batches[:steps]:
        a0 = x
        s0 = a0 @ model[0].weight.T + model[0].bias
        a1 = torch.tanh(s0)
        s1 = a1 @ model[2].weight.T + model[2].bias
        out = s1
        n = x.shape[0]
        sampled = Categorical().sample(out.detach(), gen, samples=1)[0]
        g0, g1 = torch.autograd.grad(F.cross_entropy(out, sampled), [s0, s1], retain_graph=True)
        loss = F.cross_entropy(out, y)
        grads = torch.autograd.grad(loss, [model[0].weight, model[0].bias, model[2].weight, model[2].bias])
        with torch.no_grad():
            stats = {layers[0]: (with_ones(a0), g0), layers[1]: (with_ones(a1), g1)}
            nat, vg_sum = {}, 0.0
            for k, l in enumerate(layers):
                a, g = stats[l]
                m_aa[l] = decay * m_aa[l] + (1 - decay) * (a.T @ a / n)
                m_gg[l] = decay * m_gg[l] + (1 - decay) * (g.T @ g * n)
                da, qa = torch.linalg.eigh(m_aa[l])
                dg, qg = torch.linalg.eigh(m_gg[l])
                da, dg = da * (da > 1e-10), dg * (dg > 1e-10)
                grad_mat = torch.cat([grads[2 * k], grads[2 * k + 1][:, None]], dim=1)
                v1 = qg.T @ grad_mat @ qa
                v2 = v1 / (dg[:, None] * da[None, :] + damping)
                v = qg @ v2 @ qa.T
                nat[l] = v
                vg_sum += float((v * grad_mat * lr**2).sum())
            nu = min(1.0, math.sqrt(kl_clip / vg_sum))
            for k, l in enumerate(layers):
                v = nat[l] * nu
                for p, d_p in ((l.weight, v[:, :-1]), (l.bias, v[:, -1])):
                    if p not in buf:
                        buf[p] = d_p.clone()
                    else:
                        buf[p] = momentum * buf[p] + d_p
                    p -= lr * buf[p]


def test_kfac_recipe_equals_transcribed_alecwangcq_kfac() -> None:
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(16, 4, generator=gen, dtype=D), torch.randint(0, 3, (16,), generator=gen)) for _ in range(6)]
    for lr, damping in ((0.05, 1e-3), (3.0, 0.1)):  # (3.0: the KL clip binds)
        a, b = mlp(), mlp()
        opt = precond.build("kfac", a, likelihood="categorical", lr=lr, set={"transform.0.every": 1, "transform.0.damping": damping})
        for x, y in batches:
            opt.step(ce_closure(a, x, y))
        kfac_reference(b, batches, 6, lr, damping)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0)
        assert (p - mlp().state_dict()["2.bias"]).abs().max() > 1e-3  # it moved


# --- amortised refreshes, hooks, robustness ----------------------------------------------------


def test_hooks_record_only_on_curvature_steps_and_drop_the_records() -> None:
    model = mlp()
    opt = precond.build("kfac", model, likelihood="categorical", set={"curvature.every": 3})
    rt = opt.pipelines["default"].structure.source  # the structure's stage holds its layer source, which owns the hooks
    armed = []
    x, y = batch()

    def closure():
        armed.append(rt.recorder.armed)
        return ce_closure(model, x, y)()

    for k in range(1, 8):
        opt.step(closure)
        assert not rt.recorder.records  # nothing kept after the step
        assert rt.recorder.armed == (k % 3 == 0)  # armed ahead for the next curvature step (a plain loop's forward)
    assert armed == [True, False, False, True, False, False, True]
    assert opt.state[model[0].weight]["structure.updates"] == 3
    # between steps the hooks record only when the next step is a curvature step, and only with gradients on
    with torch.no_grad():
        model(x)
    assert not rt.recorder.records


def test_eigenbases_are_reused_between_refreshes() -> None:
    model = mlp()
    opt = precond.build("kfac", model, likelihood="categorical")
    x, y = batch()
    seen = []
    for step in range(1, 13):
        opt.step(ce_closure(model, x, y))
        st = opt.state[model[0].weight]
        seen.append((st["structure.refreshed.0"], st["structure.basis.0.0"].clone()))
    assert [s for s, _ in seen] == [1] * 10 + [11] * 2
    assert all(torch.equal(seen[0][1], q) for _, q in seen[:10]) and not torch.equal(seen[0][1], seen[10][1])


def test_failed_eigh_keeps_the_previous_preconditioner_and_raises_after_max_failures(monkeypatch) -> None:
    x, y = batch()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 4, generator=gen, dtype=D), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    ref = mlp()
    opt_ref = precond.build("kfac", ref, likelihood="categorical", set={"transform.0.every": 100})  # never refreshes again
    for b in batches:
        opt_ref.step(ce_closure(ref, *b))

    model = mlp()
    opt = precond.build("kfac", model, likelihood="categorical", set={"transform.0.every": 1, "structure.max_failures": 6})
    opt.step(ce_closure(model, *batches[0]))
    real = torch.linalg.eigh

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    for b in batches[1:]:
        opt.step(ce_closure(model, *b))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)  # trained on the step-1 eigenbases, exactly as a run that never refreshed
    st = opt.state[model[0].weight]
    assert st["structure.failures.0"] == 5 and st["structure.failures_total"] == 5
    with pytest.raises(EighFailureError, match="6 times in a row"):
        opt.step(ce_closure(model, *batches[0]))
    monkeypatch.setattr(torch.linalg, "eigh", real)


def test_no_eigenbasis_yet_passes_the_direction_through(monkeypatch) -> None:
    model = mlp()
    recipe = {"name": "t", "lr": 0.1, "curvature": {"type": "sampled_fisher"}, "structure": {"type": "kronecker"},
              "transform": {"type": "inverse", "damping": 1e-3}}
    opt = precond.build(recipe, model, likelihood="categorical")
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x")))
    x, y = batch()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
    opt.step(ce_closure(model, x, y))
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-14, rtol=0)


# --- what users run into -------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.to(D)

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.fc(self.emb(tokens)))))


def test_unsupported_layers_fail_at_build_with_a_rule_suggestion_and_kfac_routes_them() -> None:
    model = Mixed()
    bare = precond.load_recipe("kfac").to_dict()
    bare["rules"] = []
    with pytest.raises(PipelineError, match=r"cannot cover 'emb.weight' \(Embedding.*rules: \[\{name: fallback, match: \{modules: \[Embedding, LayerNorm\]\}"):
        precond.build(bare, model, likelihood="categorical")
    opt = precond.build("kfac", model, likelihood="categorical")
    rules = {p: g["rule"] for g in opt.param_groups for p in g["params"]}
    assert [rules[p] for p in (model.emb.weight, model.norm.weight, model.norm.bias)] == ["fallback"] * 3
    assert [rules[p] for p in (model.fc.weight, model.fc.bias, model.head.weight, model.head.bias)] == ["default"] * 4
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 10, (5, 7), generator=g), torch.randint(0, 3, (5, 7), generator=g)
    losses = [float(opt.step(ce_closure(model, tokens, y))) for _ in range(15)]
    assert losses[-1] < losses[0]


def test_summary_assignment_lists_the_rule_of_every_parameter() -> None:
    from precond.inspect import summarize

    summary = summarize(precond.load_recipe("kfac"), "mlp:4,6,3", steps=1)
    assert summary.assignment == [("0.weight", "Linear", "default"), ("0.bias", "Linear", "default"),
                                  ("2.weight", "Linear", "default"), ("2.bias", "Linear", "default")]


class Functional(nn.Module):
    """Uses ``fc``'s parameters without calling the module: its hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.to(D)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


def test_layers_whose_hooks_never_fire_are_reported_and_step_unpreconditioned() -> None:
    model = Functional()
    recipe = {"name": "t", "lr": 0.1, "curvature": {"type": "sampled_fisher"}, "structure": {"type": "kronecker", "init": 1.0},
              "transform": {"type": "inverse", "damping": 1e-3}}
    opt = precond.build(recipe, model, likelihood="categorical")
    x, y = batch()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = model.fc.weight.detach() - 0.1 * model.fc.weight.grad
    with pytest.warns(RuntimeWarning, match=r"hooks of 'fc' \(Linear\) did not fire"):
        opt.step(ce_closure(model, x, y))
    assert torch.allclose(model.fc.weight, expected, atol=1e-14, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        opt.step(ce_closure(model, x, y))
    assert opt.state[model.head.weight]["structure.updates"] == 2


def test_in_place_activations_after_a_layer_are_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(D)
    opt = precond.build("kfac", model, likelihood="categorical")
    x, y = batch()
    with pytest.raises(PipelineError, match="modified in place"):
        opt.step(ce_closure(model, x, y))


def test_kfac_needs_a_module() -> None:
    model = mlp()
    with pytest.raises(precond.RecipeError, match="pass the nn.Module"):
        precond.build("kfac", list(model.parameters()))
    with pytest.raises(PipelineError, match="cannot fill Kronecker factors 'gradient'"):
        precond.build({"name": "t", "curvature": {"type": "sampled_fisher"}, "structure": {"type": "kronecker", "factors": "gradient"},
                       "transform": {"type": "inverse_root"}}, model)


def test_empirical_kfac_on_a_conv_net_trains() -> None:
    model = ConvNet(padding=1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 2, 6, 6, generator=g, dtype=D), torch.randint(0, 4, (16,), generator=g)
    model(x)
    opt = precond.build("kfac", model, likelihood="categorical", set={"curvature": {"type": "empirical_fisher"}})
    losses = [float(opt.step(ce_closure(model, x, y))) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_hooks_go_away_with_the_optimizer() -> None:
    import gc
    import weakref

    model = mlp()
    opt = precond.build("kfac", model, likelihood="categorical")
    x, y = batch()
    opt.step(ce_closure(model, x, y))
    assert all(len(model[i]._forward_hooks) == 1 for i in (0, 2))
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert all(len(model[i]._forward_hooks) == 0 for i in (0, 2))


@pytest.mark.parametrize("recipe", ["kfac", "kbfgs"])
def test_weight_and_bias_in_different_groups_are_refused(recipe: str) -> None:
    from precond.errors import PipelineError
    from precond.optimizer import Optimizer
    from precond.recipe import resolve

    model = nn.Sequential(nn.Linear(4, 3))
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias]}]
    with pytest.raises(PipelineError, match=r"weight and bias of layer '0' are in different param groups; structure k(ronecker|bfgs) preconditions them together"):
        Optimizer(groups, resolve(recipe), model=model, likelihood="categorical")


def test_unserved_parameters_go_to_the_fallback_whatever_owns_them() -> None:
    """A position embedding registered on the model itself, a LayerNorm and a module type precond has never
    heard of go to the fallback rule without a module list; the Linear layers keep their Kronecker factors."""

    class Scale(nn.Module):  # an unknown module type with a parameter
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(8, dtype=D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4, dtype=D))
            self.fc1, self.norm, self.scale, self.fc2 = nn.Linear(4, 8).double(), nn.LayerNorm(8).double(), Scale(), nn.Linear(8, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.scale(self.norm(torch.tanh(self.fc1(x + self.pos)))))

    net = Net()
    opt = precond.build("kfac", net, likelihood="categorical")
    rules = {opt.param_info[p].name: g["rule"] for g in opt.param_groups for p in g["params"]}
    assert rules == {"pos": "fallback", "fc1.weight": "default", "fc1.bias": "default", "norm.weight": "fallback",
                     "norm.bias": "fallback", "scale.gain": "fallback", "fc2.weight": "default", "fc2.bias": "default"}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 uses it (transformers.pytorch_utils.Conv1D): y = x @ W + b, W (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf, dtype=D))
        self.bias = nn.Parameter(torch.zeros(nf, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def test_hugging_face_conv1d_layers_are_linear_layers_stored_transposed() -> None:
    """K-FAC on GPT-2's Conv1D layers equals K-FAC on the same Linear layers (weights transposed), step for step."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    conv = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7))
    with torch.no_grad():
        for c, l in ((conv[0], linear[0]), (conv[2], linear[2])):
            c.weight.copy_(l.weight.T)
            c.bias.copy_(l.bias)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 5, generator=g, dtype=D), torch.randint(0, 3, (32,), generator=g)
    opts = [precond.build("kfac", m, likelihood="categorical") for m in (linear, conv)]
    assert all(g["rule"] == "default" for g in opts[1].param_groups)  # no layer falls back to Adam
    for _ in range(4):
        for m, opt in zip((linear, conv), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for c, l in ((conv[0], linear[0]), (conv[2], linear[2])):
        torch.testing.assert_close(c.weight, l.weight.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.bias, l.bias, rtol=1e-10, atol=1e-12)
    assert (conv[0].bias.detach() != 0).any()
