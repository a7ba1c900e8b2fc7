"""Structure ``full`` (dense and matrix-free), the Newton family and the step controls around it, against
independent references: closed forms, torch.linalg, scipy.sparse.linalg.cg, explicit Fisher sums (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn import functional as F

import precond
from precond.errors import PipelineError, RecipeError

D = torch.float64


# --- problems -----------------------------------------------------------------------------


class Quadratic(nn.Module):
    """``f(w) = ½ wᵀAw − bᵀw`` over two parameter tensors (a 2x3 matrix and a 2-vector)."""

    def __init__(self, seed: int = 0, n: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(n, n, generator=g, dtype=D)
        self.register_buffer("A", m @ m.T + 0.5 * torch.eye(n, dtype=D))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=D))
        self.w = nn.Parameter(torch.randn(2, 3, generator=g, dtype=D))
        self.v = nn.Parameter(torch.randn(n - 6, generator=g, dtype=D))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.v])

    def loss(self) -> torch.Tensor:
        x = self.flat()
        return 0.5 * x @ self.A @ x - self.b @ x

    def solution(self) -> torch.Tensor:
        return torch.linalg.solve(self.A, self.b)


def newton_recipe(**structure) -> dict:
    return {
        "name": "t",
        "lr": 1.0,
        "curvature": {"type": "hessian"},
        "structure": {"type": "full", **structure},
        "transform": {"type": "inverse"},
    }


def regression(n: int = 40, d: int = 5, out: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, out, generator=g, dtype=D)
    return x, y


def mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(D)


def classification(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def cross_entropy_closure(model, x, y):
    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    return closure


# --- Newton ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "structure",
    [{}, {"method": "cholesky"}, {"solver": "cg", "cg_max_iter": 50}, {"solver": "cg", "cg_stop": "martens", "cg_max_iter": 50}],
    ids=["eigh", "cholesky", "cg", "cg-martens"],
)
def test_newton_solves_a_strictly_convex_quadratic_in_one_step(structure) -> None:
    q = Quadratic()
    opt = precond.build(newton_recipe(**structure), q)
    opt.step(q.loss)
    assert torch.allclose(q.flat(), q.solution(), atol=1e-10, rtol=0)
    assert (q.A @ q.flat() - q.b).abs().max() <= 1e-10


def test_builtin_newton_recipe_on_a_quadratic() -> None:
    q = Quadratic(seed=5)
    precond.build("newton", q).step(q.loss)
    assert (q.A @ q.flat() - q.b).abs().max() <= 1e-10


def test_damped_newton_and_tensor_scope_solve_the_blocks() -> None:
    q = Quadratic(seed=1)
    x0 = q.flat().clone()
    g = q.A @ x0 - q.b
    lam = 0.3
    precond.build(newton_recipe(scope="tensor"), q, set={"transform.0.damping": lam}).step(q.loss)
    # scope tensor: the Hessian blocks of w (6 entries) and v (2 entries), each damped
    expected = x0.clone()
    for sl in (slice(0, 6), slice(6, 8)):
        block = q.A[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=D)
        expected[sl] -= torch.linalg.solve(block, g[sl])
    assert torch.allclose(q.flat(), expected, atol=1e-12, rtol=0)


def test_layer_scope_is_block_diagonal_by_module() -> None:
    model, (x, y) = mlp(), classification()
    closure = cross_entropy_closure(model, x, y)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    lam = 0.5
    h = precond.estimate("hessian", model, closure, structure="full")
    loss = closure()[0]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    sizes = [p.numel() for p in params]
    layer1, layer2 = sum(sizes[:2]), sum(sizes[2:])
    expected = []
    for sl in (slice(0, layer1), slice(layer1, layer1 + layer2)):
        n = sl.stop - sl.start
        expected.append(torch.linalg.solve(h[sl, sl] + lam * torch.eye(n, dtype=D), g[sl]))
    opt = precond.build(newton_recipe(scope="layer"), model, set={"transform.0.damping": lam})
    opt.step(closure)
    step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)])
    assert torch.allclose(step, torch.cat(expected), atol=1e-10, rtol=0)
    with pytest.raises(PipelineError, match="pass the nn.Module"):
        precond.build(newton_recipe(scope="layer"), list(model.parameters())).step(closure)


def test_newton_on_a_flat_loss_does_not_move() -> None:
    """A zero Hessian (and gradient) from a graph that does not reach every parameter: no step, no crash."""
    model, (x, _) = mlp(), classification()
    before = [p.detach().clone() for p in model.parameters()]
    opt = precond.build("newton", model)
    opt.step(lambda: ((model(x) * 0.0).sum(), model(x)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_dense_refuses_large_blocks_and_suggests_cg() -> None:
    model = nn.Linear(80, 80).to(D)  # 6480 parameters
    with pytest.raises(PipelineError, match="solver: cg"):
        precond.build("newton", model)
    precond.build("newton", model, set={"structure.solver": "cg", "curvature.max_params": 10})  # matrix-free is fine
    precond.build("newton", model, set={"structure.scope": "tensor", "structure.max_params": 6400})
    with pytest.raises(PipelineError, match="6400x6400"):
        precond.build("newton", model, set={"structure.scope": "tensor", "structure.max_params": 6000})
    with pytest.raises(RecipeError, match="cannot accumulate"):
        precond.build("newton", model, set={"structure.solver": "cg", "structure.accumulate": "ema"})
    with pytest.raises(RecipeError, match="cannot apply transform 'inverse_root'"):
        precond.build({**newton_recipe(solver="cg"), "transform": {"type": "inverse_root"}}, model)


# --- Gauss-Newton, Hessian-free ------------------------------------------------------------


def test_gauss_newton_solves_linear_least_squares_in_one_step() -> None:
    x, y = regression()
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(D)
    opt = precond.build("gauss_newton", model, likelihood="gaussian")
    opt.step(lambda: (F.mse_loss(model(x), y), model(x)))
    design = torch.cat([x, torch.ones(len(x), 1, dtype=D)], dim=1)
    sol = torch.linalg.lstsq(design, y).solution  # (6, 2): weights then bias
    assert torch.allclose(model.weight.detach(), sol[:5].T, atol=1e-10, rtol=0)
    assert torch.allclose(model.bias.detach(), sol[5], atol=1e-10, rtol=0)


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_hessian_free_with_enough_cg_iterations_equals_newton(curvature) -> None:
    x, y = regression(seed=7)
    torch.manual_seed(1)
    a, b = nn.Linear(5, 2).to(D), None
    b = nn.Linear(5, 2).to(D)
    b.load_state_dict(a.state_dict())
    closure_a = lambda: (F.mse_loss(a(x), y), a(x))  # noqa: E731
    closure_b = lambda: (F.mse_loss(b(x), y), b(x))  # noqa: E731
    precond.build("newton", a).step(closure_a)
    # Hessian-free without damping, with a plain step: the CG solve alone (12 unknowns, 50 iterations)
    hf = precond.build(
        "hessian_free", b, likelihood="gaussian",
        set={"curvature": {"type": curvature}, "transform.0.damping": 0.0, "step": {"type": "lr"}},
    )
    hf.step(closure_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)


def test_cg_solver_equals_scipy_cg_including_warm_start() -> None:
    """Truncated (5 iterations) CG on (H + λI) x = g from the block equals scipy's iterates, cold and warm."""
    q = Quadratic(seed=2, n=20)
    lam, iters, warm = 0.1, 5, 0.95
    opt = precond.build(
        newton_recipe(solver="cg", cg_max_iter=iters, cg_tol=0.0, warm_start=warm), q,
        set={"transform.0.damping": lam},
    )
    a = (q.A + lam * torch.eye(20, dtype=D)).numpy()
    previous = None
    for _ in range(3):
        x0 = q.flat().detach().clone()
        g = (q.A @ x0 - q.b).numpy()
        start = None if previous is None else warm * previous
        ref, _ = spla.cg(a, g, x0=start, rtol=0.0, atol=0.0, maxiter=iters)
        opt.step(q.loss)
        step = (x0 - q.flat().detach()).numpy()
        np.testing.assert_allclose(step, ref, atol=1e-11, rtol=0)
        previous = ref
    state = opt.state[q.w]
    assert state["structure.cg_iterations"] == iters


