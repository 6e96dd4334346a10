"""Offline metrics on hand-made cases and the chapter's answers, and run comparison."""

from __future__ import annotations

import pytest

from helpers.review.metrics import (
    compare_runs,
    exact_match,
    normalize_text,
    normalized_match,
    rouge_l,
    score_responses,
    summarize_scores,
)
from helpers.review.responses import load_responses, save_responses


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


def test_compare_runs(responses_path, tmp_path):
    chapter = load_responses(responses_path).entries[:10]
    echo = [{**e, "model_response": e["output"]} for e in chapter]
    echo_file = save_responses(echo, tmp_path / "echo.json")
    df = compare_runs({"gpt2-medium": chapter, "echo": echo_file}, judge_scores={"echo": 100.0})
    assert list(df.index) == ["gpt2-medium", "echo"]
    assert df.loc["echo", "exact_match"] == 1.0 and df.loc["echo", "rougeL"] == pytest.approx(1.0)
    assert df.loc["echo", "judge"] == 1.0
    assert df.loc["gpt2-medium", "n"] == 10
    rubric = compare_runs({"echo": echo}, judge_scores={"echo": 4.0}, judge_range=(1, 5))
    assert rubric.loc["echo", "judge"] == 0.75
