"""`python -m helpers.dpo` (helpers.dpo.cli, files from helpers.dpo.outputs): a tiny run
writes every output and resumes; expected problems are one `error:` line with exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from helpers.model import GPTModel


@pytest.fixture()
def tiny_sft(tmp_path, tiny_config):
    from helpers.weights import save_model

    torch.manual_seed(0)
    return save_model(
        GPTModel(tiny_config), tmp_path / "sft.safetensors", metadata={"base_model": "tiny"}
    )


@pytest.fixture()
def small_prefs(tmp_path):
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


def _cli_args(sft, data, out, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--sft-checkpoint", str(sft), "--data", str(data), "--output-dir", str(out),
        "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4", "--response-limit", "1", "--quiet", *extra,
    ]  # fmt: skip


def test_cli_writes_artifacts_and_resumes(tiny_sft, small_prefs, tmp_path, capsys):
    from helpers.dpo.cli import main
    from helpers.weights import load_model

    out = tmp_path / "dpo"
    assert main(_cli_args(tiny_sft, small_prefs, out, "--max-steps", "2")) == 0
    printed = capsys.readouterr().out
    assert "TINY OFFLINE MODE" in printed and "=== DPO summary ===" in printed
    names = {p.name for p in out.iterdir()}
    assert {"history.csv", "dpo-plot.png", "dpo-plot.pdf", "summary.json", "checkpoints", "tiny-dpo.safetensors",
            "validation-responses.json"} <= names  # fmt: skip
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


def test_cli_expected_errors_are_one_line_with_exit_code_2(tiny_sft, small_prefs, tmp_path, capsys):
    from helpers.dpo.cli import main

    def err(args) -> str:
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