def test_martens_stop_ends_cg_early() -> None:
    q = Quadratic(seed=4, n=60)
    q.A.copy_(torch.diag(torch.logspace(-3, 3, 60, dtype=D)))  # ill-conditioned: slow CG
    opt = precond.build(newton_recipe(solver="cg", cg_max_iter=60, cg_tol=0.0, cg_stop="martens", martens_eps=1e-2), q)
    opt.step(q.loss)
    assert 10 < opt.state[q.w]["structure.cg_iterations"] < 60


# --- matrix-free products equal the dense matrices --------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("hessian", {}),
        ("gauss_newton", {}),
        ("gauss_newton", {"mc_samples": 2}),
        ("sampled_fisher", {"form": "per_sample", "samples": 2}),
        ("sampled_fisher", {"form": "batch", "samples": 3}),
        ("empirical_fisher", {"form": "per_sample"}),
        ("empirical_fisher", {"form": "batch"}),
    ],
)
def test_matvec_equals_the_dense_estimate(name, options) -> None:
    from precond import registry
    from precond.block import GroupStep, Needs
    from precond.evaluation import evaluate
    from precond.interfaces import Environment
    from precond.likelihood import get_likelihood

    model, (x, y) = mlp(), classification()
    block = registry.get("curvature", name)(**options)
    params = list(model.parameters())
    ev = evaluate(cross_entropy_closure(model, x, y), params, block.needs() | Needs(outputs=True), "test")
    grads = [p.grad.clone() for p in params]

    def ctx():
        ev.memo.clear()
        ev.env = Environment(model=model, likelihood=get_likelihood("categorical"), generator=torch.Generator().manual_seed(11))
        return GroupStep({}, params, grads, [{} for _ in params], [1] * len(params), 1, ev, ev.env, scope=params)

    with torch.no_grad():
        dense = block.full(ctx())
        c = ctx()
        g = torch.Generator().manual_seed(5)
        for _ in range(2):  # products reuse the step's sampled labels
            v = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
            mv = torch.cat([t.reshape(-1) for t in block.matvec(c, v)])
            assert torch.allclose(mv, dense @ torch.cat([t.reshape(-1) for t in v]), atol=1e-12, rtol=0)


