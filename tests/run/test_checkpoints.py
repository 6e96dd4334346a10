"""Training checkpoints: round trip, weights_only loading, RNG states, clear errors."""

from __future__ import annotations

import argparse
import collections
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import helpers.run.checkpoints as checkpoints
from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.run.checkpoints import (
    Checkpoint,
    CheckpointError,
    DiskFullError,
    TrainState,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    space_needed,
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
    with pytest.raises(CheckpointError, match="not a course training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def _unreadable_files(folder: Path) -> dict[str, Path]:
    """Files torch.load(weights_only=True) refuses, each as a --resume could meet it."""
    names = ("zip-with-objects", "pickle", "random", "empty")
    files = {name: folder / f"{name}.pt" for name in names}
    torch.save({"args": argparse.Namespace(lr=1)}, files["zip-with-objects"])  # not allowed
    files["pickle"].write_bytes(pickle.dumps(collections.Counter(a=1)))
    files["random"].write_bytes(bytes(range(256)) * 4)
    files["empty"].write_bytes(b"")
    torch.save({"weights": torch.zeros(1000)}, folder / "whole.pt")
    files["truncated"] = folder / "truncated.pt"
    files["truncated"].write_bytes((folder / "whole.pt").read_bytes()[:300])
    return files


def test_an_unreadable_checkpoint_is_named_and_torch_advice_never_passed_on(
    tmp_path: Path,
) -> None:
    """torch's own message ends with advice to set weights_only=False (run the file's code)."""
    reasons = {
        "zip-with-objects": "objects a checkpoint never has",
        "pickle": "a pickle file",
        "random": "not a torch.save file",
        "empty": "the file is empty",
        "truncated": "truncated or damaged",
    }
    for name, path in _unreadable_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"cannot read {path}: not a course training checkpoint"), message
        assert reasons[name] in message, message
        assert "weights_only" not in message and "\n" not in message and "\x1b" not in message


def test_a_full_disk_is_a_disk_full_error_and_keeps_the_last_checkpoint(
    tiny_config: GPTConfig, tmp_path: Path, full_disk: Callable[..., Callable[..., None]]
) -> None:
    model, state = _state(tiny_config)
    full_disk(1)
    path = save_checkpoint(tmp_path, state)  # the first write fits
    later = Checkpoint(**{**state.__dict__, "state": TrainState(step=9)})
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path, later)
    size = path.stat().st_size  # what the write needs: at least a checkpoint, not much more
    assert err.value.folder == tmp_path and size <= err.value.needed < size + 2**21
    assert err.value.free == 2**20  # what the full disk left free
    message = str(err.value)
    assert message.startswith(f"disk full: cannot write checkpoint {path}") and "MiB" in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert load_checkpoint(path).state.step == 3  # the last good one, intact


def test_torch_write_failures_are_a_full_disk_only_without_the_space(
    tiny_config: GPTConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch reports a full disk as RuntimeError("[enforce fail ...] unexpected pos"), no errno."""
    _, state = _state(tiny_config)

    def enforce_fail(obj: object, path: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(checkpoints.torch, "save", enforce_fail)
    with pytest.raises(CheckpointError) as err:  # plenty of space: something else went wrong
        save_checkpoint(tmp_path, state)
    assert not isinstance(err.value, DiskFullError) and "enforce fail" not in str(err.value)
    usage = shutil.disk_usage(tmp_path)._replace(free=4096)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(DiskFullError, match="0 MiB are free"):
        save_checkpoint(tmp_path, state)


def test_space_needed_reuses_an_existing_checkpoint() -> None:
    # A new run: its checkpoint, then its model file.
    assert space_needed(300, model_file=100) == 400
    # Over an existing checkpoint (a resume): the replaced file's space comes back, but the
    # atomic write needs a whole new checkpoint beside the old one first.
    assert space_needed(300, model_file=100, existing=300) == 300
    assert space_needed(300, model_file=100, existing=250) == 300
    assert space_needed(300, model_file=500, existing=300) == 500


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
