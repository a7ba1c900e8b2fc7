"""Full structure: one dense curvature matrix per tensor, per layer or per param group.

Two ways to apply a transform to a direction ``v``:

* ``solver: dense`` keeps the matrix. ``inverse`` solves ``(scale·C + λI) x = v``
  (eigendecomposition, or Cholesky with ``method: cholesky``); ``inverse_root``
  applies ``f(C)`` through the eigendecomposition. A singular ``C`` is handled
  as ``lstsq`` does: eigenvalues below ``n·eps·max|λ|`` count as zero and a
  component whose ``f`` is infinite is dropped (the pseudo-inverse).
* ``solver: cg`` never forms the matrix: ``inverse`` runs conjugate gradients
  on curvature-vector products (the curvature block's ``matvec``: HVPs,
  GGN-vector products, Fisher-vector products) with an iteration limit, a
  relative-residual tolerance, Martens' relative-progress stop and a warm
  start from the previous solution.

A curvature block fills the matrix in one of two ways: ``full(ctx)`` returns
a fresh estimate, which the structure keeps (``replace``) or accumulates
(``ema``, ``sum``); or ``full_update(ctx, matrix)`` refines the stored matrix
and says whether it holds ``C`` or ``C⁻¹`` (the ``secant`` quasi-Newton
updates: BFGS keeps the inverse ``H``, so ``inverse`` is then a product).

The matrix of a block lives in the state of the block's first parameter
(``structure.matrix``), so checkpoints carry it, and so does its last good
eigendecomposition (``structure.eigenvalues``, ``structure.eigenvectors``): a
failed one (NaN/Inf, or no convergence also in float64) leaves the previous in
use, is counted (``structure.failures``) and raises after ``max_failures`` in a
row, as the Kronecker structure does (:class:`precond.linalg.spectral.SpectralCache`).
:class:`Full` is the configuration, :class:`FullStage` the structure in one
optimizer (its curvature block, and block owners on several processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from precond.block import Curvature, Direction, Estimate, GroupStep, Needs, Served, Stage, Structure, Transform
from precond.distributed import Ownership
from precond.errors import PipelineError
from precond.linalg.cg import cg
from precond.linalg.spectral import EighFailureError, SpectralCache, robust_eigh
from precond.registry import register

Scope = Literal["tensor", "layer", "model"]


# --- blocks of parameters ------------------------------------------------------------------


def partition(params: list[torch.Tensor], scope: Scope, info: dict[torch.Tensor, Any]) -> list[list[int]]:
    """Indices of ``params`` grouped by ``scope``: each tensor, each owning module, or all."""
    if scope == "tensor":
        return [[i] for i in range(len(params))]
    if scope == "model":
        return [list(range(len(params)))] if params else []
    if not info:
        raise PipelineError(
            "scope: layer groups parameters by the module that owns them: pass the nn.Module to "
            "precond.build(recipe, model), not its parameters (or use scope: tensor | model)"
        )
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        owner = info[p].module_name if p in info else ("param", id(p))
        groups.setdefault(owner, []).append(i)
    return list(groups.values())


def secant_estimates(curvature: Curvature, ctx: GroupStep, blocks: list[list[int]], what: str) -> list[Estimate]:
    """The secant pair ``(s, y)`` a curvature's ``pair`` forms for each block (none on its first step)."""
    pair = getattr(curvature, "pair", None)
    if not callable(pair):
        return []
    out: list[Estimate] = []
    for b, idx in enumerate(blocks):
        step = pair(ctx.part(idx))
        if step.s is None:
            continue
        where = f"{what} {b} of {len(blocks)}"
        out.append(Estimate(step.s, tuple(idx), f"{where}: secant pair s, the parameter change"))
        out.append(Estimate(step.y, tuple(idx), f"{where}: secant pair y, the gradient change"))
    return out


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.view_as(p) for c, p in zip(torch.split(vector, [p.numel() for p in like]), like)]


# --- operators the transforms act through ----------------------------------------------------


class NoDecomposition(Exception):
    """A dense block has no eigendecomposition yet (every one so far failed): its direction passes unchanged."""