# --- natural gradient -------------------------------------------------------------------------


def test_natural_gradient_fisher_equals_the_exact_expectation_and_the_ggn() -> None:
    """For softmax cross-entropy the Fisher the recipe uses, E_{ŷ~p}[∇ℓ(ŷ)∇ℓ(ŷ)ᵀ] summed over every label,
    equals the GGN Jᵀ(diag p − ppᵀ)J built from torch.func.jacrev."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    x, y = classification(n=7)
    opt = precond.build("natural_gradient", model, likelihood="categorical")
    opt.step(cross_entropy_closure(model, x, y))
    # the structure kept the matrix of the step's parameters; recompute at those parameters' previous values
    used = opt.state[model.weight]["structure.matrix"]

    torch.manual_seed(0)
    ref = nn.Linear(4, 3).to(D)
    names = [n for n, _ in ref.named_parameters()]
    params = {n: p.detach() for n, p in ref.named_parameters()}

    def logits(ps, xi):
        return functional_call(ref, ps, (xi.unsqueeze(0),)).squeeze(0)

    fisher = torch.zeros(15, 15, dtype=D)
    ggn = torch.zeros(15, 15, dtype=D)
    for xi in x:
        out = logits(params, xi)
        p = torch.softmax(out, -1)
        jac = jacrev(logits)(params, xi)
        j = torch.cat([jac[n].reshape(3, -1) for n in names], dim=1)  # (C, P)
        ggn += j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
        for label in range(3):  # the expectation over ŷ ~ Categorical(p), exactly
            grad = j.T @ (p - F.one_hot(torch.tensor(label), 3).to(D))
            fisher += p[label] * torch.outer(grad, grad)
    fisher, ggn = fisher / len(x), ggn / len(x)
    assert torch.allclose(fisher, ggn, atol=1e-12, rtol=0)
    assert torch.allclose(used, fisher, atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_normalized_natural_gradient_step_has_kl_delta(solver, damping) -> None:
    """½ sᵀ(F + λI)s = δ for the step s, with F the exact Fisher (= GGN) at the start."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    x, y = classification(n=30)
    closure = cross_entropy_closure(model, x, y)
    fisher = precond.estimate("gauss_newton", model, closure, structure="full", likelihood="categorical")
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = 2e-3
    sets = {"structure.solver": solver, "structure.cg_max_iter": 100, "transform.0.damping": damping, "step.delta": delta}
    if damping == 0.0:  # the categorical Fisher of a linear model is singular (softmax shift): keep to its range
        sets["structure.solver"] = "dense"
    opt = precond.build("normalized_natural_gradient", model, likelihood="categorical", set=sets)
    opt.step(closure)
    s = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    metric = fisher + damping * torch.eye(len(s), dtype=D)
    assert abs(0.5 * s @ metric @ s - delta) <= 1e-12
    assert s.abs().max() > 0


