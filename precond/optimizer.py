"""The step pipeline: a ``torch.optim.Optimizer`` assembled from a recipe's blocks.

One step is

    evaluate the closure (forward, backward; what the blocks need)
    per param group: decay the gradient (l2), refresh the curvature when due,
                     momentum (pre) -> transforms -> momentum (post)
    decay the parameters (decoupled), the step control moves the parameters

with no method-specific branches: blocks declare what they need
(:class:`precond.block.Needs`) and the pipeline provides it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from precond.block import (
    CurvatureRecord, Direction, Estimate, GroupStep, Needs, PipelineBlocks, Served, Step, each_alone,
)
from precond.conventions import recipe_needs
from precond.distributed import Comm, fully_sharded, global_to_shard, local, rows_of, shard_to_global
from precond.errors import CheckpointError, PipelineError, PrecondError
from precond.evaluation import CLOSURE, PLAIN, Evaluation, OutputTap, evaluate, math_attention_in_forward
from precond.guard import Guard
from precond.interfaces import Environment, ParamInfo, param_info  # noqa: F401  (ParamInfo, param_info: re-exported)
from precond.likelihood import get_likelihood
from precond.likelihood_check import OutputGradient, warn_if_mismatch
from precond.recipe import DEFAULT_RULE, Recipe, builtin_recipes, fingerprint, load_recipe, rule_of

STATE_VERSION = 1
_FSDP_PLAIN = (
    "recipe '{recipe}' runs a second backward pass through the model (at labels sampled from it) on its curvature "
    "steps; under fully_shard precond runs it only inside opt.step(closure), after the closure's forward pass "
    "(FSDP2 cannot start a backward pass inside yours). Pass a closure that returns (loss, outputs) and does not call "
    "backward: opt.step(lambda: (loss_fn(out := model(x), y), out))"
)


def group_defaults(recipe: Recipe) -> dict[str, Any]:
    """The param-group hyperparameters a recipe's own blocks read on every step (``momentum``), initialised."""
    out: dict[str, Any] = {}
    for block in pipeline_blocks(recipe).blocks():
        out.update(block.group_defaults())
    return out


def pipeline_blocks(recipe: Recipe) -> PipelineBlocks:
    """A recipe's own blocks (not its rules' or its step control), in the order they run."""
    return PipelineBlocks(recipe.curvature, recipe.structure, tuple(recipe.transform), recipe.momentum, recipe.decay)


class Pipeline:
    """The per-group stages of one recipe (its own, or a rule's), in the order they run.

    ``config`` holds the blocks' configurations; the attributes ``curvature`` ...
    ``decay`` their stages in this optimizer (:meth:`precond.block.Block.stage`:
    the block itself unless it keeps runtime state).
    """

    def __init__(self, config: PipelineBlocks, served: Served) -> None:
        self.config = config

        def stage(block: Any) -> Any:
            return None if block is None else block.stage(served)

        self.curvature = stage(config.curvature)
        self.structure = stage(config.structure)
        self.transforms = tuple(stage(t) for t in config.transforms)
        self.momentum = stage(config.momentum)
        self.decay = stage(config.decay)
        self.pre = config.momentum is not None and config.momentum.position == "pre"
        # a curvature that needs the outputs' graph works while the user's backward passes the outputs (plain
        # loop, torch-style closure); the structure reads it back through this record when the step runs
        needs_graph = config.curvature is not None and config.curvature.needs().outputs
        self.record = CurvatureRecord(self.curvature) if needs_graph else None
        self._needs: dict[Needs | None, Needs] = {}  # needs_at's unions, by the curvature's needs on the step
        self._may_be_nonfinite: bool | None = None  # update_may_be_nonfinite, once known

    def curvature_for(self, ev: Evaluation) -> Any:
        """The curvature the structure reads on this step: the record of the user's backward passes, or the block
        (or, on torch's state-initialisation step, zeros: :class:`_ZeroCurvature`)."""
        if ev.template:
            return _ZeroCurvature(self.curvature)
        return self.record if self.record is not None and ev.convention != CLOSURE else self.curvature

    def stages(self) -> list[Any]:
        return [b for b in (self.curvature, self.structure, *self.transforms, self.momentum, self.decay) if b is not None]

    def needs_at(self, step: int) -> Needs:
        """What the pipeline needs on ``step`` (a curvature block only on its refresh steps). The blocks are frozen
        configurations: the union is made once per value of the curvature's needs (a step's fixed cost)."""
        curvature = self.config.curvature
        now = curvature.needs_at(step) if curvature is not None else None
        out = self._needs.get(now)
        if out is None:
            out = Needs()
            for block in self.config.blocks():
                out = out | (now if block is curvature else block.needs())
            self._needs[now] = out
        return out

    def update_may_be_nonfinite(self) -> bool:
        """False when finite gradients and estimates provably give a finite update (Adam, SGD, Sophia). Asked twice per
        step, of frozen configurations: decided once."""
        if self._may_be_nonfinite is None:
            c = self.config
            nonnegative = c.curvature is None or c.curvature.nonnegative()
            form = c.structure.form if c.structure is not None else ""
            self._may_be_nonfinite = not all(t.keeps_finite(form, nonnegative) for t in c.transforms)
        return self._may_be_nonfinite

    def init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        for block in (self.structure, self.momentum):
            if block is not None:
                block.init_state(param, state)

    def direction(self, ctx: GroupStep) -> Direction:
        """Momentum (pre), then the transforms: the preconditioned direction."""
        d = Direction(ctx.grads, 1.0, False)
        if self.pre:
            d = self.momentum.apply(ctx, d)
        for t in self.transforms:
            if not t.linear or d.denominator is not None:
                d = d.materialize()
            d = self.structure.precondition(ctx, t, d) if t.spectral else t.apply(ctx, d)
        return d

    def post(self, ctx: GroupStep, d: Direction) -> Direction:
        """Momentum after preconditioning (K-FAC), if any."""
        if self.momentum is not None and not self.pre:
            d = self.momentum.apply(ctx, d)
        return d


