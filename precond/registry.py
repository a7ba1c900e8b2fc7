"""kind -> name -> block class; the ``@register`` decorator; entry-point plugins.

A third-party package adds blocks by exposing a module in the entry-point
group ``precond.blocks``; importing that module runs its ``@register``
decorators. The recipe schema is generated from this registry, so a plugin
block is validated, listed and documented like a built-in.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Literal, TypeVar

from pydantic import create_model

from precond import plugins
from precond.block import KIND_BASES, KINDS, Block

ENTRY_POINT_GROUP = "precond.blocks"
B = TypeVar("B", bound=type[Block])

_BLOCKS: dict[str, dict[str, type[Block]]] = {kind: {} for kind in KINDS}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False
PLUGIN_ERRORS: dict[str, str] = {}
_listeners: list[Callable[[], None]] = []

BUILTIN_PACKAGES = ("precond.curvature", "precond.structure", "precond.transform", "precond.step")
"""Every module of these packages is imported before the registry is read: a new block is one file with
one ``@register`` (no list to update)."""


def builtin_modules() -> list[str]:
    """The modules of :data:`BUILTIN_PACKAGES`, in name order (their blocks register on import)."""
    out = []
    for package in BUILTIN_PACKAGES:
        path = importlib.import_module(package).__path__
        out.extend(f"{package}.{m.name}" for m in sorted(pkgutil.iter_modules(path), key=lambda m: m.name))
    return out


def register(kind: str, name: str) -> Callable[[B], B]:
    """Register a block class under ``kind`` and ``name``.

    The class must derive from the base of its kind (``precond.block.Curvature``,
    ``Structure``, ...). A ``type: Literal[name]`` field is added, so the class
    can be used directly in Python (``Diagonal(beta=0.99)``) and appears in the
    recipe schema as ``{type: name, ...}``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; kinds are {', '.join(KINDS)}")
    if not name.isidentifier():
        raise ValueError(f"block name {name!r} must be an identifier (letters, digits, _)")

    def decorate(cls: B) -> B:
        base = KIND_BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"@register({kind!r}, {name!r}): {cls!r} must subclass precond.block.{base.__name__}")
        existing = _BLOCKS[kind].get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} block {name!r} is already registered by {existing.__module__}")
        block = create_model(  # type: ignore[call-overload]  # a field definition built at run time
            cls.__name__,
            __base__=cls,
            __module__=cls.__module__,
            __doc__=cls.__doc__,
            type=(Literal[name], name),
        )
        block.__qualname__ = cls.__qualname__
        block.kind = kind
        block.name = name
        _BLOCKS[kind][name] = block
        for listener in _listeners:
            listener()
        return block  # type: ignore[return-value]  # a subclass of cls, with its `type` field

    return decorate


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever a block is registered (the schema cache uses it)."""
    _listeners.append(listener)


def _ensure_loaded() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in builtin_modules():
            importlib.import_module(module)
    load_plugins()


def load_plugins(force: bool = False) -> dict[str, str]:
    """Import every module in the ``precond.blocks`` entry-point group.

    A plugin that fails to import is reported (a warning, and in
    ``PLUGIN_ERRORS``), never fatal. Returns ``PLUGIN_ERRORS``.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED and not force:
        return PLUGIN_ERRORS
    _PLUGINS_LOADED = True
    for ep in plugins.entry_points(ENTRY_POINT_GROUP):
        plugins.load(ep, "block", PLUGIN_ERRORS)
    return PLUGIN_ERRORS


def blocks(kind: str) -> dict[str, type[Block]]:
    """The registered blocks of one kind, by name."""
    _ensure_loaded()
    return dict(_BLOCKS[kind])


def names(kind: str) -> list[str]:
    return sorted(blocks(kind))


def suggest(word: str, options: list[str], cutoff: float = 0.5) -> str:
    """' (did you mean 'x'?)' or '' — for error messages (``cutoff``: difflib's similarity, 0 to 1)."""
    close = difflib.get_close_matches(word, options, n=3, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def get(kind: str, name: str) -> type[Block]:
    """The block class ``name`` of ``kind``; a KeyError that suggests close names."""
    table = blocks(kind)
    if name not in table:
        raise KeyError(f"unknown {kind} block {name!r}{suggest(name, list(table))}; registered: {', '.join(sorted(table))}")
    return table[name]


def parameters(cls: type[Block]) -> list[dict[str, Any]]:
    """The configurable fields of a block: name, type, default, description."""
    rows = []
    for fname, info in cls.model_fields.items():
        if fname == "type":
            continue
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
        rows.append(
            {
                "name": fname,
                "type": annotation,
                "default": None if info.is_required() else info.get_default(call_default_factory=True),
                "required": info.is_required(),
                "description": info.description or "",
            }
        )
    return rows


def describe_all() -> list[dict[str, Any]]:
    """Every registered block with its kind, name, one-line doc, needs and parameters."""
    out = []
    for kind in KINDS:
        for name, cls in sorted(blocks(kind).items()):
            doc = (cls.__doc__ or "").strip().splitlines()
            out.append(
                {
                    "kind": kind,
                    "name": name,
                    "doc": doc[0] if doc else "",
                    "module": cls.__module__,
                    "parameters": parameters(cls),
                }
            )
    return out