# --- spectral transforms on a dense matrix ----------------------------------------------------


def test_full_matrix_adagrad_inverse_root_and_amortised_eigendecomposition() -> None:
    """Full-matrix Adagrad: G_t = Σ g gᵀ, step (G_t + εI)^(-1/2) g; with every: 3 the root is refreshed
    on steps 1, 4, 7 only (from the sum as it was then)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3).to(D)
    x, y = classification(n=10)
    x = x[:, :3]
    recipe = {
        "name": "full_adagrad",
        "lr": 0.1,
        "curvature": {"type": "empirical_fisher"},
        "structure": {"type": "full", "accumulate": "sum"},
        "transform": {"type": "inverse_root", "p": 2, "damping": 1e-3, "every": 3},
    }
    opt = precond.build(recipe, model)
    params = list(model.parameters())
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    total = torch.zeros(12, 12, dtype=D)
    root = None
    for t in range(1, 8):
        opt.step(lambda: F.cross_entropy(model(x), y))
        out = F.linear(x, ref[0], ref[1])
        g = torch.cat([q.reshape(-1) for q in torch.autograd.grad(F.cross_entropy(out, y), ref)])
        total += torch.outer(g, g)
        if (t - 1) % 3 == 0:
            vals, vecs = np.linalg.eigh(total.numpy())
            root = torch.tensor(vecs @ np.diag((np.clip(vals, 0, None) + 1e-3) ** -0.5) @ vecs.T)
        step = root @ g
        with torch.no_grad():
            ref[0] -= 0.1 * step[:9].reshape(3, 3)
            ref[1] -= 0.1 * step[9:]
        for p, r in zip(params, ref):
            assert torch.allclose(p, r, atol=1e-12, rtol=0), t


def _eigh_fails(*args, **kwargs):
    raise torch.linalg.LinAlgError("forced failure")


def test_failed_eigh_keeps_the_previous_decomposition_and_raises_after_max_failures(monkeypatch) -> None:
    """A forced eigh failure on a dense block: it keeps training on its step-1 decomposition, exactly as a run
    whose transform never refreshes after step 1, counts the failures and raises after max_failures."""
    from precond.linalg.spectral import EighFailureError

    batches = [classification(seed=10 + t) for t in range(6)]
    ref, model = mlp(), mlp()
    opt_ref = precond.build("natural_gradient", ref, likelihood="categorical", set={"transform.0.every": 100})
    opt = precond.build("natural_gradient", model, likelihood="categorical", set={"structure.max_failures": 6})  # every: 1
    for t, (x, y) in enumerate(batches):
        opt_ref.step(cross_entropy_closure(ref, x, y))
        with monkeypatch.context() as patch:
            if t > 0:  # every decomposition after the first fails
                patch.setattr(torch.linalg, "eigh", _eigh_fails)
            opt.step(cross_entropy_closure(model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert (model[2].bias - mlp()[2].bias).abs().max() > 1e-3  # it moved
    st = opt.state[model[0].weight]  # the block's state (scope: model, one block)
    assert (st["structure.failures"], st["structure.failures_total"]) == (5, 5)
    with monkeypatch.context() as patch, pytest.raises(EighFailureError, match="dense block 0 of 1 .* failed 6 times in a row"):
        patch.setattr(torch.linalg, "eigh", _eigh_fails)
        opt.step(cross_entropy_closure(model, *batches[0]))
    opt.step(cross_entropy_closure(model, *batches[0]))  # a success resets the count, not the total
    assert (st["structure.failures"], st["structure.failures_total"]) == (0, 6)


def test_no_decomposition_yet_passes_the_direction_through(monkeypatch) -> None:
    model = mlp()
    opt = precond.build({**newton_recipe(), "lr": 0.1}, model)
    x, y = classification()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
    monkeypatch.setattr(torch.linalg, "eigh", _eigh_fails)
    opt.step(cross_entropy_closure(model, x, y))
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-14, rtol=0)
    assert opt.state[model[0].weight]["structure.failures"] == 1


def test_ema_accumulation_is_bias_corrected() -> None:
    q = Quadratic(seed=3)
    opt = precond.build(newton_recipe(accumulate="ema", beta=0.9), q)
    for _ in range(3):
        opt.step(q.loss)
    st = opt.state[q.w]
    assert st["structure.updates"] == 3
    assert torch.allclose(st["structure.matrix"] / (1 - 0.9**3), q.A, atol=1e-12, rtol=0)


# --- Levenberg-Marquardt -----------------------------------------------------------------------


def reduction_ratio(a: torch.Tensor, x: torch.Tensor, b: torch.Tensor, scale: float, lam: float) -> float:
    """ρ of the step p = −(scale·A + λI)⁻¹ g on f = ½xᵀAx − bᵀx, with the model's own curvature."""
    g = a @ x - b
    m = scale * a + lam * torch.eye(len(x), dtype=D)
    p = -torch.linalg.solve(m, g)
    f = lambda z: 0.5 * z @ a @ z - b @ z  # noqa: E731
    return float((f(x + p) - f(x)) / (g @ p + 0.5 * p @ m @ p))


