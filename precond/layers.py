"""Layers for Kronecker-factored curvature: which modules, their rows, and forward hooks.

K-FAC approximates the curvature block of a layer ``s = W a (+ b)`` by
``A ⊗ G`` with ``A`` built from the layer's inputs ``a`` and ``G`` from the
gradients ``g = ∂L/∂s`` of its outputs. Conventions (docs/algorithms.md#k-fac; the
loss is the batch mean ``L = (1/M) Σ_m ℓ_m`` over ``M`` samples of the model
outputs, see :mod:`precond.curvature.common`):

* A layer's inputs and output gradients are cut into *rows*: every leading
  dimension (batch, sequence, tokens) is folded into the batch, and a
  ``Conv2d`` contributes one row per example and spatial location (KFC
  patches, Grosse & Martens 2016). ``R`` is the number of rows.
* ``A = (1/R) Σ_r a_r a_rᵀ`` with ``a_r`` the input row, with a trailing 1
  (the homogeneous coordinate) when the layer's bias is preconditioned with
  its weight.
* ``G = w · Σ_k Σ_r g_rk g_rkᵀ`` where ``g_rk`` are output gradients of the
  mean loss (``k`` over sampled labels or Hessian-root columns) and the
  estimator's weight ``w`` is ``M`` (or ``M / samples``): per-sample output
  gradients are ``M·g``, so for one row per sample ``G = (1/M) Σ_m δ_m δ_mᵀ``.
  For a convolution this gives KFC's ``|T| · Ω ⊗ Γ`` (expectations over
  examples and locations), the location-count factor ``|T|`` landing in ``G``.
* The weight is flattened row-major with the bias as an extra last column:
  ``V = [dW.reshape(d_out, -1) | db]`` of shape ``(d_out, d_in (+1))``, and
  the curvature acts as ``G V Aᵀ``; as a matrix it is ``kron(G, A)`` on
  ``V.flatten()``.

A :class:`Recorder` registers one forward hook per layer once; the hooks do
nothing unless armed (on curvature refresh steps), then keep the layer
inputs (detached) and outputs (with their graph), and optionally capture the
output gradients of the main backward pass with tensor hooks.
"""

from __future__ import annotations

import math

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from precond.errors import PipelineError
from precond.evaluation import in_inner_backward, inner_backward

SUPPORTED = (nn.Linear, nn.Conv2d)


def transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's layers): ``x @ W + b`` with ``W`` of shape ``(in, out)``, a Linear
    layer whose weight is stored transposed (recognised by name and shape, without importing transformers)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def supported(module: nn.Module) -> str | None:
    """``None`` if K-FAC can handle ``module``, else the reason it cannot."""
    if transposed_linear(module):
        return None
    if not isinstance(module, SUPPORTED):
        return f"{type(module).__name__} is not a Linear or Conv2d layer"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "MultiheadAttention's output projection: its weights are used without calling the layer"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"Conv2d with groups={module.groups} (grouped or depthwise convolutions) is not supported"
    return None


