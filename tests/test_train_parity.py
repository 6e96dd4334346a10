"""`train` with its defaults computes exactly the chapter's `train_model_simple` losses.

The speed levers (no per-step host synchronisation, fused AdamW on CUDA, bf16 only when
asked) must not change what is computed: on CPU the history equals, bit for bit, that of
the book's loop written out below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.train import calc_loss_batch, evaluate_model, train


def _loader(seed: int, n: int = 24) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 50, (n, 10), generator=g)
    targets = (inputs + 1) % 50
    targets[:, -2:] = -100
    return DataLoader(
        TensorDataset(inputs, targets),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def train_model_simple(
    model: torch.nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    device: str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    seed: int,
) -> tuple[list[float], list[float], list[int]]:
    """The book's loop (chapter 5/7), plus the per-epoch reseed `train` documents."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        torch.manual_seed(seed + epoch)  # train(): each epoch's order from (seed, epoch)
        train_loader.generator.manual_seed(seed + epoch)
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen


def test_history_equals_the_chapters_loop(tiny_config: GPTConfig) -> None:
    from dataclasses import replace

    tiny_config = replace(tiny_config, context_length=16, emb_dim=16, n_layers=1)  # fast
    torch.manual_seed(3)
    reference_model = GPTModel(tiny_config)
    model = GPTModel(tiny_config)
    model.load_state_dict(reference_model.state_dict())
    cfg = TrainConfig(num_epochs=2, lr=2e-3, eval_freq=2, eval_iter=2, seed=11)

    optimizer = torch.optim.AdamW(
        reference_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    expected = train_model_simple(
        reference_model,
        _loader(0),
        _loader(5),
        optimizer,
        "cpu",
        cfg.num_epochs,
        cfg.eval_freq,
        cfg.eval_iter,
        cfg.seed,
    )
    history = train(
        model,
        _loader(0),
        _loader(5),
        config=cfg,
        options=RunOptions(progress=False, log_evals=False),
    )

    assert history["train_loss"].tolist() == expected[0]
    assert history["val_loss"].tolist() == expected[1]
    assert history["tokens_seen"].tolist() == expected[2]
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _global_rng_loader(seed: int, n: int = 24) -> DataLoader[Any]:
    # The chapter's DataLoader: no generator of its own, shuffled from torch's global RNG.
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 50, (n, 10), generator=g)
    loader = DataLoader(
        TensorDataset(inputs, (inputs + 1) % 50), batch_size=4, shuffle=True, drop_last=True
    )
    loader.chapter_order = True  # what make_loaders(chapter_compat=True) sets
    return loader


def chapter_train_model_simple(
    model: torch.nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
) -> tuple[list[float], list[float]]:
    """The book's loop verbatim: no reseeding between epochs."""
    train_losses, val_losses, global_step = [], [], -1
    for _ in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, "cpu")
            loss.backward()
            optimizer.step()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, "cpu", eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
    return train_losses, val_losses


def test_chapter_order_loaders_follow_the_chapters_loop_over_epochs(tiny_config: GPTConfig) -> None:
    """Chapter-faithful mode: seed once (123) before training, every epoch as the chapter's."""
    from dataclasses import replace

    tiny_config = replace(tiny_config, context_length=16, emb_dim=16, n_layers=1)
    torch.manual_seed(3)
    reference_model = GPTModel(tiny_config)
    model = GPTModel(tiny_config)
    model.load_state_dict(reference_model.state_dict())
    cfg = TrainConfig(num_epochs=3, lr=2e-3, eval_freq=2, eval_iter=2, seed=123)

    optimizer = torch.optim.AdamW(
        reference_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    train_loader, val_loader = _global_rng_loader(0), _global_rng_loader(5)
    torch.manual_seed(123)  # the chapter seeds right before train_model_simple
    expected = chapter_train_model_simple(
        reference_model,
        train_loader,
        val_loader,
        optimizer,
        cfg.num_epochs,
        cfg.eval_freq,
        cfg.eval_iter,
    )
    history = train(
        model,
        train_loader,
        val_loader,
        config=cfg,
        options=RunOptions(progress=False, log_evals=False),
    )

    assert history["train_loss"].tolist() == expected[0]
    assert history["val_loss"].tolist() == expected[1]
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)
