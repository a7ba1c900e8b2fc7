"""Per-step time of a precond recipe against another library's implementation of the same method, side by side.

    python bench/peers.py [--pairs soap,shampoo_grafted,kfac,sophia_g,muon,adam]
                          [--problems autoencoder,wide,transformer]
                          [--rounds 20] [--threads 1]

For each pair the two optimizers train identical copies of the same model on the same batches; rounds of 10
steps alternate between them in one process (the order flips every round), and the table prints the per-step
time (the median over the rounds of each round's mean: refreshes are amortised, every 10th step refreshes, and
a burst of another job on a shared machine stays out), its ratio precond / peer, and both against
``torch.optim.Adam`` on the same model. The clock is the process's CPU time (``--clock cpu``, the default):
with one thread every kernel, the backward pass included, runs on the calling thread, and on a machine
shared with other jobs the CPU time does not count the time slices the process waits for a core, which the
wall clock (``--clock wall``) does. For most pairs only the optimizer step is timed (the forward and
backward pass run outside the timer); for ``kfac`` and ``sophia_g`` the whole iteration is timed (zero_grad,
forward, backward, step, for all three contenders of the row), because both sides do part of their work in
the passes: kfac-pytorch's and precond's layer hooks, precond's sampled-label backward pass and the official
SophiaG's extra forward and backward pass for its Hessian estimate. Peers not installed are skipped with a note:

* ``soap``: ``pytorch_optimizer.SOAP`` (``pip install pytorch_optimizer``), equal settings: betas (0.95, 0.95),
  shampoo_beta 0.95, eps 1e-8, weight decay 0.01, precondition_frequency 10, max dim 10000, 1-D tensors
  diagonal (its default ``precondition_1d=False``, the recipe's ``precondition_1d: false``).
* ``soap_official``: the same peer against the recipe ``soap_official`` (no null_threshold, no relative_eps).
* ``soap_heavyball``: ``heavyball.SOAP`` (``pip install heavyball``) with the same settings (merge_dims off,
  use_precond_schedule off: a refresh every 10 steps), run eagerly (``heavyball.utils.compile_mode = None``): its
  default compiles every fused function with torch.compile's max-autotune, minutes per model on a CPU.
* ``adam``: ``torch.optim.Adam`` itself, its default (on a CPU the loop over the tensors; the floor of an
  elementwise step).
* ``muon``: ``torch.optim.Muon`` on the matrices the recipe gives to Muon (not embeddings, not the layer named
  ``head``) plus ``torch.optim.AdamW`` on the rest. ``muon_bf16``: the same with the recipe's Newton-Schulz in
  bfloat16 (``transform.dtype: bfloat16``), as torch.optim.Muon runs it.
* ``shampoo_grafted``: Distributed Shampoo (``pip install git+https://github.com/facebookresearch/optimizers``,
  module ``distributed_shampoo``) with Adam grafting: lr 1e-3, betas (0.9, 0.999), epsilon 1e-12, weight decay
  1e-5 (decoupled), max_preconditioner_dim 1024, ``AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)``, its
  default root-inverse Shampoo (eigh, float32 factors); the precondition frequency is 10 on both sides (the
  recipe's 100 set to 10 with ``transform.0.every``, and the start 10 on both transforms, Distributed
  Shampoo's ``start_preconditioning_step=-1``, i.e. the frequency), so refreshes are amortised as in the
  other pairs. ``shampoo_grafted32``: the same with the recipe's eigendecompositions in float32
  (``structure.float64: false``), as the peer's default.
* ``kfac``: kfac-pytorch (``pip install git+https://github.com/gpauloski/kfac-pytorch``, module ``kfac``)
  ``KFACPreconditioner`` (factors every step, inverses every 10, damping 1e-3, factor decay 0.95, kl_clip 1e-3,
  lr 1e-2, eigen decompositions: its defaults otherwise) followed by ``torch.optim.SGD(lr=1e-2, momentum=0.9)``.
  Its output-gradient factor comes from the loss's own gradient; the recipe's from sampled labels (one extra
  backward pass through the same graph). Layers K-FAC does not factor take SGD there and Adam here.
  ``kfac_empirical``: the recipe with ``curvature: empirical_fisher`` (the loss's own gradient, as the peer).
* ``sophia_g``: the official ``SophiaG`` (``pip install sophia-opt``; lr 1e-4, betas (0.965, 0.99), rho 0.04,
  weight decay 0.1, ``bs`` the number of predictions per batch) with the official loop's Hessian estimate
  every 10 steps (after each 10th step a forward pass, labels sampled from the outputs, a backward pass and
  ``update_hessian``), the recipe's ``every: 10``.
* ``NAME_unguarded`` (any pair above): the same pair with the recipe's ``on_nonfinite: ignore``, which drops
  precond's checks for NaN/Inf (the gradients before the step and, where a transform can make it non-finite, the
  update after it: one fused norm and one host synchronisation each), which none of the peers makes; their fixed
  cost shows on small models.

Models: the MLP autoencoder 64-256-128-32-128-256-64 (tanh) at batch 128 and the 512-1024-1024-10 MLP at
batch 256 -- the two of the Kronecker issue's table -- and a character transformer (vocabulary 64, 2 pre-norm
blocks of d_model 128, 4 heads, MLP 512, causal, sequence 64) at batch 32 built from nn.Linear, nn.Embedding
and nn.LayerNorm (K-FAC factors its Linear layers, the embeddings and norms take each side's fallback).
The Muon pairs on the MLP take minutes per round on a CPU (torch.optim.Muon's bfloat16 products of
1024x1024 matrices): leave them out there (``--problems wide --pairs soap,adam,shampoo_grafted,kfac,sophia_g``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's precond (not another installed one)
import precond  # noqa: E402
from tiny_gpt import TinyGPT  # noqa: E402  (bench/ is the script's directory: on sys.path)


def autoencoder() -> nn.Module:
    sizes = [64, 256, 128, 32, 128, 256, 64]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def wide() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


VOCAB, SEQ, D_MODEL, HEADS, LAYERS = 64, 64, 128, 4, 2


def transformer() -> nn.Module:
    return TinyGPT(VOCAB, D_MODEL, LAYERS, HEADS, SEQ)


# name: (model, batch size, input width, likelihood)
PROBLEMS: dict[str, tuple[Callable[[], nn.Module], int, int, str]] = {
    "autoencoder": (autoencoder, 128, 64, "gaussian"),
    "wide": (wide, 256, 512, "categorical"),
    "transformer": (transformer, 32, SEQ, "categorical"),
}


def batches(problem: str, n: int) -> list[torch.Tensor]:
    _, batch, width, _ = PROBLEMS[problem]
    g = torch.Generator().manual_seed(0)
    if problem == "transformer":  # token ids; the targets are the next ids (the last one wraps around)
        return [torch.randint(0, VOCAB, (batch, SEQ), generator=g) for _ in range(n)]
    return [torch.randn(batch, width, generator=g) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, problem: str) -> torch.Tensor:
    out = model(x)
    if problem == "autoencoder":
        return F.mse_loss(out, x)
    if problem == "transformer":
        return F.cross_entropy(out.reshape(-1, VOCAB), x.roll(-1, 1).reshape(-1))
    return F.cross_entropy(out, (x[:, :10].argmax(1)))


RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "soap": ("soap", {}), "soap_official": ("soap_official", {}), "soap_heavyball": ("soap", {}), "adam": ("adam", {}),
    "muon": ("muon", {}), "muon_bf16": ("muon", {"transform.dtype": "bfloat16"}),
    "shampoo_grafted": ("shampoo_grafted", {"transform.0.every": 10, "transform.0.start": 10, "transform.1.start": 10}),
    "shampoo_grafted32": ("shampoo_grafted", {"transform.0.every": 10, "transform.0.start": 10, "transform.1.start": 10,
                                              "structure.float64": False}),
    "kfac": ("kfac", {}), "kfac_empirical": ("kfac", {"curvature": {"type": "empirical_fisher"}}),
    "sophia_g": ("sophia_g", {}),
}
WHOLE_ITERATION = {"kfac", "kfac_empirical", "sophia_g"}  # pairs timed over zero_grad, forward, backward and step
NOTES: dict[str, str] = {}  # why a peer could not be built


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The recipe's split: matrices to Muon; embeddings, the layer named head and every vector to AdamW."""
    embeds = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    mats, rest = [], []
    for name, p in model.named_parameters():
        muon = p.dim() >= 2 and id(p) not in embeds and "head." not in name and "embed" not in name
        (mats if muon else rest).append(p)
    return mats, rest


