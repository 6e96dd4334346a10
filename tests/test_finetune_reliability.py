"""The command line when things go wrong: kills, signals, bad folders, resume mismatches.

Also the settings layer: flags generated from TrainConfig, one table of tiny defaults, a
seeded random init, `run` that neither mutates its input nor exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

import helpers.finetune as finetune
from helpers.config import TINY_RUN_DEFAULTS, get_config, run_defaults
from helpers.run.checkpoints import load_checkpoint
from helpers.run.cli import DEFAULT_CHECKPOINT_MINUTES, build_parser, settings_from_args
from helpers.run.train_config import RunOptions, TrainConfig
from helpers.run.train_extensions import TrainingInterrupted
from tests.process_support import wait_for_file

ROOT = Path(__file__).resolve().parents[1]


def _args(data_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(data_path), "--limit", "40", "--batch-size", "4",
        "--epochs", "1", "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", "2",
        "--test-limit", "1", "--output-dir", str(out), "--quiet", *extra,
    ]  # fmt: skip


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- settings ---------------------------------------------------------------------------


def test_every_train_config_field_has_a_generated_flag() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in fields(TrainConfig):
        assert f.name in flags, f.name
        assert f.metadata["help"] in (flags[f.name].help or ""), f.name
    assert "--epochs" in flags["num_epochs"].option_strings
    assert "--grad-accum" in flags["grad_accum_steps"].option_strings


def test_settings_come_from_one_table_and_leave_args_alone(
    chapter_data_path: Path, tmp_path: Path
) -> None:
    args = build_parser().parse_args(_args(chapter_data_path, tmp_path, "--limit", "50"))
    before = dict(vars(args))
    settings = settings_from_args(args)
    assert vars(args) == before  # nothing filled in behind the caller's back
    assert run_defaults("tiny") is TINY_RUN_DEFAULTS
    assert settings.train.lr == TINY_RUN_DEFAULTS.lr and settings.limit == 50
    assert settings.checkpoint_minutes == DEFAULT_CHECKPOINT_MINUTES  # periodic by default
    medium = settings_from_args(build_parser().parse_args(["--model", "gpt2-medium"]))
    assert (medium.train.lr, medium.limit, medium.max_new_tokens) == (5e-5, None, 256)
    # Decoding: tiny blocks repeated n-grams by default, GPT-2 decodes as the chapter does,
    # and --no-repeat-ngram 0 gives tiny the chapter's plain greedy decoding.
    assert settings.no_repeat_ngram == TINY_RUN_DEFAULTS.no_repeat_ngram > 0
    assert medium.no_repeat_ngram == 0
    plain = build_parser().parse_args(_args(chapter_data_path, tmp_path, "--no-repeat-ngram", "0"))
    assert settings_from_args(plain).no_repeat_ngram == 0
    # Dropout: the preset's unless --drop-rate says otherwise (0 for a DDP run that must
    # equal the 1-process one).
    assert settings.drop_rate is None and get_config("tiny").drop_rate == 0.1
    no_dropout = build_parser().parse_args(_args(chapter_data_path, tmp_path, "--drop-rate", "0"))
    assert settings_from_args(no_dropout).drop_rate == 0.0


def test_seed_seeds_the_random_init(chapter_data_path: Path, tmp_path: Path) -> None:
    def weights(*extra: str) -> torch.Tensor:
        settings = settings_from_args(
            build_parser().parse_args(_args(chapter_data_path, tmp_path, *extra))
        )
        return finetune.build(settings, finetune.load(settings)).model.wte.weight

    assert torch.equal(weights("--seed", "7"), weights("--seed", "7"))
    assert not torch.equal(weights("--seed", "7"), weights("--seed", "8"))


def test_run_raises_instead_of_exiting(chapter_data_path: Path, tmp_path: Path) -> None:
    settings = settings_from_args(
        build_parser().parse_args(_args(chapter_data_path, tmp_path, "--limit", "5"))
    )
    with pytest.raises(finetune.RunError, match="raise --limit"):
        finetune.run(settings)


# --- expected errors: one line, exit code 2 ------------------------------------------


def test_bad_dataset_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]')
    assert finetune.main(_args(bad, tmp_path / "out")) == 2
    _one_line_error(capsys, str(bad))
    with pytest.raises(ValueError):
        finetune.main(_args(bad, tmp_path / "out", "--debug"))


def test_unwritable_or_full_output_folder_fails_before_training(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert finetune.main(_args(chapter_data_path, blocker / "out")) == 2
    _one_line_error(capsys, "not writable", str(blocker / "out"))

    import helpers.runtime

    usage = helpers.runtime.shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(helpers.runtime.shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trained anyway"))
    assert finetune.main(_args(chapter_data_path, tmp_path / "full")) == 2
    _one_line_error(capsys, "MiB free", str(tmp_path / "full"))


def test_nan_during_training_is_one_line(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def diverge(*args: Any, **kwargs: Any) -> None:
        raise FloatingPointError("training loss is nan at step 3 (epoch 1, batch 4)")

    monkeypatch.setattr(finetune, "train", diverge)
    assert finetune.main(_args(chapter_data_path, tmp_path / "nan")) == 2
    _one_line_error(capsys, "training loss is nan at step 3")


def test_interrupt_before_any_checkpoint_does_not_suggest_resume(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise TrainingInterrupted("SIGINT", checkpoint=None, step=0)

    monkeypatch.setattr(finetune, "train", interrupted)
    assert finetune.main(_args(chapter_data_path, tmp_path / "int")) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was saved" in err and "--resume" not in err


def test_failed_checkpoint_still_writes_the_model(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import helpers.run.checkpoints

    def full_disk(obj: object, path: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(helpers.run.checkpoints.torch, "save", full_disk)
    out = tmp_path / "run"
    assert finetune.main(_args(chapter_data_path, out)) == 2
    assert (out / "tiny-sft.safetensors").is_file() and (out / "summary.json").is_file()
    warning, error = capsys.readouterr().err.strip().splitlines()  # when it failed, and at the end
    assert warning.startswith("warning: cannot write checkpoint")
    assert error.startswith("error: cannot write checkpoint") and str(out / "checkpoints") in error
    assert "enforce fail" not in warning + error


def test_resume_refuses_other_settings_and_other_data(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert finetune.main(_args(chapter_data_path, out)) == 0
    capsys.readouterr()
    assert finetune.main(_args(chapter_data_path, out, "--resume", "--lr", "0.05")) == 2
    _one_line_error(
        capsys, f"hyper-parameters changed: lr 0.05 (checkpoint: {TINY_RUN_DEFAULTS.lr:g})"
    )

    entries = json.loads(chapter_data_path.read_text(encoding="utf-8"))[:40]
    entries[0]["output"] += " (edited)"  # same size, different data
    other = tmp_path / "other.json"
    other.write_text(json.dumps(entries), encoding="utf-8")
    assert finetune.main(_args(other, out, "--resume")) == 2
    _one_line_error(capsys, "data differ")


# --- a disk that fills up, an unreadable checkpoint, determinism ------------------------


def test_a_disk_that_fills_mid_run_stops_and_resume_finishes_the_run(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    full_disk: Callable[..., Callable[..., None]],
) -> None:
    flags = ("--deterministic", "--checkpoint-every", "2")  # 8 steps: checkpoints 2, 4, 6, 8
    assert finetune.main(_args(chapter_data_path, tmp_path / "full", *flags)) == 0
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    make_room = full_disk(1, free_after=2**20)  # step 2's checkpoint fits, step 4's does not
    capsys.readouterr()
    assert finetune.main(_args(chapter_data_path, out, *flags)) == 2
    err = _one_line_error(capsys, f"disk full: cannot write checkpoint {ckpt / 'checkpoint.pt'}")
    assert "the last good checkpoint (step 2) is intact" in err and "rerun with --resume" in err
    assert load_checkpoint(ckpt).state.step == 2 and not (out / "tiny-sft.safetensors").exists()
    found = re.search(r"free at least (\d+) MiB there", err)
    assert found, err
    freed = (int(found.group(1)) + 1) * 2**20  # as much as it says (+1: it rounds)

    make_room(free=2**20)  # nothing freed yet: refused before training, one line
    assert finetune.main(_args(chapter_data_path, out, *flags, "--resume")) == 2
    _one_line_error(capsys, "MiB free", str(out))
    make_room(free=2**20 + freed)  # freed what it asked for: the resume finishes the run
    assert finetune.main(_args(chapter_data_path, out, *flags, "--resume")) == 0
    # Less than a new run's model and checkpoint: the existing checkpoint's space is reused.
    new_run = sum(f.stat().st_size for f in (out / "tiny-sft.safetensors", ckpt / "checkpoint.pt"))
    assert 2**20 + freed < new_run
    history = (out / finetune.HISTORY_NAME).read_text()
    assert (
        history == (tmp_path / "full" / finetune.HISTORY_NAME).read_text()
    )  # the same run, exactly


def test_a_disk_full_while_writing_the_model_keeps_the_run_for_resume(
    chapter_data_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors import SafetensorError

    import helpers.weights

    def no_space(*args: Any, **kwargs: Any) -> None:  # what safetensors raises on a full disk
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    real = helpers.weights.save_file
    monkeypatch.setattr(helpers.weights, "save_file", no_space)
    out = tmp_path / "run"
    assert finetune.main(_args(chapter_data_path, out)) == 2
    model = out / "tiny-sft.safetensors"
    err = _one_line_error(capsys, f"disk full: cannot write the results into {out}", str(model))
    assert f"the trained run is in {out / 'checkpoints'}" in err and "rerun with --resume" in err
    assert not model.exists() and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(helpers.weights, "save_file", real)
    assert finetune.main(_args(chapter_data_path, out, "--resume")) == 0
    assert model.is_file() and (out / "summary.json").is_file()
    assert load_checkpoint(out / "checkpoints").state.step == 8  # the run was complete


def test_resume_from_an_unreadable_checkpoint_names_it_without_torch_advice(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "run" / "checkpoints" / "checkpoint.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x80\x04not really a pickle")
    assert finetune.main(_args(chapter_data_path, tmp_path / "run", "--resume")) == 2
    err = _one_line_error(capsys, f"cannot read {bad}: not a course training checkpoint")
    assert "weights_only" not in err


def test_deterministic_is_a_flag_generated_from_run_options(
    chapter_data_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = {a.dest: a for a in build_parser()._actions}
    (help_text,) = (f.metadata["help"] for f in fields(RunOptions) if f.name == "deterministic")
    assert flags["deterministic"].help == help_text
    assert settings_from_args(build_parser().parse_args(["--deterministic"])).deterministic
    seen: list[RunOptions] = []

    def capture(*args: Any, options: RunOptions, **kwargs: Any) -> None:
        seen.append(options)
        raise FloatingPointError("stop here")

    monkeypatch.setattr(finetune, "train", capture)
    assert finetune.main(_args(chapter_data_path, tmp_path / "run", "--deterministic")) == 2
    assert seen[0].deterministic is True


# --- real signals to a real process --------------------------------------------------


def _start(data_path: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "helpers.finetune",
           *_args(data_path, out, "--epochs", "200", "--eval-freq", "50", *extra)]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_sigterm_saves_a_checkpoint(chapter_data_path: Path, tmp_path: Path) -> None:
    # SIGHUP takes the same path (tests/test_train_reliability.py sends both in-process).
    signame = "SIGTERM"
    out = tmp_path / "run"
    proc = _start(chapter_data_path, out, "--checkpoint-every", "3")
    try:
        wait_for_file(out / "checkpoints" / "checkpoint.pt", proc)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame), err[-2000:]
    assert f"Interrupted ({signame})" in err and "rerun with --resume" in err
    state = load_checkpoint(out / "checkpoints").state
    assert state.step >= 3 and not list((out / "checkpoints").glob("*.tmp"))


def test_a_killed_run_leaves_a_usable_periodic_checkpoint(
    chapter_data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _start(chapter_data_path, out, "--checkpoint-minutes", "0.002")  # by the clock
    try:
        wait_for_file(out / "checkpoints" / "checkpoint.pt", proc)
        time.sleep(1.0)  # let it write a few more, possibly mid-write when killed
        proc.kill()  # SIGKILL: nothing runs on the way out
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert load_checkpoint(out / "checkpoints").state.step >= 1


def test_contradicting_checkpoint_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--model", "tiny", "--no-checkpoint", "--checkpoint-every", "5"])
    assert exc.value.code == 2
    assert "--no-checkpoint contradicts --checkpoint-every" in capsys.readouterr().err
    args = build_parser().parse_args(["--model", "tiny", "--no-checkpoint"])
    settings = settings_from_args(args)
    assert settings.checkpoint_minutes is None and settings.checkpoint_every is None
