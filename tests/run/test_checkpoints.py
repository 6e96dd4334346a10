"""Training checkpoints: round trip, weights_only loading, RNG states, clear errors."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.run.checkpoints import (
    Checkpoint,
    CheckpointError,
    TrainState,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from helpers.run.train_config import TrainConfig


def _state(tiny_config: GPTConfig) -> tuple[GPTModel, Checkpoint]:
    torch.manual_seed(0)
    model = GPTModel(tiny_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    state = Checkpoint(
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        state=TrainState(
            step=3,
            epoch=1,
            batches=2,
            tokens_seen=120,
            history=[
                {
                    "step": 0,
                    "epoch": 0.5,
                    "tokens_seen": 60,
                    "train_loss": 1.5,
                    "val_loss": float("inf"),
                    "lr": 1e-3,
                }
            ],
            rng=capture_rng_state([torch.Generator().manual_seed(4)]),
        ),
        config=TrainConfig(lr=1e-3, schedule="cosine"),
        train_batches=5,
        data_fingerprint="abc",
    )
    return model, state


def test_round_trip_is_exact_and_weights_only(tiny_config: GPTConfig, tmp_path: Path) -> None:
    model, state = _state(tiny_config)
    path = save_checkpoint(tmp_path / "run", state)
    assert path == tmp_path / "run" / "checkpoint.pt" and checkpoint_path(tmp_path / "run") == path
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files left
    torch.load(path, weights_only=True)  # loads without allowing arbitrary pickles
    loaded = load_checkpoint(path)
    for key, value in state.model.items():
        assert torch.equal(loaded.model[key], value)
    assert loaded.state.history == state.state.history and loaded.config == state.config
    assert (loaded.state.step, loaded.state.epoch, loaded.state.batches) == (3, 1, 2)
    fresh = torch.optim.AdamW(GPTModel(tiny_config).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], state.optimizer["state"][0]["exp_avg"]
    )


def test_the_objective_is_recorded_and_format_2_reads_as_fine_tuning(
    tiny_config: GPTConfig, tmp_path: Path
) -> None:
    from dataclasses import replace

    from helpers.run.checkpoints import CHAPTER_OBJECTIVE

    _, state = _state(tiny_config)
    dpo = replace(state, objective={"name": "DPO", "reference model": "abc"})
    assert load_checkpoint(save_checkpoint(tmp_path / "dpo", dpo)).objective == dpo.objective
    # A checkpoint of the previous format (no objective recorded) still resumes fine-tuning.
    path = save_checkpoint(tmp_path / "old", state)
    raw = torch.load(path, weights_only=True)
    del raw["objective"]
    torch.save({**raw, "format": "course-train-checkpoint/2"}, path)
    assert load_checkpoint(path).objective == {"name": CHAPTER_OBJECTIVE}


def test_rng_states_restore(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    random.seed(5)
    torch.manual_seed(5)
    saved = capture_rng_state([gen])
    expected = (random.random(), torch.rand(3), torch.rand(2, generator=gen))
    save_checkpoint(
        tmp_path / "c.pt",
        Checkpoint({}, {}, {}, TrainState(rng=saved), TrainConfig(), 0, ""),
    )
    restore_rng_state(load_checkpoint(tmp_path / "c.pt").state.rng, [gen])
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    assert torch.equal(torch.rand(2, generator=gen), expected[2])
    with pytest.raises(CheckpointError, match="generator"):
        restore_rng_state(saved, [])


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_resume_into_a_differently_tied_head_is_refused(
    tiny_config: GPTConfig, tmp_path: Path
) -> None:
    """Tied and untied heads share state-dict keys; the resume check still tells them apart."""
    from dataclasses import replace

    from torch.utils.data import DataLoader, TensorDataset

    from helpers.run.checkpoints import CheckpointError
    from helpers.run.train_config import RunOptions
    from helpers.train import train

    cfg = replace(tiny_config, context_length=16, emb_dim=16, n_layers=1)
    inputs = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(inputs, (inputs + 1) % 50)

    def loader() -> DataLoader[Any]:
        return DataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    config = TrainConfig(num_epochs=1, eval_freq=1, eval_iter=1)
    options = RunOptions(checkpoint_dir=str(tmp_path), progress=False, log_evals=False)
    torch.manual_seed(0)
    train(GPTModel(cfg), loader(), loader(), config=config, options=options)
    untied = GPTModel(replace(cfg, tie_embeddings=False))
    with pytest.raises(CheckpointError, match="tied vs untied output head"):
        train(
            untied,
            loader(),
            loader(),
            config=replace(config, num_epochs=2),
            options=options,
            resume_from=tmp_path,
        )
