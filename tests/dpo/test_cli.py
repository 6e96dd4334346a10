"""`python -m helpers.dpo` (helpers.dpo.cli, files from helpers.dpo.outputs): a tiny run
writes every output and resumes; expected problems are one `error:` line with exit code 2;
nothing is lost to SIGTERM, SIGHUP or kill -9, and an unusable folder is found before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from helpers.config import GPTConfig
from helpers.dpo.train import DPOConfig
from helpers.model import GPTModel
from helpers.run.checkpoints import load_checkpoint
from tests.process_support import wait_for_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tiny_sft(tmp_path: Path, tiny_config: GPTConfig) -> Path:
    from helpers.weights import save_model

    torch.manual_seed(0)
    return save_model(
        GPTModel(tiny_config), tmp_path / "sft.safetensors", metadata={"base_model": "tiny"}
    )


@pytest.fixture()
def small_prefs(tmp_path: Path) -> Path:
    from helpers.dpo.preferences import save_preferences

    entries = [
        {
            "instruction": f"Say {i}.",
            "input": "",
            "output": f"{i}.",
            "chosen": f"Sure: {i}.",
            "rejected": "No.",
        }
        for i in range(20)
    ]
    return save_preferences(entries, tmp_path / "prefs.json")


def _cli_args(sft: Path, data: Path, out: Path, *extra: str) -> list[str]:
    small = "--model tiny --batch-size 4 --eval-freq 2 --eval-iter 1 --max-new-tokens 4"
    paths = ["--sft-checkpoint", str(sft), "--data", str(data), "--output-dir", str(out)]
    return [*small.split(), *paths, "--response-limit", "1", "--quiet", *extra]


def test_cli_writes_artifacts_and_resumes(
    tiny_sft: Path, small_prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.cli import main
    from helpers.weights import load_model

    out = tmp_path / "dpo"
    assert main(_cli_args(tiny_sft, small_prefs, out, "--max-steps", "2")) == 0
    printed = capsys.readouterr().out
    assert "TINY OFFLINE MODE" in printed and "=== DPO summary ===" in printed
    names = {p.name for p in out.iterdir()}
    assert {
        "history.csv",
        "dpo-plot.png",
        "dpo-plot.pdf",
        "summary.json",
        "checkpoints",
        "tiny-dpo.safetensors",
        "validation-responses.json",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    first = pd.read_csv(out / "history.csv")
    assert first["step"].tolist() == [0]
    assert main(_cli_args(tiny_sft, small_prefs, out, "--resume")) == 0
    history = pd.read_csv(out / "history.csv")
    # 20 entries -> 17 train pairs -> 4 batches of 4: steps 0..3, evaluated at 0 and 2
    assert history["step"].tolist() == [0, 2]
    pd.testing.assert_frame_equal(history.iloc[:1], first)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["entries"] == {"train": 17, "validation": 1}
    responses = json.loads((out / "validation-responses.json").read_text())
    assert responses["metadata"]["model"] == "tiny" and len(responses["entries"]) == 1
    assert {"sft_response", "dpo_response"} <= set(responses["entries"][0])
    assert load_model(out / "tiny-dpo.safetensors").cfg.emb_dim == 32


def test_cli_expected_errors_are_one_line_with_exit_code_2(
    tiny_sft: Path, small_prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.cli import main

    def err(args: list[str]) -> str:
        assert main(args) == 2
        text = capsys.readouterr().err.strip()
        assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text
        return text

    assert "no instruction-tuned model at" in err(
        _cli_args(tmp_path / "none.safetensors", small_prefs, tmp_path / "a")
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "chosen": "c"}]))
    assert "entry 0 is missing the field 'rejected'" in err(
        _cli_args(tiny_sft, bad, tmp_path / "b")
    )
    assert "no such preference file" in err(
        _cli_args(tiny_sft, tmp_path / "nope.json", tmp_path / "c")
    )
    assert "--resume: no DPO checkpoint" in err(
        _cli_args(tiny_sft, small_prefs, tmp_path / "d", "--resume")
    )
    assert "was fine-tuned from tiny" in err(
        [*_cli_args(tiny_sft, small_prefs, tmp_path / "e"), "--model", "gpt2-small"]
    )
    with pytest.raises(SystemExit) as exc:
        main(["--beta", "-1"])
    assert exc.value.code == 2


def test_unusable_output_folder_is_found_before_training(
    tiny_sft: Path,
    small_prefs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import helpers.dpo.train
    import helpers.runtime
    from helpers.dpo.cli import main

    monkeypatch.setattr(helpers.dpo.train, "train_dpo", lambda *a, **k: pytest.fail("trained"))

    def err(out: Path, *needles: str) -> None:
        assert main(_cli_args(tiny_sft, small_prefs, out)) == 2
        text = capsys.readouterr().err.strip()
        assert text.startswith("error: ") and "\n" not in text, text
        assert all(needle in text for needle in (str(out), *needles)), text

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err(blocker / "out", "not writable")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        err(locked, "not writable")

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as m:  # what a read-only mount answers, even to root
        m.setattr(helpers.runtime.tempfile, "TemporaryFile", read_only)
        err(tmp_path / "ro", "not writable", "Read-only file system")
    usage = helpers.runtime.shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(helpers.runtime.shutil, "disk_usage", lambda path: usage)
    err(tmp_path / "full", "MiB free")


# --- real signals and kills to a real process --------------------------------------------


def _start(sft: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    # One thread: a resumed run is then bit for bit the one that was stopped.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = _cli_args(sft, data, out, "--epochs", "500", "--eval-freq", "50", *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "helpers.dpo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_signals_save_a_checkpoint_that_resumes(
    tiny_sft: Path, small_prefs: Path, tmp_path: Path, signame: str
) -> None:
    from helpers.dpo.cli import main

    out = tmp_path / "dpo"
    proc = _start(tiny_sft, small_prefs, out, "--checkpoint-every", "2")
    try:
        wait_for_file(out / "checkpoints" / "checkpoint.pt", proc)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame), err[-2000:]
    assert f"Interrupted ({signame}) at step" in err and "rerun with --resume" in err
    assert not list((out / "checkpoints").glob("*.tmp"))
    step = load_checkpoint(out / "checkpoints", DPOConfig).state.step
    assert step >= 2
    more = ("--resume", "--epochs", "500", "--eval-freq", "50", "--max-steps", str(step + 2))
    assert main(_cli_args(tiny_sft, small_prefs, out, *more)) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_kill_9_leaves_a_usable_checkpoint_and_no_temp_files(
    tiny_sft: Path, small_prefs: Path, tmp_path: Path
) -> None:
    from helpers.dpo.cli import main

    out = tmp_path / "dpo"
    proc = _start(tiny_sft, small_prefs, out, "--checkpoint-every", "1")  # writing all the time
    try:
        wait_for_file(out / "checkpoints" / "checkpoint.pt", proc)
        time.sleep(1.0)  # a few more checkpoints, possibly one mid-write when killed
        proc.kill()  # SIGKILL: nothing runs on the way out
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    folder = out / "checkpoints"
    step = load_checkpoint(folder, DPOConfig).state.step
    assert step >= 1
    (folder / ".checkpoint.pt.dead1234.tmp").write_bytes(b"half a checkpoint")  # for certain
    more = ("--resume", "--epochs", "500", "--eval-freq", "50", "--max-steps", str(step + 1))
    assert main(_cli_args(tiny_sft, small_prefs, out, *more)) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(folder, DPOConfig).state.step == step + 1


# --- the command line comes from DPOSettings ------------------------------------------------


def test_parser_is_generated_from_dpo_settings_with_the_real_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dataclasses import fields

    from helpers.dpo.cli import DPOSettings, build_parser, settings_from_args
    from helpers.dpo.train import BOOK_DPO_DEFAULTS, TINY_DPO_DEFAULTS, DPOConfig

    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    assert {f.name for f in fields(DPOSettings)} <= set(flags)
    # Left out, a flag holds the setting's default (None: the model's run default, later).
    args = parser.parse_args([])
    assert (args.epochs, args.weight_decay, args.beta, args.seed) == (1, 0.01, 0.1, 123)
    assert (args.style, args.quiet, args.resume) == ("alpaca", False, False)
    assert args.lr is None and args.batch_size is None
    # The hyper-parameters are DPOConfig's: the same help, check and default, stated there.
    book = DPOConfig()
    assert (args.epochs, args.weight_decay, args.beta) == (book.num_epochs, 0.01, book.beta)
    assert args.weight_decay == book.weight_decay
    assert "--epochs" in flags["epochs"].option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for needle in (
        f"AdamW learning rate (default: {BOOK_DPO_DEFAULTS.lr:g}; tiny: {TINY_DPO_DEFAULTS.lr:g})",
        "use the first N pairs",  # all of them by default, for GPT-2 and tiny alike
        f"answer length (default: {BOOK_DPO_DEFAULTS.max_new_tokens}; "
        f"tiny: {TINY_DPO_DEFAULTS.max_new_tokens})",
        "(default: 0.1)",
        "prompt style (default: alpaca)",
    ):
        assert needle in help_text, needle

    settings = settings_from_args(parser.parse_args(["--beta", "0.5", "--limit", "9"]))
    assert (settings.beta, settings.limit, settings.lr) == (0.5, 9, None)
    tiny = settings.with_run_defaults("tiny")
    assert (tiny.lr, tiny.limit, tiny.batch_size) == (
        TINY_DPO_DEFAULTS.lr,
        9,
        TINY_DPO_DEFAULTS.batch_size,
    )
    assert settings.with_run_defaults("gpt2-medium").lr == BOOK_DPO_DEFAULTS.lr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--beta", "nan"], "argument --beta: must be > 0 (finite), got nan"),
        (["--lr", "inf"], "argument --lr: must be > 0 (finite) or None, got inf"),
        (["--limit", "-1"], "argument --limit: must be > 0 or None, got -1"),
        (["--epochs", "1.5"], "argument --epochs: expected a int, got '1.5'"),
        (["--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
        (["--style", "chatml"], "argument --style: invalid choice: 'chatml'"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.dpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_dpo_settings_are_frozen_and_validated() -> None:
    from dataclasses import FrozenInstanceError

    from helpers.dpo.cli import DPOSettings

    with pytest.raises(ValueError, match="DPOSettings.beta must be > 0"):
        DPOSettings(beta=0.0)
    with pytest.raises(ValueError, match="DPOSettings.max_steps must be > 0 or None"):
        DPOSettings(max_steps=0)
    with pytest.raises(FrozenInstanceError):
        DPOSettings().beta = 1.0  # type: ignore[misc]
