"""K-BFGS and K-BFGS(L): Kronecker-factored BFGS per layer (Goldfarb, Ren & Bahamou 2020; docs/algorithms.md#k-bfgs).

For a layer ``a = W h (+ b)`` (Linear or Conv2d, rows as in :mod:`precond.layers`)
the inverse curvature is ``H_g ⊗ H_a`` and the direction of the gradient-shaped
``V = [dW | db]`` is ``H_g V H_a``:

* activation side: ``A ← β A + (1 − β) hhᵀ`` (the first step: ``hhᵀ``) with
  ``hhᵀ = (1/R) Σ_r h_r h_rᵀ`` over the input rows (homogeneous coordinate for
  the bias), ``A_LM = A + √λ I``; ``H_a = A_LM⁻¹`` on the first step, then
  one BFGS update per step with the Hessian-action pair ``s_a = H_a h̄``,
  ``y_a = A_LM s_a`` (``h̄`` the mean input row), so ``H_a`` tracks ``A_LM⁻¹``
  along the directions the inputs visit;
* pre-activation side: after the parameter step the closure runs once more on
  the same batch (forward and backward, the layer hooks recording), and
  ``s_g = ā(θ₊) − ā(θ)``, ``y_g = ḡ(θ₊) − ḡ(θ)`` with ``ā`` the mean
  pre-activation row and ``ḡ`` the mean per-sample output gradient (``M·∂L/∂a``);
  the pair is averaged (``pair_decay``), damped twice — Powell with ``H_g``
  (``sᵀy ≥ μ₁ yᵀH_g y``, ``μ₁ = 0.2``), then Levenberg–Marquardt
  (``sᵀy ≥ μ₂ sᵀs``, ``μ₂ = √λ``) — and ``H_g`` gets a BFGS update (K-BFGS,
  from ``H_g = I``) or the pair joins an L-BFGS memory (K-BFGS(L), ``H₀ = I``).

The curvature block is ``secant`` (the pairs are secant pairs of the layer's
pre-activations, formed by this structure from its hooks). Momentum on the
gradient (``ĝ = 0.9 ĝ + 0.1 g``), the ``τ = 1e-5`` L2 term and the step are the
recipe's blocks. Only ``inverse`` (undamped: the damping is ``λ`` here) applies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from precond.block import Curvature, Direction, Estimate, GroupStep, Needs, Served, Stage, Structure, Transform
from precond.errors import PipelineError
from precond.evaluation import evaluate
from precond.guard import all_finite
from precond.kron.sources import LayerHooks
from precond.layers import Layer, factor_dtype, layer_problem, layer_rows
from precond.linalg.quasi_newton import bfgs_inverse_update, double_damping, two_loop
from precond.registry import register
from precond.transform.spectral import float32_damping


class _LBFGSOperator:
    """``H v`` of an L-BFGS memory with ``H₀ = I`` (``@`` works on vectors and on column blocks)."""

    def __init__(self, s: Tensor | None, y: Tensor | None) -> None:
        self.s = [] if s is None else list(s)
        self.y = [] if y is None else list(y)

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() == 1:
            return two_loop(v.neg(), self.s, self.y, None, 1.0)
        return torch.stack([self @ col for col in v.T], dim=1)


@register("structure", "kbfgs")
class KBFGS(Structure):
    """K-BFGS: per layer ``H_g ⊗ H_a``, BFGS with Hessian action on the inputs' side, damped BFGS or L-BFGS
    on secant pairs of the pre-activations (one extra forward/backward pass per step)."""

    form: ClassVar[str] = "kbfgs"

    damping: float = Field(
        0.3, gt=0.0, description="lambda: A + sqrt(lambda) I, and mu2 = sqrt(lambda) in the LM damping; a normal float32 (>= 1.2e-38)"
    )
    a_decay: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay of the activation factor A")
    pair_decay: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay of the pre-activation pairs (0: none, full batch)")
    mu1: float = Field(0.2, gt=0.0, lt=1.0, description="Powell damping threshold: s'y >= mu1 y'H_g y")
    g_update: Literal["bfgs", "lbfgs"] = Field("bfgs", description="H_g by BFGS (K-BFGS) or limited memory (K-BFGS(L))")
    memory: int = Field(100, ge=1, description="K-BFGS(L): pairs kept")

    @field_validator("damping")
    @classmethod
    def _normal_damping(cls, value: float) -> float:
        return float32_damping(value, "damping", zero=False, example="0.3")

    def needs(self) -> Needs:
        return Needs(hooks=True, closure=True)  # the closure runs again at the new parameters

    def distributed_problem(self) -> str | None:
        return "structure 'kbfgs' updates its BFGS factors from this process's layer statistics (not averaged over the processes)"

    def cannot_serve(self, module: Any, role: str) -> str | None:
        return layer_problem(module, role)

    def supports(self, transform: Transform) -> bool:
        return (
            transform.name == "inverse"
            and getattr(transform, "damping", 0.0) == 0.0
            and getattr(transform, "scale", 1.0) == 1.0
        )

    def h_g(self, st: dict[str, Any]) -> Any:
        """``H_g`` as a matrix (K-BFGS) or as an operator on its L-BFGS memory (K-BFGS(L))."""
        if self.g_update == "bfgs":
            return st[self.key("H_g")]
        return _LBFGSOperator(st.get(self.key("mem_s")), st.get(self.key("mem_y")))

    # --- lifecycle ----------------------------------------------------------------------
    # (only curvature 'secant' fills a 'kbfgs' structure: the recipe validator's estimator x structure check)

    def stage(self, served: Served) -> KBFGSStage:
        return KBFGSStage(self, served)


class KBFGSStage(Stage):
    """K-BFGS in one optimizer: its configuration, its layers and their hooks (armed on every step), and this
    step's pending pre-activation statistics for the pass at the new parameters after the step."""

    config: KBFGS

    def __init__(self, config: KBFGS, served: Served) -> None:
        super().__init__(config)
        params = [q for q in served.params if q.requires_grad]
        self.hooks = LayerHooks(params, served, "structure kbfgs", capture_grads=True, owner=self)
        self.pending: dict[str, Any] | None = None  # this step's pre-activation statistics and closure, for after_step

    def init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        """Nothing per parameter up front: a layer's factors appear with its first statistics."""

    def before_closure(self, step: int) -> None:
        self.pending = None
        self.hooks.arm()

    def after_step(self) -> None:
        pending, self.pending = self.pending, None
        try:
            if pending is not None:
                self._pre_activation_update(pending)
        finally:
            self.hooks.disarm()

    # --- statistics -------------------------------------------------------------------------

    def _layers(self, ctx: GroupStep) -> list[tuple[Layer, list[int]]]:
        """The layers of ``ctx.params`` and the positions of their parameters there."""
        return [(layer, [i for i in (iw, ib) if i is not None]) for layer, iw, ib in self.hooks.of(ctx.params)]

    def _means(self, m: int) -> dict[Layer, tuple[Tensor, Tensor, Tensor]]:
        """Per recorded layer: input rows, mean pre-activation row, mean per-sample output-gradient row."""
        recorder = self.hooks.recorder
        out = {}
        for layer, rec in recorder.records.items():
            recorder.check_intact(layer)
            grads = [(g if g is not None else torch.zeros_like(o)).unsqueeze(0) for g, o in zip(rec.grads, rec.outputs)]
            h_rows, g_rows = layer_rows(layer, rec, grads)
            a_rows = torch.cat([layer.output_rows(o.detach()) for o in rec.outputs])
            out[layer] = (h_rows, a_rows.mean(0), g_rows[0].mean(0) * m)
        return out

    def _fresh(self, ctx: GroupStep) -> list[tuple[Layer, list[int], dict[str, Tensor]]]:
        """Per layer of the group, this step's statistics (computed once): ``hh`` = ``(1/R) Σ h hᵀ`` of the
        input rows, ``h`` their mean, ``a`` the mean pre-activation and ``g`` the mean output gradient."""
        return ctx.memo(self, "fresh", lambda: self._statistics(ctx))

    def _statistics(self, ctx: GroupStep) -> list[tuple[Layer, list[int], dict[str, Tensor]]]:
        means = self._means(ctx.evaluation.samples("structure kbfgs"))
        out = []
        for layer, idx in self._layers(ctx):
            if layer not in means:
                raise PipelineError(
                    f"structure kbfgs: the forward hook of layer '{layer.name}' did not fire inside the closure"
                )
            h_rows, a_mean, g_mean = (t.to(factor_dtype(t)) for t in means[layer])  # float32 for half params
            stats = {"hh": h_rows.T @ h_rows / h_rows.shape[0], "h": h_rows.mean(0), "a": a_mean, "g": g_mean}
            out.append((layer, idx, stats))
        return out

    def estimates(self, ctx: GroupStep, curvature: Curvature) -> list[Estimate]:
        """Per layer: the input statistic ``hhᵀ`` (for ``A`` and ``H_a``), the mean input row (``H_a``'s pair)
        and the mean pre-activation and output gradient (the first half of the ``H_g`` pair)."""
        labels = {
            "hh": "K-BFGS input statistic hh^T (for A and H_a)",
            "h": "K-BFGS mean input row (the H_a pair)",
            "a": "K-BFGS mean pre-activation (the H_g pair)",
            "g": "K-BFGS mean output gradient (the H_g pair)",
        }
        return [
            Estimate(t, tuple(idx), f"layer '{layer.name}': {labels[k]}, dims {t.shape[-1]}")
            for layer, idx, stats in self._fresh(ctx)
            for k, t in stats.items()
        ]

    def update(self, ctx: GroupStep, curvature: Curvature) -> None:
        c = self.config
        root = math.sqrt(c.damping)
        for layer, _, stats in self._fresh(ctx):
            hh, h_mean, a_mean, g_mean = stats["hh"], stats["h"], stats["a"], stats["g"]
            st = ctx.env.state_of(layer.params[0])
            k_a, k_ha = c.key("A"), c.key("H_a")
            eye = torch.eye(hh.shape[0], dtype=hh.dtype, device=hh.device)
            if k_a not in st:
                st[k_a] = hh
                st[k_ha] = torch.linalg.inv(hh + root * eye)
                if c.g_update == "bfgs":
                    st[c.key("H_g")] = torch.eye(layer.d_out, dtype=hh.dtype, device=hh.device)
            else:
                st[k_a] = c.a_decay * st[k_a] + (1.0 - c.a_decay) * hh
                s_a = st[k_ha] @ h_mean
                y_a = st[k_a] @ s_a + root * s_a  # A_LM s_a
                st[k_ha] = bfgs_inverse_update(st[k_ha], s_a, y_a).matrix
            if self.pending is None:
                self.pending = {"closure": ctx.evaluation.closure, "params": ctx.evaluation.params, "before": {},
                                "state_of": ctx.env.state_of, "tap": ctx.env.tap}
            self.pending["before"][layer] = (a_mean, g_mean)

    def _pre_activation_update(self, pending: dict[str, Any]) -> None:
        """The G side: run the closure at θ₊ on the same batch, form the damped pairs, update ``H_g``."""
        c = self.config
        params = pending["params"]
        saved = [p.grad for p in params]
        self.hooks.arm()
        try:
            who = "structure kbfgs (the pass at the new parameters)"
            ev = evaluate(pending["closure"], params, Needs(), who, pending["tap"])
            means = self._means(ev.samples(who))
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        mu2 = math.sqrt(c.damping)
        with torch.no_grad():
            for layer, (a_old, g_old) in pending["before"].items():
                if layer not in means:
                    continue
                _, a_new, g_new = means[layer]
                s, y = a_new - a_old, g_new - g_old
                if not bool(s.any()):  # the parameters did not move (a skipped step): no pair
                    continue
                if not all_finite([s, y]):  # the new point diverged: no pair (H_g keeps its finite value)
                    continue
                st = pending["state_of"](layer.params[0])
                k_s, k_y = c.key("s_g"), c.key("y_g")
                if c.pair_decay and k_s in st:
                    s = c.pair_decay * st[k_s] + (1.0 - c.pair_decay) * s
                    y = c.pair_decay * st[k_y] + (1.0 - c.pair_decay) * y
                st[k_s], st[k_y] = s, y
                pair = double_damping(s, y, c.h_g(st), c.mu1, mu2=mu2)
                if c.g_update == "bfgs":
                    result = bfgs_inverse_update(st[c.key("H_g")], pair.s, pair.y)
                    st[c.key("H_g")] = result.matrix
                    updated = result.status != "skipped"
                else:
                    updated = bool(torch.dot(pair.s, pair.y) > 1e-10)
                    if updated:
                        k_ms, k_my = c.key("mem_s"), c.key("mem_y")
                        old_s = st.get(k_ms, pair.s.new_zeros(0, pair.s.numel()))
                        old_y = st.get(k_my, pair.y.new_zeros(0, pair.y.numel()))
                        st[k_ms] = torch.cat([old_s, pair.s.unsqueeze(0)])[-c.memory :]
                        st[k_my] = torch.cat([old_y, pair.y.unsqueeze(0)])[-c.memory :]
                if updated:
                    st[c.key("damped_s")], st[c.key("damped_y")] = pair.s, pair.y

    # --- the direction --------------------------------------------------------------------

    def precondition(self, ctx: GroupStep, transform: Transform, direction: Direction) -> Direction:
        c = self.config
        if direction.denominator is not None:
            direction = direction.materialize()
        out = list(direction.tensors)
        for layer, iw, ib in self.hooks.of(ctx.params):
            st = ctx.env.state_of(layer.params[0])
            if c.key("H_a") not in st:  # no statistics yet (the curvature has not run)
                continue
            parts = direction.tensors
            v = layer.to_matrix(None if iw is None else parts[iw], None if ib is None else parts[ib])
            h_a = st[c.key("H_a")]
            p = ((c.h_g(st) @ v.to(h_a.dtype)) @ h_a).to(v.dtype)
            for i, t in zip((iw, ib), layer.from_matrix(p)):
                if i is not None:
                    out[i] = t  # type: ignore[assignment]  # from_matrix gives the parts the layer has
        return Direction(out, direction.coef, True)
