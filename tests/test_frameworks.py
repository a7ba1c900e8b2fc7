"""precond optimizers inside the frameworks people train with: Hugging Face ``transformers.Trainer`` (the plain
loop, ``optimizers=(opt, scheduler)``, its gradient clipping) and Lightning's automatic optimization (a torch-style
closure passed to ``optimizer.step``).

Each trains a small model for a few steps and must equal the same steps written out by hand in a plain loop on the
same batches, and the loss must fall.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.nn import functional as F

import precond
from precond.evaluation import TORCH_CLOSURE

RECIPES = ["kfac", "shampoo", "soap", "sophia_g"]
STEPS = 6
# Sophia-G refreshes its curvature every 10 steps from step 11; here every 2 steps from the first
OVERRIDES = {"sophia_g": {"curvature.every": 2, "curvature.start": 1}}


def build(name: str, model: torch.nn.Module) -> precond.Optimizer:
    return precond.build(name, model, likelihood="categorical", set=OVERRIDES.get(name), lr=3e-3 if name != "kfac" else 1e-2)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- Hugging Face Trainer -----------------------------------------------------------------------------------


def tiny_gpt2():
    """A tiny GPT-2 built from a config (no download): its Conv1D layers take K-FAC's factors; the tied
    embedding and the norms follow kfac's Adam fallback. No dropout, so that two runs can be compared."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).float()


def token_rows(n: int = 48, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 32, (n, 1), generator=g)
    ids = (base + torch.arange(length)) % 32  # a learnable pattern: each token is the previous plus one
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("name", RECIPES)
def test_hugging_face_trainer_equals_the_plain_loop(name: str, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    seen: list[dict[str, torch.Tensor]] = []

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    model = tiny_gpt2()
    start = flat(model)
    opt = build(name, model)
    if name == "kfac":  # the attention and MLP layers (Hugging Face Conv1D) have Kronecker factors
        kronecker = {opt.param_info[p].name for g in opt.param_groups if g["rule"] == "default" for p in g["params"]}
        assert "transformer.h.0.attn.c_attn.weight" in kronecker and "transformer.h.0.mlp.c_fc.weight" in kronecker
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.05 * s)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", seed=0, max_grad_norm=1.0, disable_tqdm=True, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=token_rows(), data_collator=collate,
                                       optimizers=(opt, schedule))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(seen) >= STEPS and len(losses) == STEPS
    assert losses[-1] < losses[0]

    # the same steps by hand: zero, forward, backward, clip, step, schedule
    again = tiny_gpt2()
    assert torch.equal(flat(again), start)
    again.train()
    opt2 = build(name, again)
    schedule2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 - 0.05 * s)
    for batch in seen[:STEPS]:
        # as the Trainer calls a model that takes loss kwargs: the loss summed over the batch's label tokens
        again(**batch, num_items_in_batch=(batch["labels"] != -100).sum()).loss.backward()
        torch.nn.utils.clip_grad_norm_(again.parameters(), 1.0)
        opt2.step()
        schedule2.step()
        again.zero_grad()
    torch.testing.assert_close(flat(model), flat(again), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(model), start)


# --- Lightning ------------------------------------------------------------------------------------------------


def lightning_module(name: str):
    lightning = pytest.importorskip("lightning")

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            self.losses: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            return build(name, self)

    return Classifier()


def classification_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16 * STEPS, 6, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    return list(zip(x.split(16), y.split(16)))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", RECIPES)
def test_lightning_automatic_optimization_equals_the_plain_loop(name: str, monkeypatch) -> None:
    lightning = pytest.importorskip("lightning")
    import precond.optimizer as optimizer_module

    conventions, real = [], optimizer_module.evaluate

    def spy(*args, **kwargs):
        ev = real(*args, **kwargs)
        conventions.append(ev.convention)
        return ev

    monkeypatch.setattr(optimizer_module, "evaluate", spy)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    batches = classification_batches()
    module = lightning_module(name)
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    x_all, y_all = (torch.cat(t) for t in zip(*batches))
    with torch.no_grad():
        before = float(F.cross_entropy(module(x_all), y_all))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(module.losses) == STEPS
    assert conventions == [TORCH_CLOSURE] * STEPS  # Lightning hands step() a closure that runs backward itself
    with torch.no_grad():
        assert float(F.cross_entropy(module(x_all), y_all)) < before

    plain = lightning_module(name)
    opt = build(name, plain)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    torch.testing.assert_close(flat(module), flat(plain), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(plain), flat(lightning_module(name)))
