"""transform newton_schulz (Muon's orthogonalization) against independent references: the SVD closed form of
the iteration (float64), torch.optim.Muon's step (momentum 0: exactly the orthogonalized gradient), and its
own batched vs one-matrix paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from precond.errors import PipelineError
from precond.transform.newton_schulz import newton_schulz, shape_scale

MUON = (3.4445, -4.7750, 2.0315)


def closed_form(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """``U p^(steps)(σ/‖G‖_F) Vᵀ`` from the SVD: the iteration acts on each singular value alone."""
    a, b, c = coefficients
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = s / torch.linalg.matrix_norm(g)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (12, 12)])
@pytest.mark.parametrize("coefficients", [MUON, (3.0, -16 / 5, 6 / 5)])
def test_float64_iteration_equals_the_svd_closed_form(shape, coefficients) -> None:
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(g, coefficients, 5, 1e-7, torch.float64)
    torch.testing.assert_close(got, closed_form(g, coefficients, 5), rtol=0, atol=1e-12)


def test_a_batch_equals_each_matrix_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    gs = torch.randn(3, 10, 6, dtype=torch.float64, generator=gen)
    batched = newton_schulz(gs, MUON, 5, 1e-7, torch.float64)
    for g, y in zip(gs, batched):
        torch.testing.assert_close(y, closed_form(g, MUON, 5), rtol=0, atol=1e-12)
    # bfloat16: the batched kernels round differently from the 2-D ones, within bfloat16's precision
    gs32 = gs.float()
    one = torch.stack([newton_schulz(g, MUON, 5, 1e-7, torch.bfloat16) for g in gs32]).float()
    torch.testing.assert_close(newton_schulz(gs32, MUON, 5, 1e-7, torch.bfloat16).float(), one, rtol=0, atol=3e-2)


def test_zero_direction_stays_zero() -> None:
    assert not newton_schulz(torch.zeros(4, 3), MUON, 5, 1e-7, torch.bfloat16).any()


def test_shape_scales() -> None:
    assert shape_scale(torch.Size([1024, 512]), "original") == pytest.approx(math.sqrt(2))
    assert shape_scale(torch.Size([512, 1024]), "original") == 1.0
    assert shape_scale(torch.Size([1024, 512]), "match_rms_adamw") == pytest.approx(6.4)
    assert shape_scale(torch.Size([1024, 512]), "none") == 1.0


def recipe(scale: str = "original") -> dict:
    return {"name": "orthogonalized_sgd", "lr": 0.02, "weight_decay": 0.1,
            "transform": {"type": "newton_schulz", "scale": scale, "dtype": "bfloat16"}, "decay": {"type": "decoupled"}}


@pytest.mark.parametrize("scale", ["original", "match_rms_adamw"])
def test_equals_torch_muon_without_momentum(scale) -> None:
    """torch.optim.Muon with momentum 0 steps along NS(G) scaled by its shape factor, after decoupled decay:
    the same operations in the same order, so the parameters agree bit for bit."""
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(16, 8, generator=gen)
    grads = [torch.randn(16, 8, generator=gen) for _ in range(4)]
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ref = torch.optim.Muon([a], lr=0.02, weight_decay=0.1, momentum=0.0, adjust_lr_fn=scale)
    opt = precond.build(recipe(scale), [b])
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert torch.equal(a, b)


def test_conv_kernels_are_orthogonalized_as_out_by_the_rest() -> None:
    model = nn.Conv2d(3, 4, 3, bias=False)
    g = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model.weight.data = model.weight.data.double()
    opt = precond.build({**recipe("none"), "weight_decay": 0.0,
                         "transform": {"type": "newton_schulz", "scale": "none", "dtype": "float64"}}, model)
    before = model.weight.detach().clone()
    model.weight.grad = g.clone()
    opt.step()
    expected = before - 0.02 * closed_form(g.reshape(4, 27), MUON, 5).reshape(4, 3, 3, 3)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-12)


def test_vectors_are_refused_with_the_rule_that_routes_them() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(PipelineError, match=r"parameter 'bias' has shape \(3,\).*rules"):
        precond.build(recipe(), model)
    rules = {**recipe(), "rules": [{"name": "vectors", "match": {"names": ["*bias"]}, "recipe": "adam"}]}
    precond.build(rules, model)  # the bias goes to Adam
