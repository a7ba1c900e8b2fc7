"""A tiny character-level transformer language model on text shipped with Python.

Corpus: the Zen of Python (decoded from ``this.py`` without importing it,
which would print) followed by the source of a few small, long-stable
stdlib modules (``colorsys``, ``bisect``, ``textwrap``, ``heapq``) — English
docstrings and code, available offline everywhere. The text depends on the
Python version; its SHA-256 is recorded in ``TaskInstance.info``.

The vocabulary is fixed (newline plus printable ASCII 32..126, 96 symbols;
tabs become spaces, anything else ``?``). The first 90% of the text is the
training split, the last 10% the test split. Training minibatches are random
windows drawn from a generator seeded by the task seed; evaluation uses fixed
non-overlapping windows spread over each split.

The corpus is small (~50k characters): in full mode the model reaches a test
perplexity near 7.6 after ~500 Adam steps and then overfits, hence the
default budget of 800 steps and a target of 8.

The model: token + learned position embeddings, pre-LayerNorm blocks with
hand-written causal self-attention (plain ``nn.Linear`` projections, so
K-FAC layer hooks, double backward and ``torch.func`` all work) and a GELU
MLP, a final LayerNorm and an output ``nn.Linear``. Outputs are ``(N, T, V)``
logits; the loss is
``F.cross_entropy(outputs.reshape(-1, V), targets.reshape(-1))``.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from precond.tasks.base import Forward, TaskInstance, register_task, seeded

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)  # 96
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]
CORPUS_MODULES = ("colorsys", "bisect", "textwrap", "heapq")


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def _zen_of_python() -> str:
    source = _module_source("this")
    if not source:
        return ""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "s" for t in node.targets):
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    return ""


@lru_cache(maxsize=1)
def corpus() -> str:
    """The training text (cached in-process)."""
    parts = [_zen_of_python()] + [_module_source(m) for m in CORPUS_MODULES]
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 10_000:  # stdlib sources missing: fall back to a generated text
        text = _generated_text()
    return text.replace("\t", "    ")


def _generated_text(n_sentences: int = 2000) -> str:
    import random

    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the model", "an optimizer", "the gradient", "a matrix"]
    verbs = ["sees", "follows", "updates", "preconditions", "inverts", "scales"]
    objects = ["the step", "a curvature", "the loss", "the weights", "a factor", "the data"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_sentences))


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


@lru_cache(maxsize=1)
def _encoded() -> torch.Tensor:
    return encode(corpus())


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, block_size: int):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.ones(block_size, block_size, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(n, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        att = att.masked_fill(self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, block_size: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, block_size)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformerLM(nn.Module):
    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        d_model: int = 32,
        n_heads: int = 2,
        n_layers: int = 2,
        block_size: int = 32,
    ):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_heads, block_size) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        return self.head(self.ln_f(self.blocks(x)))


def _windows(data: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` non-overlapping windows of ``length + 1`` tokens,
    spread evenly over ``data``."""
    total = (len(data) - 1) // length
    n = min(total, max_windows)
    picks = torch.linspace(0, total - 1, n).round().long().tolist()
    return torch.stack([data[i * length : i * length + length + 1] for i in picks])


@register_task("tiny-lm")
def tiny_lm(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """Character-level 2-layer transformer LM on stdlib text; metric test perplexity."""
    data = _encoded()
    split = int(0.9 * len(data))
    train_data, test_data = data[:split], data[split:]
    d_model, n_heads, block_size, batch_size = (32, 2, 32, 32) if short else (64, 4, 64, 32)
    with seeded(seed):
        model = TinyTransformerLM(VOCAB_SIZE, d_model, n_heads, 2, block_size).to(dtype)
    eval_train = _windows(train_data, block_size, 64)
    eval_test = _windows(test_data, block_size, 64)

    forward = Forward(model)
    closure, batches, evaluate = lm_parts(model, forward, train_data, (eval_train, eval_test), batch_size, block_size, seed * 1_000_003 + 17)

    return TaskInstance(
        name="tiny-lm",
        model=model,
        likelihood="categorical",
        train_batches=batches,
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_perplexity",
        higher_is_better=False,
        target=16.0 if short else 8.0,
        default_steps=150 if short else 800,
        eval_every=10 if short else 25,
        default_lr={
            "default": 3e-3, "adam": 3e-3, "sgd": 0.3,
            # measured with `precond compare ... --lr-grid` (seed 0, full mode, 400-800 steps)
            "kfac": 5e-3, "shampoo": 1e-2, "sophia_g": 3e-4, "sophia_h": 3e-4, "adahessian": 0.03,
        },
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description="character-level 2-layer transformer on stdlib text",
        info={
            "vocab_size": VOCAB_SIZE,
            "d_model": d_model,
            "n_heads": n_heads,
            "block_size": block_size,
            "corpus_chars": len(data),
            "corpus_sha256": hashlib.sha256(corpus().encode()).hexdigest(),
        },
    )


def lm_parts(
    model: nn.Module, forward: Forward, train_data: torch.Tensor, evals: tuple[torch.Tensor, torch.Tensor],
    batch_size: int, block_size: int, batch_seed: int,
) -> tuple[Callable[[Any], Any], Callable[[], Iterator[Any]], Callable[[], dict[str, float]]]:
    """A character LM task's closure (next-character cross-entropy), its stream of random windows of the
    training text (seeded), and its evaluation on fixed train and test windows (loss and perplexity)."""

    def closure(batch: Any) -> Any:
        x, y = batch
        out = forward(x)
        return F.cross_entropy(out.reshape(-1, VOCAB_SIZE), y.reshape(-1)), out

    def batches() -> Iterator[Any]:
        gen = torch.Generator().manual_seed(int(batch_seed))
        offsets = torch.arange(block_size + 1)
        while True:
            starts = torch.randint(0, len(train_data) - block_size - 1, (batch_size,), generator=gen)
            chunk = train_data[starts[:, None] + offsets]
            yield chunk[:, :-1], chunk[:, 1:]

    @torch.no_grad()
    def loss_on(windows: torch.Tensor) -> float:
        out = model(windows[:, :-1])
        return F.cross_entropy(out.reshape(-1, VOCAB_SIZE), windows[:, 1:].reshape(-1)).item()

    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            train_loss, test_loss = loss_on(evals[0]), loss_on(evals[1])
        finally:
            model.train(was_training)
        return {
            "train_loss": train_loss,
            "test_loss": test_loss,
            "train_perplexity": math.exp(min(train_loss, 700.0)),
            "test_perplexity": math.exp(min(test_loss, 700.0)),
        }

    return closure, batches, evaluate
