"""recipe muon against independent references: torch.optim.Muon on the matrices (20 steps, bit for bit), torch.optim.AdamW
on what the rules route away, the Nesterov EMA's equation, conv kernels as (out, in*kh*kw) matrices, and a resumed run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precond
from precond.step.momentum import EMA
from precond.transform.identity import Identity

SCALES = {"original": 0.02, "match_rms_adamw": 1e-3}  # the lr each scale is meant for (Keller Jordan's, Moonlight's)


def hidden_mlp(dtype: torch.dtype) -> nn.Module:
    """Only matrices (no biases, nothing the rules route away); two (12, 12) layers share the batched path."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 12, bias=False), nn.Tanh(),
                         nn.Linear(12, 12, bias=False), nn.Tanh(), nn.Linear(12, 12, bias=False), nn.Tanh(),
                         nn.Linear(12, 3, bias=False)).to(dtype)


def batches(dtype: torch.dtype, n: int = 20, features: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, features, generator=gen, dtype=dtype), torch.randint(0, 3, (32,), generator=gen)) for _ in range(n)]


def train_pair(ours: torch.optim.Optimizer, refs: list[torch.optim.Optimizer], a: nn.Module, b: nn.Module, data, loss_fn) -> None:
    for x, y in data:
        ours.step(lambda: loss_fn(a, x, y))  # noqa: B023
        for r in refs:
            r.zero_grad()
        loss_fn(b, x, y)[0].backward()
        for r in refs:
            r.step()


def classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    out = model(x)
    return F.cross_entropy(out, y), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_equals_torch_muon_bit_for_bit(scale: str, dtype: torch.dtype) -> None:
    """20 steps of a trajectory (the gradients depend on the parameters): EMA lerp, Nesterov lerp, NS in bfloat16,
    decoupled decay with the raw lr, the shape-scaled step — the same operations in the same order as torch."""
    a = hidden_mlp(dtype)
    b = copy.deepcopy(a)
    lr = SCALES[scale]
    ours = precond.build("muon", a, lr=lr, set={"transform.0.scale": scale, "transform.0.dtype": "bfloat16"})
    ref = torch.optim.Muon(b.parameters(), lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=scale)
    assert {g["rule"] for g in ours.param_groups} == {"default"}
    train_pair(ours, [ref], a, b, batches(dtype), classify)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all(not torch.equal(p, q) for p, q in zip(a.parameters(), hidden_mlp(dtype).parameters()))  # it moved


