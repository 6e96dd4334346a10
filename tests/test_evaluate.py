"""Response files, extraction for both prompt styles, offline metrics and run comparison."""

from __future__ import annotations

import json

import pytest

from helpers.evaluate import (
    compare_runs,
    exact_match,
    generate_test_responses,
    load_responses,
    normalize_text,
    normalized_match,
    plot_comparison,
    rouge_l,
    save_responses,
    score_responses,
    summarize_scores,
)
from helpers.prompts import extract_response, format_prompt

ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_response_both_styles(style):
    prompt = format_prompt(ENTRY, style)
    assert extract_response(prompt + " The capital is Paris. <|endoftext|>junk", style) == (
        "The capital is Paris."
    )
    # A model that starts a new turn of the template is cut there.
    nxt = "### Instruction:" if style == "alpaca" else "<|user|>"
    assert extract_response(prompt + "Paris.\n\n" + nxt + " more", style) == "Paris."
    # Generated text without the prompt in front (what generate_responses decodes).
    assert extract_response("  Paris. ", style) == "Paris."


def test_metrics_on_hand_made_cases():
    assert exact_match("Paris.", " Paris.\n") == 1.0
    assert exact_match("paris", "Paris.") == 0.0
    assert normalize_text("The  Cat, sat!") == "cat sat"
    assert normalized_match("the cat sat.", "A cat sat") == 1.0
    assert normalized_match("dog", "cat") == 0.0
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    # LCS "the cat sat" = 3 words; P = 3/3, R = 3/5 -> F1 = 0.75
    assert rouge_l("the cat sat", "the cat sat on mats") == pytest.approx(0.75)
    assert rouge_l("", "the cat") == 0.0
    # Stemming: "running" and "runs" share the stem "run".
    assert rouge_l("dogs running", "dog runs") == pytest.approx(1.0)


def test_score_responses_on_chapter_answers(responses_path):
    rs = load_responses(responses_path)
    assert len(rs.entries) == 110 and rs.metadata == {}
    scores = score_responses(rs.entries)
    assert list(scores.columns) == ["instruction", "exact_match", "normalized_match", "rougeL"]
    assert len(scores) == 110
    # Entry 0: "The car is as fast as a bullet." vs "... as lightning." -> no match, high overlap.
    assert scores.loc[0, "exact_match"] == 0.0
    # LCS of 6 words; precision 6/8, recall 6/7 -> F1 = 0.8
    assert scores.loc[0, "rougeL"] == pytest.approx(0.8)
    summary = summarize_scores(scores)
    assert 0 < summary["exact_match"] <= summary["normalized_match"] < 1
    assert 0.3 < summary["rougeL"] < 1


def test_save_and_load_roundtrip_and_validation(tmp_path):
    entries = [{**ENTRY, "model_response": "Paris"}]
    path = save_responses(entries, tmp_path / "r.json", metadata={"model": "tiny"})
    rs = load_responses(path)
    assert rs.entries == entries and rs.metadata == {"model": "tiny"}
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ENTRY]))
    with pytest.raises(ValueError, match="entry 0 lacks a text field 'model_response'"):
        load_responses(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_responses(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_responses(tmp_path / "missing.json")


def test_generate_test_responses_records_settings(tmp_path, tiny_config):
    import torch

    from helpers.generate import generate_responses
    from helpers.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny_config).eval()
    entries = [ENTRY, {"instruction": "Add.", "input": "2 + 3", "output": "5"}]
    rs = generate_test_responses(
        model,
        entries,
        tmp_path / "out.json",
        model_name="tiny",
        checkpoint="none",
        style="phi3",
        max_new_tokens=5,
        progress=False,
    )
    # Same code path as generate_responses: identical answers.
    expected = generate_responses(model, entries, style="phi3", max_new_tokens=5, progress=False)
    assert [e["model_response"] for e in rs.entries] == expected
    loaded = load_responses(tmp_path / "out.json")
    assert loaded.entries == rs.entries
    meta = loaded.metadata
    assert (
        meta["model"] == "tiny" and meta["prompt_style"] == "phi3" and meta["checkpoint"] == "none"
    )
    assert meta["generation"]["max_new_tokens"] == 5 and meta["generation"]["decoding"] == "greedy"


def test_compare_runs_and_chart(responses_path):
    chapter = load_responses(responses_path).entries[:10]
    echo = [{**e, "model_response": e["output"]} for e in chapter]
    df = compare_runs({"gpt2-medium": chapter, "echo": echo}, judge_scores={"echo": 100.0})
    assert list(df.index) == ["gpt2-medium", "echo"]
    assert df.loc["echo", "exact_match"] == 1.0 and df.loc["echo", "rougeL"] == pytest.approx(1.0)
    assert df.loc["echo", "judge"] == 1.0
    assert df.loc["gpt2-medium", "n"] == 10
    fig = plot_comparison(df)
    assert len(fig.axes[0].patches) == 2 * 4  # runs x (3 metrics + judge)
    rubric = compare_runs({"echo": echo}, judge_scores={"echo": 4.0}, judge_range=(1, 5))
    assert rubric.loc["echo", "judge"] == 0.75
