"""Offline scores that need no second model: exact match, normalised match, ROUGE-L, repetition.

ROUGE-L alone flatters a weak model, so it is reported next to what no model is needed for:
two baselines (`baseline_runs`: a constant answer, copying the input) and the chapter's
published GPT-2 medium answers (`BOOK_GPT2_MEDIUM`), plus the share of answers that loop
(`has_repeated_ngram`). `answer_report` puts these together for a run's test answers;
`compare_runs` puts several runs' mean scores side by side (optionally with a judge's mean
score rescaled to 0-1); `helpers.plots.plot_comparison` draws that table.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from rouge_score import rouge_scorer

from helpers.review.responses import RESPONSE_KEY, ResponseSet, load_responses

# "repetition" is 1.0 for an answer with a repeated 3-word sequence: lower is better.
METRICS = ("exact_match", "normalized_match", "rougeL", "repetition")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"\w+(?:'\w+)*")  # letters/digits/_, inner apostrophes kept ("it's")

REPEAT_N = 3  # a loop is an answer in which some 3 consecutive words occur twice
CONSTANT_ANSWER = "The answer is the"  # the constant baseline: the same answer to everything
# The chapter's published GPT-2 medium (355M) answers to its 110 test entries
# (instruction-data-with-response.json), scored with this module (tests/review/test_metrics.py
# recomputes both): mean ROUGE-L, and the share with a repeated 3-word sequence (4 of 110).
BOOK_GPT2_MEDIUM = {"rougeL": 0.589, "repetition": 0.036}


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the expected output (outer whitespace ignored), else 0.0."""
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    """1.0 when the answers are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, punctuation dropped ("It's 'cold'." -> it's, cold)."""
    return _WORD.findall(text.lower())


def has_repeated_ngram(text: str, n: int = REPEAT_N) -> bool:
    """True when some `n` consecutive words (see `words`) occur twice or more in `text`.

    Case and punctuation are ignored and occurrences may overlap: "The capital of 'The
    capital of" repeats "the capital of", and "no no no no" repeats "no no no".
    """
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(grams) != len(set(grams))


def repetition_share(answers: Sequence[str], n: int = REPEAT_N) -> float:
    """Share of `answers` with a repeated `n`-word sequence (`has_repeated_ngram`); NaN if none."""
    if not answers:
        return float("nan")
    return sum(has_repeated_ngram(a, n) for a in answers) / len(answers)


def copy_input_answer(entry: Mapping[str, Any]) -> str:
    """The copying baseline's answer: the entry's input, or its instruction when it has none."""
    return entry.get("input") or entry["instruction"]


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words, stemmed) from the `rouge-score` package."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_responses(
    entries: Sequence[Mapping[str, Any]], *, response_key: str = RESPONSE_KEY
) -> pd.DataFrame:
    """One row per entry: exact match, normalised match, ROUGE-L, repetition (1.0: loops)."""
    rows = []
    for i, e in enumerate(entries):
        pred, ref = e[response_key], e["output"]
        rows.append(
            {
                "index": i,
                "instruction": e["instruction"],
                "exact_match": exact_match(pred, ref),
                "normalized_match": normalized_match(pred, ref),
                "rougeL": rouge_l(pred, ref),
                "repetition": float(has_repeated_ngram(pred)),
            }
        )
    return pd.DataFrame(rows).set_index("index")


def summarize_scores(scores: pd.DataFrame) -> dict[str, float]:
    """Mean of each metric column (fractions in [0, 1]; `repetition`: the share that loops)."""
    return {m: float(scores[m].mean()) for m in METRICS if m in scores}


def baseline_runs(
    entries: Sequence[Mapping[str, Any]], *, response_key: str = RESPONSE_KEY
) -> dict[str, list[dict[str, Any]]]:
    """`entries` answered by the two baselines, for `compare_runs`: what needs no model at all.

    "constant answer": `CONSTANT_ANSWER` to every entry; "copy the input": the entry's input
    (its instruction when it has none), which scores well on the many rewrite tasks.
    """
    return {
        "constant answer": [{**e, response_key: CONSTANT_ANSWER} for e in entries],
        "copy the input": [{**e, response_key: copy_input_answer(e)} for e in entries],
    }


def mean_rouge_l(
    entries: Sequence[Mapping[str, Any]], *, response_key: str = RESPONSE_KEY
) -> float:
    """Mean ROUGE-L of the entries' answers against their expected outputs; NaN if none."""
    if not entries:
        return float("nan")
    return sum(rouge_l(e[response_key], e["output"]) for e in entries) / len(entries)


def answer_report(
    entries: Sequence[Mapping[str, Any]], *, response_key: str = RESPONSE_KEY
) -> dict[str, Any]:
    """A run's answers in numbers, rounded to 3 places (summary.json, the printed summary).

    n, mean ROUGE-L, the share that repeats a 3-word sequence, how many are empty, the two
    baselines' mean ROUGE-L on the same entries, and the chapter's published GPT-2 medium
    answers (`BOOK_GPT2_MEDIUM`, comparable when `entries` are the chapter's test split).
    """
    if not entries:
        raise ValueError("answer_report: no entries to report on")
    answers = [e[response_key] for e in entries]
    baselines = baseline_runs(entries, response_key=response_key)
    return {
        "n": len(entries),
        "rougeL": round(mean_rouge_l(entries, response_key=response_key), 3),
        "repetition": round(repetition_share(answers), 3),
        "empty": sum(not a.strip() for a in answers),
        "baselines_rougeL": {
            name: round(mean_rouge_l(run, response_key=response_key), 3)
            for name, run in baselines.items()
        },
        "book_gpt2_medium": dict(BOOK_GPT2_MEDIUM),
    }


def compare_runs(
    runs: Mapping[str, str | Path | Sequence[Mapping[str, Any]] | ResponseSet],
    *,
    judge_scores: Mapping[str, float] | None = None,
    judge_range: tuple[float, float] = (0, 100),
    response_key: str = RESPONSE_KEY,
) -> pd.DataFrame:
    """Metrics of several response files (or entry lists) side by side: one row per run.

    `judge_scores` are mean judge scores per run on `judge_range` (the chapter's 0-100
    prompt by default; (1, 5) for the rubric); they are rescaled to 0-1 like the metrics.
    """
    rows = {}
    for name, run in runs.items():
        if isinstance(run, (str, Path)):
            run = load_responses(run, response_key=response_key)
        entries = run.entries if isinstance(run, ResponseSet) else list(run)
        row: dict[str, float] = {"n": len(entries)}
        row.update(summarize_scores(score_responses(entries, response_key=response_key)))
        if judge_scores and name in judge_scores:
            low, high = judge_range
            row["judge"] = (judge_scores[name] - low) / (high - low)
        rows[name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "run"
    return df