def test_defaults_are_torch_muon_with_moonlights_scale() -> None:
    recipe = precond.load_recipe("muon")
    ref = torch.optim.Muon([nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="match_rms_adamw").defaults
    ns, m = recipe.transform[0], recipe.momentum
    assert (recipe.lr, recipe.weight_decay, m.beta, m.nesterov) == (ref["lr"], ref["weight_decay"], ref["momentum"], ref["nesterov"])
    assert (ns.coefficients, ns.eps, ns.steps, ns.scale) == (ref["ns_coefficients"], ref["eps"], ref["ns_steps"], ref["adjust_lr_fn"])
    assert not m.bias_correction and recipe.decay.name == "decoupled"


class TinyLM(nn.Module):
    """The shapes of a transformer: embeddings, norms with gains and biases, hidden matrices, an output head,
    and a free scalar gain owned by the model itself (routed by its order, not by a module type or name)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(11, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.gain = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(16, 11)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        x = x + self.gain * self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, 11), y.reshape(-1)), out


def lm_batches(n: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 11, (4, 6), generator=gen), torch.randint(0, 11, (4, 6), generator=gen)) for _ in range(n)]


def test_rules_route_embeddings_head_and_vectors_to_adamw() -> None:
    model = TinyLM()
    opt = precond.build("muon", model)
    names = {p: n for n, p in model.named_parameters()}
    groups = {g["rule"]: sorted(names[p] for p in g["params"]) for g in opt.param_groups}
    assert groups["default"] == ["down.weight", "up.weight"]
    assert groups["adamw"] == sorted(["tok.weight", "norm.weight", "norm.bias", "up.bias", "gain", "head.weight", "head.bias"])


@pytest.mark.parametrize("names", [["lm_head.weight"], ["heads.head.weight"], ["classifier.6.weight"], ["pos_embed"],
                                   ["model.embed_tokens.weight"]])
def test_output_and_embedding_names(names: list[str]) -> None:
    from precond.api import rule_of

    recipe = precond.load_recipe("muon")
    for name in names:
        assert rule_of(recipe, name, nn.Linear(2, 2), torch.zeros(4, 4)) == "adamw"
    assert rule_of(recipe, "blocks.0.attn.proj.weight", nn.Linear(2, 2), torch.zeros(4, 4)) == "default"


def test_rules_follow_torch_adamw_exactly() -> None:
    """The matrices follow torch.optim.Muon and everything the rules route away torch.optim.AdamW with Moonlight's
    betas (0.9, 0.95), eps 1e-8 and weight decay 0.1, on one model trained 20 steps."""
    a = TinyLM()
    b = copy.deepcopy(a)
    ours = precond.build("muon", a, set={"transform.0.dtype": "bfloat16"})  # torch's rounding (auto: float32 on CPU)
    hidden = [b.up.weight, b.down.weight]
    rest = [p for p in b.parameters() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    train_pair(ours, [muon, adamw], a, b, lm_batches(), lm_loss)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_conv_kernels_follow_muon_on_their_matrix_view() -> None:
    """A Conv2d kernel (8, 3, 3, 3) steps as torch.optim.Muon steps the (8, 27) matrix with the same gradients:
    orthogonalized and scaled (0.2 sqrt(27)) as that matrix, 5 steps, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3, bias=False))
    opt = precond.build("muon", model, set={"transform.0.dtype": "bfloat16"})
    kernel = model[0].weight
    twin = nn.Parameter(kernel.detach().reshape(8, 27).clone())
    ref = torch.optim.Muon([twin], lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.step(lambda: classify(model, x, y))  # noqa: B023
        twin.grad = kernel.grad.reshape(8, 27).clone()
        ref.step()
        assert torch.equal(kernel.detach().reshape(8, 27), twin.detach())


@pytest.mark.parametrize("bias_correction", [False, True])
def test_nesterov_ema_equation(bias_correction: bool) -> None:
    """``u_t = (1 - β) g_t + β m_t`` with ``m_t = β m_{t-1} + (1 - β) g_t`` (``m_t/(1 - βᵗ)`` with bias correction),
    through a plain SGD step (identity transform, lr 1), in float64."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    p = nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    beta = 0.8
    opt = precond.compose([p], transform=Identity(), momentum=EMA(beta=beta, nesterov=True, bias_correction=bias_correction), lr=1.0)
    m = torch.zeros(5, 3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * g
        expected = (1 - beta) * g + beta * (m / (1 - beta**t) if bias_correction else m)
        torch.testing.assert_close(before - p.detach(), expected, rtol=0, atol=1e-15)


def test_nesterov_off_keeps_the_plain_ema() -> None:
    assert EMA().nesterov is False
    p, q = (nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2))
    plain = precond.compose([p], transform=Identity(), momentum=EMA(beta=0.9), lr=0.1)
    adam_like = precond.compose([q], transform=Identity(), momentum=EMA(beta=0.9, nesterov=False), lr=0.1)
    for g in (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.3, -1.0])):
        p.grad, q.grad = g.double(), g.double()
        plain.step()
        adam_like.step()
    assert torch.equal(p, q)


def test_resume_is_bitwise_with_rules() -> None:
    data = lm_batches(12)
    full = TinyLM()
    opt = precond.build("muon", full)
    for x, y in data:
        opt.step(lambda: lm_loss(full, x, y))  # noqa: B023
    half = TinyLM()
    opt1 = precond.build("muon", half)
    for x, y in data[:6]:
        opt1.step(lambda: lm_loss(half, x, y))  # noqa: B023
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = TinyLM()
    fresh.load_state_dict(ckpt["model"])
    opt2 = precond.build("muon", fresh)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[6:]:
        opt2.step(lambda: lm_loss(fresh, x, y))  # noqa: B023
    for p, q in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_auto_precision_is_float32_on_the_cpu() -> None:
    """``dtype: auto`` (the recipe's): float32 iterations on the CPU, where bfloat16 products are slow; bfloat16
    would round differently, float32 equals an explicit float32."""
    results = {}
    for dtype in ("auto", "float32", "bfloat16"):
        model = hidden_mlp(torch.float32)
        opt = precond.build("muon", model, set={"transform.0.dtype": dtype})
        for x, y in batches(torch.float32, n=3):
            opt.step(lambda: classify(model, x, y))  # noqa: B023
        results[dtype] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(results["auto"], results["float32"])
    assert not torch.equal(results["auto"], results["bfloat16"])