@dataclass(eq=False)
class Layer:
    """One Linear or Conv2d module and which of its parameters are preconditioned together."""

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    # sizes, fixed at construction (read several times per step)
    transposed: bool = field(init=False)
    d_out: int = field(init=False)
    d_in: int = field(init=False)  # input-factor size: the flattened weight row, plus 1 with a bias
    row: int = field(init=False)  # the flattened weight row's length

    def __post_init__(self) -> None:
        self.transposed = transposed_linear(self.module)  # Hugging Face Conv1D: weight (in, out)
        shape = self.module.weight.shape
        self.d_out = shape[1] if self.transposed else shape[0]
        self.row = shape[0] if self.transposed else self.module.weight[0].numel()
        self.d_in = self.row + (1 if self.bias is not None else 0)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    # --- rows ---------------------------------------------------------------------------

    def input_rows(self, x: Tensor) -> Tensor:
        """``(R, d_in)``: one row per example and location, with a trailing 1 for the bias."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            padding = m.padding
            if m.padding_mode != "zeros" or isinstance(padding, str):
                x = F.pad(x, _explicit_padding(m), mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
                padding = 0
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_rows(self, g: Tensor) -> Tensor:
        """``(R', d_out)`` rows of an output-shaped tensor (extra leading dimensions are folded in)."""
        if isinstance(self.module, nn.Conv2d):
            g = g.movedim(-3, -1)
        return g.reshape(-1, g.shape[-1])

    # --- gradient-shaped matrices -------------------------------------------------------

    def to_matrix(self, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """``V = [W.reshape(d_out, -1) | b]`` (missing parts as zeros)."""
        ref = self.module.weight
        cols = []
        if self.weight is not None:
            w = weight if weight is not None else torch.zeros_like(ref)
            cols.append(w.T if self.transposed else w.reshape(self.d_out, -1))
        else:
            cols.append(ref.new_zeros(self.d_out, 0))
        if self.bias is not None:
            cols.append((bias if bias is not None else torch.zeros_like(self.bias)).reshape(self.d_out, 1))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def from_matrix(self, v: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w = b = None
        if self.weight is not None:
            w = v[:, : self.row].T if self.transposed else v[:, : self.row].reshape(self.weight.shape)
        if self.bias is not None:
            b = v[:, -1].reshape(self.bias.shape)
        return w, b


def _explicit_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) for a Conv2d's padding (ints, 'same' or 'valid')."""
    if m.padding == "valid":
        return (0, 0, 0, 0)
    if m.padding == "same":
        out = []
        for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])
    ph, pw = m.padding  # type: ignore[misc]  # ints here: the string forms returned above
    return (pw, pw, ph, ph)


def layer_problem(module: nn.Module, role: str) -> str | None:
    """Why a parameter (its owning module and its ``role`` there) has no Kronecker layer factors, or None."""
    reason = supported(module)
    if reason is None and role not in ("weight", "bias"):
        reason = f"'{role}' is neither the weight nor the bias of its {type(module).__name__}"
    return reason


def find_layers(params: Iterable[Tensor], info: dict[Tensor, Any], who: str) -> dict[Tensor, Layer]:
    """Map each parameter to its layer; a parameter K-FAC cannot cover fails with a message suggesting a rule.

    ``info`` maps parameters to their names and modules (:attr:`precond.interfaces.Environment.info`).
    """
    members: list[tuple[Tensor, int]] = []  # each parameter and its module's id
    roles: dict[int, tuple[Any, dict[str, Tensor]]] = {}  # module id -> (its info, {role: parameter})
    problems = []
    for p in params:
        meta = info.get(p)
        if meta is None:
            problems.append(("<unnamed parameter>", "unknown", "it is not a parameter of the model"))
            continue
        reason = layer_problem(meta.module, meta.role)
        if reason is not None:
            problems.append((meta.name, type(meta.module).__name__, reason))
            continue
        roles.setdefault(id(meta.module), (meta, {}))[1][meta.role] = p
        members.append((p, id(meta.module)))
    if problems:
        # whole module types can be routed by type; supported types in an unsupported configuration
        # (grouped convolutions) and unknown owners by parameter name
        kinds = sorted({k for n, k, _ in problems if k != "unknown" and not k.startswith(tuple(t.__name__ for t in SUPPORTED))})
        names = [n for n, k, _ in problems if k not in kinds]
        match = ", ".join(part for part in (f"modules: [{', '.join(kinds)}]" if kinds else "",
                                            f"names: [{', '.join(repr(n) for n in names[:4])}{', ...' if len(names) > 4 else ''}]" if names else "") if part)
        lines = "; ".join(f"'{n}' ({reason})" for n, _, reason in problems[:8])
        more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
        hint = (f"route them to another recipe with a rule, e.g. rules: [{{name: fallback, match: {{{match}}}, recipe: adam}}], "
                "or every parameter it cannot serve with match: {unserved: true}")
        raise PipelineError(f"{who} has Kronecker factors only for Linear and Conv2d layers; it cannot cover {lines}{more}: {hint}")
    # built once every role is known: a Layer's sizes depend on whether it has a bias
    layers = {m: Layer(meta.module_name, meta.module, r.get("weight"), r.get("bias")) for m, (meta, r) in roles.items()}
    return {p: layers[m] for p, m in members}


