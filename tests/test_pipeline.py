"""The step pipeline: closures, needs, intervals, transforms, composition, schema, CLI."""

from __future__ import annotations

import copy
import json
from typing import ClassVar

import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

import precond
from conftest import loss_of, make_batches, make_mlp, max_diff
from precond.block import Curvature, DiagonalEstimate, Needs
from precond.cli import app
from precond.cli.recipes import builtin_recipes
from precond.curvature.empirical_fisher import EmpiricalFisher
from precond.errors import PipelineError
from precond.registry import register
from precond.step.momentum import EMA
from precond.structure.diagonal import Diagonal
from precond.transform.clip import Clip
from precond.transform.inverse_root import InverseRoot


@register("curvature", "test_graph_probe")
class GraphProbe(Curvature):
    """Test block: needs a differentiable gradient and model outputs; records what it got."""

    fills: ClassVar[frozenset[str]] = frozenset({"diagonal"})
    seen: ClassVar[list[bool]] = []

    def needs(self) -> Needs:
        return Needs(create_graph=True, outputs=True)

    def diagonal(self, ctx):
        graph = ctx.evaluation.graph_grads
        GraphProbe.seen.append(graph is not None and all(graph[p].requires_grad for p in ctx.params))
        return DiagonalEstimate(roots=ctx.grads)


def torch_adam_run(model, batches, **kw):
    opt = torch.optim.Adam(model.parameters(), **kw)
    for b in batches:
        opt.zero_grad()
        loss_of(model, b)[0].backward()
        opt.step()


def test_compose_equals_build() -> None:
    a, b = make_mlp(), make_mlp()
    built = precond.build("adam", a)
    composed = precond.compose(
        b,
        curvature=EmpiricalFisher(),
        structure=Diagonal(beta=0.999),
        transform=InverseRoot(p=2, damping=1e-8, damping_position="outside"),
        momentum=EMA(beta=0.9),
        lr=1e-3,
    )
    for batch in make_batches(n=10):
        built.step(lambda: loss_of(a, batch))
        composed.step(lambda: loss_of(b, batch))
    assert max_diff(a, b) == 0.0


@pytest.mark.parametrize("style", ["tuple", "bare", "torch"])
def test_closure_styles(style: str) -> None:
    a = make_mlp()
    b = copy.deepcopy(a)
    opt = precond.build("adam", a)
    batches = make_batches(n=5)
    for batch in batches:
        def closure():
            loss, out = loss_of(a, batch)
            if style == "tuple":
                return loss, out
            if style == "torch":
                opt.zero_grad()
                loss.backward()
            return loss
        loss = opt.step(closure)
        assert loss.shape == () and not loss.requires_grad
    torch_adam_run(b, batches)
    assert max_diff(a, b) <= 1e-12


def test_plain_idiom_refused_with_what_is_needed() -> None:
    model = make_mlp()
    recipe = {"name": "probe", "curvature": {"type": "test_graph_probe"}, "structure": {"type": "diagonal"},
              "transform": {"type": "inverse_root", "damping": 1e-8}}
    opt = precond.build(recipe, model)
    loss_of(model, make_batches(n=1)[0])[0].backward()
    with pytest.raises(PipelineError, match=r"differentiable gradient.*loss\.backward\(create_graph=True\).*forward-only closure"):
        opt.step()
    batch = make_batches(n=1)[0]
    GraphProbe.seen.clear()
    opt.step(lambda: loss_of(model, batch)[0])  # a bare loss: the outputs come from the model's forward hook
    assert GraphProbe.seen and all(GraphProbe.seen)
    GraphProbe.seen.clear()
    opt.step(lambda: loss_of(model, batch))
    assert GraphProbe.seen and all(GraphProbe.seen)
    # the gradients handed to users are plain tensors, the graph is not kept on .grad
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())

    def torch_style():
        opt.zero_grad()
        loss, out = loss_of(model, batch)
        loss.backward()
        return loss, out

    with pytest.raises(PipelineError, match="differentiable gradient"):
        opt.step(torch_style)


def test_closure_must_return_a_scalar_loss() -> None:
    model = make_mlp()
    opt = precond.build("adam", model)
    with pytest.raises(PipelineError, match="scalar loss"):
        opt.step(lambda: "loss")
    with pytest.raises(PipelineError, match="does not depend"):
        opt.step(lambda: torch.tensor(1.0))


