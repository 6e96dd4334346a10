"""Training that goes wrong: signals, stale temp files, full disks, NaNs, resume mismatches."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

import helpers.run.checkpoints as checkpoints
from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.run.checkpoints import (
    Checkpoint,
    CheckpointError,
    DiskFullError,
    TrainState,
    data_fingerprint,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.run.train_extensions import TrainingInterrupted
from helpers.train import train


def _loader(
    shift: int = 1, *, n: int = 16, seed: int = 0, shuffle: bool = True
) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 50, (n, 8), generator=g)
    return DataLoader(
        TensorDataset(inputs, (inputs + shift) % 50),
        batch_size=4,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


def _model(cfg: GPTConfig, seed: int = 1) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


@pytest.fixture()
def small_config(tiny_config: GPTConfig) -> GPTConfig:
    """Even smaller than tiny_config: these tests are about control flow, not learning."""
    from dataclasses import replace

    return replace(tiny_config, context_length=16, emb_dim=16, n_heads=2, n_layers=1)


def _opts(tmp_path: Path, **kw: Any) -> RunOptions:
    return RunOptions(progress=False, log_evals=False, checkpoint_dir=str(tmp_path / "ckpt"), **kw)


CFG = TrainConfig(num_epochs=1, lr=1e-3, eval_freq=2, eval_iter=1)


class _SignalAtBatch(Sampler[list[int]]):
    """Batches of 4 in order; sends `signum` to this process when batch `at` is drawn."""

    def __init__(self, n: int, signum: int, at: int) -> None:
        self.n, self.signum, self.at = n, signum, at

    def __len__(self) -> int:
        return self.n // 4

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(len(self)):
            if b == self.at:
                os.kill(os.getpid(), self.signum)  # a Ctrl-C or `kill` in the middle of a run
            yield list(range(4 * b, 4 * b + 4))


def _signalling_loader(signum: int, at: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    dataset = _loader().dataset
    assert isinstance(dataset, TensorDataset)
    return DataLoader(dataset, batch_sampler=_SignalAtBatch(len(dataset), signum, at))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_save_a_checkpoint_and_restore_handlers(
    small_config: GPTConfig, tmp_path: Path, signame: str
) -> None:
    signum = getattr(signal, signame)
    before = signal.getsignal(signum)
    loader = _signalling_loader(signum, at=2)  # while drawing step 3's batch
    with pytest.raises(TrainingInterrupted) as err:
        train(_model(small_config), loader, _loader(), config=CFG, options=_opts(tmp_path))
    assert err.value.signal_name == signame and err.value.step == 2
    assert err.value.checkpoint == tmp_path / "ckpt" / "checkpoint.pt"
    assert load_checkpoint(err.value.checkpoint).state.step == 2
    assert signal.getsignal(signum) is before


def test_interrupt_before_the_first_step_saves_nothing(
    small_config: GPTConfig, tmp_path: Path
) -> None:
    loader = _signalling_loader(signal.SIGTERM, at=0)
    with pytest.raises(TrainingInterrupted) as err:
        train(_model(small_config), loader, _loader(), config=CFG, options=_opts(tmp_path))
    assert err.value.checkpoint is None and err.value.step == 0
    assert not (tmp_path / "ckpt" / "checkpoint.pt").exists()


def test_stale_temp_files_of_dead_writers_are_removed(
    small_config: GPTConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = folder / ".checkpoint.pt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = folder / "notes.txt"
    other.write_text("kept")
    assert remove_stale_temp_files(folder) == [stale] and other.exists()
    stale.write_bytes(b"again")
    train(_model(small_config), _loader(), _loader(), config=CFG, options=_opts(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "notes.txt"]


def test_a_full_disk_is_named_and_training_finishes(
    small_config: GPTConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def full_disk(obj: object, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    history = train(_model(small_config), _loader(), _loader(), config=CFG, options=_opts(tmp_path))
    error = history.attrs["checkpoint_error"]
    assert str(tmp_path / "ckpt" / "checkpoint.pt") in error and "disk full" in error
    assert (
        "enforce fail" not in error
        and "warning: cannot write checkpoint" in capsys.readouterr().err
    )
    assert list((tmp_path / "ckpt").iterdir()) == []  # no temp file left behind
    assert len(history) == 2  # training was not lost to the failed save


def _same_run(a: tuple[Any, GPTModel], b: tuple[Any, GPTModel]) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(a[0], b[0], check_exact=True)
    for key, value in a[1].state_dict().items():
        assert torch.equal(value, b[1].state_dict()[key]), key


def test_a_disk_that_fills_mid_run_stops_and_resume_finishes_the_same_run(
    small_config: GPTConfig, tmp_path: Path, full_disk: Callable[..., Callable[..., None]]
) -> None:
    cfg = TrainConfig(num_epochs=2, lr=1e-3, eval_freq=2, eval_iter=1)
    options = _opts(tmp_path, checkpoint_every=2, deterministic=True)  # steps 2, 4, 6, 8

    def run(**kw: Any) -> tuple[Any, GPTModel]:
        model = _model(small_config)
        val = _loader(shuffle=False)  # as validation loaders are (a shuffled one is not resumed)
        return train(model, _loader(), val, config=cfg, options=options, **kw), model

    full = run()
    (tmp_path / "ckpt" / "checkpoint.pt").unlink()
    free = full_disk(1)  # the step-2 checkpoint fits, the step-4 one does not
    with pytest.raises(DiskFullError) as err:
        run()
    message = str(err.value)
    folder = tmp_path / "ckpt"
    assert message.startswith(f"disk full: cannot write checkpoint {folder / 'checkpoint.pt'}")
    assert "the last good checkpoint (step 2) is intact: free at least" in message
    assert message.endswith("and rerun with --resume") and "\n" not in message
    size = (folder / "checkpoint.pt").stat().st_size
    assert err.value.folder == folder and err.value.free == 2**20  # what full_disk left
    assert size <= err.value.needed < size + 2**21  # a checkpoint beside the one it replaces
    assert f"free at least {(err.value.needed - 2**20) / 2**20:.0f} MiB there" in message
    assert [p.name for p in folder.iterdir()] == ["checkpoint.pt"]  # no temp file left
    assert load_checkpoint(folder).state.step == 2  # stopped there, not trained on unsaved
    free()
    _same_run(run(resume_from=folder), full)  # space freed: the resume ends the same run


def test_a_disk_full_before_any_checkpoint_says_rerun_without_resume(
    small_config: GPTConfig, tmp_path: Path, full_disk: Callable[..., Callable[..., None]]
) -> None:
    full_disk(0)
    with pytest.raises(DiskFullError) as err:
        train(
            _model(small_config),
            _loader(),
            _loader(),
            config=CFG,
            options=_opts(tmp_path, checkpoint_every=1),
        )
    assert "training stopped before any checkpoint was saved" in str(err.value)
    assert (
        str(err.value).endswith("and rerun") and not (tmp_path / "ckpt" / "checkpoint.pt").exists()
    )


def test_deterministic_runs_are_identical_and_leave_the_settings_as_they_were(
    small_config: GPTConfig,
) -> None:
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    seen: list[tuple[int, bool]] = []

    def run() -> tuple[Any, GPTModel]:
        model = _model(small_config)
        options = RunOptions(progress=False, log_evals=False, deterministic=True)
        history = train(
            model,
            _loader(),
            _loader(),
            config=CFG,
            options=options,
            callback=lambda h: seen.append(
                (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
            ),
        )
        return history, model

    _same_run(run(), run())
    assert seen and set(seen) == {(1, True)}  # while training: one thread, deterministic
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_an_unusable_checkpoint_folder_stops_before_training(
    small_config: GPTConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import helpers.runtime
    from helpers.runtime import OutputDirError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = _model(small_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = RunOptions(progress=False, checkpoint_dir=str(blocker / "ckpt"))
    with pytest.raises(OutputDirError, match="not writable"):
        train(model, _loader(), _loader(), config=CFG, options=options)
    usage = helpers.runtime.shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(helpers.runtime.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OutputDirError, match="MiB free"):
        train(model, _loader(), _loader(), config=CFG, options=_opts(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untrained


def test_nan_weights_are_never_checkpointed(small_config: GPTConfig, tmp_path: Path) -> None:
    model = _model(small_config)
    state = Checkpoint(model.state_dict(), {}, {}, TrainState(step=1), CFG, 4, "")
    with torch.no_grad():
        model.wte.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights in wte.weight"):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not (tmp_path / "c.pt").exists()


def test_a_nan_step_stops_before_its_checkpoint(
    small_config: GPTConfig,
    tmp_path: Path,
    nan_after: Callable[..., torch.nn.Module],
) -> None:
    model = nan_after(_model(small_config), calls=2)  # the 3rd training batch turns NaN
    cfg = TrainConfig(num_epochs=1, eval_freq=100)
    with pytest.raises(
        FloatingPointError, match=r"training loss is nan at step 2 \(epoch 1, batch 3\)"
    ):
        train(model, _loader(), _loader(), config=cfg, options=_opts(tmp_path, checkpoint_every=1))
    saved = load_checkpoint(tmp_path / "ckpt")
    assert saved.state.step == 2
    assert all(torch.isfinite(t).all() for t in saved.model.values())


def test_non_finite_validation_loss_is_an_error(small_config: GPTConfig) -> None:
    class NaNInEval(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.inner(x)
            return logits if self.training else logits * float("inf")

    with pytest.raises(
        FloatingPointError, match="validation loss is nan at the evaluation of step 0"
    ):
        train(
            NaNInEval(_model(small_config)),
            _loader(),
            _loader(),
            config=CFG,
            options=RunOptions(progress=False, log_evals=False),
        )


def test_resume_refuses_changed_hyper_parameters_and_data(
    small_config: GPTConfig, tmp_path: Path
) -> None:
    opts = _opts(tmp_path)
    train(_model(small_config), _loader(), _loader(), config=CFG, options=opts)
    changed = TrainConfig(num_epochs=1, lr=0.05, eval_freq=2, eval_iter=1, weight_decay=0.0)
    with pytest.raises(
        CheckpointError, match=r"changed: lr 0.05 \(checkpoint: 0.001\); weight_decay"
    ):
        train(
            _model(small_config),
            _loader(),
            _loader(),
            config=changed,
            options=opts,
            resume_from=opts.checkpoint_dir,
        )
    other_data = _loader(seed=3)  # same size, other examples
    with pytest.raises(CheckpointError, match="data differ"):
        train(
            _model(small_config),
            other_data,
            _loader(),
            config=CFG,
            options=opts,
            resume_from=opts.checkpoint_dir,
        )
    # More epochs is the one change allowed: it continues the run.
    more = TrainConfig(num_epochs=2, lr=1e-3, eval_freq=2, eval_iter=1)
    history = train(
        _model(small_config),
        _loader(),
        _loader(),
        config=more,
        options=opts,
        resume_from=opts.checkpoint_dir,
    )
    assert history["step"].tolist() == [0, 2, 4, 6]


def test_resume_into_a_different_model_size_is_one_clear_line(
    small_config: GPTConfig, tmp_path: Path
) -> None:
    from dataclasses import replace

    opts = _opts(tmp_path)
    train(
        GPTModel(replace(small_config, n_layers=3)), _loader(), _loader(), config=CFG, options=opts
    )
    with pytest.raises(
        CheckpointError, match="weights do not fit the model.*different model size"
    ) as err:
        train(
            _model(small_config),
            _loader(),
            _loader(),
            config=CFG,
            options=opts,
            resume_from=opts.checkpoint_dir,
        )
    assert "\n" not in str(err.value)


def test_malformed_and_old_checkpoints_are_one_clear_line(tmp_path: Path) -> None:
    torch.save(
        {"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "state": {"step": "x"}},
        tmp_path / "bad.pt",
    )
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"format": "course-train-checkpoint/1", "model": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="older version"):
        load_checkpoint(tmp_path / "old.pt")


def test_data_fingerprint_sees_content_not_just_size() -> None:
    a, b = _loader(seed=0).dataset, _loader(seed=1).dataset
    assert data_fingerprint([a]) == data_fingerprint([_loader(seed=0).dataset])
    assert data_fingerprint([a]) != data_fingerprint([b])
    assert data_fingerprint([[[1, 2], [3]]]) != data_fingerprint([[[1], [2, 3]]])