class Optimizer(torch.optim.Optimizer):
    """A precond optimizer. Build one with :func:`precond.build` or :func:`precond.compose`.

    Param groups, ``state_dict``/``load_state_dict`` (bit-for-bit resume),
    LR schedulers (``group["lr"]`` is read every step) and ``zero_grad`` work as
    in torch. ``step(closure)`` takes a closure that runs the forward pass and
    returns ``loss`` or ``(loss, outputs)``; the optimizer runs the backward
    pass(es). Recipes that need only gradients also accept the plain
    ``loss.backward(); opt.step()``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        recipe: Recipe,
        *,
        model: nn.Module | None = None,
        likelihood: str | None = None,
        seed: int = 0,
        grad_scaler: Any = None,
    ) -> None:
        try:
            self.likelihood = None if likelihood is None else get_likelihood(likelihood)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        defaults = {"lr": recipe.lr, "weight_decay": recipe.weight_decay, "rule": DEFAULT_RULE, **group_defaults(recipe)}
        super().__init__(params, defaults)
        self.recipe = recipe
        self.model = model
        configs = {DEFAULT_RULE: pipeline_blocks(recipe)}
        for rule in recipe.rules:
            configs[rule.name] = pipeline_blocks(rule.recipe)
        unknown = {g["rule"] for g in self.param_groups} - set(configs)
        if unknown:
            raise PipelineError(f"param groups name rules {sorted(unknown)} that the recipe does not define")
        self.param_info = param_info(model) if model is not None else {}
        self.needs = recipe_needs(recipe)
        if (self.needs.hooks or self.needs.model) and model is None:
            raise PipelineError(
                f"recipe '{recipe.name}' needs {' and '.join(self.needs.names())}: pass the nn.Module to "
                "precond.build(recipe, model), not its parameters"
            )
        if model is not None:
            _refuse_compiled(model, recipe.name, self.needs)
        # FSDP2 (fully_shard): DTensor parameters; the element-wise recipes run on each process's shards
        sharded = fully_sharded(p for g in self.param_groups for p in g["params"])
        self.comm = Comm(recipe.distributed.mode, fully_sharded=sharded)
        self._refuse_distributed_problems(configs)
        # fully sharded: the rules whose pipeline needs each parameter whole (Shampoo, SOAP, Muon) run at each
        # parameter's owner on the gathered gradient (:meth:`_owned`, :meth:`_scatter`)
        self._whole_rules = {r for r, c in configs.items() if any(b.gathers() for b in c.blocks())} if sharded else set()
        self._ranks_checked = False
        self._shards: dict[int, torch.Tensor] = {}  # this step: id of a tensor in a ctx -> its DTensor parameter
        self._standins: dict[int, torch.Tensor] = {}  # id of an owned DTensor parameter -> its whole-shaped stand-in
        self._owner_table: tuple[tuple[int, ...], dict[int, int]] | None = None
        self._index: dict[torch.Tensor, int] | None = None
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)  # probes and labels drawn where they are used
        self.global_step = 0
        self.guard = Guard(recipe.on_nonfinite, recipe.max_nonfinite)
        tapped = model is not None and (self.needs.outputs or self.needs.hooks)
        self.tap = OutputTap(model, self._from_outputs, owner=self) if tapped else None  # type: ignore[arg-type]  # model: checked
        self.grad_scaler = grad_scaler
        if model is not None and self.needs.create_graph:  # the user's forward passes, differentiated twice
            math_attention_in_forward(model, owner=self)
        self.env = Environment(
            recipe=recipe.name, info=self.param_info, comm=self.comm, model=model, likelihood=self.likelihood,
            generator=self.generator, state_of=self._state_of, index=self.index_of, tap=self.tap,
            param_of=lambda t: self._shards.get(id(t), t),
        )
        groups = tuple(self.param_groups)
        # an owner's pipeline sees one process: its blocks own every parameter they are handed, nothing travels
        self._whole_env = dataclasses.replace(self.env, comm=Comm("off")) if self._whole_rules else self.env
        self.pipelines = {
            rule: Pipeline(config, Served(
                self._whole_env if rule in self._whole_rules else self.env,
                tuple(g for g in groups if g["rule"] == rule), groups, config, configs,
            ))
            for rule, config in configs.items()
        }
        self.step_control: Step = recipe.step.stage(Served(self.env, groups, groups, configs[DEFAULT_RULE], configs))
        self._stages = [self.step_control] + [s for pipe in self.pipelines.values() for s in pipe.stages()]
        self._refuse_missing_likelihood()  # after the blocks' own checks (which pairs of blocks work at all)
        self._likelihood_checked = self.likelihood is None  # the first step compares the loss with it
        self._prepare(1)  # a plain loop's first forward pass comes before any step

    def _prepare(self, step: int) -> None:
        """Ready for the forward pass(es) of ``step``: hooks armed where due, nothing left from earlier passes."""
        for stage in self._stages:
            stage.before_closure(step)
        if self.tap is not None:
            self.tap.reset()
            self.tap.listening = True  # the user's passes until the next step
        for pipe in self.pipelines.values():
            if pipe.record is not None:
                pipe.record.clear()

    def _from_outputs(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        """A backward pass the user runs reached the model's outputs (plain loop, torch-style closure): the
        structures whose curvature needs the outputs' graph take what they need now (:class:`OutputTap`)."""
        step = self.global_step + 1
        pipes = [p for p in self.pipelines.values() if p.record is not None and p.curvature.due(step)]
        if not pipes:
            return
        if self.comm.fully_sharded:
            raise PipelineError(_FSDP_PLAIN.format(recipe=self.recipe.name))
        ev = Evaluation(outputs=outputs, output_grad=grad, params=self._trainable(), env=self.env, convention=PLAIN)
        scopes: dict[int, list[torch.Tensor]] = {}
        work = []
        for group in self.param_groups:
            pipe = self.pipelines[group["rule"]]
            params = [p for p in group["params"] if p.requires_grad]
            if pipe not in pipes or not params:
                continue
            states = [self.state[p] for p in params]
            steps = [s.get("step", 0) + 1 for s in states]
            ctx = GroupStep(group, params, [], states, steps, step, ev, self.env)  # no gradient yet: grads empty
            ctx.scope = scopes.setdefault(id(pipe.curvature), [])
            ctx.scope.extend(params)
            work.append((ctx, pipe))
        samples = outputs.numel() // outputs.shape[-1]
        for pipe in dict.fromkeys(p for _, p in work):
            pipe.record.begin(samples)  # type: ignore[union-attr]  # the pipes with a record
        try:
            with torch.no_grad():
                for ctx, pipe in work:
                    pipe.structure.from_outputs(ctx, pipe.record)
        finally:
            for pipe in dict.fromkeys(p for _, p in work):
                pipe.record.end()  # type: ignore[union-attr]  # the pipes with a record

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's, with the recipe's rules: parameters go to the rule that matches them (modules added to
        the model since ``build`` are looked up), or to ``param_group["rule"]`` when given; each rule's
        hyperparameters fill what the group does not set."""
        if "pipelines" not in self.__dict__:  # torch's __init__ adding the first groups
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if self.model is not None:
            self.param_info.update(param_info(self.model))  # env.info is this dict: blocks see the new names too
        if "rule" in param_group:
            if param_group["rule"] not in self.pipelines:
                raise PipelineError(f"param group names rule {param_group['rule']!r}; the recipe's rules: {sorted(self.pipelines)}")
            parts = {param_group["rule"]: params}
        else:
            parts = {}
            for p in params:
                info = self.param_info.get(p)
                rule = DEFAULT_RULE if info is None else rule_of(self.recipe, info.name, info.module, info.role, p)
                parts.setdefault(rule, []).append(p)
        subs = {DEFAULT_RULE: self.recipe, **{r.name: r.recipe for r in self.recipe.rules}}
        for rule, ps in parts.items():
            sub = subs[rule]
            defaults = {"lr": sub.lr, "weight_decay": sub.weight_decay, **group_defaults(sub)}
            super().add_param_group({**defaults, **param_group, "params": ps, "rule": rule})
            for stage in self.pipelines[rule].stages():
                getattr(stage, "added", lambda params: None)(ps)  # stateless blocks are their own stages
        self._index = None  # positions over the groups, recomputed
        self._prepare(self.global_step + 1)  # hooks on the new layers armed for the next forward pass

    def _state_of(self, param: torch.Tensor) -> dict[str, Any]:
        return self.state[self._shards.get(id(param), param)]  # looked up on every call: load_state_dict replaces self.state

    def index_of(self, param: torch.Tensor) -> int:
        """The parameter's position over all param groups: a stable name (e.g. for block owners)."""
        param = self._shards.get(id(param), param)  # fully sharded: a shard or an owner's stand-in
        if self._index is None:
            self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return self._index[param]

    # --- one step ----------------------------------------------------------------------

    _step_supports_amp_scaling = True  # GradScaler hands its scale and overflow flag to step() (grad_scale, found_inf)

    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]  # torch's stub: float | None
        upcoming = self.global_step + 1
        if self.tap is not None:
            self.tap.listening = False  # the passes inside the step are precond's (or a closure's: evaluate)
        if self._amp_overflow():  # GradScaler: inf/NaN in the scaled gradients; skipped, no curvature state touched
            self._prepare(upcoming)
            return None
        try:
            ev = self._evaluate(closure, upcoming)
            with torch.no_grad():
                problem = self._update(ev, upcoming)
        finally:
            for stage in self._stages:
                stage.after_step()
            self._prepare(self.global_step + 1)
        self.guard.record(problem, upcoming)
        return ev.loss

    def _amp_overflow(self) -> bool:
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step for optimizers that handle scaling
        return found_inf is not None and bool(found_inf)

    def _evaluate(self, closure: Callable[[], Any] | None, step: int) -> Evaluation:
        needs = self._needs_at(step)
        if closure is not None:
            for stage in self._stages:
                stage.before_closure(step)  # this step's forward pass is the closure's: drop what came before
        params = self._trainable()
        captured = None
        if closure is not None and self.likelihood is not None and not self._likelihood_checked:
            self._likelihood_checked = True  # once: is the loss the likelihood's?
            closure = captured = OutputGradient(closure)
        ev = evaluate(closure, params, needs, f"recipe '{self.recipe.name}'", self.tap, always=self.needs)
        if captured is not None and self.likelihood is not None:  # from the step's own backward pass: no extra work
            warn_if_mismatch(self.likelihood, captured, f"recipe '{self.recipe.name}' with likelihood='{self.likelihood.name}'", stacklevel=4)
        ev.env = self.env
        ev.template = closure is None and self._initialising(params)
        if self.comm.fully_sharded and self.needs.outputs and ev.convention != CLOSURE and not ev.template:
            raise PipelineError(_FSDP_PLAIN.format(recipe=self.recipe.name))
        self._unscale(ev, params)
        if self.comm.active and ev.graph_grads is not None:
            # torch.autograd.grad (for a differentiable gradient) bypasses DDP's reducer: average here
            have = [p for p in params if p.grad is not None]
            grads = [p.grad.clone() for p in have if p.grad is not None]  # the detached grads share memory with the graph's
            self.comm.mean_(grads)
            for p, g in zip(have, grads):
                p.grad = g
        return ev

    def _initialising(self, params: list[torch.Tensor]) -> bool:
        """Whether this is torch's state-initialisation step (``torch.distributed.checkpoint.state_dict``'s
        ``get_optimizer_state_dict`` on a fresh optimizer: zero gradients, every lr 0, no closure) for a recipe
        whose curvature comes from a forward pass, which that step does not run. The state it creates only says
        which keys a checkpoint fills (their values are loaded next), so the curvature estimates are zeros."""
        if self.state or not (self.needs.outputs or self.needs.hooks):
            return False
        if any(float(g["lr"]) != 0.0 for g in self.param_groups) or any(p.grad is None for p in params):
            return False
        return not any(bool(local(p.grad).any()) for p in params if p.grad is not None)

    def _unscale(self, ev: Evaluation, params: list[torch.Tensor]) -> None:
        """Under ``GradScaler.step(opt)``: the gradients divided by the loss scale (as GradScaler would, unless
        ``scaler.unscale_(opt)`` did already), and the scale kept for statistics the hooks took from the scaled
        backward pass (``grad_scaler=`` at build gives it when the gradients were unscaled before the step)."""
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, scale.double().reciprocal().float())
            ev.grad_scale = float(scale)
        elif getattr(self, "found_inf", None) is not None:  # GradScaler.step after scaler.unscale_(opt)
            if self.grad_scaler is not None:
                ev.grad_scale = float(self.grad_scaler.get_scale())
            elif self.needs.hooks or self.needs.outputs:
                raise PipelineError(
                    f"recipe '{self.recipe.name}' takes statistics from your backward pass, which GradScaler scaled; "
                    "after scaler.unscale_(opt) the optimizer is not told by how much. Pass grad_scaler=scaler to "
                    "precond.build (as kfac-pytorch's grad_scaler), or call scaler.step(opt) without unscale_"
                )
        if ev.graph_grads is not None and ev.grad_scale not in (None, 1.0):
            raise PipelineError(
                f"recipe '{self.recipe.name}' differentiates the gradient again; under GradScaler that gradient is of "
                "the scaled loss. Use bfloat16 autocast without a GradScaler, or no autocast, for this recipe"
            )

    def _update(self, ev: Evaluation, step: int) -> str | None:
        """One step of the pipeline; returns what was non-finite (the step then changes nothing) or None."""
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._shards = {}  # id of a shard in this step's ctx.params -> its DTensor parameter
        problem = self._check_gradients(live, ev.loss)  # before any state exists or changes
        if problem:
            return problem
        ctxs = [c for c in (self._gather(g, ev, step) for g in self.param_groups) if c.params]
        pipes = [self.pipelines[c.group["rule"]] for c in ctxs]
        if self.comm.active and not self._ranks_checked:
            self._check_ranks_agree(ctxs)  # (fully sharded: the parameters that are not DTensors, if any)
        for ctx, pipe in zip(ctxs, pipes):
            pipe.decay.gradient(ctx)  # (l2: entry by entry, on the shards before a whole gradient is gathered)
        # the pipelines' work: each ctx, or (fully sharded, pipelines over whole parameters) the whole parameters
        # this process owns; the same on every process but for these
        whole = [c for c in ctxs if c.group["rule"] in self._whole_rules]
        work = [(c, p) for c, p in zip(ctxs, pipes) if c.group["rule"] not in self._whole_rules]
        owned = self._owned(whole, ev, step) if whole else []
        work += owned
        scopes: dict[int, list[torch.Tensor]] = {}
        for ctx, pipe in work:
            ctx.scope = scopes.setdefault(id(pipe.curvature), [])
            ctx.scope.extend(ctx.params)
        due = [(c, p) for c, p in work if p.curvature is not None and p.curvature.due(step)]
        whole_due = any((cv := self.pipelines[c.group["rule"]].curvature) is not None and cv.due(step) for c in whole)
        # what the fresh estimates are made from: the owners' whole gradients, or (a structure whose statistics are
        # pooled: K-FAC's layer hooks) every process's rows ctx, averaged, which the owners then read
        pooled = [(c, self.pipelines[c.group["rule"]]) for c in whole]
        pooled = [(c, p) for c, p in pooled if _pooled(p) and p.curvature.due(step)]
        at_owner = {id(c) for c, _ in owned}
        problem = self._check_estimates(
            [(c, p) for c, p in due if id(c) not in at_owner or not _pooled(p)] + pooled,
            whole_due, at_owner,
        )
        if problem:
            return problem
        self.global_step = step  # from here on the step counts
        for ctx, _ in work:
            for s in ctx.states:
                s["step"] += 1
        for ctx, pipe in due:
            pipe.structure.update(ctx, pipe.curvature_for(ev))
        wctxs = [c for c, _ in work]
        self.step_control.prepare(wctxs)
        directions = [pipe.direction(ctx) for ctx, pipe in work]
        directions = self.step_control.scale(wctxs, directions)
        directions = [pipe.post(ctx, d) for (ctx, pipe), d in zip(work, directions)]
        problem = self._check_updates(wctxs, [p for _, p in work], directions, pipes)
        if problem:
            return problem
        if whole:  # every process receives the owners' updates and takes its rows
            wctxs, directions = self._scatter(ctxs, work, directions)
        for ctx in wctxs:
            self.pipelines[ctx.group["rule"]].decay.parameters(ctx)
        self.step_control.apply(wctxs, directions)
        return None

    # --- fully sharded pipelines over whole parameters: owner computes, rows go back -------------

    def _owners(self) -> dict[int, int]:
        """The owner process of each parameter of the pipelines over whole parameters (by id): LPT
        (:func:`precond.distributed.assign_named`) over the sets one owner holds together (:meth:`owner_units`)
        by the cost of their state, a pure function of the shapes and the number of processes (so a
        checkpoint's owners are known on loading)."""
        key = tuple(id(p) for g in self.param_groups if g["rule"] in self._whole_rules for p in g["params"])
        if self._owner_table is None or self._owner_table[0] != key:
            units, costs = self.owner_units()
            owners = self.comm.owners(costs)
            self._owner_table = (key, {id(p): o for unit, o in zip(units, owners) for p in unit})
        return self._owner_table[1]

    def owner_units(self, rules: set[str] | None = None) -> tuple[list[list[torch.Tensor]], list[tuple[str, float]]]:
        """Fully sharded: the sets of parameters of the pipelines over whole parameters (``rules``: those rules'
        instead) that one owner holds together (a parameter alone, or a K-FAC layer's weight and bias: the
        structure's ``together``), each with its name and the cost of its state there, which the owner
        assignment (:func:`precond.distributed.assign_named`) balances (``bench/fsdp_bytes.py`` predicts the
        traffic at any number of processes from them)."""
        rules = self._whole_rules if rules is None else rules
        units: list[list[torch.Tensor]] = []
        costs: list[tuple[str, float]] = []
        for g in (g for g in self.param_groups if g["rule"] in rules):
            params = list(g["params"])
            structure = self.pipelines[g["rule"]].structure
            for where, cost in structure.together(params) if structure is not None else each_alone(params):
                units.append([params[i] for i in where])
                costs.append((f"{self.index_of(params[where[0]]):09d}", cost))
        return units, costs

    def _standin(self, p: torch.Tensor) -> torch.Tensor:
        """A tensor of ``p``'s whole shape, dtype and device that holds no memory (the owner's blocks read
        only a parameter's shape, :meth:`precond.block.Block.gathers`); the same object on every step, so the
        blocks' per-parameter caches hold."""
        t = self._standins.get(id(p))
        if t is None or t.shape != p.shape:
            t = self._standins[id(p)] = torch.zeros((), dtype=p.dtype, device=local(p).device).expand(p.shape)
        return t

    def _owned(self, whole: list[GroupStep], ev: Evaluation, step: int) -> list[tuple[GroupStep, Pipeline]]:
        """The whole gradient of every parameter of ``whole`` (each process's ctx of its rows, after l2
        decay) at its owner (one all-to-all of the rows of the owner's replica, :meth:`Comm.to_owners`; for
        another layout one all-gather per parameter), and a ctx per param group of the parameters this
        process owns: whole gradients, stand-ins for the parameters, their state."""
        owners = self._owners()
        everything = [(self._shards[id(shard)], g) for lc in whole for shard, g in zip(lc.params, lc.grads)]
        wholes: dict[int, torch.Tensor] = {}  # id of a parameter this process owns -> its whole gradient
        if self.comm.direct([p for p, _ in everything]):  # each gradient's rows to its owner only
            arrived = self.comm.to_owners([g for _, g in everything], [p for p, _ in everything],
                                          [owners[id(p)] for p, _ in everything])
            wholes = {id(everything[i][0]): t for i, t in arrived.items()}
        else:  # (a layout other than FSDP2's or HSDP's) gathered on every process, within the parameter's mesh
            for p, g in everything:
                full = self.comm.whole(g, p)  # collective: every process, parameters in the same order
                if owners[id(p)] == self.comm.rank:
                    wholes[id(p)] = full
        out = []
        for lc in whole:
            pipe = self.pipelines[lc.group["rule"]]
            params, grads, states, steps = [], [], [], []
            for shard in lc.params:
                p = self._shards[id(shard)]
                if owners[id(p)] != self.comm.rank:
                    continue
                full = wholes[id(p)]
                standin = self._standin(p)
                self._shards[id(standin)] = p
                state = self.state[p]
                if len(state) <= 1:  # nothing, or the step count every process keeps
                    state.setdefault("step", 0)
                    pipe.init_state(standin, state)
                params.append(standin)
                grads.append(full)
                states.append(state)
                steps.append(state["step"] + 1)
            if params:
                ctx = GroupStep(lc.group, params, grads, states, steps, step, ev, self._whole_env, objective_l2=lc.objective_l2)
                out.append((ctx, pipe))
        return out

    def _scatter(
        self, ctxs: list[GroupStep], work: list[tuple[GroupStep, Pipeline]], directions: list[Direction]
    ) -> tuple[list[GroupStep], list[Direction]]:
        """The owners' updates to every process, each process's rows of them as the directions of its ctxs of
        rows; returns the ctxs to apply, in param-group order, with their directions.

        First an all-gather (:meth:`Comm.exchange`) of, per parameter, its step count, its direction's
        coefficient and whether a denominator comes (float64: exact), then the direction's tensors (and
        denominators) in the parameters' dtype, unmaterialized, each process receiving its rows (one
        all-to-all, :meth:`Comm.from_owners`; for another layout an all-gather of the whole tensors): each process
        applies its rows exactly as one process applies the whole.
        """
        mine: dict[int, tuple[int, float, Direction, int]] = {}  # id of the parameter -> (step, coef, direction, i)
        done: dict[int, Direction] = {}
        for (ctx, _), d in zip(work, directions):
            if ctx.group["rule"] not in self._whole_rules:
                done[id(ctx)] = d
                continue
            coefs = d.coef if isinstance(d.coef, list) else [d.coef] * len(ctx.params)
            for i, (standin, n, c) in enumerate(zip(ctx.params, ctx.steps, coefs)):
                mine[id(self._shards[id(standin)])] = (n, float(c), d, i)
        owners = self._owners()
        whole = [self._shards[id(s)] for c in ctxs if c.group["rule"] in self._whole_rules for s in c.params]
        here = [(k, p) for k, p in enumerate(whole) if id(p) in mine]
        heads = self.comm.exchange(
            [(owners[id(p)], [[3]]) for p in whole],
            {k: (float(mine[id(p)][0]), [torch.tensor([mine[id(p)][1], float(mine[id(p)][2].denominator is not None),
                                                       float(mine[id(p)][2].nonzero)], dtype=torch.float64)])
             for k, p in here},
            torch.float64,
        )
        dens = [bool(h[1][0][1]) for h in heads]  # type: ignore[index]  # every owner sends (status >= 1)
        dtype = torch.float32
        for p in whole:
            dtype = torch.promote_types(dtype, p.dtype)
        local_results: dict[int, tuple[float, list[torch.Tensor] | None]] = {}
        for k, p in here:
            _, _, d, i = mine[id(p)]
            local_results[k] = (1.0, [d.tensors[i]] + ([d.denominator[i]] if d.denominator is not None else []))
        if self.comm.direct(whole):  # each process receives its rows only
            rows = self.comm.from_owners({k: r[1] for k, r in local_results.items() if r[1] is not None}, whole,
                                         [owners[id(p)] for p in whole], [2 if den else 1 for den in dens])
            bodies: list[tuple[float, list[torch.Tensor] | None]] = [(1.0, r) for r in rows]
        else:  # (another layout) the whole updates to every process, which takes its rows
            bodies = self.comm.exchange(
                [(owners[id(p)], [list(p.shape)] * (2 if den else 1)) for p, den in zip(whole, dens)], local_results, dtype
            )
            bodies = [(st, None if ts is None else [rows_of(t, p) for t in ts]) for (st, ts), p in zip(bodies, whole)]
        results = iter(zip(heads, bodies))
        out_ctxs, out_dirs = [], []
        for c in ctxs:
            if c.group["rule"] not in self._whole_rules:
                out_ctxs.append(c)
                out_dirs.append(done[id(c)])
                continue
            tensors, denominators, coefs, nonzero = [], [], [], True
            for i, shard in enumerate(c.params):
                (status, head), (_, body) = next(results)
                assert head is not None and body is not None  # every owner sends (a failed step returned before)
                p = self._shards[id(shard)]
                c.steps[i] = self.state[p]["step"] = int(status)  # every process keeps each step count
                coefs.append(float(head[0][0]))
                nonzero = nonzero and bool(head[0][2])
                tensors.append(body[0].to(shard.dtype))
                if len(body) > 1:
                    denominators.append(body[1].to(shard.dtype))
            if denominators and len(denominators) != len(tensors):  # (one pipeline: all or none)
                raise PipelineError("the owners' updates of one param group mix directions with and without a denominator")
            coef = coefs[0] if all(x == coefs[0] for x in coefs) else coefs
            out_ctxs.append(c)
            out_dirs.append(Direction(tensors, coef, True, denominators or None, nonzero))
        return out_ctxs, out_dirs

    # --- the non-finite checks (precond.guard) ------------------------------------------

    def _check_gradients(self, params: list[torch.Tensor], loss: torch.Tensor | None) -> str | None:
        """The loss and the gradients, in one reduction (one host synchronisation per step)."""
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise PipelineError("precond does not support sparse gradients")
        first = [] if loss is None else [loss.reshape(())]

        def describe(i: int) -> str:
            if first and i == 0:
                return f"the loss is {loss.item()}"  # type: ignore[union-attr]  # first is not empty: a loss
            return f"non-finite gradient in {self._name(params[i - len(first)])}"

        problem = self.guard.check(first + [local(p.grad) for p in params if p.grad is not None], describe)
        return self.comm.agree(problem) if self.guard.active else problem  # fully sharded: each process saw its shards

    def _check_estimates(
        self, due: list[tuple[GroupStep, Pipeline]], whole_due: bool = False, at_owner: frozenset[int] | set[int] = frozenset()
    ) -> str | None:
        """The fresh estimates, averaged over the processes where they come from local data, then checked.

        Each estimate says what it is (:class:`precond.interfaces.Estimate`): a structure may keep several
        per parameter (Kronecker factors, secant pairs) or one for several parameters (a dense block).
        """
        fresh = [
            (ctx, pipe, _estimates(pipe.structure.estimates(ctx, pipe.curvature_for(ctx.evaluation)), len(ctx.params)))
            for ctx, pipe in due
        ]
        if self.comm.active:  # (not at an owner of whole parameters: its statistics are of the global gradient)
            self.comm.mean_([e.tensor for ctx, pipe, est in fresh if pipe.curvature.reduce_estimates(pipe.config.structure.fill)
                             and id(ctx) not in at_owner for e in est])
        problem = None
        for ctx, pipe, est in fresh:
            problem = self.guard.check([e.tensor for e in est], lambda i: self._describe_estimate(ctx, pipe, est[i]))  # noqa: B023
            if problem:
                break
        if self.guard.active and (any(est for c, _, est in fresh if id(c) not in at_owner) or whole_due):
            problem = self.comm.agree(problem)  # the same on every process (owners: whether a pipeline over whole parameters was due)
        return problem

    def _describe_estimate(self, ctx: GroupStep, pipe: Pipeline, estimate: Estimate) -> str:
        """``curvature 'x' is non-finite for parameter 'fc1.weight' (Kronecker factor 0 of 2, dims 256)``."""
        params = [ctx.params[i] for i in estimate.params if 0 <= i < len(ctx.params)]
        who = self._names(params)
        structure, curvature = pipe.structure.name, pipe.curvature.name
        where = f"{estimate.part}, in structure '{structure}'" if estimate.part else f"structure '{structure}'"
        return f"curvature '{curvature}' is non-finite for {who} ({where})"

    def _check_updates(
        self, ctxs: list[GroupStep], pipes: list[Pipeline], directions: list[Direction], everyone: list[Pipeline]
    ) -> str | None:
        """Statistics advanced already (from finite inputs); a non-finite update leaves the parameters.
        ``everyone``: the pipelines of this step's param groups (the same on every process)."""
        problem = self._first_bad_update(ctxs, pipes, directions)
        if self.guard.active and any(pipe.update_may_be_nonfinite() for pipe in everyone):  # the same on every process
            problem = self.comm.agree(problem)
        return problem

    def _first_bad_update(self, ctxs: list[GroupStep], pipes: list[Pipeline], directions: list[Direction]) -> str | None:
        for ctx, pipe, d in zip(ctxs, pipes, directions):
            if not self.guard.active or not pipe.update_may_be_nonfinite():
                continue
            blocks = ", ".join(b.name for b in pipe.config.blocks())
            problem = self.guard.check(
                d.tensors,
                lambda i: f"the update of {self._name(ctx.params[i])} is non-finite (blocks {blocks}); parameters unchanged",  # noqa: B023
                d.denominator,
                d.nonzero,
            )
            if problem:
                return problem
        return None

    def _refuse_missing_likelihood(self) -> None:
        """At build time, not at the first step that needs it: a block that needs a likelihood (labels
        sampled from the model, the loss Hessian in the outputs) and none was given."""
        if self.likelihood is not None:
            return
        used = {g["rule"] for g in self.param_groups}
        subs = {DEFAULT_RULE: self.recipe, **{r.name: r.recipe for r in self.recipe.rules}}
        for rule, pipe in self.pipelines.items():
            blocks = ([self.recipe.step] if rule == DEFAULT_RULE else []) + (pipe.config.blocks() if rule in used else [])
            for block in blocks:
                if not block.needs().likelihood:
                    continue
                where = f"recipe '{self.recipe.name}'" + (f", rule '{rule}' (recipe '{subs[rule].name}')" if rule != DEFAULT_RULE else "")
                raise PipelineError(
                    f"{where}: {block.kind} '{block.name}' needs a likelihood, the distribution the model predicts "
                    "(it samples labels from the model or uses the loss's Hessian in the outputs). Pass "
                    "likelihood='categorical' to precond.build for a cross-entropy loss (F.cross_entropy), or "
                    "likelihood='gaussian' for squared error (F.mse_loss)"
                )

    # --- several processes (precond.distributed) -----------------------------------------

    def _refuse_distributed_problems(self, configs: dict[str, PipelineBlocks]) -> None:
        """Under torch.distributed, refuse a recipe with a block that would let the processes drift apart, or (fully
        sharded parameters) one that needs more than each process's shards."""
        blocks = [self.recipe.step] + [b for config in configs.values() for b in config.blocks()]
        if self.comm.fully_sharded:
            problems = [p for p in (b.shard_problem() for b in blocks) if p]
            if problems:
                elementwise, whole = _fully_sharded_recipes()
                raise PipelineError(
                    f"recipe '{self.recipe.name}' cannot run on fully sharded parameters (FSDP2, fully_shard): "
                    + "; ".join(dict.fromkeys(problems)) + ". Element-wise recipes run under fully_shard ("
                    + ", ".join(elementwise) + "), and recipes over each whole parameter or layer at its owner ("
                    + ", ".join(whole) + "); the recipes over many parameters at once (full matrices, histories), "
                    "EKFAC, and those that differentiate through the model per sample or twice are not supported "
                    "under FSDP2 yet: use DistributedDataParallel (docs/distributed.md#fully-sharded-fsdp2)"
                )
        if not self.comm.active:
            return
        problems = [p for p in (b.distributed_problem() for b in blocks) if p]
        if problems:
            raise PipelineError(
                f"recipe '{self.recipe.name}' cannot run on {self.comm.world} processes: " + "; ".join(dict.fromkeys(problems))
                + ". The processes would drift apart. Use one process, or a recipe without these blocks (docs/distributed.md)"
            )

    def _check_ranks_agree(self, ctxs: list[GroupStep]) -> None:
        """Once, on the first step: every process must hold the same parameters and averaged gradients."""
        self._ranks_checked = True
        pairs = [(p, g) for c in ctxs for p, g in zip(c.params, c.grads)]
        if self.comm.fully_sharded:  # shards differ by design; plain parameters must still agree
            pairs = [(p, g) for p, g in pairs if id(p) not in self._shards]
            if not pairs:
                return
        params = [p for p, _ in pairs]
        mine = torch.stack(
            [torch.stack([t.double().sum(), t.double().square().sum()]) for p, g in pairs for t in (p.detach(), g)]
        ) if params else torch.zeros(0, 2, dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(self.comm.world)]
        torch.distributed.all_gather(everyone, mine, group=self.comm.group)
        for rank, other in enumerate(everyone):
            differ = ((other != everyone[0]) & ~(other.isnan() & everyone[0].isnan())).any(dim=1).nonzero()  # NaN == NaN here
            if len(differ):
                i = int(differ[0])
                what = "values" if i % 2 == 0 else "gradients"
                raise PipelineError(
                    f"the {what} of {self._name(params[i // 2])} differ between processes 0 and {rank} on the first step: "
                    + ("the model's parameters are not the same on every process (DistributedDataParallel broadcasts "
                       "them when it wraps the model)" if what == "values" else
                       "the gradients are not averaged over the processes")
                    + ". Wrap the model in torch.nn.parallel.DistributedDataParallel and call the wrapper inside the "
                    "closure; precond averages its own curvature statistics (docs/distributed.md)"
                )

    def _name(self, p: torch.Tensor) -> str:
        label = self._label(p)
        return f"parameter {label}" if label else "a parameter"

    def _label(self, p: torch.Tensor) -> str:
        """``'fc1.weight'`` (with a model) or ``3 of param group 0``; empty if the optimizer does not hold ``p``."""
        info = self.param_info.get(p)
        if info is not None:
            return f"'{info.name}'"
        for i, g in enumerate(self.param_groups):
            for j, q in enumerate(g["params"]):
                if q is p or q is self._shards.get(id(p)):  # fully sharded: the steps see each parameter's shard
                    info = self.param_info.get(q)
                    return f"'{info.name}'" if info is not None else f"{j} of param group {i}"
        return ""

    def _names(self, params: list[torch.Tensor], most: int = 4) -> str:
        """``parameter 'a'``, or ``parameters 'a', 'b' and 3 more``."""
        if len(params) == 1:
            return self._name(params[0])
        if not params:
            return "no known parameter"
        labels = [self._label(p) or "?" for p in params[:most]]
        more = f" and {len(params) - most} more" if len(params) > most else ""
        return f"parameters {', '.join(labels)}{more}"

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _needs_at(self, step: int) -> Needs:
        parts = tuple(pipeline.needs_at(step) for pipeline in self.pipelines.values())
        cache = self.__dict__.setdefault("_needs_of", {})  # the union per combination of the pipelines' needs
        out = cache.get(parts)
        if out is None:
            out = self.recipe.step.needs()
            for part in parts:
                out = out | part
            cache[parts] = out
        return out

    def _gather(self, group: dict[str, Any], ev: Evaluation, step: int) -> GroupStep:
        pipe = self.pipelines[group["rule"]]
        params, grads, states, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            shard = local(p)  # fully sharded: the steps see this process's rows (a view: in-place updates reach p)
            if shard is not p:
                self._shards[id(shard)] = p
            if group["rule"] in self._whole_rules:  # its state is at its owner (_owned); the step count comes back
                params.append(shard)
                grads.append(local(p.grad))
                states.append({})
                steps.append(0)
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                pipe.init_state(shard, state)
            params.append(shard)
            grads.append(local(p.grad))
            states.append(state)
            steps.append(state["step"] + 1)  # committed once the step is known to be finite
        l2 = pipe.config.decay.objective_l2(float(group.get("weight_decay", 0.0)))
        return GroupStep(group, params, grads, states, steps, step, ev, self.env, objective_l2=l2)

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus precond's own section.

        With ``distributed.mode: sharded`` on several processes each process
        keeps only the blocks it owns: this call is then collective (every
        process must make it) and returns the whole state on every process, so
        a checkpoint loads on any number of processes.
        """
        out = super().state_dict()
        if self.comm.sharded:
            out["state"] = self._gather_state(out["state"])
        if self.comm.fully_sharded:  # each process's rows as DTensors laid out as their parameters
            order = [p for g in self.param_groups for p in g["params"]]
            ids = [i for g in out["param_groups"] for i in g["params"]]
            of = dict(zip(ids, order))
            whole = self._whole_params()  # their state: whole tensors at the owner (each saved by its owner alone)
            out["state"] = {
                k: s if id(of[k]) in whole else {n: shard_to_global(v, of[k]) for n, v in s.items()}
                for k, s in out["state"].items()
            }
        out["precond"] = {
            "version": STATE_VERSION,
            "recipe": self.recipe.name,
            "blocks": fingerprint(self.recipe),
            "global_step": self.global_step,
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
            "nonfinite": self.guard.state_dict(),
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        if out["param_groups"]:  # torch.distributed.checkpoint's get_optimizer_state_dict keeps only these two
            # (the generator's state as bytes there: param groups hold plain values, which compare with ==)
            generator = bytes(out["precond"]["generator"].cpu().tolist())  # (numpy is not a core dependency)
            out["param_groups"][0]["precond"] = {**out["precond"], "generator": generator}
        return out

    def _whole_params(self) -> set[int]:
        """The ids of the parameters whose pipeline runs at an owner on whole parameters (fully sharded)."""
        return {id(p) for g in self.param_groups if g["rule"] in self._whole_rules for p in g["params"]}

    def _gather_state(self, local: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        """The union of every process's state; a block's tensors live on its owner alone."""
        everyone: list[Any] = [None] * self.comm.world
        torch.distributed.all_gather_object(everyone, local, group=self.comm.group)
        merged: dict[Any, dict[str, Any]] = {}
        for state in everyone:
            for key, value in state.items():
                entry = merged.setdefault(key, {})
                for k, v in value.items():
                    entry.setdefault(k, v)
        return {k: merged[k] for k in sorted(merged)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint: precond's checks (before anything changes), then torch's own loading.

        Unlike torch, floating-point state keeps its own dtype (a float32
        curvature factor of a bfloat16 parameter stays float32). A
        ``torch.optim`` state_dict (no ``"precond"`` section) of Adam, AdamW,
        SGD or Adagrad is converted when this optimizer's recipe equals that
        torch optimizer with the same hyperparameters (``lr`` and
        ``weight_decay`` are carried over per param group); anything else is
        refused with :class:`CheckpointError` (:mod:`precond.torch_state`).
        """
        state_dict, extra = self._checked(dict(state_dict))
        super().load_state_dict(state_dict)  # torch's: param groups, parameter ids, devices, the user's hooks
        # torch casts floating-point state to its parameter's dtype: put back precond's own (bit for bit)
        order = [p for g in self.param_groups for p in g["params"]]
        saved = [i for sg in state_dict["param_groups"] for i in sg["params"]]
        whole = self._whole_params()
        owners = self._owners() if whole else {}
        for key, param in zip(saved, order):
            original = state_dict["state"].get(key)
            if id(param) in whole:  # a parameter's whole state, kept by its owner alone (at this number of processes)
                if original is None:
                    self.state.pop(param, None)
                elif owners[id(param)] == self.comm.rank:
                    self.state[param] = {k: _to_device(v, local(param).device) for k, v in original.items()}
                else:  # the others keep its step count (each process's state names every parameter, as DCP wants)
                    self.state[param] = {k: v for k, v in original.items() if k == "step"}
            elif original is not None:
                self.state[param] = {k: _to_device(global_to_shard(v, param), param.device) for k, v in original.items()}
        self._index = None
        self._owner_table = None
        self.global_step = int(extra["global_step"])
        self._load_generator(extra["generator"], extra.get("generator_device", "cpu"))
        self.guard.load_state_dict(extra.get("nonfinite", {}))

    def _load_generator(self, state: torch.Tensor | bytes, device: str) -> None:
        """The random stream continues where it stopped; a checkpoint written on another kind of device (a CPU
        generator's state is not a CUDA one's) seeds this one from that state instead, deterministically."""
        if isinstance(state, (bytes, bytearray)):  # the copy in the first param group
            state = torch.frombuffer(bytearray(state), dtype=torch.uint8)
        if device == self.generator.device.type:
            self.generator.set_state(state)
            return
        seed = int.from_bytes(hashlib.sha256(bytes(state.tolist())).digest()[:8], "little")
        self.generator.manual_seed(seed)
        warnings.warn(
            f"the checkpoint's random generator ran on {device}, this optimizer's runs on {self.generator.device.type}: "
            "probes and sampled labels continue from a stream seeded by the saved one, not the same numbers",
            stacklevel=3,
        )

    def _checked(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint as torch loads it (a torch.optim one converted) and precond's section, after every
        check that it fits this optimizer; raises :class:`CheckpointError` otherwise."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise CheckpointError("not an optimizer state_dict: expected the keys 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise CheckpointError(
                f"the checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise CheckpointError(
                    f"param group {i}: the checkpoint has {len(sg['params'])} parameters, this optimizer has {len(g['params'])}"
                )
        extra = state_dict.get("precond")
        if saved_groups and "precond" in saved_groups[0]:  # it travels in the first param group too (DCP keeps that)
            extra = saved_groups[0]["precond"] if extra is None else extra
            saved_groups = [{k: v for k, v in g.items() if k != "precond"} for g in saved_groups]
            state_dict = {**state_dict, "param_groups": saved_groups}
        if extra is None:  # a torch.optim state_dict: converted for the recipes that equal one, else refused
            from precond.torch_state import from_torch

            converted, saved_groups, steps = from_torch(self, state_dict)
            state_dict = {**state_dict, "state": converted, "param_groups": saved_groups}
            extra = {
                "blocks": fingerprint(self.recipe),
                "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
                "global_step": steps,
                "generator": self.generator.get_state(),
                "nonfinite": self.guard.state_dict(),
            }
        if extra.get("blocks") != fingerprint(self.recipe):
            raise CheckpointError(
                f"the checkpoint was written by recipe '{extra.get('recipe')}' with blocks {extra.get('blocks')}; "
                f"this optimizer runs '{self.recipe.name}' with blocks {fingerprint(self.recipe)}"
            )
        for i, (g, shapes) in enumerate(zip(self.param_groups, extra["shapes"])):
            for j, (p, shape) in enumerate(zip(g["params"], shapes)):
                if list(p.shape) != list(shape):
                    raise CheckpointError(
                        f"param group {i}, parameter {j}: the checkpoint is for shape {tuple(shape)}, "
                        f"the model has {tuple(p.shape)}"
                    )
        listed = {i for sg in saved_groups for i in sg["params"]}
        for key in state_dict["state"]:
            if key not in listed:
                raise CheckpointError(f"the checkpoint holds state for parameter id {key!r}, which no param group lists")
        return state_dict, extra


def _pooled(pipe: Pipeline) -> bool:
    """Fully sharded: whether the pipeline's statistics are pooled over the processes (:attr:`Structure.pooled`)."""
    return pipe.structure is not None and pipe.structure.pooled


class _ZeroCurvature:
    """A curvature block's stand-in on torch's state-initialisation step (:meth:`Optimizer._initialising`): zero
    estimates of the shapes the block would give, so that every structure creates the state keys it keeps."""

    def __init__(self, curvature: Any) -> None:
        self.curvature = curvature

    def __getattr__(self, name: str) -> Any:
        return getattr(self.curvature, name)

    def diagonal(self, ctx: GroupStep) -> Any:
        from precond.block import DiagonalEstimate

        return DiagonalEstimate(values=[torch.zeros_like(g) for g in ctx.grads])

    def full(self, ctx: GroupStep) -> torch.Tensor:
        n = sum(g.numel() for g in ctx.grads)
        return ctx.grads[0].new_zeros(n, n)

    def kronecker(self, ctx: GroupStep, recorder: Any) -> Any:
        from precond.layers import KroneckerEstimate

        return KroneckerEstimate(gradients=list(ctx.grads), zero=recorder is not None)


def _fully_sharded_recipes() -> tuple[list[str], list[str]]:
    """The built-in recipes that run on fully sharded parameters: those whose every block works entry by entry
    (on each process's shards), and those with blocks over each whole parameter (at its owner)."""
    elementwise, whole = [], []
    for name in builtin_recipes():
        try:
            recipe = load_recipe(name)
        except PrecondError:  # a broken recipe file on the search path is not this message's business
            continue
        subs = [recipe] + [r.recipe for r in recipe.rules]
        blocks = [recipe.step] + [b for sub in subs for b in pipeline_blocks(sub).blocks()]
        if all(b.shard_problem() is None for b in blocks) and not recipe.step.gathers():
            (whole if any(b.gathers() for b in blocks) else elementwise).append(name)
    return sorted(elementwise), sorted(whole)


def _estimates(items: list[Any], n: int) -> list[Estimate]:
    """A structure's estimates as records; a plain tensor (a structure written before :class:`Estimate`)
    belongs to the parameter at its position when there is one per parameter, else to none named."""
    out = []
    for i, e in enumerate(items):
        if isinstance(e, Estimate):
            out.append(e)
        elif len(items) == n:
            out.append(Estimate(e, (i,)))
        else:
            out.append(Estimate(e, (), f"estimate {i} of {len(items)}"))
    return out


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _refuse_compiled(model: nn.Module, name: str, needs: Needs) -> None:
    """A ``torch.compile``d model (or submodule) serves gradient-only recipes; hooks, the outputs' graph taken
    during backward and double backward it does not (compiled graphs skip hooks added later, donate the buffers a
    second backward needs, and have no double backward): refused at build with what works."""
    compiled = [
        n or "the model"
        for n, m in model.named_modules()
        if isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
    ]
    if not compiled or not (needs.hooks or needs.outputs or needs.create_graph):
        return
    what = " and ".join(x for x, on in (("layer hooks", needs.hooks), ("the model outputs' graph", needs.outputs),
                                        ("a second backward pass (Hessian-vector products)", needs.create_graph)) if on)
    raise PipelineError(
        f"recipe '{name}' needs {what}, which a torch.compile'd module does not give ({', '.join(compiled[:3])} is "
        "compiled). Build it on the uncompiled model and call that in the training loop; gradient-only recipes "
        "(adam, adamw, sgd, adagrad, shampoo, shampoo_grafted, soap, the quasi-Newton recipes) run on compiled models"
    )
