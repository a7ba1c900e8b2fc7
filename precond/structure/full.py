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
(``structure.matrix``), so checkpoints carry it.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from precond.block import Curvature, Direction, Estimate, GroupStep, Structure, Transform
from precond.errors import PipelineError
from precond.linalg.cg import cg
from precond.linalg.spectral import robust_eigh
from precond.registry import register

Scope = Literal["tensor", "layer", "model"]
CURVATURE = "structure.full.curvature"  # ctx.extra: the curvature block, for matrix-free products
FRESH = "structure.full.fresh"  # ctx.extra: this step's fresh estimates, per block
QUADRATIC = "quadratic"  # ctx.extra: (gᵀd, dᵀ(scale·C + λI)d) of the structure's output, when known


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


def sub_step(ctx: GroupStep, idx: list[int]) -> GroupStep:
    """The part of ``ctx`` that covers ``params[idx]`` (same group, evaluation and ``extra``)."""
    if len(idx) == len(ctx.params):
        return ctx
    return GroupStep(
        ctx.optimizer,
        ctx.group,
        [ctx.params[i] for i in idx],
        [ctx.grads[i] for i in idx],
        [ctx.states[i] for i in idx],
        [ctx.steps[i] for i in idx],
        ctx.step,
        ctx.evaluation,
        scope=ctx.scope,
        extra=ctx.extra,
    )


def secant_estimates(curvature: Curvature, ctx: GroupStep, blocks: list[list[int]], what: str) -> list[Estimate]:
    """The secant pair ``(s, y)`` a curvature's ``pair`` forms for each block (none on its first step)."""
    pair = getattr(curvature, "pair", None)
    if not callable(pair):
        return []
    out: list[Estimate] = []
    for b, idx in enumerate(blocks):
        step = pair(sub_step(ctx, idx))
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


def groups_of(optimizer: Any, block: Any, kind: str) -> list[tuple[Any, dict[str, Any]]]:
    """``(pipeline, param group)`` for every group whose pipeline uses ``block`` as its ``kind``."""
    out = []
    for group in optimizer.param_groups:
        pipe = optimizer.pipelines[group["rule"]]
        if getattr(pipe, kind) is block:
            out.append((pipe, group))
    return out


# --- operators the transforms act through ----------------------------------------------------


