"""Training loop: loss falls, exact resume, early stopping, NaN detection, config checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.run.checkpoints import load_checkpoint
from helpers.run.train_config import RunOptions, TrainConfig, lr_factor
from helpers.train import calc_loss_batch, calc_loss_loader, train

QUIET = RunOptions(progress=False, log_evals=False)


def _loader(
    shift: int, *, n: int = 24, seq: int = 12, batch: int = 4, shuffle: bool, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    # Synthetic next-token task: target = (input + shift) mod 50, so train and validation
    # can teach contradictory mappings (rising validation loss on demand).
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 50, (n, seq), generator=g)
    targets = (inputs + shift) % 50
    targets[:, -2:] = -100  # padding positions are ignored
    return DataLoader(
        TensorDataset(inputs, targets),
        batch_size=batch,
        shuffle=shuffle,
        drop_last=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


def _model(cfg: GPTConfig, seed: int = 1) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def test_calc_loss_matches_cross_entropy_and_ignores_masked(tiny_config: GPTConfig) -> None:
    model = _model(tiny_config).eval()
    loader = _loader(1, shuffle=False)
    x, y = next(iter(loader))
    loss = calc_loss_batch(x, y, model, "cpu")
    logits = model(x)
    keep = y != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, expected)
    batches = [calc_loss_batch(a, b, model, "cpu").item() for a, b in list(loader)[:2]]
    assert calc_loss_loader(loader, model, "cpu", num_batches=2) == pytest.approx(sum(batches) / 2)
    empty: DataLoader[Any] = DataLoader([])  # type: ignore[arg-type]  # a list is a dataset
    assert math.isnan(calc_loss_loader(empty, model, "cpu"))


def test_loss_falls_on_chapter_batches(
    tiny_config: GPTConfig, chapter_data: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.batching import make_loaders
    from helpers.data import split_data

    splits = split_data(chapter_data[:60])
    loaders = make_loaders(splits, batch_size=4, allowed_max_length=64)
    model = _model(tiny_config)
    from helpers.run.epoch_sample import sample_printer

    cfg = TrainConfig(num_epochs=1, lr=5e-3, eval_freq=4, eval_iter=2)
    history = train(
        model,
        loaders.train,
        loaders.validation,
        config=cfg,
        options=RunOptions(progress=False),
        on_epoch_end=sample_printer(splits.validation[0]),
    )
    assert list(history.columns) == ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"]
    assert history["step"].tolist() == list(range(0, len(loaders.train), 4))
    assert history["tokens_seen"].is_monotonic_increasing
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 1.0
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in out and "Sample response:" in out


def _resume_config(
    tmp_path: Path, checkpoint_every: int | None = None, **kw: Any
) -> tuple[TrainConfig, RunOptions]:
    base = dict(
        num_epochs=2,
        lr=3e-3,
        eval_freq=2,
        eval_iter=2,
        grad_accum_steps=2,
        max_grad_norm=1.0,
        schedule="cosine",
        warmup_steps=2,
    )
    options = RunOptions(
        progress=False,
        log_evals=False,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=checkpoint_every,
    )
    return TrainConfig(**{**base, **kw}), options


def test_interrupted_run_resumes_exactly(tiny_config: GPTConfig, tmp_path: Path) -> None:
    train_loader, val_loader = _loader(1, n=48, shuffle=True), _loader(1, shuffle=False, seed=5)
    full_model = _model(tiny_config)
    cfg, opts = _resume_config(tmp_path / "a")
    full = train(full_model, train_loader, val_loader, config=cfg, options=opts)

    def interrupt(history: pd.DataFrame) -> None:
        if len(history) == 5:  # mid-epoch, during an evaluation
            raise KeyboardInterrupt

    cfg, opts = _resume_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(
            _model(tiny_config),
            train_loader,
            val_loader,
            config=cfg,
            options=opts,
            callback=interrupt,
        )
    ckpt = load_checkpoint(tmp_path / "b" / "ckpt").state
    assert len(ckpt.history) == 4 and 0 < ckpt.batches < len(train_loader)

    resumed_model = _model(tiny_config, seed=99)  # weights come from the checkpoint
    resumed = train(
        resumed_model,
        train_loader,
        val_loader,
        config=cfg,
        options=opts,
        resume_from=opts.checkpoint_dir,
    )
    assert resumed.equals(full)  # exact losses, tokens and learning rates
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_periodic_checkpoint_resumes_exactly(tiny_config: GPTConfig, tmp_path: Path) -> None:
    train_loader, val_loader = _loader(1, shuffle=True), _loader(1, shuffle=False, seed=5)
    cfg, opts = _resume_config(
        tmp_path, num_epochs=3, checkpoint_every=5, grad_accum_steps=1, max_grad_norm=None
    )
    full_model = _model(tiny_config)
    full = train(full_model, train_loader, val_loader, config=cfg, options=opts)

    def crash(history: pd.DataFrame) -> None:
        if len(history) == 7:  # step 12: the last periodic checkpoint is step 10
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            _model(tiny_config), train_loader, val_loader, config=cfg, options=opts, callback=crash
        )
    assert opts.checkpoint_dir is not None
    assert load_checkpoint(opts.checkpoint_dir).state.step == 10
    resumed_model = _model(tiny_config, seed=7)
    resumed = train(
        resumed_model,
        train_loader,
        val_loader,
        config=cfg,
        options=opts,
        resume_from=opts.checkpoint_dir,
    )
    assert resumed.equals(full)
    assert all(
        torch.equal(a, b)
        for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True)
    )


def test_resume_rejects_a_different_setup(tiny_config: GPTConfig, tmp_path: Path) -> None:
    train_loader, val_loader = _loader(1, shuffle=True), _loader(1, shuffle=False)
    cfg, opts = _resume_config(tmp_path, num_epochs=1)
    train(_model(tiny_config), train_loader, val_loader, config=cfg, options=opts)
    with pytest.raises(ValueError, match="seed"):
        train(
            _model(tiny_config),
            train_loader,
            val_loader,
            config=_resume_config(tmp_path, seed=1)[0],
            options=opts,
            resume_from=opts.checkpoint_dir,
        )
    with pytest.raises(ValueError, match="batches"):
        train(
            _model(tiny_config),
            _loader(1, n=40, shuffle=True),
            val_loader,
            config=cfg,
            options=opts,
            resume_from=opts.checkpoint_dir,
        )


def test_early_stopping_fires_and_restores_best_weights(tiny_config: GPTConfig) -> None:
    # Training teaches +1, validation expects +2: validation loss rises from the start.
    train_loader, val_loader = _loader(1, n=64, shuffle=True), _loader(2, shuffle=False)
    model = _model(tiny_config)
    snapshots = []

    def keep_weights(history: pd.DataFrame) -> None:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    cfg = TrainConfig(
        num_epochs=5,
        lr=1e-2,
        eval_freq=2,
        eval_iter=2,
        early_stopping_patience=2,
    )
    history = train(
        model, train_loader, val_loader, config=cfg, options=QUIET, callback=keep_weights
    )
    assert history.attrs["stopped_early"] is True
    best = int(history["val_loss"].idxmin())
    assert len(history) == best + 3  # two evaluations without improvement, then stop
    assert history.attrs["best_step"] == history["step"][best]
    assert history.attrs["best_val_loss"] == history["val_loss"][best]
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[best][name]), name


def test_nan_loss_names_the_step(
    tiny_config: GPTConfig, nan_after: Callable[..., torch.nn.Module]
) -> None:
    model = nan_after(_model(tiny_config), calls=3)  # the 4th training batch turns NaN
    cfg = TrainConfig(num_epochs=1, eval_freq=100)
    with pytest.raises(FloatingPointError, match=r"at step 3 \(epoch 1, batch 4\)"):
        train(model, _loader(1, shuffle=True), _loader(1, shuffle=False), config=cfg, options=QUIET)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_epochs", 0),
        ("lr", -1.0),
        ("eval_freq", 1.5),
        ("schedule", "linear"),
        ("max_grad_norm", 0.0),
        ("early_stopping_patience", 0),
        ("checkpoint_every", 3),
    ],
)
def test_train_config_rejects_bad_values(field: str, value: Any) -> None:
    cls: type[RunOptions] | type[TrainConfig]
    cls = RunOptions if field == "checkpoint_every" else TrainConfig  # a run option now
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_train_config_defaults_are_the_chapters() -> None:
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.num_epochs, cfg.eval_freq, cfg.eval_iter, cfg.seed) == (
        5e-5,
        0.1,
        2,
        5,
        5,
        123,
    )
    assert TrainConfig.from_dict({"lr": 1e-4, "unknown": 1}).lr == 1e-4


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, 20, cfg) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(10, 20, TrainConfig()) == 1.0
