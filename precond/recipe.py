"""The recipe: a validated description of an optimizer.

A recipe has a ``name``, a ``summary``, a ``reference`` (the paper), the
top-level hyperparameters (``lr``, ``weight_decay``) that become param-group
values (so LR schedulers and param groups work as in torch), and one entry
per block kind. Each block entry is a discriminated union on ``type``,
generated from the registry, so a plugin block validates like a built-in.

YAML is read with the safe loader only, keeping the line and column of every
key so an error can say exactly where it is and what would work.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from precond import registry
from precond.block import KINDS, Block, Curvature, Decay, Momentum, Step, Structure, Transform
from precond.errors import Problem, RecipeCombinationError, RecipeError, field_of, file_order

MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # guards against alias bombs ("billion laughs")
MAX_DEPTH = 64


# --- the schema ----------------------------------------------------------------------------


class Distributed(BaseModel):
    """How the recipe runs under torch.distributed (ignored in one process); docs/distributed.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["replicated", "sharded", "off"] = Field(
        "replicated",
        description="replicated: every rank keeps every preconditioner block, the block's owner computes its "
        "eigendecompositions and all ranks receive them; sharded (memory-saving): the owner alone keeps a block's "
        "statistics and computes its preconditioned update, which all ranks receive every step; off: ignore the "
        "process group (independent optimizers, e.g. an ensemble with one model per process)",
    )


class Recipe(BaseModel):
    """Base of the generated recipe model; ``isinstance(r, Recipe)`` holds for every recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="the method's name, e.g. 'adam'")
    summary: str = Field("", description="one line: what the method does")
    reference: str = Field("", description="the paper or source the recipe follows")
    lr: float = Field(1e-3, ge=0, description="learning rate (a param-group value: schedulers change it)")
    weight_decay: float = Field(0.0, ge=0, description="weight-decay coefficient (a param-group value); the `decay` block says how it applies")
    on_nonfinite: Literal["skip", "raise", "ignore"] = Field(
        "skip", description="NaN/Inf in the loss, a gradient, a curvature estimate or the update: skip the step, raise, or ignore"
    )
    max_nonfinite: int = Field(10, ge=1, description="raise after this many consecutive skipped steps")
    distributed: Distributed = Field(default_factory=Distributed, description="under torch.distributed: how preconditioner work is shared")

    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    if TYPE_CHECKING:  # the block slots: recipe_model() adds them as discriminated unions over the registry
        curvature: Curvature | None
        structure: Structure | None
        transform: list[Transform]
        momentum: Momentum | None
        step: Step
        decay: Decay
        rules: list[Rule]

    def blocks(self) -> list[tuple[str, Block]]:
        """(path, block) for every block of the recipe and of its rules, in pipeline order."""
        out: list[tuple[str, Block]] = []
        for kind in KINDS:
            value = getattr(self, kind, None)
            if isinstance(value, (list, tuple)):
                out.extend((f"{kind}.{i}", b) for i, b in enumerate(value))
            elif value is not None:
                out.append((kind, value))
        for rule in getattr(self, "rules", []):
            out.extend((f"rules.{rule.name}.{path}", b) for path, b in rule.recipe.blocks() if not path.startswith("step"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-serialisable), the inverse of validation."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class Match(BaseModel):
    """Which parameters a rule takes: by owning module type, or by parameter name (fnmatch patterns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: list[str] = Field(default_factory=list, description="module class names, e.g. [LayerNorm, Embedding]")
    names: list[str] = Field(default_factory=list, description="parameter-name patterns, e.g. ['*.bias', 'head.*']")
    dims: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="parameter orders (p.dim()), e.g. [0, 1]: every scalar and vector, whatever owns it"
    )
    unserved: bool = Field(
        False, description="every parameter the recipe's own structure cannot serve (K-FAC: all but Linear and Conv2d layers)"
    )

    def matches(self, name: str, module: Any, param: Any = None) -> bool:
        from fnmatch import fnmatchcase

        if param is not None and param.dim() in self.dims:
            return True
        return type(module).__name__ in self.modules or any(fnmatchcase(name, pat) for pat in self.names)


DEFAULT_RULE = "default"  # the rule of the parameters no rule takes: the recipe's own pipeline


def rule_of(recipe: Recipe, name: str, module: Any, role: str = "weight", param: Any = None) -> str:
    """The rule that takes a parameter (its name, owning module, name there and tensor): the first that matches it."""
    for rule in recipe.rules:
        if rule.match.matches(name, module, param) or (rule.match.unserved and serves_not(recipe, module, role)):
            return rule.name
    return DEFAULT_RULE