@pytest.mark.parametrize("scale, factor", [(1.0, 2.0 / 3.0), (0.5, 1.5), (0.3, 1.5), (0.7, 1.0)])
def test_lm_adapts_the_damping_from_the_reduction_ratio(scale, factor) -> None:
    """On a quadratic ρ is known in closed form; λ moves by 2/3 (ρ > 3/4), 3/2 (ρ < 1/4, here also ρ < 0)
    or not at all. ``scale`` < 1 makes the model underestimate the curvature, so the step overshoots."""
    q = Quadratic(seed=6)
    lam = 0.05
    recipe = {**newton_recipe(), "transform": {"type": "inverse", "damping": lam, "scale": scale}, "step": {"type": "lm"}}
    opt = precond.build(recipe, q)
    rho = reduction_ratio(q.A, q.flat().detach().clone(), q.b, scale, lam)
    opt.step(q.loss)
    assert opt.state[q.w]["step.rho"] == pytest.approx(rho, rel=1e-9)
    expected = 2.0 / 3.0 if rho > 0.75 else (1.5 if rho < 0.25 else 1.0)
    assert expected == factor
    assert opt.param_groups[0]["damping"] == pytest.approx(lam * factor, rel=1e-12)
    assert opt.state_dict()["param_groups"][0]["damping"] == opt.param_groups[0]["damping"]


def test_lm_with_cg_uses_the_exact_quadratic_model() -> None:
    """With a truncated, warm-started CG solve the predicted change is gᵀp + ½pᵀ(H + λI)p of the step taken."""
    q = Quadratic(seed=8, n=20)
    recipe = {
        **newton_recipe(solver="cg", cg_max_iter=3, cg_tol=0.0, warm_start=0.95),
        "transform": {"type": "inverse", "damping": 0.2},
        "step": {"type": "lm"},
    }
    opt = precond.build(recipe, q)
    for _ in range(3):
        x0 = q.flat().detach().clone()
        lam = opt.param_groups[0]["damping"]
        opt.step(q.loss)
        p = q.flat().detach() - x0
        g = q.A @ x0 - q.b
        predicted = g @ p + 0.5 * p @ (q.A + lam * torch.eye(20, dtype=D)) @ p
        x1 = q.flat().detach()
        actual = (0.5 * x1 @ q.A @ x1 - q.b @ x1) - (0.5 * x0 @ q.A @ x0 - q.b @ x0)
        assert opt.state[q.w]["step.rho"] == pytest.approx(float(actual / predicted), rel=1e-8)


def test_lm_needs_positive_damping_and_no_momentum() -> None:
    q = Quadratic()
    with pytest.raises(PipelineError, match="start above 0"):
        precond.build({**newton_recipe(), "step": {"type": "lm"}}, q)
    with pytest.raises(PipelineError, match="momentum"):
        precond.build(
            {**newton_recipe(), "transform": {"type": "inverse", "damping": 1.0}, "step": {"type": "lm"}, "momentum": {"type": "ema"}}, q
        )


def test_hessian_free_trains_an_mlp() -> None:
    model, (x, y) = mlp(), classification(n=40)
    closure = cross_entropy_closure(model, x, y)
    opt = precond.build("hessian_free", model, likelihood="categorical")
    first = float(closure()[0].detach())
    for _ in range(10):
        opt.step(closure)
    assert float(closure()[0].detach()) < 0.5 * first
    assert math.isfinite(opt.param_groups[0]["damping"])
