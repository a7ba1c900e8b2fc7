"""A GPT-style character language model on 2 MB of the Python standard library's own text.

Corpus (nothing downloaded; the same on every machine with the same Python version): the
documentation text of ``pydoc_data.topics`` (the help topics ``pydoc`` shows: the language
reference's sections, ~0.47 MB of English), its topics in sorted order, each headed by its name,
followed by the source of a fixed list of pure-Python standard-library modules
(:data:`CORPUS_MODULES`, in that order: English docstrings and comments, and code). Only CPython's
own files are read, located by ``importlib.util.find_spec`` (never a directory listing, whose order
depends on the file system); a module that is missing is an error, not a smaller corpus. Text is
read as UTF-8 with universal newlines, tabs become four spaces and every character outside the
vocabulary becomes ``?``. Its SHA-256 is in ``TaskInstance.info["corpus_sha256"]`` (the standard
library changes between Python releases, so the hash does: :data:`KNOWN_SHA256` lists those
measured).

Vocabulary: newline plus printable ASCII 32..126 (96 symbols), as ``tiny-lm``. Split: the corpus
is cut into blocks of 8,192 characters and every tenth block (index 9, 19, ...) is the test split,
so both splits sample every part of the corpus; training windows are drawn at random positions of
the training text (a generator seeded by the task seed), evaluation uses fixed windows spread evenly
over each split.

Model: ``tiny-lm``'s transformer at GPT scale for a CPU: token and learned position embeddings,
5 pre-LayerNorm blocks (causal self-attention with 4 heads written with plain ``nn.Linear``
projections, so K-FAC's layer hooks, double backward and ``torch.func`` all work; a GELU MLP of
4x width), a final LayerNorm and an output ``nn.Linear``: d_model 128, context 128, 1.03M
parameters. Batches of 16 windows (2,048 predicted characters per step). About one pass over the
training text in the default 1,000 steps, so the test perplexity tracks the training one (no
overfitting within the budget).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from functools import lru_cache

import numpy as np
import torch

from precond.tasks.base import Forward, TaskInstance, register_task, seeded
from precond.tasks.tiny_lm import VOCAB, VOCAB_SIZE, TinyTransformerLM, lm_parts

# pure-Python modules present in every CPython 3.10-3.13 (no Debian-split ones: no tkinter, idlelib,
# lib2to3, distutils, test); in this order
CORPUS_MODULES = (
    "_pydecimal", "inspect", "typing", "pydoc", "tarfile", "doctest", "argparse", "_pyio", "pickletools",
    "zipfile", "subprocess", "difflib", "locale", "enum", "mailbox", "ipaddress", "pickle", "ast",
)
BLOCK = 8192  # characters; every tenth block is the test split
MIN_CHARS = 2_000_000
# the corpus' SHA-256 on the Python versions it was measured on, by full version (a patch release may touch
# the standard library): the tests check the running one when it is listed, and that the loader is
# deterministic everywhere; add a line when measuring on another version
KNOWN_SHA256: dict[str, str] = {
    "3.11.7": "ffb265d82bbe031b3a26076dc905976a75ec66aef2f08a039b137861ff39c887",  # 2,250,910 characters
}

# bytes -> vocabulary index: '\n' -> 0, printable ASCII -> 1..95, anything else -> '?'
_TABLE = bytes(
    0 if b == 10 else (b - 31 if 32 <= b <= 126 else ord("?") - 31) for b in range(256)
)
assert VOCAB[_TABLE[ord("a")]] == "a" and VOCAB[_TABLE[10]] == "\n"


def _module_text(name: str) -> str:
    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py"):
        raise RuntimeError(
            f"char-lm's corpus needs the source of the standard-library module {name!r}, which this Python "
            f"({sys.version.split()[0]}) does not have as a .py file"
        )
    with open(origin, encoding="utf-8") as fh:  # universal newlines
        return fh.read()


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(f"{key}\n\n{topics[key].strip()}" for key in sorted(topics))


@lru_cache(maxsize=1)
def corpus() -> str:
    """The text (cached in-process): the pydoc topics, then the modules' sources; tabs as four spaces,
    characters outside the vocabulary as ``?``."""
    parts = [_topics_text()] + [_module_text(m) for m in CORPUS_MODULES]
    text = "\n\n".join(parts).replace("\t", "    ")
    return text.encode("ascii", "replace").decode("ascii").replace("\r", "?")


@lru_cache(maxsize=1)
def encoded() -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train ids, test ids, sha256 of the corpus)``."""
    text = corpus()
    data = torch.from_numpy(np.frombuffer(text.encode("ascii").translate(_TABLE), dtype=np.uint8).astype(np.int64))
    blocks = data.split(BLOCK)
    test = torch.cat([b for i, b in enumerate(blocks) if i % 10 == 9])
    train = torch.cat([b for i, b in enumerate(blocks) if i % 10 != 9])
    return train, test, hashlib.sha256(text.encode("ascii")).hexdigest()


