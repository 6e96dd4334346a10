"""The headless chapter run (`python -m helpers.finetune`) end to end in tiny mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from helpers.config import TINY_RUN_DEFAULTS, get_config
from helpers.finetune import main
from helpers.review.metrics import answer_report
from helpers.review.responses import load_responses
from helpers.run.cli import build_parser, settings_from_args
from helpers.run.train_config import RunOptions
from helpers.weights import load_model, read_metadata


def _args(data_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(data_path), "--limit", "40", "--batch-size", "4",
        "--epochs", "1", "--eval-freq", "2", "--eval-iter", "2", "--max-new-tokens", "8",
        "--output-dir", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_tiny_run_writes_every_artifact_and_resumes(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(chapter_data_path, out, "--mask-prompt")) == 0
    printed = capsys.readouterr().out
    assert "Initial loss: train" in printed and "=== Fine-tuning summary ===" in printed
    assert "TINY OFFLINE MODE" in printed

    names = {p.name for p in out.iterdir()}
    assert {"loss-plot.png", "loss-plot.pdf", "history.csv", "summary.json", "checkpoints",
            "instruction-data-with-response.json", "tiny-sft.safetensors"} <= names  # fmt: skip
    assert not [n for n in names if n.endswith(".tmp")]
    assert (out / "loss-plot.png").read_bytes()[:4] == b"\x89PNG"
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"]
    # 40 entries -> 34 train -> 8 batches of 4 (drop_last), evaluated at steps 0, 2, 4, 6
    assert history["step"].tolist() == [0, 2, 4, 6]

    responses = load_responses(out / "instruction-data-with-response.json")
    assert len(responses.entries) == 4  # 10% of 40 entries
    assert all(isinstance(e["model_response"], str) for e in responses.entries)
    meta = responses.metadata
    assert meta["model"] == "tiny" and meta["prompt_style"] == "alpaca" and meta["mask_prompt"]
    assert meta["generation"]["max_new_tokens"] == 8 and meta["generation"]["decoding"] == "greedy"
    # tiny's stated decoding default: no repeated n-token sequence within an answer
    assert meta["generation"]["no_repeat_ngram"] == TINY_RUN_DEFAULTS.no_repeat_ngram > 0
    assert meta["checkpoint"] == "tiny-sft.safetensors"
    assert load_model(out / "tiny-sft.safetensors").cfg == get_config("tiny")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["entries"] == {"train": 34, "validation": 2, "test": 4}
    assert summary["settings"]["lr"] == TINY_RUN_DEFAULTS.lr  # tiny mode's documented default
    # The answers scored as written, next to the baselines and the book's published ones.
    assert summary["answers"] == answer_report(responses.entries)
    answers = summary["answers"]
    assert answers["n"] == 4 and "copy the input" in answers["baselines_rougeL"]
    ngram = TINY_RUN_DEFAULTS.no_repeat_ngram
    assert f"Test answers:   4 (greedy, no repeated {ngram}-token sequence): ROUGE-L" in printed
    assert "copying the input" in printed

    # A second epoch from the checkpoint continues the same history.
    assert main(_args(chapter_data_path, out, "--mask-prompt", "--epochs", "2", "--resume")) == 0
    resumed = pd.read_csv(out / "history.csv")
    assert resumed["step"].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    pd.testing.assert_frame_equal(resumed.iloc[:4], history)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "gpt3"], "--model: Unknown model preset"),
        (["--epochs", "0"], "--epochs: must be > 0"),
        (["--lr", "fast"], "--lr: expected a float"),
        (["--style", "chatml"], "--style: invalid choice"),
    ],
)
def test_bad_options_exit_with_a_clear_message(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_run_level_errors_are_clear(
    chapter_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Expected errors: one line on stderr and exit code 2 (no traceback, no SystemExit).
    assert main(_args(chapter_data_path, tmp_path / "none", "--resume")) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert main(_args(chapter_data_path, tmp_path / "small", "--limit", "5")) == 2
    assert "raise --limit" in capsys.readouterr().err


def test_chapter_compat_run_is_chapter_faithful_end_to_end(
    chapter_data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "compat"
    extra = ("--chapter-compat", "--test-limit", "1", "--eval-freq", "4")
    assert main(_args(chapter_data_path, out, *extra)) == 0
    model_file = out / "tiny-sft.safetensors"
    assert load_model(model_file).tied is False  # the chapter's separate out_head
    assert read_metadata(model_file)["chapter_compat"] == "true"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chapter_compat"] is True and summary["settings"]["chapter_compat"] is True
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]  # full fine-tuning
    assert summary["lora"] is None
    responses = load_responses(out / "instruction-data-with-response.json")
    assert responses.metadata["generation"]["chapter_compat"] is True


def test_chapter_compat_defaults_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def compat(*extra: str) -> bool:
        return settings_from_args(
            build_parser().parse_args(["--model", "tiny", *extra])
        ).chapter_compat

    monkeypatch.delenv("COURSE_CHAPTER_COMPAT", raising=False)
    assert compat() is False and compat("--chapter-compat") is True
    monkeypatch.setenv("COURSE_CHAPTER_COMPAT", "1")
    assert compat() is True and compat("--no-chapter-compat") is False
    for extra, source in [
        ([], "$COURSE_CHAPTER_COMPAT"),
        (["--chapter-compat"], "--chapter-compat"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["--model", "tiny", "--grouped", *extra])
        assert exc.value.code == 2
        assert f"error: {source} contradicts --grouped" in capsys.readouterr().err


def test_eval_batched_reaches_the_training_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--eval-batched is a run option: it must arrive in train()'s RunOptions, not vanish."""
    import helpers.finetune as finetune

    seen: dict[str, RunOptions] = {}

    def fake_train(
        model: Any, train_loader: Any, val_loader: Any, *, options: RunOptions, **kw: Any
    ) -> pd.DataFrame:
        seen["options"] = options
        return pd.DataFrame(columns=["step", "epoch", "tokens_seen", "train_loss", "val_loss"])

    monkeypatch.setattr(finetune, "train", fake_train)
    for flags, expected in (([], False), (["--eval-batched"], True)):
        settings = settings_from_args(
            build_parser().parse_args(["--model", "tiny", "--output-dir", str(tmp_path), *flags])
        )
        # Stand-ins holding just what fit() reads.
        finetune.fit(settings, loaded=_FakeLoaded(), built=_FakeBuilt())  # type: ignore[arg-type]
        assert seen["options"].eval_batched is expected


class _FakeLoaded:
    loaders = type("L", (), {"train": None, "validation": None})()
    splits = type("S", (), {"validation": [{"instruction": "x", "input": "", "output": "y"}]})()


class _FakeBuilt:
    model = None
    device = "cpu"