def serves_not(recipe: Recipe, module: Any, role: str) -> bool:
    """Whether the recipe's own structure cannot serve a parameter (``match: {unserved: true}`` takes it)."""
    return recipe.structure is not None and recipe.structure.cannot_serve(module, role) is not None


class Rule(BaseModel):
    """Route some parameters to another recipe (e.g. K-FAC's biases and norms to Adam)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(description="the rule's name (also the param group's 'rule' key)")
    match: Match
    recipe: Any = Field(description="a built-in recipe name, a path, or an inline recipe (mapping)")

    @field_validator("recipe", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: Any) -> Any:
        if isinstance(value, Recipe):
            sub = value
        elif isinstance(value, str):
            sub = load_recipe(value)
        elif isinstance(value, Mapping):
            data = dict(value)
            data.setdefault("name", (info.data or {}).get("name", "rule"))
            sub = validate(copy.deepcopy(data), source="<rule>")
        else:
            raise ValueError("a rule's recipe is a built-in name, a path or a mapping")
        if sub.rules:
            raise ValueError("a rule's recipe cannot have rules of its own")
        if sub.step.name != "lr" or sub.step != registry.get("step", "lr")():
            raise ValueError("a rule cannot change the step control; the recipe's own step applies to every rule")
        return sub

    @field_validator("name")
    @classmethod
    def _not_default(cls, value: str) -> str:
        if value == "default":
            raise ValueError("'default' is the name of the recipe's own rule; choose another")
        return value


def _union(kind: str) -> Any:
    classes = tuple(registry.blocks(kind).values())
    if not classes:
        return None
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="type")]  # type: ignore[valid-type]  # a union built at run time


_MODEL: type[Recipe] | None = None


def _reset() -> None:
    global _MODEL
    _MODEL = None


registry.on_change(_reset)


class _Invalid:
    """Stands for a block that is not valid (unknown type, bad fields): checks that need it are skipped."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()

# validation context key: validate() collects the cross-block problems itself (all of them, with the
# problems of the fields) instead of the model validator raising the first one
_COLLECT = "precond_collect_combinations"


@dataclass(frozen=True)
class PipelineView:
    """One pipeline of a recipe -- its own, or a rule's -- as a cross-block check sees it.

    A block is a Block, ``None`` (absent) or :data:`INVALID` (reported elsewhere). ``path`` is the
    dotted prefix of the pipeline's blocks in the recipe (``""`` for the recipe's own,
    ``"rules.0.recipe."`` for a rule's) and ``label`` names it in messages.
    """

    curvature: Any
    structure: Any
    transforms: tuple[Any, ...]
    momentum: Any
    decay: Any
    path: str = ""
    label: str = "the recipe"

    def known(self) -> bool:
        """Every block is valid (or absent)."""
        return INVALID not in (self.curvature, self.structure, self.momentum, self.decay, *self.transforms)

    @classmethod
    def of(cls, recipe: Recipe, path: str = "", label: str = "the recipe") -> PipelineView:
        return cls(recipe.curvature, recipe.structure, tuple(recipe.transform), recipe.momentum, recipe.decay, path, label)


@dataclass(frozen=True)
class _Parts:
    """The blocks of a recipe for the cross-block checks (see PipelineView); ``rules()`` is lazy:
    only a step control that spans the rules asks for them."""

    own: PipelineView
    step: Any
    rules: Callable[[], list[PipelineView | Any]]

    @classmethod
    def of(cls, recipe: Recipe) -> _Parts:
        def rules() -> list[PipelineView | Any]:
            return [PipelineView.of(r.recipe, f"rules.{i}.recipe.", f"rule '{r.name}'")
                    for i, r in enumerate(recipe.rules)]

        return cls(PipelineView.of(recipe), recipe.step, rules)