def peer(name: str, model: nn.Module, problem: str) -> Any:
    if name in ("soap", "soap_official"):
        try:
            from pytorch_optimizer import SOAP
        except ImportError:
            return None
        return SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
                    precondition_frequency=10, max_precondition_dim=10000, precondition_1d=False)
    if name == "soap_heavyball":
        try:
            import heavyball
        except ImportError:
            return None
        heavyball.utils.compile_mode = None  # eager: its default compiles each fused function (max-autotune)
        return heavyball.SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8,
                              weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000, merge_dims=False,
                              precondition_1d=False, use_precond_schedule=False)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if name in ("muon", "muon_bf16"):
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            return None
        mats, rest = muon_params(model)
        return _Pair(muon_cls(mats, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"),
                     torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    if name in ("shampoo_grafted", "shampoo_grafted32"):
        try:
            from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo
        except Exception as e:  # noqa: BLE001 - any failure to import is a note, not a crash
            NOTES[name] = f"distributed_shampoo: {type(e).__name__}: {e}"
            return None
        return DistributedShampoo(model.parameters(), lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=1e-5,
                                  max_preconditioner_dim=1024, precondition_frequency=10, start_preconditioning_step=-1,
                                  use_bias_correction=True,
                                  grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8))
    if name in ("kfac", "kfac_empirical"):
        try:
            with warnings.catch_warnings():  # "NVIDIA Apex is not installed"
                warnings.simplefilter("ignore")
                from kfac.preconditioner import KFACPreconditioner
        except Exception as e:  # noqa: BLE001
            NOTES[name] = f"kfac: {type(e).__name__}: {e}"
            return None
        return _Pair(KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=10, damping=1e-3,
                                        factor_decay=0.95, kl_clip=1e-3, lr=1e-2, loglevel=logging.NOTSET),
                     torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    if name == "sophia_g":
        try:
            from sophia_opt import SophiaG
        except Exception as e:  # noqa: BLE001
            NOTES[name] = f"sophia_opt: {type(e).__name__}: {e}"
            return None
        _, batch, _, _ = PROBLEMS[problem]
        predictions = batch * SEQ if problem == "transformer" else batch
        sophia = SophiaG(model.parameters(), lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
        return _Sophia(sophia, predictions)
    raise ValueError(name)


class _Pair:
    def __init__(self, *opts: Any) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()


class _Sophia:
    """The official SophiaG with its training loop's Hessian estimate: after every 10th step, a forward pass,
    labels sampled from the outputs (categorical, or the mean plus unit Gaussian noise), a backward pass of
    the sampled loss and ``update_hessian``."""

    def __init__(self, opt: Any, predictions: int, every: int = 10) -> None:
        self.opt, self.predictions, self.every, self.steps = opt, predictions, every, 0

    def step(self) -> None:
        self.opt.step(bs=self.predictions)
        self.steps += 1

    def after(self, model: nn.Module, x: torch.Tensor, problem: str) -> None:
        if self.steps % self.every:
            return
        out = model(x)
        if problem == "autoencoder":
            sampled = 0.5 * F.mse_loss(out, (out + torch.randn_like(out)).detach(), reduction="sum") / len(out)
        else:
            logits = out.reshape(-1, out.shape[-1])
            labels = torch.distributions.Categorical(logits=logits.detach()).sample()
            sampled = F.cross_entropy(logits, labels)
        sampled.backward()
        self.opt.update_hessian()
        self.opt.zero_grad(set_to_none=True)


CLOCK = time.process_time  # --clock cpu; --clock wall: time.perf_counter


def timed(opt: Any, model: nn.Module, batches: list[torch.Tensor], problem: str, whole: bool = False) -> float:
    total = 0.0
    for x in batches:
        start = CLOCK()
        for p in model.parameters():
            p.grad = None
        loss_of(model, x, problem).backward()
        if not whole:
            start = CLOCK()
        opt.step()
        if hasattr(opt, "after"):
            opt.after(model, x, problem)
        total += CLOCK() - start
    return total / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="soap,soap_official,adam,muon,shampoo_grafted,kfac,sophia_g")
    parser.add_argument("--problems", default="autoencoder,wide,transformer")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # kfac-pytorch's hooks, first layer
    logging.getLogger("distributed_shampoo").setLevel(logging.ERROR)  # "start_preconditioning_step set to -1"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, rounds of 10 steps: {args.rounds}")
    print("| method | problem | timed | precond ms/step | peer ms/step | precond / peer | precond / Adam | "
          "peer / Adam |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for problem in args.problems.split(","):
        make, _, _, likelihood = PROBLEMS[problem]
        data = batches(problem, 10)
        for name in args.pairs.split(","):
            whole = name.removesuffix("_unguarded") in WHOLE_ITERATION
            scope = "iteration" if whole else "step"
            torch.manual_seed(0)
            ours_model = make()
            theirs_model, adam_model = make(), make()
            theirs_model.load_state_dict(ours_model.state_dict())
            adam_model.load_state_dict(ours_model.state_dict())
            base = name.removesuffix("_unguarded")
            other = peer(base, theirs_model, problem)
            if other is None:
                why = NOTES.get(base, "not installed")
                print(f"| {name} | {problem} | {scope} | | | peer not available: {why} | | |")
                continue
            recipe, fields = RECIPES[base]
            if base != name:
                fields = {**fields, "on_nonfinite": "ignore"}
            ours = precond.build(recipe, ours_model, likelihood=likelihood, set=fields or None)
            adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
            runs: dict[str, list[float]] = {"ours": [], "theirs": [], "adam": []}
            contenders = [("ours", ours, ours_model), ("theirs", other, theirs_model), ("adam", adam, adam_model)]
            for r in range(args.rounds + 1):
                order = contenders if r % 2 == 0 else contenders[::-1]
                for key, opt, model in order:
                    t = timed(opt, model, data, problem, whole)
                    if r:  # round 0 warms up (first refreshes, allocations)
                        runs[key].append(t)
            ms = {k: 1e3 * statistics.median(v) for k, v in runs.items()}  # of the rounds: robust to other jobs' bursts
            ours_t, theirs_t, adam_t = ms["ours"], ms["theirs"], ms["adam"]
            print(f"| {name} | {problem} | {scope} | {ours_t:.2f} | {theirs_t:.2f} | {ours_t / theirs_t:.2f} | "
                  f"{ours_t / adam_t:.2f} | {theirs_t / adam_t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
