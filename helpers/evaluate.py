"""Test-split answers on disk, and offline scores that need no second model.

A response file is JSON: either the chapter's plain list of entries with a `model_response`
field, or this module's `{"metadata": {...}, "entries": [...]}` that also records which
model, checkpoint, prompt style and generation settings produced the answers.
"""

from __future__ import annotations

import json
import re
import string
import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd

from helpers.atomic import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESPONSE_KEY = "model_response"
REQUIRED_FIELDS = ("instruction", "output")
METRICS = ("exact_match", "normalized_match", "rougeL")


class ResponseSet(NamedTuple):
    """Entries with model answers, plus how they were produced (empty for the chapter's file)."""

    entries: list[dict]
    metadata: dict


def save_responses(
    entries: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    response_key: str = RESPONSE_KEY,
) -> Path:
    """Save entries (each with `response_key`) and metadata as one JSON file, atomically."""
    _validate_entries(list(entries), response_key, source="entries to save")
    doc = {"metadata": dict(metadata or {}), "entries": [dict(e) for e in entries]}
    return atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def load_responses(path: str | Path, *, response_key: str = RESPONSE_KEY) -> ResponseSet:
    """Load a response file (chapter list or {metadata, entries}); errors name the bad entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Response file not found: {path.name}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid JSON ({exc})") from None
    if isinstance(doc, list):
        entries, metadata = doc, {}
    elif isinstance(doc, dict) and isinstance(doc.get("entries"), list):
        entries, metadata = doc["entries"], dict(doc.get("metadata") or {})
    else:
        raise ValueError(f"{path.name}: expected a list of entries or {{'metadata', 'entries'}}")
    _validate_entries(entries, response_key, source=path.name)
    return ResponseSet(entries, metadata)


def _validate_entries(entries: list, response_key: str, *, source: str) -> None:
    if not entries:
        raise ValueError(f"{source}: no entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is {type(entry).__name__}, expected an object")
        for field in (*REQUIRED_FIELDS, response_key):
            if not isinstance(entry.get(field), str):
                raise ValueError(f"{source}: entry {i} lacks a text field {field!r}")
        if not isinstance(entry.get("input", ""), str):
            raise ValueError(f"{source}: entry {i} field 'input' must be text")


def generate_test_responses(
    model: Any,
    entries: Sequence[Mapping[str, Any]],
    path: str | Path | None = None,
    *,
    model_name: str,
    checkpoint: str | None = None,
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    response_key: str = RESPONSE_KEY,
    extra_metadata: Mapping[str, Any] | None = None,
) -> ResponseSet:
    """Answer every entry with `generate_responses` (greedy by default); save to `path` if given.

    The metadata records model, checkpoint, prompt style and generation settings, plus
    `extra_metadata` (e.g. the fine-tuning options that produced the model).
    """
    from helpers.generate import generate_responses  # the one generation code path

    answers = generate_responses(
        model,
        list(entries),
        style=style,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        progress=progress,
    )
    out = [{**dict(e), response_key: a} for e, a in zip(entries, answers, strict=True)]
    metadata = {
        "model": model_name,
        "checkpoint": checkpoint,
        "prompt_style": style,
        "generation": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "seed": seed,
            "batch_size": batch_size,
            "decoding": "greedy" if temperature == 0 else "sampling",
        },
        "n_entries": len(out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    if path is not None:
        save_responses(out, path, metadata=metadata, response_key=response_key)
    return ResponseSet(out, metadata)


# --- offline metrics -------------------------------------------------------------------

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
def _rouge_scorer():
    from rouge_score import rouge_scorer

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


def plot_comparison(comparison: pd.DataFrame, *, title: str = "Response quality by run") -> Figure:
    """Grouped bar chart of `compare_runs` output (metrics on a 0-1 scale); returns the Figure."""
    import matplotlib.pyplot as plt

    cols = [c for c in comparison.columns if c != "n"]
    fig, ax = plt.subplots(figsize=(3.0 + 2.2 * len(comparison), 3.5))
    comparison[cols].plot.bar(ax=ax, rot=0)
    # Run names are often long ("gpt2-medium, fine-tuned, phi3 prompt"): wrap the labels.
    ax.set_xticks(ax.get_xticks(), [textwrap.fill(str(n), 18) for n in comparison.index])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (0-1)")
    ax.set_xlabel("")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    return fig