def _windows(data: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length + 1`` tokens starting at evenly spread positions of ``data``."""
    starts = torch.linspace(0, len(data) - length - 2, count).round().long()
    return data[starts[:, None] + torch.arange(length + 1)]


@register_task("char-lm")
def char_lm(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """GPT-style character LM (5 pre-norm blocks, d 128, context 128, 1.03M parameters) on 2 MB of stdlib docs and source; metric test perplexity."""
    train_data, test_data, digest = encoded()
    if short:
        d_model, n_heads, n_layers, block_size, batch_size, n_eval = 64, 4, 2, 64, 16, 32
    else:
        d_model, n_heads, n_layers, block_size, batch_size, n_eval = 128, 4, 5, 128, 16, 48
    with seeded(seed):
        model = TinyTransformerLM(VOCAB_SIZE, d_model, n_heads, n_layers, block_size).to(dtype)
    eval_train = _windows(train_data, block_size, n_eval)
    eval_test = _windows(test_data, block_size, n_eval)

    forward = Forward(model)
    closure, batches, evaluate = lm_parts(model, forward, train_data, (eval_train, eval_test), batch_size, block_size, seed * 1_000_003 + 23)

    return TaskInstance(
        name="char-lm",
        model=model,
        likelihood="categorical",
        train_batches=batches,
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_perplexity",
        higher_is_better=False,
        target=TARGET[short],
        default_steps=150 if short else 1000,
        eval_every=10 if short else 50,
        default_lr=dict(LR_HINTS[short]),
        threads=1 if short else 2,  # 2,048 tokens x d 128 a step: two threads gain, more mostly synchronise
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description=f"GPT-style character LM, {n_layers} pre-norm blocks, d {d_model}, on stdlib docs and source",
        info={
            "vocab_size": VOCAB_SIZE,
            "d_model": d_model,
            "n_heads": n_heads,
            "n_layers": n_layers,
            "block_size": block_size,
            "corpus_chars": len(train_data) + len(test_data),
            "train_chars": len(train_data),
            "test_chars": len(test_data),
            "corpus_sha256": digest,
            "python": ".".join(map(str, sys.version_info[:3])),
        },
    )


# full: lr-tuned Adam (9e-4) reaches 5.08 at step 900 and 4.79 at step 1000 (seed 0, test tracking the training
# perplexity: no overfitting; docs/benchmarks.md); 5 is reached inside the default budget, as the issue asks
TARGET = {False: 5.0, True: 16.0}
# full: each recipe's best of x0.3/x1/x3 around a first guess, 40 s of training each (seed 0), and Adam's
# 9e-4 confirmed over 180 s and to the target against 3e-3 (docs/benchmarks.md, char-lm); short: Adam's 3e-3
LR_HINTS = {
    False: {"default": 3e-3, "adam": 9e-4, "adamw": 9e-4, "sgd": 0.3, "kfac": 1e-2, "shampoo_grafted": 3e-3,
            "soap": 9e-3, "sophia_g": 9e-4, "muon": 3e-3},
    True: {"default": 3e-3, "adam": 3e-3, "sgd": 0.3},
}
