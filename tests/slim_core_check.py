"""The library without its ``cli`` extra: ``pip install precond`` gives torch, pydantic and pyyaml only.

``python tests/slim_core_check.py`` builds and steps optimizers (``kfac``, ``adam``, ``shampoo``,
``sophia_g``), composes one from blocks, estimates curvature, loads every built-in recipe and
round-trips a ``state_dict``, then checks that none of the extra's modules was imported. With
``--block`` it first installs a ``sys.meta_path`` finder that makes them unimportable (what
tests/test_slim_core.py does, in a subprocess; ``--block=sklearn,matplotlib``: those only); without
it, it is the check to run by hand in a virtual environment where precond was installed without
extras. ``--block --cli ARGS...`` runs the console script's entry point, ``precond.cli:main``, with
ARGS instead.
"""

from __future__ import annotations

import sys

# the cli extra and what it brings (typer's click, scikit-learn's scipy and numpy); torch does not need numpy
BLOCKED = ("typer", "rich", "click", "sklearn", "matplotlib", "scipy", "numpy")


class Blocker:
    """A ``sys.meta_path`` finder: importing a BLOCKED module raises ModuleNotFoundError, and every
    attempt is recorded with the file that made it (so that precond's own attempts, even ones inside
    ``try: ... except ImportError``, are found). :func:`block` installs it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name.partition(".")[0] in BLOCKED:
            self.attempts.append((name, _importer()))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by {__file__})", name=name)
        return None


def _in_import_machinery(filename: str) -> bool:
    return filename.startswith("<frozen") or "importlib" in filename


def _importer() -> str:
    """The file of the innermost frame outside the import machinery."""
    frame = sys._getframe(2)
    while frame is not None and _in_import_machinery(frame.f_code.co_filename):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "?"


def block(names: tuple[str, ...] = BLOCKED) -> Blocker:
    global BLOCKED
    BLOCKED = names
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED:
            raise RuntimeError(f"{name} was imported before the blocker (python -S, or a sitecustomize?)")
    finder = Blocker()
    sys.meta_path.insert(0, finder)
    # importlib.util.find_spec (how torch probes optional packages) answers None, as for a missing package
    import importlib.util

    find_spec = importlib.util.find_spec

    def hiding_find_spec(name, package=None):  # noqa: ANN001, ANN202
        absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        return None if absolute.partition(".")[0] in BLOCKED else find_spec(name, package)

    importlib.util.find_spec = hiding_find_spec
    return finder


def check_core() -> None:
    import io

    import torch
    import torch.nn.functional as F

    import precond
    from precond.curvature.empirical_fisher import EmpiricalFisher
    from precond.recipe import builtin_recipes
    from precond.step.momentum import EMA
    from precond.structure.diagonal import Diagonal
    from precond.transform.inverse_root import InverseRoot

    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def closure_for(model):  # noqa: ANN001, ANN202
        def closure():  # noqa: ANN202
            out = model(x)
            return F.cross_entropy(out, y), out

        return closure

    def train(opt, model, steps: int = 3) -> list[float]:  # noqa: ANN001
        losses = [float(opt.step(closure_for(model))) for _ in range(steps)]
        assert all(v == v and abs(v) < 1e6 for v in losses), losses
        return losses

    names = sorted(builtin_recipes())
    assert {"adam", "kfac", "shampoo", "sophia_g"} <= set(names), names
    for name in names:
        recipe = precond.load_recipe(name)
        assert recipe.name, name

    for name in ("kfac", "adam", "shampoo", "sophia_g"):
        model = mlp()
        losses = train(precond.build(name, model, likelihood="categorical"), model)
        print(f"{name}: losses {', '.join(f'{v:.4f}' for v in losses)}")

    model = mlp()
    opt = precond.compose(model, curvature=EmpiricalFisher(), structure=Diagonal(beta=0.999),
                          transform=InverseRoot(p=2, damping=1e-8, damping_position="outside"), momentum=EMA(beta=0.9),
                          lr=1e-3)
    train(opt, model)

    model = mlp()
    closure = closure_for(model)
    H = precond.estimate("hessian", model, closure, structure="full")
    n = sum(p.numel() for p in model.parameters())
    assert tuple(H.shape) == (n, n)
    G = precond.estimate("gauss_newton", model, closure, likelihood="categorical")
    assert set(G) == {name for name, _ in model.named_parameters()}
    precond.estimate("hutchinson", model, closure, samples=4, seed=0)
    precond.estimate("sampled_fisher", model, closure, structure="kronecker")

    # a checkpoint: the resumed optimizer continues exactly as the original
    model = mlp()
    opt = precond.build("kfac", model, likelihood="categorical", seed=3)
    train(opt, model, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt2 = precond.build("kfac", resumed, likelihood="categorical", seed=3)
    opt2.load_state_dict(ckpt["opt"])
    assert train(opt, model) == train(opt2, resumed)
    print("estimate, compose, load_recipe, state_dict round trip: ok")


def check_cli(argv: list[str]) -> None:
    sys.argv = ["precond", *argv]
    from precond.cli import main

    main()


def main() -> int:
    args = sys.argv[1:]
    finder = None
    if args and args[0].startswith("--block"):  # --block, or --block=NAME,NAME: only those
        _, _, names = args.pop(0).partition("=")
        finder = block(tuple(names.split(",")) if names else BLOCKED)
    if args[:1] == ["--cli"]:
        check_cli(args[1:])
        return 0
    check_core()
    imported = sorted({name.partition(".")[0] for name in sys.modules} & set(BLOCKED))
    if imported:
        print(f"FAIL: the core imported {', '.join(imported)}", file=sys.stderr)
        return 1
    if finder is not None:
        import os

        import precond

        package = os.path.dirname(os.path.abspath(precond.__file__)) + os.sep
        ours = [(name, path) for name, path in finder.attempts if os.path.abspath(path).startswith(package)]
        if ours:
            print(f"FAIL: precond tried to import {ours}", file=sys.stderr)
            return 1
        if finder.attempts:  # torch's optional imports, answered 'not installed'
            print(f"blocked (not precond's): {sorted({a[0] for a in finder.attempts})}")
    print("slim core: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