def require_one_group(layers: Iterable[Layer], param_groups: list[dict[str, Any]], who: str) -> None:
    """A layer's weight and bias are preconditioned together: they must sit in the same param group."""
    group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}
    for layer in dict.fromkeys(layers):
        if len({group_of[p] for p in layer.params}) > 1:
            raise PipelineError(
                f"the weight and bias of layer '{layer.name}' are in different param groups; {who} preconditions "
                "them together: put them in one group, or route the bias elsewhere with a rule"
            )


# --- recording ------------------------------------------------------------------------------


@dataclass(eq=False)
class Record:
    """What one armed forward pass left for a layer (one entry per call of the module)."""

    inputs: list[Tensor] = field(default_factory=list)  # detached layer inputs
    outputs: list[Tensor] = field(default_factory=list)  # layer outputs with their graph
    versions: list[int] = field(default_factory=list)  # output version counters at record time
    grads: list[Tensor | None] = field(default_factory=list)  # ∂L/∂output of the main backward (if captured)
    # filled from the model's outputs during a backward pass the user ran (fill_output_grads): per call,
    # (K, *output.shape) output gradients and the index of its forward pass in Recorder.passes
    filled: list[tuple[Tensor, int] | None] = field(default_factory=list)


class Recorder:
    """Forward hooks on ``layers``, registered once; they record only while armed.

    ``capture_grads``: also capture each recorded output's gradient from the
    first backward pass through it (the main backward; used by the empirical
    Fisher). The hooks are removed when ``owner`` (the optimizer) is
    garbage-collected, or by :meth:`remove`.
    """

    def __init__(self, layers: Iterable[Layer], capture_grads: bool, owner: Any = None) -> None:
        self.layers = list(dict.fromkeys(layers))
        self.capture_grads = capture_grads
        self.armed = False
        self.records: dict[Layer, Record] = {}
        self.passes: list[tuple[int, float]] = []  # (samples, weight) of each forward pass filled from the outputs
        self.handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        if owner is not None:
            weakref.finalize(owner, _remove_handles, self.handles)  # the list: layers added later go too

    def add(self, layers: Iterable[Layer]) -> None:
        """Hooks on more layers (parameters added to the optimizer after it was built)."""
        for layer in dict.fromkeys(layers):
            if layer not in self.layers:
                self.layers.append(layer)
                self.handles.append(layer.module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: Layer) -> Any:
        recorder = weakref.ref(self)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self_ = recorder()
            if self_ is None or not self_.armed or not torch.is_grad_enabled():
                return
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                return
            if not output.requires_grad:
                return
            rec = self_.records.setdefault(layer, Record())
            rec.inputs.append(inputs[0].detach())
            rec.outputs.append(output)
            rec.versions.append(output._version)
            rec.grads.append(None)
            rec.filled.append(None)
            if self_.capture_grads:
                # weakly: the hook lives on the output's graph node, which the record keeps through the output; a
                # strong reference would close a cycle through autograd's C++ node that the garbage collector cannot
                # see, and every step's record (inputs, outputs, gradients) would stay alive for good
                index, record = len(rec.grads) - 1, weakref.ref(rec)

                def capture(grad: Tensor) -> None:
                    r = record()
                    if r is not None and r.grads[index] is None and not in_inner_backward():  # not precond's own
                        r.grads[index] = grad.detach()

                output.register_hook(capture)

        return hook

    def arm(self) -> None:
        self.records = {}
        self.passes = []
        self.armed = True

    def disarm(self) -> None:
        """Stop recording and drop everything recorded (the graph goes with it)."""
        self.armed = False
        self.records = {}
        self.passes = []

    def remove(self) -> None:
        _remove_handles(self.handles)
        self.handles.clear()

    def check_intact(self, layer: Layer) -> None:
        rec = self.records.get(layer)
        if rec is None:
            return
        for out, version in zip(rec.outputs, rec.versions):
            if out._version != version:
                raise PipelineError(
                    f"the output of layer '{layer.name}' was modified in place after the layer ran (e.g. "
                    "nn.ReLU(inplace=True)); Kronecker factors need the layer outputs intact: use inplace=False"
                )