def test_curvature_every_refreshes_on_schedule() -> None:
    """Adagrad whose statistic refreshes on steps 1, 4, 7, ... equals the equations with that schedule."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.3, 1.2, -0.7], dtype=torch.float64)
    opt = precond.build("adagrad", [w], lr=0.1, set={"curvature.every": 3})
    x = w.detach().clone()
    acc = torch.zeros(3, dtype=torch.float64)
    for t in range(1, 10):
        g = 2 * a * x + torch.sin(x)
        if (t - 1) % 3 == 0:
            acc = acc + g * g
        x = x - 0.1 * g / (acc.sqrt() + 1e-10)
        opt.step(lambda: (a * w * w).sum() - torch.cos(w).sum())
    assert torch.allclose(w.detach(), x, atol=1e-12, rtol=0)
    assert opt.state[w]["structure.updates"] == 3


def test_transform_every_reuses_the_cached_multiplier() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = precond.build("adagrad", [w], lr=0.1, set={"transform.0.every": 4})
    x = w.detach().clone()
    acc = torch.zeros(3, dtype=torch.float64)
    mult = None
    for t in range(1, 10):
        g = 3 * x**2 - 1
        acc = acc + g * g
        if (t - 1) % 4 == 0:
            mult = 1 / (acc.sqrt() + 1e-10)
        x = x - 0.1 * g * mult
        opt.step(lambda: (w**3 - w).sum())
    assert torch.allclose(w.detach(), x, atol=1e-12, rtol=0)


def test_clip_elementwise_and_norm() -> None:
    from precond.block import Direction

    d = Direction([torch.tensor([3.0, -0.5]), torch.tensor([[-2.0]])], 0.5, False)
    out = Clip(threshold=1.0).apply(None, d)
    assert torch.equal(out.tensors[0], torch.tensor([1.0, -0.25])) and torch.equal(out.tensors[1], torch.tensor([[-1.0]]))
    assert torch.equal(d.tensors[0], torch.tensor([3.0, -0.5]))  # inputs untouched
    d = Direction([torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])], 1.0, False)
    out = Clip(mode="norm", threshold=1.0).apply(None, d)
    assert torch.allclose(out.tensors[0], torch.tensor([0.6, 0.0])) and torch.allclose(out.tensors[1], torch.tensor([[0.8]]))
    small = Clip(mode="norm", threshold=10.0).apply(None, d)
    assert torch.equal(small.tensors[0], d.tensors[0])


def test_inverse_root_inside_vs_outside_and_inverse() -> None:
    """The diagonal spectral transforms equal their closed forms."""
    from precond.block import Direction
    from precond.transform.inverse import Inverse

    v = [torch.tensor([4.0, 9.0], dtype=torch.float64)]
    d = Direction([torch.tensor([1.0, 2.0], dtype=torch.float64)])
    out = InverseRoot(p=2, damping=1.0, damping_position="outside").diagonal(v, [0.25], d).materialize().tensors[0]
    assert torch.allclose(out, torch.tensor([1 / 5, 2 / 7], dtype=torch.float64))  # sqrt(v/0.25) + 1
    out = InverseRoot(p=4, damping=1.0, damping_position="inside").diagonal(v, None, d).materialize().tensors[0]
    assert torch.allclose(out, torch.tensor([5 ** -0.25, 2 * 10 ** -0.25], dtype=torch.float64))
    out = Inverse(damping=0.5).diagonal(v, [2.0], d).materialize().tensors[0]
    assert torch.allclose(out, torch.tensor([1 / 2.5, 2 / 5.0], dtype=torch.float64))
    lam = torch.tensor([4.0, 9.0], dtype=torch.float64)
    assert torch.allclose(InverseRoot(p=2, damping=1.0, damping_position="outside").fn(lam), 1 / (lam.sqrt() + 1))


def test_schema_is_generated_from_the_registry() -> None:
    s = precond.recipe.schema()
    text = json.dumps(s)
    for name in ("empirical_fisher", "diagonal", "inverse_root", "heavy_ball", "decoupled", "test_graph_probe"):
        assert name in text
    assert s["additionalProperties"] is False
    out = CliRunner().invoke(app, ["schema"])
    assert out.exit_code == 0 and json.loads(out.output)["title"] == "precond recipe"


def test_cli_list_show_build_all() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["list"])
    assert out.exit_code == 0 and "adamw" in out.output and "inverse_root" in out.output
    out = runner.invoke(app, ["show", "adam"])
    assert out.exit_code == 0 and "Kingma" in out.output
    out = runner.invoke(app, ["build", "adam"])  # the default demo model
    assert out.exit_code == 0, out.output
    assert "2.00x the parameters" in out.output  # Adam keeps two moments
    # every built-in recipe, on a model small enough for the dense ones (on the default's 2,730 parameters an
    # eigendecomposition of the full curvature takes seconds a step)
    out = runner.invoke(app, ["build", "--all", "--model", "mlp:8,16,3"])
    assert out.exit_code == 0, out.output
    for name in builtin_recipes():
        assert f"{name}:" in out.output
    assert out.output.count("ms/step") == len(builtin_recipes())


def test_recipe_round_trips_through_yaml(tmp_path) -> None:
    recipe = precond.load_recipe("adam", set={"structure.beta": 0.95})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert precond.load_recipe(path) == recipe


def test_likelihood_is_validated() -> None:
    with pytest.raises(PipelineError, match="unknown likelihood"):
        precond.build("adam", make_mlp(), likelihood="poisson")
    assert precond.build("adam", make_mlp(), likelihood="gaussian").likelihood.name == "gaussian"


def test_sgd_with_cross_entropy_outputs_tuple() -> None:
    model = make_mlp()
    opt = precond.build("sgd", model, lr=0.1)
    x, y = make_batches(n=1)[0]
    first = F.cross_entropy(model(x), y).item()
    for _ in range(20):
        opt.step(lambda: (F.cross_entropy(model(x), y), None))
    assert F.cross_entropy(model(x), y).item() < first
