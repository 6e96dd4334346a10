"""DPO training (helpers.dpo.train, through helpers.train.train) on small hand-made pairs
(vocabulary of 64, so steps take milliseconds): the margin grows, the reference stays frozen,
the numbers are those of the book's loop, a resume (after max_steps, Ctrl-C or a signal) is
exact and refuses a different run; loaders from entries and the plot."""

from __future__ import annotations

import functools
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.config import GPTConfig
from helpers.data import split_data
from helpers.dpo.loss import (
    PairExample,
    collate_pairs,
    dpo_loss_batch,
    freeze_reference,
    make_preference_loaders,
)
from helpers.dpo.outputs import plot_dpo_history
from helpers.dpo.train import (
    BOOK_HISTORY_COLUMNS,
    HISTORY_COLUMNS,
    DPOConfig,
    state_fingerprint,
    train_dpo,
)
from helpers.model import GPTModel
from helpers.run.checkpoints import CheckpointError, load_checkpoint
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.run.train_extensions import TrainingInterrupted
from helpers.train import train

PAD = 0
CFG = GPTConfig(vocab_size=64, context_length=32, emb_dim=32, n_heads=2, n_layers=2)


def _pairs(n: int = 24, seed: int = 0) -> list[PairExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(
            1, 64, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g
        ).tolist()
        chosen = [10, 11, 12]  # the preferred answer is always the same: learnable
        rejected = torch.randint(20, 64, (3,), generator=g).tolist()
        out.append(PairExample(prompt, prompt + chosen, prompt + rejected))
    return out


def _loaders(seed: int = 123) -> tuple[DataLoader[Any], DataLoader[Any]]:
    def loader(data: list[PairExample], train: bool) -> DataLoader[Any]:
        return DataLoader(
            data,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=4,
            shuffle=train,
            drop_last=train,
            collate_fn=lambda b: collate_pairs(b, pad_token_id=PAD),
            generator=torch.Generator().manual_seed(seed),
        )

    return loader(_pairs(24), True), loader(_pairs(8, seed=1), False)


def _models() -> tuple[GPTModel, GPTModel]:
    torch.manual_seed(0)
    policy = GPTModel(CFG)
    return policy, freeze_reference(policy)


def _config(**kw: Any) -> DPOConfig:
    return DPOConfig(**(dict(lr=3e-3, beta=0.1, eval_freq=2, eval_iter=2) | kw))


def _options(**kw: Any) -> RunOptions:
    return RunOptions(**(dict(progress=False, log_evals=False) | kw))


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Bit for bit is promised single-threaded only (RunOptions.deterministic does this too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reward_margin_grows_and_the_reference_never_changes() -> None:
    policy, reference = _models()
    before = state_fingerprint(reference)
    assert before == state_fingerprint(policy)  # the policy starts as the reference
    train_loader, val_loader = _loaders()
    history = train_dpo(
        policy,
        reference,
        train_loader,
        val_loader,
        config=_config(num_epochs=2),
        options=_options(),
    )
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["step"].tolist() == [0, 2, 4, 6, 8, 10]  # 6 batches x 2 epochs
    assert history["train_reward_margin"].iloc[-1] > history["train_reward_margin"].iloc[0] + 0.05
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_reward_margin"].iloc[-1] > 0
    assert (
        history["train_reward_margin"]
        - (history["train_chosen_reward"] - history["train_rejected_reward"])
    ).abs().max() < 1e-9
    assert state_fingerprint(reference) == before
    assert state_fingerprint(policy) != before
    assert all(not p.requires_grad for p in reference.parameters()) and not reference.training
    # On a batch, the trained policy prefers the chosen answers more than the reference does.
    batch = next(iter(val_loader))
    _, chosen_reward, rejected_reward = dpo_loss_batch(batch, policy, reference)
    assert chosen_reward > rejected_reward


def _run(
    tmp_path: Path | None = None,
    *,
    resume: bool = False,
    callback: Callable[[pd.DataFrame], None] | None = None,
    train_loader: DataLoader[Any] | None = None,
    **options: Any,
) -> tuple[pd.DataFrame, GPTModel]:
    """A DPO run of 2 epochs from fresh models (a new process, as far as training can tell)."""
    policy, reference = _models()
    loaders = _loaders()
    ckpt = {} if tmp_path is None else {"checkpoint_dir": str(tmp_path)}
    history = train_dpo(
        policy,
        reference,
        train_loader or loaders[0],
        loaders[1],
        config=_config(num_epochs=2),
        options=_options(**ckpt, **options),
        resume_from=tmp_path if resume else None,
        callback=callback,
    )
    return history, policy


def _assert_same_run(
    history: pd.DataFrame, policy: GPTModel, full: pd.DataFrame, full_policy: GPTModel
) -> None:
    pd.testing.assert_frame_equal(history, full, check_exact=True)
    for key, value in policy.state_dict().items():
        assert torch.equal(value, full_policy.state_dict()[key]), key


def test_exact_resume_matches_an_uninterrupted_run(tmp_path: Path, one_thread: None) -> None:
    full, full_policy = _run()
    for stop in (3, 6, 7):  # mid-epoch, at the epoch boundary, mid second epoch
        ckpt = tmp_path / f"run{stop}"
        part, _ = _run(ckpt, max_steps=stop)
        assert part["step"].iloc[-1] <= stop - 1 and part.attrs["steps"] == stop
        assert load_checkpoint(ckpt, DPOConfig).state.step == stop
        torch.manual_seed(999)  # whatever the random state, the resumed run is the same
        _assert_same_run(*_run(ckpt, resume=True), full, full_policy)

    # Resuming a finished run trains nothing and keeps its checkpoint intact.
    again, policy = _run(ckpt, resume=True)
    _assert_same_run(again, policy, full, full_policy)
    assert again.attrs["steps"] == 12 and load_checkpoint(ckpt, DPOConfig).state.step == 12


def test_interrupted_dpo_resumes_exactly(tmp_path: Path, one_thread: None) -> None:
    """Ctrl-C during an evaluation, or a signal mid-epoch: saved, then resumed bit for bit."""
    full, full_policy = _run()

    def ctrl_c(history: pd.DataFrame) -> None:
        if len(history) == 4:  # during the evaluation of step 6 (the second epoch's first)
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as err:
        _run(tmp_path / "a", callback=ctrl_c)
    assert err.value.step == 7 and err.value.checkpoint == tmp_path / "a" / "checkpoint.pt"
    assert len(load_checkpoint(tmp_path / "a", DPOConfig).state.history) == 3  # owes step 6's
    _assert_same_run(*_run(tmp_path / "a", resume=True), full, full_policy)


class _SignalAtBatch(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of 4 (from torch's RNG, which train() seeds for each epoch); sends
    SIGTERM to this process when batch `kill_at` of the first epoch is drawn."""

    def __init__(self, n: int, kill_at: int | None) -> None:
        self.n, self.kill_at = n, kill_at

    def __len__(self) -> int:
        return self.n // 4

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n).tolist()
        for b in range(len(self)):
            if b == self.kill_at:
                self.kill_at = None  # once: `kill` in the middle of a run
                os.kill(os.getpid(), signal.SIGTERM)
            yield order[4 * b : 4 * b + 4]


def _signalling_loader(kill_at: int | None) -> DataLoader[Any]:
    return DataLoader(
        _pairs(24),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_sampler=_SignalAtBatch(24, kill_at),
        collate_fn=lambda b: collate_pairs(b, pad_token_id=PAD),
    )


def test_sigterm_saves_and_the_resumed_run_is_exact(tmp_path: Path, one_thread: None) -> None:
    full, full_policy = _run(train_loader=_signalling_loader(None))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        _run(tmp_path, train_loader=_signalling_loader(4))  # while drawing step 4's batch
    assert err.value.signal_name == "SIGTERM" and err.value.step == 4
    assert err.value.checkpoint is not None
    assert load_checkpoint(err.value.checkpoint, DPOConfig).state.step == 4
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = _run(tmp_path, resume=True, train_loader=_signalling_loader(None))
    _assert_same_run(*resumed, full, full_policy)


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    train_loader, val_loader = _loaders()
    policy, reference = _models()
    train_dpo(
        policy,
        reference,
        train_loader,
        val_loader,
        config=_config(),
        options=_options(max_steps=2, checkpoint_dir=str(tmp_path)),
    )
    policy, reference = _models()
    with pytest.raises(
        CheckpointError, match=r"hyper-parameters changed: beta 0.5 \(checkpoint: 0.1\)"
    ):
        train_dpo(
            policy,
            reference,
            train_loader,
            val_loader,
            config=_config(beta=0.5),
            options=_options(),
            resume_from=tmp_path,
        )
    other_reference = freeze_reference(GPTModel(CFG))
    with pytest.raises(CheckpointError, match="the reference model differs"):
        train_dpo(
            policy,
            other_reference,
            train_loader,
            val_loader,
            config=_config(),
            options=_options(),
            resume_from=tmp_path,
        )
    # Fine-tuning and DPO share the checkpoint format, not their runs.
    with pytest.raises(
        CheckpointError, match="checkpoint is from a DPO run, this is a fine-tuning"
    ):
        train(
            policy,
            train_loader,
            val_loader,
            config=TrainConfig(),
            options=_options(),
            resume_from=tmp_path,
        )
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "bad.pt")


def test_deterministic_dpo_runs_are_identical() -> None:
    first, second = _run(deterministic=True), _run(deterministic=True)
    _assert_same_run(*first, *second)


def _chapter_loader() -> DataLoader[Any]:
    # The book's: no generator (global random state), its collate; train() seeds it once.
    loader: DataLoader[Any] = DataLoader(
        _pairs(24),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=4,
        shuffle=True,
        drop_last=True,
        collate_fn=functools.partial(collate_pairs, pad_token_id=PAD, chapter_compat=True),
    )
    loader.chapter_order = True  # helpers.train: seed the global RNG once, as the book does
    return loader


def test_chapter_compat_resumes_exactly_within_the_books_epoch(
    tmp_path: Path, one_thread: None
) -> None:
    def run(**options: Any) -> tuple[pd.DataFrame, GPTModel]:
        policy, reference = _models()
        resume = options.pop("resume", None)
        history = train_dpo(
            policy,
            reference,
            _chapter_loader(),
            _loaders()[1],
            config=_config(),
            options=_options(checkpoint_dir=str(tmp_path), **options),
            resume_from=resume,
            chapter_compat=True,
        )
        return history, policy

    full, full_policy = run()
    assert list(full.columns) == BOOK_HISTORY_COLUMNS
    run(max_steps=3)
    torch.manual_seed(7)  # whatever the random state now: the book's order is restored
    _assert_same_run(*run(resume=tmp_path), full, full_policy)


def test_chapter_compat_dpo_takes_the_books_batches_rewards_and_line(
    book_pairs: list[dict[str, str]],
    tiny_config: GPTConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The book's loader order (its printed widths 77, 81, 94, ...), its tokens_seen (chosen
    rows only), its log-ratio rewards (1/beta times the course's) and its log line."""
    loaders = make_preference_loaders(
        split_data(book_pairs), batch_size=8, allowed_max_length=128, chapter_compat=True
    )
    torch.manual_seed(0)
    policy = GPTModel(tiny_config)
    reference = freeze_reference(policy)
    history = train_dpo(
        policy,
        reference,
        loaders.train,
        loaders.validation,
        config=DPOConfig(lr=1e-3, eval_freq=100, eval_iter=1),
        options=RunOptions(progress=False, max_steps=3),
        chapter_compat=True,
    )
    assert list(history.columns) == BOOK_HISTORY_COLUMNS
    assert history["tokens_seen"].tolist() == [8 * 77]  # the evaluation after step 0
    assert history.attrs["tokens_seen"] == 8 * (77 + 81 + 94)
    row = history.iloc[0]
    assert row["train_logratio_margin"] == pytest.approx(
        row["train_chosen_logratio"] - row["train_rejected_logratio"]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    number = r"-?\d+\.\d{3}"
    assert re.fullmatch(
        rf"Ep 1 \(Step 000000\): Train loss {number}, Val loss {number}, "
        rf"Train reward margins {number}, Val reward margins {number}",
        line,
    ), line
    batch = next(iter(loaders.validation))
    book = dpo_loss_batch(batch, policy, reference, beta=0.1, chapter_compat=True)
    course = dpo_loss_batch(batch, policy, reference, beta=0.1)
    torch.testing.assert_close(course, (book[0], 0.1 * book[1], 0.1 * book[2]))


def test_dpo_config_is_a_validated_train_config() -> None:
    config = DPOConfig()
    assert (config.num_epochs, config.lr, config.weight_decay, config.beta) == (1, 5e-6, 0.01, 0.1)
    assert (config.eval_freq, config.eval_iter, config.seed) == (5, 5, 123)  # the book's
    assert isinstance(config, TrainConfig)
    for bad in (float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="DPOConfig.beta must be > 0"):
            DPOConfig(beta=bad)
    with pytest.raises(ValueError, match="DPOConfig.lr"):
        DPOConfig(lr=float("inf"))


def test_plot_and_loaders_from_entries() -> None:
    entries = [
        {
            "instruction": f"Count to {i}.",
            "input": "",
            "output": "x",
            "chosen": "Sure: 1 2",
            "rejected": "No.",
        }
        for i in range(20)
    ]
    loaders = make_preference_loaders((entries[:12], entries[12:16], entries[16:]), batch_size=4)
    assert len(loaders.train) == 3 and len(loaders.validation) == 1
    batch = next(iter(loaders.validation))
    assert batch["chosen"].shape == batch["chosen_mask"].shape and batch["chosen"].shape[0] == 4
    history = pd.DataFrame(
        [{c: float(i) for c in HISTORY_COLUMNS} for i in range(3)], columns=HISTORY_COLUMNS
    )
    fig = plot_dpo_history(history, title="t")
    assert [ax.get_ylabel() for ax in fig.axes] == ["DPO loss", "Reward margin (beta x log-ratio)"]
    book = pd.DataFrame(
        [{c: float(i) for c in BOOK_HISTORY_COLUMNS} for i in range(3)],
        columns=BOOK_HISTORY_COLUMNS,
    )
    fig = plot_dpo_history(book, title="t")
    assert fig.axes[1].get_ylabel() == "Log-ratio reward margin (the book's)"