def _remove_handles(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


def fill_output_grads(
    recorder: Recorder, outputs: Tensor, cotangents: Tensor, samples: int, weight: float, chunk: int = 16
) -> None:
    """During a backward pass the user runs, while it passes ``outputs``: backpropagate ``cotangents``
    ``(K, *outputs.shape)`` to the layer outputs recorded since the last fill (this forward pass's), and keep
    them per call with the forward pass's ``samples`` and ``weight`` (as :func:`output_grads_by_backprop`
    with its ``w``), for :func:`filled_output_grads` when the step runs."""
    from precond.autodiff import batched_vjp

    targets: list[tuple[Record, int]] = []
    for layer, rec in recorder.records.items():
        recorder.check_intact(layer)
        targets.extend((rec, i) for i, f in enumerate(rec.filled) if f is None)
    if not targets:
        return
    scale = 1.0
    if outputs.dtype == torch.float16:  # keep the backward in float16's range: a power of 2, undone exactly below
        top = float(cotangents.abs().amax())
        scale = 2.0 ** round(math.log2(2.0**15 / top)) if top > 0 else 1.0
    with inner_backward():
        grads = batched_vjp(
            outputs, [rec.outputs[i] for rec, i in targets], lambda a, b: cotangents[a:b] * scale,
            cotangents.shape[0], chunk,
        )
    recorder.passes.append((samples, weight))
    j = len(recorder.passes) - 1
    for (rec, i), g in zip(targets, grads):
        rec.filled[i] = ((g.float() / scale).to(g.dtype) if scale != 1.0 else g, j)


def filled_output_grads(recorder: Recorder) -> KroneckerEstimate | None:
    """The output gradients :func:`fill_output_grads` kept, as one batch; ``None`` if some recorded call has none.

    With one forward pass the gradients and the weight are as they were computed; with several (gradient
    accumulation over micro-batches of ``m_j`` samples, ``M`` in all) each call's gradients are rescaled by
    ``m_j / M`` and the weight per sample kept, so that ``G`` is the whole batch's."""
    calls = [f for rec in recorder.records.values() for f in rec.filled]
    if not calls or any(f is None for f in calls):
        return None
    passes = recorder.passes
    total = sum(m for m, _ in passes)
    out: dict[Layer, list[Tensor]] = {}
    for layer, rec in recorder.records.items():
        grads = []
        for f in rec.filled:
            assert f is not None  # checked above
            g, j = f
            grads.append(g if len(passes) == 1 else g * (passes[j][0] / total))
        out[layer] = grads
    m0, w0 = passes[0]
    return KroneckerEstimate(out, weight=w0 if len(passes) == 1 else w0 / m0 * total)


def output_grads_by_backprop(recorder: Recorder, outputs: Tensor, cotangents: Tensor, chunk: int = 16) -> dict[Layer, list[Tensor]]:
    """Backpropagate ``cotangents`` ``(K, *outputs.shape)`` from the model outputs to every recorded layer output.

    One pass through the recorded graph per chunk of cotangents (vmapped over
    the autograd engine when ``K > 1``) gives the gradients of all layers at
    once. Returns, per layer, one ``(K, *layer_output.shape)`` tensor per call.
    """
    from precond.autodiff import batched_vjp

    targets: list[tuple[Layer, Tensor]] = []
    for layer, rec in recorder.records.items():
        recorder.check_intact(layer)
        targets.extend((layer, out) for out in rec.outputs)
    if not targets:
        return {}
    k = cotangents.shape[0]
    with inner_backward():
        grads = batched_vjp(outputs, [t for _, t in targets], lambda a, b: cotangents[a:b], k, chunk)
    out: dict[Layer, list[Tensor]] = {}
    for (layer, _), g in zip(targets, grads):
        out.setdefault(layer, []).append(g)
    return out


def captured_output_grads(recorder: Recorder) -> dict[Layer, list[Tensor]]:
    """The output gradients the tensor hooks captured in the main backward, as ``(1, *shape)`` per call."""
    out: dict[Layer, list[Tensor]] = {}
    for layer, rec in recorder.records.items():
        recorder.check_intact(layer)
        out[layer] = [(g if g is not None else torch.zeros_like(o)).unsqueeze(0) for g, o in zip(rec.grads, rec.outputs)]
    return out


@dataclass
class KroneckerEstimate:
    """What a curvature hands a Kronecker structure.

    Layer factors: ``output_grads`` per layer (one ``(K, *output.shape)``
    tensor per call of the layer) and ``weight`` ``w`` with
    ``G = w Σ_k Σ_rows g gᵀ``. Gradient factors (Shampoo): ``gradients``, one
    tensor per parameter of the group.
    """

    output_grads: dict[Layer, list[Tensor]] | None = None
    weight: float = 1.0
    gradients: list[Tensor] | None = None
    zero: bool = False  # torch's state-initialisation step: every layer's factors are zeros (no forward pass ran)


def layer_rows(layer: Layer, record: Record, grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Input rows ``(R, d_in)`` and output-gradient rows ``(K, R, d_out)`` over all calls, row-aligned."""
    a = [layer.input_rows(x) for x in record.inputs]
    g = [layer.output_rows(t).reshape(t.shape[0], -1, layer.d_out) for t in grads]
    return (torch.cat(a) if len(a) > 1 else a[0]), (torch.cat(g, dim=1) if len(g) > 1 else g[0])


def layer_factors(a_rows: Tensor, g_rows: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """One batch's ``A = (1/R) Σ a aᵀ`` and ``G = w Σ_k Σ_r g gᵀ`` from :func:`layer_rows`."""
    flat = g_rows.reshape(-1, g_rows.shape[-1])
    # scaled in place: the products are new tensors, a second pass would allocate another
    return (a_rows.T @ a_rows).div_(a_rows.shape[0]), (flat.T @ flat).mul_(weight)


def sample_count(outputs: Any, who: str) -> int:
    """``M``: the number of samples in the closure's outputs (all but the last dimension)."""
    out = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
    if not isinstance(out, Tensor) or out.dim() == 0:
        raise PipelineError(
            f"{who} needs the number of samples in the loss to scale the output-gradient factor: "
            "return (loss, outputs) from the closure"
        )
    return out.numel() // out.shape[-1]


def warn_silent(layers: list[Layer], who: str) -> None:
    names = ", ".join(f"'{l.name}' ({type(l.module).__name__})" for l in layers)
    warnings.warn(
        f"{who}: the forward hooks of {names} did not fire on a curvature step (the module was not called "
        "inside the closure, or only under no_grad); their factors were not updated",
        RuntimeWarning,
        stacklevel=3,
    )


# --- without an optimizer (precond.estimate) ---------------------------------------------------


def model_layers(model: nn.Module) -> list[Layer]:
    """Every Linear/Conv2d of ``model`` with a trainable weight (its bias included when trainable)."""
    out = []
    for name, module in model.named_modules():
        if supported(module) is not None or not module.weight.requires_grad:
            continue
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        out.append(Layer(name, module, module.weight, bias))
    return out


def estimate_factors(curvature: Any, ctx: Any, recorder: Recorder) -> dict[str, tuple[Tensor, Tensor]]:
    """One batch's ``{module_name: (A, G)}`` for every recorded layer (see the module docstring)."""
    est = curvature.kronecker(ctx, recorder)
    out = {}
    for layer in recorder.layers:
        rec = recorder.records.get(layer)
        grads = (est.output_grads or {}).get(layer)
        if rec is None or not rec.inputs or not grads:
            continue
        a, g = layer_factors(*layer_rows(layer, rec, grads), est.weight)
        out[layer.name] = (a.detach().clone(), g.detach().clone())
    return out


def factor_dtype(like: torch.Tensor) -> torch.dtype:
    """Curvature factors of half-precision parameters are kept (and applied) in float32."""
    return torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