class DenseOperator:
    """``C`` held as a dense matrix, or as its inverse ``H = C⁻¹`` (``inverse=True``)."""

    def __init__(
        self, matrix: torch.Tensor, inverse: bool, method: str, eig: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        self.matrix = matrix
        self.inverse = inverse
        self.method = method
        self._eig = eig

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the stored matrix (``C``, or ``H`` when inverse)."""
        if self._eig is None:
            res = robust_eigh(self.matrix)
            if res is None:
                raise PipelineError(
                    "the eigendecomposition of the full curvature matrix failed (it holds NaN/Inf): "
                    "check the loss and the learning rate, or add damping"
                )
            self._eig = (res.eigenvalues, res.eigenvectors.contiguous())  # one layout, however computed or received
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
    ``cg``: matrix-free, only ``inverse`` (``(scale·C + λI)⁻¹ v`` by CG on the
    curvature block's products; the curvature must refresh every step).
    """

    form: ClassVar[str] = "full"

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

    @model_validator(mode="after")
    def _cg_is_matrix_free(self) -> Full:
        if self.solver == "cg" and self.accumulate != "replace":
            raise ValueError("solver: cg keeps no matrix, so it cannot accumulate; use accumulate: replace or solver: dense")
        return self

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

    def setup(self, optimizer: Any) -> None:
        for pipe, group in groups_of(optimizer, self, "structure"):
            params = [p for p in group["params"] if p.requires_grad]
            curvature = pipe.curvature
            if optimizer.comm.sharded and callable(getattr(curvature, "full_update", None)):
                raise PipelineError(
                    f"curvature '{curvature.name}' refines the full matrix from its previous value on every process; "
                    "distributed.mode: sharded keeps a block's matrix on its owner only: use distributed.mode: replicated"
                )
            if self.solver == "cg":
                if not callable(getattr(curvature, "matvec", None)):
                    raise PipelineError(
                        f"structure 'full' with solver: cg needs curvature-vector products, which curvature "
                        f"'{curvature.name}' does not provide; use solver: dense"
                    )
                if curvature.every != 1 or curvature.start != 1:
                    raise PipelineError(
                        "structure 'full' with solver: cg needs the curvature on every step (every: 1, start: 1)"
                    )
                continue
            for idx in partition(params, self.scope, optimizer.param_info):
                n = sum(params[i].numel() for i in idx)
                if n > self.max_params:
                    size = n * n * params[idx[0]].element_size()
                    raise PipelineError(
                        f"structure 'full' with solver: dense would keep a {n}x{n} matrix ({size / 2**20:.0f} MiB) "
                        f"and decompose it every refresh; the limit is max_params={self.max_params}. Use solver: cg "
                        "(matrix-free conjugate gradients on curvature-vector products), a smaller scope "
                        "(scope: layer | tensor), or raise max_params"
                    )

    # --- the step ---------------------------------------------------------------------

    def blocks(self, ctx: GroupStep) -> list[list[int]]:
        info = ctx.optimizer.param_info if ctx.optimizer is not None else {}
        return partition(ctx.params, self.scope, info)

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """Fresh dense estimates per block (kept for ``update``); a secant refinement's pair ``(s, y)``
        per block; none for CG (it keeps no statistics)."""
        if self.solver == "cg":
            return []
        blocks = self.blocks(ctx)
        if callable(getattr(curvature, "full_update", None)):
            return secant_estimates(curvature, ctx, blocks, "dense block")
        n = len(blocks)
        return [
            Estimate(m, tuple(idx), f"dense block {b} of {n}, {m.shape[0]}x{m.shape[-1]}")
            for b, (idx, m) in enumerate(zip(blocks, self._fresh(ctx, curvature)))
        ]

    def _fresh(self, ctx: GroupStep, curvature: Curvature) -> list[torch.Tensor]:
        """This step's dense estimate per block, computed once."""
        key = (FRESH, id(self))
        if key not in ctx.extra:
            ctx.extra[key] = [curvature.full(sub_step(ctx, idx)) for idx in self.blocks(ctx)]
        return ctx.extra[key]

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        ctx.extra[CURVATURE] = curvature
        if self.solver == "cg":
            return
        refine = getattr(curvature, "full_update", None)
        fresh = None if callable(refine) else self._fresh(ctx, curvature)
        k_matrix, k_inverse, k_updates = self.key("matrix"), self.key("inverse"), self.key("updates")
        blocks = self.blocks(ctx)
        comm = ctx.optimizer.comm
        owners = self._owners(ctx, blocks) if comm.sharded else [comm.rank] * len(blocks)
        for b, idx in enumerate(blocks):
            sub = sub_step(ctx, idx)
            st = sub.states[0]
            if owners[b] != comm.rank:  # sharded: the owner alone keeps the block's matrix
                for key in (k_matrix, self.key("eigenvalues"), self.key("eigenvectors")):
                    st.pop(key, None)
                st[k_updates] = st.get(k_updates, 0) + 1
                continue
            old = st.get(k_matrix)
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
                if self.accumulate == "replace":
                    matrix = est
                elif old is None:
                    matrix = est * (1.0 - self.beta) if self.accumulate == "ema" else est.clone()
                else:
                    matrix = old
                    if self.accumulate == "ema":
                        matrix.mul_(self.beta).add_(est, alpha=1.0 - self.beta)
                    else:
                        matrix.add_(est)
            st[k_matrix] = matrix
            st[k_inverse] = bool(inverse)
            st[k_updates] = st.get(k_updates, 0) + 1

    def operator(self, ctx: GroupStep, transform: Transform) -> DenseOperator | CGOperator | None:
        """The view of the block's curvature the transform acts through (``None`` before any estimate)."""
        st = ctx.states[0]
        if self.solver == "cg":
            curvature = ctx.extra.get(CURVATURE)
            if curvature is None:
                raise PipelineError("structure 'full' with solver: cg has no curvature on this step")

            def product(x: torch.Tensor) -> torch.Tensor:
                return flat(curvature.matvec(ctx, unflat(x, ctx.params)))

            return CGOperator(product, st, self)
        matrix = st.get(self.key("matrix"))
        if matrix is None:
            return None
        updates = st.get(self.key("updates"), 0)
        if self.accumulate == "ema" and self.bias_correction and updates:
            matrix = matrix / (1.0 - self.beta**updates)
        eig = None
        if transform.every != 1 or transform.start != 1:  # amortised: keep the decomposition
            k_vals, k_vecs = self.key("eigenvalues"), self.key("eigenvectors")
            if transform.due(ctx.step) or k_vals not in st:
                op = DenseOperator(matrix, st[self.key("inverse")], self.method)
                st[k_vals], st[k_vecs] = op.eig()
            eig = (st[k_vals], st[k_vecs])
        return DenseOperator(matrix, st[self.key("inverse")], self.method, eig)

    def _owners(self, ctx: GroupStep, blocks: list[list[int]]) -> list[int]:
        """Each block's owner process (cost ``n³``, :func:`precond.distributed.assign_named`)."""
        comm = ctx.optimizer.comm
        sizes = [sum(ctx.params[i].numel() for i in idx) for idx in blocks]
        costs = [(f"full:{ctx.optimizer.index_of(ctx.params[idx[0]])}", float(n) ** 3) for idx, n in zip(blocks, sizes)]
        return comm.owners(costs)

    def _refreshes_eig(self, st: dict[str, Any], transform: Transform, step: int) -> bool:
        """Whether this step's solve recomputes the kept eigendecomposition (the same on every process)."""
        amortised = transform.every != 1 or transform.start != 1
        return amortised and st.get(self.key("matrix")) is not None and (transform.due(step) or self.key("eigenvalues") not in st)

    def _solve(self, sub: GroupStep, transform: Transform, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``x = f(C) v`` and the quadratic ``(vᵀx, xᵀ(scale·C + λI)x)``; None before any estimate."""
        op = self.operator(sub, transform)
        if op is None:
            return None
        x = transform.full(sub, op, v)  # type: ignore[attr-defined]
        quad = getattr(op, "quadratic", None)
        if quad is None:  # exact solves: xᵀ(scale·C + λI)x = vᵀx
            quad = (float(v @ x),) * 2
        return x, torch.tensor(quad, dtype=torch.float64)

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        """Per block ``x = f(C) v``. On several processes each block's owner solves (and refreshes the
        eigendecomposition) and one all-gather hands every process every block's ``x`` (in replicated
        mode also a refreshed eigendecomposition, so every process keeps the same state)."""
        if direction.denominator is not None:
            direction = direction.materialize()
        comm = ctx.optimizer.comm
        blocks = self.blocks(ctx)
        owners = self._owners(ctx, blocks) if comm.active else [comm.rank] * len(blocks)
        items, local, travels = [], {}, []
        for b, idx in enumerate(blocks):
            sub = sub_step(ctx, idx)
            n = sum(p.numel() for p in sub.params)
            travels.append(comm.active and not comm.sharded and self._refreshes_eig(sub.states[0], transform, ctx.step))
            items.append((owners[b], [(n,), (2,)] + ([(n,), (n, n)] if travels[b] else [])))
            if owners[b] == comm.rank:
                solved = self._solve(sub, transform, flat([direction.tensors[i] for i in idx]))
                eig = [sub.states[0][self.key("eigenvalues")], sub.states[0][self.key("eigenvectors")]] if travels[b] and solved else []
                local[b] = (1.0, [*solved, *eig]) if solved is not None else (0.0, None)
        results = comm.exchange(items, local, torch.float64) if comm.active else [local[b] for b in range(len(blocks))]
        out: list[torch.Tensor] = list(direction.tensors)
        gd, dad, known = 0.0, 0.0, True
        for b, (idx, (_, tensors)) in enumerate(zip(blocks, results)):
            if tensors is None:  # no estimate yet (the curvature starts later): leave the direction as it is
                known = False
                continue
            params = [ctx.params[i] for i in idx]
            st = ctx.states[idx[0]]
            if travels[b]:
                like = st[self.key("matrix")]
                st[self.key("eigenvalues")], st[self.key("eigenvectors")] = (t.to(like.dtype) for t in tensors[2:4])
            for i, t in zip(idx, unflat(tensors[0].to(params[0].dtype), params)):
                out[i] = t
            gd, dad = gd + float(tensors[1][0]), dad + float(tensors[1][1])
        if known and transform.name == "inverse":
            ctx.extra[QUADRATIC] = (gd, dad)
        return Direction(out, direction.coef, True)
