"""Offline scores that need no second model: exact match, normalised match, ROUGE-L, run tables.

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

METRICS = ("exact_match", "normalized_match", "rougeL")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


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


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words, stemmed) from the `rouge-score` package."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_responses(
    entries: Sequence[Mapping[str, Any]], *, response_key: str = RESPONSE_KEY
) -> pd.DataFrame:
    """One row per entry with exact match, normalised match and ROUGE-L of its answer."""
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
            }
        )
    return pd.DataFrame(rows).set_index("index")


def summarize_scores(scores: pd.DataFrame) -> dict[str, float]:
    """Mean of each metric column (fractions in [0, 1])."""
    return {m: float(scores[m].mean()) for m in METRICS if m in scores}


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
