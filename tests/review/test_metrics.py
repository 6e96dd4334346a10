"""Offline metrics on hand-made cases and the chapter's answers, and run comparison."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers.review.metrics import (
    BOOK_GPT2_MEDIUM,
    CONSTANT_ANSWER,
    answer_report,
    baseline_runs,
    compare_runs,
    copy_input_answer,
    exact_match,
    has_repeated_ngram,
    normalize_text,
    normalized_match,
    repetition_share,
    rouge_l,
    score_responses,
    summarize_scores,
    words,
)
from helpers.review.responses import load_responses, save_responses


def test_metrics_on_hand_made_cases() -> None:
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


def test_score_responses_on_chapter_answers(responses_path: Path) -> None:
    rs = load_responses(responses_path)
    scores = score_responses(rs.entries)
    assert list(scores.columns) == [
        "instruction", "exact_match", "normalized_match", "rougeL", "repetition"
    ]  # fmt: skip
    assert len(scores) == 110
    # Entry 0: "The car is as fast as a bullet." vs "... as lightning." -> no match, high overlap.
    assert scores.loc[0, "exact_match"] == 0.0
    # LCS of 6 words; precision 6/8, recall 6/7 -> F1 = 0.8
    assert scores.loc[0, "rougeL"] == pytest.approx(0.8)
    summary = summarize_scores(scores)
    assert 0 < summary["exact_match"] <= summary["normalized_match"] < 1
    assert 0.3 < summary["rougeL"] < 1
    # The published numbers the README and every run's summary quote: 0.589, 4 loops of 110.
    assert round(summary["rougeL"], 3) == BOOK_GPT2_MEDIUM["rougeL"]
    assert scores["repetition"].sum() == 4
    assert round(summary["repetition"], 3) == BOOK_GPT2_MEDIUM["repetition"]


def test_repeated_ngram_definition() -> None:
    assert words("It's 'cold', isn't it?") == ["it's", "cold", "isn't", "it"]
    # The tiny model's typical loop: case and punctuation do not hide the repeat.
    assert has_repeated_ngram("The capital of 'The capital of ' process")
    assert has_repeated_ngram("no no no no")  # overlapping occurrences count
    assert not has_repeated_ngram("no no no")  # one 3-gram, once
    # A repeated 2-word phrase is not a repeated 3-word sequence...
    assert not has_repeated_ngram("the cat sat on the cat mat")
    assert has_repeated_ngram("the cat sat on the cat mat", n=2)
    # ...nor are the same words in another order.
    assert not has_repeated_ngram("red green blue, blue green red")
    assert not has_repeated_ngram("") and not has_repeated_ngram("Paris.")
    assert repetition_share(["a b c a b c", "a b c", "x y z x y z w"]) == pytest.approx(2 / 3)
    assert math.isnan(repetition_share([]))


def test_baselines_and_answer_report() -> None:
    entries = [
        {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat sat."},
        {"instruction": "Name a color.", "input": "", "output": "Red is a color."},
    ]
    assert copy_input_answer(entries[0]) == "The cat sat."
    assert copy_input_answer(entries[1]) == "Name a color."  # no input: the instruction
    runs = baseline_runs(entries)
    assert [e["model_response"] for e in runs["constant answer"]] == [CONSTANT_ANSWER] * 2
    assert [e["model_response"] for e in runs["copy the input"]] == [
        "The cat sat.",
        "Name a color.",
    ]
    answered = [{**entries[0], "model_response": "The cat sat. The cat sat."},
                {**entries[1], "model_response": " "}]  # fmt: skip
    report = answer_report(answered)
    # ROUGE-L: LCS 3 words, P 3/6, R 3/3 -> 2/3; the empty answer scores 0.
    assert report["rougeL"] == round((2 / 3 + 0) / 2, 3)
    assert report["repetition"] == 0.5 and report["empty"] == 1 and report["n"] == 2
    # Constant "the answer is the": LCS 1 with "the cat sat" (P 1/4, R 1/3 -> 2/7) and 1 with
    # "red is a color" ("is": P 1/4, R 1/4 -> 1/4). Copying: 1.0 for the rewrite; "name a
    # color" vs "red is a color": LCS "a color" (P 2/3, R 2/4 -> 4/7).
    assert report["baselines_rougeL"] == {
        "constant answer": round((2 / 7 + 1 / 4) / 2, 3),
        "copy the input": round((1 + 4 / 7) / 2, 3),
    }
    assert report["book_gpt2_medium"] == BOOK_GPT2_MEDIUM
    with pytest.raises(ValueError, match="no entries"):
        answer_report([])


def test_baselines_on_the_chapter_test_split(responses_path: Path) -> None:
    # The figures: the constant answer 0.19, copying the input 0.44 on the 110 entries.
    report = answer_report(load_responses(responses_path).entries)
    assert report["baselines_rougeL"] == {"constant answer": 0.193, "copy the input": 0.445}
    assert report["rougeL"] == BOOK_GPT2_MEDIUM["rougeL"] and report["n"] == 110


def test_compare_runs(responses_path: Path, tmp_path: Path) -> None:
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
