"""Property-based: any input gives a valid optimizer or a RecipeError — never another exception,
never code execution, in bounded time."""

from __future__ import annotations

import math
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import precond
from precond.errors import RecipeError
from precond.recipe import parse_yaml, validate

KEYS = ["name", "lr", "weight_decay", "curvature", "structure", "transform", "momentum", "step", "decay", "rules",
        "type", "beta", "p", "damping", "every", "start", "samples", "on_nonfinite", "summary", "x", "lrr", ""]
TYPES = ["empirical_fisher", "sampled_fisher", "hutchinson", "gauss_newton", "hessian", "diagonal", "inverse",
         "inverse_root", "clip", "identity", "ema", "heavy_ball", "lr", "l2", "decoupled", "nonsense", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(TYPES), st.just(1e308), st.just(-1e-320),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    ),
    max_leaves=25,
)
recipes = st.fixed_dictionaries(
    {"name": st.one_of(st.just("fuzz"), scalars)},
    optional={k: values for k in KEYS if k not in ("name",)},
)
PARAMS = [torch.nn.Parameter(torch.zeros(3))]


def _build_or_recipe_error(data) -> None:
    try:
        opt = precond.build(data, PARAMS)
    except RecipeError as exc:
        assert str(exc)
        return
    except precond.errors.PipelineError as exc:  # valid recipe that needs a module, a likelihood ...
        assert str(exc)
        return
    assert isinstance(opt, torch.optim.Optimizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_random_mappings(data) -> None:
    start = time.perf_counter()
    _build_or_recipe_error(data)
    assert time.perf_counter() - start < 5


@settings(max_examples=200, deadline=None)
@given(values)
def test_random_yaml_documents(data) -> None:
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    try:
        recipe_data, locations = parse_yaml(text, "fuzz.yaml")
        validate(recipe_data, locations=locations, source="fuzz.yaml")
    except RecipeError as exc:
        assert "fuzz.yaml" in str(exc) or str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    try:
        data, locations = parse_yaml(raw, "bytes.yaml")
        validate(data, locations=locations, source="bytes.yaml")
    except RecipeError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="{}[]:,-&*!|>'\"#\n abcxyz01.", max_size=200))
def test_random_yaml_syntax(text: str) -> None:
    try:
        data, locations = parse_yaml(text, "text.yaml")
        validate(data, locations=locations, source="text.yaml")
    except RecipeError:
        pass


@pytest.mark.parametrize(
    "text",
    [
        "name: !!python/object/apply:os.system ['touch /tmp/precond-pwned']\n",
        "name: !!python/object/new:subprocess.Popen [['touch', '/tmp/precond-pwned']]\n",
        "name: x\nlr: !!python/name:os.system\n",
        "!!python/object/apply:os.system ['touch /tmp/precond-pwned']\n",
        "name: x\ncurvature: !!python/object:precond.curvature.hessian.Hessian {}\n",
    ],
)
def test_tags_never_execute(text: str, tmp_path) -> None:
    import os

    marker = "/tmp/precond-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(RecipeError, match="tag|python"):
        data, locations = parse_yaml(text, "evil.yaml")
        validate(data, locations=locations, source="evil.yaml")
    assert not os.path.exists(marker)


def test_deep_nesting_and_bombs_are_bounded() -> None:
    deep = "name: x\nsummary: " + "[" * 5000 + "]" * 5000 + "\n"
    start = time.perf_counter()
    with pytest.raises(RecipeError):
        parse_yaml(deep, "deep.yaml")
    bomb = "a: &a ['x','x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    with pytest.raises(RecipeError, match="expands"):
        parse_yaml(bomb, "bomb.yaml")
    assert time.perf_counter() - start < 10


def test_huge_and_special_numbers() -> None:
    for lr in (float("nan"), float("inf"), -1.0):
        with pytest.raises(RecipeError, match="lr"):
            precond.build({"name": "x", "lr": lr}, PARAMS)
    opt = precond.build({"name": "x", "lr": 1e300, "transform": {"type": "identity"}}, PARAMS)
    assert opt.param_groups[0]["lr"] == 1e300
    assert math.isfinite(opt.param_groups[0]["lr"])