def _combination_problems(parts: _Parts) -> list[tuple[str, str, bool]]:
    """Cross-block rules: which blocks make sense together (the estimator x structure table of
    docs/algorithms.md#curvature-estimators).

    ``(path, message, moved)`` for every problem among the valid blocks; ``moved``: a check
    blocks used to make when the optimizer was built (a PipelineError then), see
    :class:`precond.errors.RecipeCombinationError`. A check that needs an invalid block is skipped.
    """
    out: list[tuple[str, str, bool]] = []
    own = parts.own
    curvature, structure = own.curvature, own.structure
    if curvature is not INVALID and structure is not INVALID:
        if curvature is not None and structure is None:
            out.append(("curvature", f"curvature '{curvature.name}' has nowhere to go: add a structure that it can fill "
                        f"({', '.join(sorted(curvature.fills)) or 'none'})", False))
        elif structure is not None and curvature is None:
            out.append(("structure", f"structure '{structure.name}' needs a curvature block to fill it "
                        "(e.g. curvature: {type: empirical_fisher})", False))
        elif curvature is not None and structure.form not in curvature.fills:
            fillers = sorted(n for n, c in registry.blocks("curvature").items() if structure.form in c.fills)
            out.append((
                "structure",
                f"curvature '{curvature.name}' cannot fill a '{structure.form}' structure; it fills: "
                f"{', '.join(sorted(curvature.fills)) or 'nothing'}. Curvatures that fill '{structure.form}': "
                f"{', '.join(fillers) or 'none'}",
                False,
            ))
        elif curvature is not None:
            check = getattr(structure, "recipe_problems", None)  # what else the structure needs of its curvature
            if callable(check):
                out.extend((path, message, True) for path, message in check(curvature))
    for i, transform in enumerate(own.transforms):
        if transform is INVALID or not transform.spectral or structure is INVALID:
            continue
        if structure is None and curvature is None:
            out.append((
                f"transform.{i}",
                f"transform '{transform.name}' is a function of the curvature, but the recipe has no curvature/structure; "
                "add them (e.g. curvature: {type: empirical_fisher}, structure: {type: diagonal}) or use "
                "transform: identity",
                False,
            ))
        elif structure is not None and not structure.supports(transform):
            why = structure.refusal(transform)
            message = f"structure '{structure.name}' cannot apply transform '{transform.name}'" + (f": {why}" if why else "")
            out.append((f"transform.{i}", message, False))
    step = parts.step
    check = getattr(step, "recipe_problems", None)  # what the step control needs of every pipeline
    if step is not INVALID and callable(check):
        for view in [own, *parts.rules()]:
            if isinstance(view, PipelineView) and view.known():
                found = check(view)
                out.extend((view.path + path, message, True) for path, message in found)
                if not found:
                    out.extend(_missing_facts(view, step))
    elif step is not INVALID:
        out.extend(_missing_facts(own, step))
    return out


def _missing_facts(view: PipelineView, step: Any) -> list[tuple[str, str, bool]]:
    """Facts a block requires (:class:`precond.interfaces.Facts`) that no block of its pipeline (or the step
    control) produces."""
    if not view.known():
        return []
    blocks = [(f"{view.path}{kind}", b) for kind, b in (("curvature", view.curvature), ("structure", view.structure),
                                                         ("momentum", view.momentum), ("decay", view.decay)) if b is not None]
    blocks += [(f"{view.path}transform.{i}", t) for i, t in enumerate(view.transforms)]
    blocks += [("step", step)]
    produced = {fact for _, b in blocks for fact in b.produces}
    out = []
    for path, block in blocks:
        for fact in sorted(block.requires - produced):
            makers = sorted(f"{kind} '{name}'" for kind in KINDS for name, cls in registry.blocks(kind).items() if fact in cls.produces)
            out.append((path, f"{block.kind} '{block.name}' needs the {fact} that {' or '.join(makers) or 'no block'} "
                        f"produces, and {view.label} has none of them", False))
    return out


def _check_combination(recipe: Recipe, info: ValidationInfo) -> Recipe:
    """The model validator: the first cross-block problem (``validate`` collects them all itself)."""
    if (info.context or {}).get(_COLLECT):
        return recipe
    for path, message, _ in _combination_problems(_Parts.of(recipe)):
        raise PydanticCustomError("recipe_combination", message, {"path": path})
    return recipe