class DenseOperator:
    """``C`` held as a dense matrix, or as its inverse ``H = C⁻¹`` (``inverse=True``).

    ``eig``: the decomposition to use; else ``decompose()`` makes one when a transform first needs it
    (the structure's keep-last-good refresh: the new decomposition, the previous one, or None).
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        inverse: bool,
        method: str,
        eig: tuple[torch.Tensor, torch.Tensor] | None = None,
        decompose: Callable[[], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> None:
        self.matrix = matrix
        self.inverse = inverse
        self.method = method
        self._eig = eig
        self._decompose = decompose

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the stored matrix (``C``, or ``H`` when inverse)."""
        if self._eig is None and self._decompose is not None:
            self._eig, self._decompose = self._decompose(), None
        if self._eig is None:
            raise NoDecomposition
        return self._eig

    def function(self, fn: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
        """``f(C) v`` with the pseudo-inverse convention for (numerically) zero eigenvalues."""
        vals, vecs = self.eig()
        n = vals.numel()
        cutoff = n * torch.finfo(vals.dtype).eps * vals.abs().max()
        vals = torch.where(vals.abs() <= cutoff, torch.zeros_like(vals), vals)
        lam = 1.0 / vals if self.inverse else vals  # C's eigenvalues (inf where H has a zero)
        f = fn(lam)
        f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
        return vecs @ (f * (vecs.T @ vector))

    def solve(self, vector: torch.Tensor, scale: float, damping: float) -> torch.Tensor:
        """``(scale·C + damping·I)⁻¹ v``."""
        if self.inverse and damping == 0.0:
            return (self.matrix @ vector) / scale
        if not self.inverse and self.method == "cholesky" and self._eig is None:
            a = scale * self.matrix
            if damping:
                a = a + damping * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                return torch.cholesky_solve(vector.unsqueeze(1), chol).squeeze(1)
        return self.function(lambda lam: 1.0 / (scale * lam + damping), vector)


class CGOperator:
    """``C`` known only through products ``v ↦ C v``: solves by conjugate gradients."""

    def __init__(self, product: Callable[[torch.Tensor], torch.Tensor], state: dict[str, Any], config: Full):
        self.product = product
        self.state = state
        self.config = config
        self.quadratic: tuple[float, float] | None = None

    def function(self, fn: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
        raise PipelineError("structure 'full' with solver: cg can only solve (transform 'inverse'); use solver: dense")

    def solve(self, vector: torch.Tensor, scale: float, damping: float) -> torch.Tensor:
        c = self.config

        def matvec(x: torch.Tensor) -> torch.Tensor:
            out = self.product(x)
            if scale != 1.0:
                out = out * scale
            return out + damping * x if damping else out

        key = c.key("cg_solution")
        x0 = None
        if c.warm_start > 0 and key in self.state and self.state[key].shape == vector.shape:
            x0 = c.warm_start * self.state[key]
        res = cg(matvec, vector, x0, max_iter=c.cg_max_iter, tol=c.cg_tol, stop=c.cg_stop, martens_eps=c.martens_eps)
        x = res.x
        assert isinstance(x, torch.Tensor)
        gx = float(vector @ x)
        if res.negative_curvature_flag and res.iterations == 0 and not bool(x.any()):
            # negative curvature along the first direction: a scaled gradient step (as scipy's Newton-CG)
            curv = float(vector @ matvec(vector))
            x = vector * (float(vector @ vector) / abs(curv)) if curv else vector.clone()
            gx = float(vector @ x)
            self.quadratic = (gx, float(x @ matvec(x)))
        else:
            self.quadratic = (gx, 2.0 * res.objective_values[-1] + 2.0 * gx)  # φ = ½xᵀAx − vᵀx
        self.state[key] = x.detach().clone()
        self.state[c.key("cg_iterations")] = res.iterations
        return x


# --- the structure ----------------------------------------------------------------------------


@register("structure", "full")
class Full(Structure):
    """A dense curvature per tensor, layer or param group (``scope``), applied densely or by CG (``solver``).

    ``dense``: the matrix is stored (``accumulate``: ``replace`` it by each
    fresh estimate, or keep an ``ema`` / ``sum``), refused above ``max_params``
    entries per block; transforms act through its eigendecomposition
    (``method: eigh``, robust to indefinite and singular matrices) or, for
    ``inverse`` refreshed every step, a Cholesky solve (``method: cholesky``,
    falling back to ``eigh`` when the matrix is not positive definite). A
    transform with ``every: k`` reuses the eigendecomposition for ``k`` steps.
    A failed eigendecomposition (NaN/Inf, or no convergence also in float64)
    keeps the block's previous one (none before the first success: the
    direction passes unchanged) and raises after ``max_failures`` in a row.
    ``cg``: matrix-free, only ``inverse`` (``(scale·C + λI)⁻¹ v`` by CG on the
    curvature block's products; the curvature must refresh every step).
    """

    form: ClassVar[str] = "full"
    produces: ClassVar[frozenset[str]] = frozenset({"quadratic"})  # of an inverse's solve, for step 'lm'

    scope: Scope = Field("model", description="one matrix per tensor, per layer (owning module), or per param group")
    solver: Literal["dense", "cg"] = Field("dense", description="dense matrix, or matrix-free conjugate gradients")
    accumulate: Literal["replace", "ema", "sum"] = Field("replace", description="dense: keep the latest estimate, an EMA, or a sum")
    beta: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay (accumulate: ema)")
    bias_correction: bool = Field(True, description="divide the EMA by 1-beta^n (accumulate: ema)")
    method: Literal["eigh", "cholesky"] = Field("eigh", description="dense solve: eigendecomposition, or Cholesky (falls back to eigh)")
    max_params: int = Field(5000, ge=1, description="dense: refuse blocks with more parameters than this")
    cg_max_iter: int = Field(100, ge=1, description="cg: iteration limit")
    cg_tol: float = Field(1e-10, ge=0.0, description="cg: stop when ||r|| <= cg_tol * ||b||")
    cg_stop: Literal["residual", "martens"] = Field("residual", description="cg: residual test only, or also Martens' relative progress")
    martens_eps: float = Field(5e-4, gt=0.0, description="cg: epsilon of Martens' relative-progress stop")
    warm_start: float = Field(0.0, ge=0.0, le=1.0, description="cg: start from this multiple of the previous solution (0: cold)")
    max_failures: int = Field(5, ge=1, description="dense: raise after this many consecutive failed eigendecompositions of a block")

    @model_validator(mode="after")
    def _cg_is_matrix_free(self) -> Full:
        if self.solver == "cg" and self.accumulate != "replace":
            raise ValueError("solver: cg keeps no matrix, so it cannot accumulate; use accumulate: replace or solver: dense")
        return self

    def needs(self) -> Needs:
        # CG multiplies by the curvature while the step runs: a curvature of the outputs needs their graph then
        return Needs(graph_at_step=self.solver == "cg")

    def distributed_problem(self) -> str | None:
        if self.solver == "cg":
            return "structure 'full' with solver: cg multiplies by this process's curvature in every CG iteration (not averaged over the processes)"
        return None

    def supports(self, transform: Transform) -> bool:
        if self.solver == "cg":
            return transform.name == "inverse" and getattr(transform, "damping_mode", "add") == "add"
        return super().supports(transform)

    def recipe_problems(self, curvature: Any) -> list[tuple[str, str]]:
        """Validation, with the recipe (``setup`` checks the same when built without it): CG multiplies
        by the curvature of this step. ``(path in the recipe, message)``."""
        if self.solver != "cg":
            return []
        if not callable(getattr(curvature, "matvec", None)):
            return [(
                "structure.solver",
                f"structure 'full' with solver: cg needs curvature-vector products, which curvature "
                f"'{curvature.name}' does not provide; use solver: dense",
            )]
        if curvature.every != 1 or curvature.start != 1:
            return [(
                "curvature.every" if curvature.every != 1 else "curvature.start",
                "structure 'full' with solver: cg needs the curvature on every step (every: 1, start: 1)",
            )]
        return []

    # --- lifecycle --------------------------------------------------------------------

    def stage(self, served: Served) -> FullStage:
        """What depends on the model and the processes (the recipe validator checked the rest)."""
        curvature = served.pipeline.curvature
        if served.env.comm.sharded and callable(getattr(curvature, "full_update", None)):
            raise PipelineError(
                f"curvature '{getattr(curvature, 'name', None)}' refines the full matrix from its previous value on every "
                "process; distributed.mode: sharded keeps a block's matrix on its owner only: use distributed.mode: replicated"
            )
        if self.solver == "dense":
            for group in served.groups:
                params = [p for p in group["params"] if p.requires_grad]
                for idx in partition(params, self.scope, served.env.info):
                    n = sum(params[i].numel() for i in idx)
                    if n > self.max_params:
                        size = n * n * params[idx[0]].element_size()
                        raise PipelineError(
                            f"structure 'full' with solver: dense would keep a {n}x{n} matrix ({size / 2**20:.0f} MiB) "
                            f"and decompose it every refresh; the limit is max_params={self.max_params}. Use solver: cg "
                            "(matrix-free conjugate gradients on curvature-vector products), a smaller scope "
                            "(scope: layer | tensor), or raise max_params"
                        )
        return FullStage(self, served)

    # --- pure per-configuration logic -------------------------------------------------------

    def blocks(self, ctx: GroupStep) -> list[list[int]]:
        return partition(ctx.params, self.scope, ctx.env.info)

    def amortised(self, transform: Transform) -> bool:
        """Whether ``transform`` keeps the eigendecomposition between its refresh steps."""
        return transform.every != 1 or transform.start != 1


@dataclass
class _Refresh:
    """What a step's eigendecomposition of one block did (for the exchange and the error)."""

    tried: bool = False
    result: dict[str, torch.Tensor] | None = None  # the new decomposition, None when it failed
    exhausted: bool = False  # max_failures failures in a row


_WHY = (
    "the eigendecomposition failed (the matrix holds NaN/Inf, or eigh did not converge, also in float64): check "
    "the loss and the learning rate, or add damping"
)


class FullStage(Stage):
    """The full structure in one optimizer: its configuration, its curvature block (CG multiplies by it) and
    who owns which block on several processes."""

    config: Full

    def __init__(self, config: Full, served: Served) -> None:
        super().__init__(config)
        curvature = served.pipeline.curvature
        assert curvature is not None  # the recipe validator: a structure needs a curvature
        self.curvature = curvature
        self.ownership = Ownership(served.env.comm)
        self.keys = {what: config.key(what) for what in ("matrix", "inverse", "updates", "eigenvalues", "eigenvectors")}
        self.cache = SpectralCache(config.key("failures"), config.key("failures_total"), None, config.max_failures)

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Nothing per parameter up front: a block's matrix appears with its first estimate."""

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """Fresh dense estimates per block (kept for ``update``); a secant refinement's pair ``(s, y)``
        per block; none for CG (it keeps no statistics)."""
        if self.config.solver == "cg":
            return []
        blocks = self.config.blocks(ctx)
        if callable(getattr(curvature, "full_update", None)):
            return secant_estimates(curvature, ctx, blocks, "dense block")
        n = len(blocks)
        return [
            Estimate(m, tuple(idx), f"dense block {b} of {n}, {m.shape[0]}x{m.shape[-1]}")
            for b, (idx, m) in enumerate(zip(blocks, self._fresh(ctx, curvature)))
        ]

    def _fresh(self, ctx: GroupStep, curvature: Curvature) -> list[torch.Tensor]:
        """This step's dense estimate per block, computed once."""
        return ctx.memo(self, "fresh", lambda: [curvature.full(ctx.part(idx)) for idx in self.config.blocks(ctx)])

    def _owners(self, ctx: GroupStep, blocks: list[list[int]]) -> list[int]:
        """Each block's owner process (cost ``n³``)."""
        names = [f"full:{ctx.env.index(ctx.params[idx[0]])}" for idx in blocks]
        costs = [float(sum(ctx.params[i].numel() for i in idx)) ** 3 for idx in blocks]
        return self.ownership.owners(names, tuple(map(id, ctx.params)), lambda: list(zip(names, costs)))

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        c, k = self.config, self.keys
        if c.solver == "cg":
            return
        refine = getattr(curvature, "full_update", None)
        fresh = None if callable(refine) else self._fresh(ctx, curvature)
        blocks = c.blocks(ctx)
        owners = self._owners(ctx, blocks) if self.ownership.sharded else None
        for b, idx in enumerate(blocks):
            sub = ctx.part(idx)
            st = sub.states[0]
            if owners is not None and not self.ownership.keeps(owners[b]):  # sharded: the owner alone keeps the matrix
                for key in (k["matrix"], k["eigenvalues"], k["eigenvectors"]):
                    st.pop(key, None)
                st[k["updates"]] = st.get(k["updates"], 0) + 1
                continue
            old = st.get(k["matrix"])
            n = sum(p.numel() for p in sub.params)
            if old is not None and old.shape[0] != n:
                raise PipelineError(
                    "structure 'full': the parameters with gradients changed between steps, so a stored "
                    "matrix no longer matches its block; give every parameter a gradient on every step"
                )
            if callable(refine):
                matrix, inverse = refine(sub, old)
            else:
                assert fresh is not None
                est = fresh[b]
                inverse = False
                if c.accumulate == "replace":
                    matrix = est
                elif old is None:
                    matrix = est * (1.0 - c.beta) if c.accumulate == "ema" else est.clone()
                else:
                    matrix = old
                    if c.accumulate == "ema":
                        matrix.mul_(c.beta).add_(est, alpha=1.0 - c.beta)
                    else:
                        matrix.add_(est)
            st[k["matrix"]] = matrix
            st[k["inverse"]] = bool(inverse)
            st[k["updates"]] = st.get(k["updates"], 0) + 1

    # --- the eigendecomposition: keep the last good one ------------------------------------------

    def _kept(self, st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        vals = st.get(self.keys["eigenvalues"])
        return None if vals is None else (vals, st[self.keys["eigenvectors"]])

    def _decompose(
        self, st: dict[str, Any], matrix: torch.Tensor, outcome: _Refresh
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decompose ``matrix`` (float64 retry) into ``st``; on failure the previous decomposition stays
        (counted). Returns the decomposition to use (None: there never was one)."""
        res = robust_eigh(matrix)
        outcome.tried = True
        outcome.result = None if res is None else {
            self.keys["eigenvalues"]: res.eigenvalues,
            self.keys["eigenvectors"]: res.eigenvectors.contiguous(),  # one layout, however computed or received
        }
        outcome.exhausted = self.cache.refresh(st, outcome.result)
        return self._kept(st)

    def _decomposes(self, st: dict[str, Any], transform: Transform, step: int) -> bool:
        """Whether this step's solve may decompose the block's matrix (the same on every process)."""
        if st.get(self.keys["matrix"]) is None:
            return False
        return not self.config.amortised(transform) or transform.due(step) or self.keys["eigenvalues"] not in st

    def operator(
        self, ctx: GroupStep, transform: Transform, outcome: _Refresh | None = None
    ) -> DenseOperator | CGOperator | None:
        """The view of the block's curvature the transform acts through (``None`` before any estimate)."""
        c, st = self.config, ctx.states[0]
        if c.solver == "cg":

            def product(x: torch.Tensor) -> torch.Tensor:
                return flat(self.curvature.matvec(ctx, unflat(x, ctx.params)))  # type: ignore[attr-defined]  # CG's curvature has matvec (recipe_problems)

            return CGOperator(product, st, c)
        matrix = st.get(self.keys["matrix"])
        if matrix is None:
            return None
        updates = st.get(self.keys["updates"], 0)
        if c.accumulate == "ema" and c.bias_correction and updates:
            matrix = matrix / (1.0 - c.beta**updates)
        inverse = st[self.keys["inverse"]]
        outcome = _Refresh() if outcome is None else outcome
        if c.amortised(transform):  # keep the decomposition between refreshes
            if transform.due(ctx.step) or self.keys["eigenvalues"] not in st:
                self._decompose(st, matrix, outcome)
            return DenseOperator(matrix, inverse, c.method, self._kept(st))
        return DenseOperator(matrix, inverse, c.method, None, lambda: self._decompose(st, matrix, outcome))

    def _solve(
        self, sub: GroupStep, transform: Transform, v: torch.Tensor, outcome: _Refresh
    ) -> list[torch.Tensor] | None:
        """``[x, (vᵀx, xᵀ(scale·C + λI)x)]`` with ``x = f(C) v``; None before any estimate or decomposition."""
        op = self.operator(sub, transform, outcome)
        if op is None:
            return None
        try:
            x = transform.full(sub, op, v)  # type: ignore[attr-defined]  # a per-form method: Structure.supports checked it
        except NoDecomposition:
            return None
        quad = getattr(op, "quadratic", None)
        if quad is None:  # exact solves: xᵀ(scale·C + λI)x = vᵀx
            quad = (float(v @ x),) * 2
        return [x, torch.tensor(quad, dtype=torch.float64)]

    # --- the direction -----------------------------------------------------------------------

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        """Per block ``x = f(C) v``. On several processes each block's owner solves (and decomposes) and one
        exchange hands every process every block's ``x``; in replicated mode also the owner's decomposition
        (or its failure), so that every process keeps the same state."""
        if direction.denominator is not None:
            direction = direction.materialize()
        k = self.keys
        blocks = self.config.blocks(ctx)
        subs = [ctx.part(idx) for idx in blocks]
        sizes = [sum(p.numel() for p in sub.params) for sub in subs]
        owners = self._owners(ctx, blocks)
        replicated = self.ownership.active and not self.ownership.sharded
        travels = [b for b, s in enumerate(subs) if replicated and self._decomposes(s.states[0], transform, ctx.step)]
        outcomes: dict[int, _Refresh] = {}

        def solve(b: int) -> tuple[float, list[torch.Tensor] | None]:
            outcome = outcomes[b] = _Refresh()
            x = self._solve(subs[b], transform, flat([direction.tensors[i] for i in blocks[b]]), outcome)
            return (-1.0, None) if outcome.exhausted else (0.0, None) if x is None else (1.0, x)

        def decomposed(b: int) -> tuple[float, list[torch.Tensor] | None]:
            outcome = outcomes[b]
            if not outcome.tried:
                return 0.0, None
            return (-1.0, None) if outcome.result is None else (1.0, list(outcome.result.values()))

        def computed(indices: list[int]) -> list[tuple[float, list[torch.Tensor] | None]]:
            # the solves come first: a block's decomposition item follows its solve item
            return [solve(i) if i < len(blocks) else decomposed(travels[i - len(blocks)]) for i in indices]

        results = self.ownership.share(
            owners + [owners[b] for b in travels],
            [[(n,), (2,)] for n in sizes] + [[(sizes[b],), (sizes[b], sizes[b])] for b in travels],
            computed,
            torch.float64,
        )
        for b, (status, tensors) in zip(travels, results[len(blocks) :]):  # replicated: keep the owner's outcome
            if status != 0 and not self.ownership.mine(owners[b]):
                st = subs[b].states[0]
                like = st[k["matrix"]].dtype
                kept = None
                if tensors is not None:
                    kept = {k["eigenvalues"]: tensors[0].to(like), k["eigenvectors"]: tensors[1].to(like)}
                self.cache.refresh(st, kept)
        out: list[torch.Tensor] = list(direction.tensors)
        gd, dad, known = 0.0, 0.0, True
        for b, (idx, sub, (status, tensors)) in enumerate(zip(blocks, subs, results)):
            if status < 0:
                raise self._failure(b, len(blocks), sizes[b])
            if tensors is None:  # no estimate or decomposition yet: leave the direction as it is
                known = False
                continue
            for i, t in zip(idx, unflat(tensors[0].to(sub.params[0].dtype), sub.params)):
                out[i] = t
            gd, dad = gd + float(tensors[1][0]), dad + float(tensors[1][1])
        if known and transform.solves:  # the quadratic model of a solve, for step 'lm'
            ctx.facts.quadratic = (gd, dad)
        return Direction(out, direction.coef, True)

    def _failure(self, b: int, total: int, n: int) -> EighFailureError:
        what = f"structure 'full': the eigendecomposition of dense block {b} of {total} ({n}x{n})"
        return self.cache.error(what, _WHY)