def recipe_model() -> type[Recipe]:
    """The recipe model for the blocks registered now (cached until a block registers)."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    fields: dict[str, Any] = {}
    descriptions = {
        "curvature": "how the curvature is estimated",
        "structure": "how the curvature is stored and accumulated",
        "transform": "function(s) of the curvature applied to the direction; one block or a list",
        "momentum": "momentum, before (pre) or after (post) preconditioning",
        "step": "how the step length is chosen",
        "decay": "how weight_decay applies: l2 (on the gradient) or decoupled (on the parameters)",
    }
    for kind in ("curvature", "structure", "momentum"):
        u = _union(kind)
        fields[kind] = (Optional[u], Field(None, description=descriptions[kind])) if u else (None, None)
    t = _union("transform")
    fields["transform"] = (list[t], Field(default_factory=list, description=descriptions["transform"]))  # type: ignore[valid-type]  # t: a run-time union
    fields["step"] = (_union("step"), Field(default_factory=lambda: registry.get("step", "lr")(), description=descriptions["step"]))
    fields["decay"] = (_union("decay"), Field(default_factory=lambda: registry.get("decay", "l2")(), description=descriptions["decay"]))
    fields["rules"] = (
        list[Rule],
        Field(default_factory=list, description="route parameters (by module type or name) to other recipes; first match wins"),
    )

    def _listify(cls: Any, value: Any) -> Any:
        if value is None:
            return []
        return value if isinstance(value, (list, tuple)) else [value]

    model = create_model(  # type: ignore[call-overload]  # field definitions built at run time
        "Recipe",
        __base__=Recipe,
        __module__=__name__,
        __validators__={
            "_listify": field_validator("transform", mode="before")(_listify),
            "_combination": model_validator(mode="after")(_check_combination),
        },
        **fields,
    )
    model.__doc__ = Recipe.__doc__
    _MODEL = model
    return model


def schema() -> dict[str, Any]:
    """JSON Schema of a recipe (for editors: yaml-language-server, VS Code)."""
    s = recipe_model().model_json_schema()
    s.setdefault("properties", {})["extends"] = {
        "type": "string",
        "description": "start from this recipe (a built-in name or a path): keys given here replace its keys, a block "
        "without 'type' changes only the fields it names, rules replace the rule of the same name or come first",
    }
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["title"] = "precond recipe"
    return s


# --- YAML with locations -------------------------------------------------------------------


@dataclass(frozen=True)
class Loc:
    source: str
    line: int | None = None  # 1-based
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


Locations = dict[tuple[Any, ...], Loc]


def _mark(source: str, node: yaml.Node) -> Loc:
    return Loc(source, node.start_mark.line + 1, node.start_mark.column + 1)


def parse_yaml(text: str | bytes, source: str = "<string>") -> tuple[Any, Locations]:
    """Parse YAML safely, returning the data and the location of every key and item."""
    if isinstance(text, bytes):
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError(f"the file is {len(text)} bytes; recipes are limited to {MAX_RECIPE_BYTES}", source)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"not UTF-8 text (byte {exc.start}: {exc.reason}); save the recipe as UTF-8", source) from None
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the text is {len(text)} characters; recipes are limited to {MAX_RECIPE_BYTES}", source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = exc.problem or str(exc)
        raise RecipeError([Problem(where, "", f"YAML syntax error: {what}")], source) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"YAML error: {exc}", source) from None
    except RecursionError:
        raise RecipeError(f"nested too deeply (more than {MAX_DEPTH} levels)", source) from None
    if node is None:
        raise RecipeError([Problem(source, "", "the recipe is empty; expected a mapping with at least 'name'")], source)
    locations: Locations = {}
    constructor = yaml.SafeLoader("")
    budget = [MAX_YAML_NODES]

    def build(n: yaml.Node, path: tuple[Any, ...], depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise RecipeError(
                [Problem(str(_mark(source, n)), "", f"the recipe expands to more than {MAX_YAML_NODES} values "
                         "(anchors and aliases that multiply); write it out plainly")],
                source,
            )
        if depth > MAX_DEPTH:
            raise RecipeError([Problem(str(_mark(source, n)), _dotted(path), f"nested deeper than {MAX_DEPTH} levels")], source)
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and n.tag not in _PLAIN_TAGS:
            raise RecipeError(
                [Problem(str(_mark(source, n)), _dotted(path), f"the tag {n.tag!r} is not allowed; recipes are plain data (no tags such as !!python/...)")],
                source,
            )
        if isinstance(n, yaml.MappingNode):
            constructor.flatten_mapping(n)
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = build(key_node, path, depth + 1)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    raise RecipeError([Problem(str(_mark(source, key_node)), _dotted(path), f"keys must be plain words, got {key!r}")], source)
                if key in out:
                    raise RecipeError([Problem(str(_mark(source, key_node)), _dotted(path + (key,)), "duplicate key")], source)
                locations[path + (key,)] = _mark(source, key_node)
                out[key] = build(value_node, path + (key,), depth + 1)
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                locations[path + (i,)] = _mark(source, item)
                items.append(build(item, path + (i,), depth + 1))
            return items
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise RecipeError(
                [Problem(str(_mark(source, n)), _dotted(path), f"{exc.problem}; recipes are plain data (no tags such as !!python/...)")],
                source,
            ) from None

    try:
        data = build(node, (), 0)
    except RecursionError:
        raise RecipeError(f"nested too deeply (more than {MAX_DEPTH} levels)", source) from None
    locations[()] = _mark(source, node)
    return data, locations


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


# --- resolving a recipe from a name, file, dict or Recipe ------------------------------------


def recipe_dirs() -> list[Path]:
    """Where built-in recipes live: inside the wheel, or the checkout's top-level folder."""
    dirs = []
    packaged = resources.files("precond") / "recipes"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir() and checkout not in dirs:
        dirs.append(checkout)
    return dirs


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file."""
    found: dict[str, Path] = {}
    for d in reversed(recipe_dirs()):
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return dict(sorted(found.items()))


def _source_of(spec: str | Path) -> tuple[Path, str]:
    s = str(spec)
    path = Path(s).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in s or "\\" in s:
        if not path.is_file():
            raise RecipeError([Problem(s, "", "no such recipe file")], s)
        return path, s
    table = builtin_recipes()
    if s in table:
        return table[s], f"{s} ({table[s].name})"
    hint = registry.suggest(s, list(table))
    raise RecipeError(
        [Problem("", "", f"no built-in recipe named {s!r}{hint}; built-in: {', '.join(table)}; or give a path to a .yaml file")],
        s,
    )


def load_recipe(spec: str | Path, *, hyper: Mapping[str, Any] | None = None, set: Mapping[str, Any] | None = None) -> Recipe:  # noqa: A002
    """Load and validate a recipe from a built-in name or a YAML file."""
    path, source = _source_of(spec)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError([Problem(str(path), "", f"cannot read the file: {exc.strerror}")], str(path)) from None
    where = str(path) if path.is_absolute() or not str(spec).isidentifier() else str(path)
    data, locations = parse_yaml(raw, where)
    return validate(data, locations=locations, source=where, hyper=hyper, set=set)


def resolve(spec: Any, *, hyper: Mapping[str, Any] | None = None, set: Mapping[str, Any] | None = None) -> Recipe:  # noqa: A002
    """A Recipe from a built-in name, a path, a dict or a Recipe, with overrides applied."""
    if isinstance(spec, Recipe):
        if not hyper and not set:
            return spec
        return validate(spec.to_dict(), source=f"<recipe {spec.name}>", hyper=hyper, set=set)
    if isinstance(spec, Mapping):
        return validate(copy.deepcopy(dict(spec)), source="<dict>", hyper=hyper, set=set)
    if isinstance(spec, (str, Path)):
        return load_recipe(spec, hyper=hyper, set=set)
    raise RecipeError(f"a recipe is a built-in name, a path, a dict or a Recipe; got {type(spec).__name__}")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["structure.beta=0.99", ...]`` (CLI ``--set``) -> ``{"structure.beta": 0.99}`` (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([Problem(f"--set {item}", "", "expected key=value, e.g. --set structure.beta=0.99 or --set lr=0.01")])
        data, _ = parse_yaml(text, f"--set {key.strip()}") if text.strip() else (None, {})
        out[key.strip()] = data
    return out


def _apply_overrides(
    data: Any, locations: Locations, hyper: Mapping[str, Any] | None, sets: Mapping[str, Any] | None
) -> None:
    if not isinstance(data, dict):
        return
    base = Recipe.model_fields
    for key, value in (hyper or {}).items():
        if key not in Recipe.HYPERPARAMETERS:
            hint = registry.suggest(key, list(Recipe.HYPERPARAMETERS))
            raise RecipeError(
                [Problem(f"keyword {key}=", "", f"unknown hyperparameter {key!r}{hint}; top-level hyperparameters are "
                         f"{', '.join(Recipe.HYPERPARAMETERS)}; set block fields with set={{'kind.field': value}}, "
                         "e.g. set={'momentum.beta': 0.9}")]
            )
        data[key] = value
        locations[(key,)] = Loc(f"keyword {key}=")
    for dotted, value in (sets or {}).items():
        parts: list[Any] = [int(p) if p.isdigit() else p for p in str(dotted).split(".")]
        if not parts or any(p == "" for p in parts):
            raise RecipeError([Problem(f"--set {dotted}", "", "expected a dotted path such as structure.beta")])
        where = Loc(f"--set {dotted}")
        if parts[0] not in base and parts[0] not in KINDS and parts[0] != "rules":
            hint = registry.suggest(str(parts[0]), list(base) + list(KINDS))
            raise RecipeError([Problem(str(where), "", f"unknown recipe key {parts[0]!r}{hint}")])
        if parts[0] == "transform" and isinstance(data.get("transform"), dict):
            data["transform"] = [data["transform"]]  # address the single transform as transform.0
        parts = _list_path(data, parts)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
            if nxt is None:
                if isinstance(node, dict):
                    nxt = node[part] = {}
                    locations[tuple(parts[: i + 1])] = where
                else:
                    raise RecipeError([Problem(str(where), _dotted(tuple(parts[: i + 1])), "no such entry in the recipe")])
            if isinstance(nxt, str) and part == "recipe" and parts[0] == "rules":  # a rule's recipe by name: its fields
                nxt = node[part] = resolve(nxt).to_dict()
            if not isinstance(nxt, (dict, list)):
                raise RecipeError([Problem(str(where), _dotted(tuple(parts[: i + 1])), f"is {nxt!r}, not a block; cannot set a field inside it")])
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise RecipeError([Problem(str(where), str(dotted), "no such list item")])
        node[last] = value
        locations[tuple(parts)] = where


def _list_path(data: Any, parts: list[Any]) -> list[Any]:
    """``parts`` with list items named: a rule by its name (``rules.adam.recipe.lr``), the one item of a
    one-item list by nothing (``transform.damping`` for ``transform.0.damping``)."""
    out: list[Any] = []
    node = data
    for part in parts:
        if isinstance(node, list) and isinstance(part, str):
            named = [k for k, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
            if named:
                part = named[0]
            elif len(node) == 1 and not (isinstance(node[0], dict) and "name" in node[0] and "match" in node[0]):
                out.append(0)
                node = node[0]
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return out


def validate(
    data: Any,
    *,
    locations: Locations | None = None,
    source: str = "<dict>",
    hyper: Mapping[str, Any] | None = None,
    set: Mapping[str, Any] | None = None,  # noqa: A002
) -> Recipe:
    """Validate plain data into a Recipe, turning every error into a located RecipeError."""
    locations = dict(locations or {})
    if not isinstance(data, dict):
        got = type(data).__name__ if data is not None else "nothing"
        raise RecipeError([Problem(str(locations.get((), source)), "", f"a recipe is a mapping (key: value lines), got {got}")], source)
    data = _extend(data, locations, source)
    _apply_overrides(data, locations, hyper, set)
    # every problem in one pass: unknown block types, then the fields of everything else, then the
    # cross-block checks among the valid blocks; reported together, in file order
    problems, unknown = _check_types(data, locations, source)
    clean = _without(data, unknown)
    recipe: Recipe | None = None
    try:
        recipe = recipe_model().model_validate(clean, context={_COLLECT: True})
    except ValidationError as exc:
        problems.extend(_problem(e, clean, locations, source) for e in exc.errors())
    parts = _Parts.of(recipe) if recipe is not None else _parts_of_data(clean, unknown)
    moved = False
    for path, message, was_pipeline_error in _combination_problems(parts):
        problems.append(_combination_problem(path, message, clean, locations, source))
        moved = moved or was_pipeline_error
    if problems:
        raise (RecipeCombinationError if moved else RecipeError)(file_order(problems), source)
    assert recipe is not None
    _ORIGINS.remember(recipe, locations, source)
    return recipe


def _extend(data: dict[str, Any], locations: Locations, source: str) -> dict[str, Any]:
    """``extends: BASE``: the base recipe's data with this recipe's keys over it. A block given without ``type``
    (or with the base's) changes only the fields it names; one of another type replaces the base's block. A rule
    named as one of the base's replaces it in place; new rules come before the base's (the first match wins)."""
    if "extends" not in data:
        return data
    data = dict(data)
    spec = data.pop("extends")
    where = str(locations.get(("extends",), source))
    if not isinstance(spec, str) or not spec:
        raise RecipeError([Problem(where, "extends", f"expected a built-in recipe name or a path, got {spec!r}")], source)
    base = resolve(spec).to_dict()
    merged = {**base, **{k: v for k, v in data.items() if k != "rules"}}
    for key in KINDS:
        mine, theirs = data.get(key), base.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict) and mine.get("type", theirs.get("type")) == theirs.get("type"):
            merged[key] = {**theirs, **mine}
    if "rules" in data:
        mine_rules = data["rules"]
        if not isinstance(mine_rules, list):
            merged["rules"] = mine_rules  # validation says what a rule list is
        else:
            names = {r.get("name") for r in mine_rules if isinstance(r, dict)}
            replaced = {r.get("name"): r for r in mine_rules if isinstance(r, dict)}
            base_rules = base.get("rules") or []
            base_names = {r.get("name") for r in base_rules}
            new = [r for r in mine_rules if not isinstance(r, dict) or r.get("name") not in base_names]
            merged["rules"] = new + [replaced[r["name"]] if r.get("name") in names else r for r in base_rules]
    return merged


def _without(data: dict[str, Any], unknown: set[tuple[Any, ...]]) -> dict[str, Any]:
    """``data`` without the blocks whose type is unknown or missing (a transform in a list becomes
    ``identity`` so that the others keep their index; nothing of it is checked further)."""
    if not unknown:
        return data
    clean = dict(data)
    for path in unknown:
        if len(path) == 1:
            clean.pop(path[0], None)
        else:
            kind, i = path
            clean[kind] = list(clean[kind])
            clean[kind][i] = {"type": "identity"}
    return clean


def _parts_of_data(data: dict[str, Any], unknown: set[tuple[Any, ...]]) -> _Parts:
    """The blocks for the cross-block checks when the recipe as a whole did not validate: each
    block validated on its own (INVALID if it does not, or its type is unknown)."""

    def block(kind: str, entry: Any, path: tuple[Any, ...]) -> Any:
        if path in unknown:
            return INVALID
        if entry is None:
            return registry.get(kind, {"step": "lr", "decay": "l2"}[kind])() if kind in ("step", "decay") else None
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            return INVALID
        try:
            return registry.get(kind, entry["type"]).model_validate(entry)
        except (KeyError, ValueError, TypeError):  # pydantic's ValidationError is a ValueError
            return INVALID

    entries = data.get("transform")
    if entries is None:
        transforms: tuple[Any, ...] = ()
    elif isinstance(entries, dict):
        transforms = (block("transform", entries, ("transform",)),)
    elif isinstance(entries, list):
        transforms = tuple(block("transform", e, ("transform", i)) if e is not None else INVALID for i, e in enumerate(entries))
    else:
        transforms = (INVALID,)
    own = PipelineView(*(block(k, data.get(k), (k,)) for k in ("curvature", "structure")), transforms,
                       *(block(k, data.get(k), (k,)) for k in ("momentum", "decay")))

    def rules() -> list[PipelineView | Any]:
        items = data.get("rules")
        if not isinstance(items, list):
            return []
        out: list[PipelineView | Any] = []
        for i, item in enumerate(items):
            try:
                rule = Rule.model_validate(item)
            except (ValueError, TypeError):
                out.append(INVALID)
                continue
            out.append(PipelineView.of(rule.recipe, f"rules.{i}.recipe.", f"rule '{rule.name}'"))
        return out

    return _Parts(own, block("step", data.get("step"), ("step",)), rules)


def _combination_problem(path: str, message: str, data: dict[str, Any], locations: Locations, source: str) -> Problem:
    parts = tuple(int(p) if p.isdigit() else p for p in path.split(".") if p)
    if len(parts) >= 2 and parts[0] == "transform" and isinstance(data.get("transform"), dict):
        parts = parts[:1] + parts[2:]  # a single transform written as a mapping: transform.0.x is transform.x
    return Problem(str(_locate(parts, locations, source)), _dotted(parts), message)


class _Origins:
    """Where each validated recipe was written (its key locations), kept beside the frozen recipe
    (not a field: recipes compare equal by content) for messages that come later, e.g. the
    warnings about rule patterns that match nothing in the model."""

    def __init__(self) -> None:
        self._table: dict[int, tuple[Locations, str]] = {}

    def remember(self, recipe: Recipe, locations: Locations, source: str) -> None:
        key = id(recipe)
        if key not in self._table:
            weakref.finalize(recipe, self._table.pop, key, None)
        self._table[key] = (locations, source)

    def locate(self, recipe: Recipe, path: tuple[Any, ...]) -> str:
        """``file:line:column`` of ``path`` in the recipe's file (or the nearest enclosing key), else ''."""
        entry = self._table.get(id(recipe))
        if entry is None:
            return ""
        locations, source = entry
        return str(_locate(path, locations, source))


_ORIGINS = _Origins()


def location_of(recipe: Recipe, path: tuple[Any, ...]) -> str:
    """Where ``path`` (e.g. ``("rules", 0, "match", "modules", 1)``) is written in the recipe's
    file: ``file:line:column``, the source's name when the line is not known, '' if unknown."""
    return _ORIGINS.locate(recipe, path)


def _check_types(data: dict[str, Any], locations: Locations, source: str) -> tuple[list[Problem], set[tuple[Any, ...]]]:
    """Unknown or missing block ``type``: say so with the registered names, before pydantic.

    Returns the problems and the paths of those blocks (their fields are not checked further)."""
    problems = []
    unknown: set[tuple[Any, ...]] = set()
    for kind in KINDS:
        entries = data.get(kind)
        items = entries if isinstance(entries, list) and kind == "transform" else [entries]
        for i, entry in enumerate(items):
            if entry is None:
                continue
            path = (kind, i) if isinstance(entries, list) else (kind,)
            where = str(_locate(path, locations, source))
            known = registry.names(kind)
            if isinstance(entry, str):  # shorthand `momentum: ema` is not allowed; say what is
                problems.append(Problem(where, _dotted(path), f"expected a mapping with a 'type', e.g. {{type: {entry}}}"))
                unknown.add(path)
                continue
            if not isinstance(entry, dict):
                continue
            name = entry.get("type")
            if name is None:
                problems.append(Problem(where, _dotted(path), f"missing 'type'; {kind} types: {', '.join(known)}"))
                unknown.add(path)
            elif not isinstance(name, str) or name not in known:
                hint = registry.suggest(str(name), known)
                problems.append(
                    Problem(str(_locate(path + ("type",), locations, source)), _dotted(path + ("type",)),
                            f"unknown {kind} type {name!r}{hint}; registered {kind} types: {', '.join(known)}")
                )
                unknown.add(path)
    return problems, unknown


def _locate(path: tuple[Any, ...], locations: Locations, source: str) -> Loc:
    while path:
        if path in locations:
            return locations[path]
        path = path[:-1]
    return locations.get((), Loc(source))


def _data_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Map a pydantic error location to a path in the data (drop union tags and list wrapping)."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node:
            if path == ["transform"] and part == 0:
                continue  # a single transform written as a mapping is validated as transform[0]
            if isinstance(node.get("type"), str) and part == node["type"]:
                continue  # the discriminator tag pydantic inserts
        path.append(part)
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(path)


def _block_class(path: tuple[Any, ...], data: dict[str, Any]) -> type[BaseModel] | None:
    if not path:
        return recipe_model()
    if path == ("distributed",):
        return Distributed
    kind = path[0]
    if kind not in KINDS:
        return None
    entry = data.get(kind)
    if kind == "transform" and isinstance(entry, list):
        entry = entry[path[1]] if len(path) > 1 and isinstance(path[1], int) and path[1] < len(entry) else None
    if isinstance(entry, dict) and isinstance(entry.get("type"), str):
        try:
            return registry.get(kind, entry["type"])
        except KeyError:
            return None
    return None


def _problem(error: Mapping[str, Any], data: dict[str, Any], locations: Locations, source: str) -> Problem:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "recipe_combination":
        return _combination_problem(str(ctx.get("path", "")), error["msg"], data, locations, source)
    path = _data_path(tuple(error["loc"]), data)
    field = field_of(error)  # a block validator's error about one of its fields: located at that key
    if field is not None:
        path = path + (field,)
        return Problem(str(_locate(path, locations, source)), _dotted(path), error["msg"])
    where = str(_locate(path, locations, source))
    dotted = _dotted(path)
    if kind == "extra_forbidden":
        owner = _block_class(path[:-1], data)
        fields = [f for f in (owner.model_fields if owner else {}) if f != "type"]
        hint = registry.suggest(str(path[-1]), fields) if fields else ""
        valid = f"; valid keys: {', '.join(fields)}" if fields else ""
        return Problem(where, dotted, f"unknown key {path[-1]!r}{hint}{valid}")
    if kind == "missing":
        return Problem(where, dotted, "required field is missing")
    if kind == "value_error":
        return Problem(where, dotted, error["msg"].removeprefix("Value error, "))
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    expected = error["msg"]
    if expected.startswith("Input should be"):
        expected = "expected" + expected[len("Input should be"):]
    return Problem(where, dotted, f"{expected} (got {shown})")



def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What must match for a checkpoint to resume: the block types, in order."""
    return {path: block.name for path, block in recipe.blocks()}

