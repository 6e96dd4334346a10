"""Response files: test-split answers on disk, and the one id that names an answer.

A response file is JSON: either the chapter's plain list of entries with a `model_response`
field, or `{"metadata": {...}, "entries": [...]}` that also records which model, checkpoint,
prompt style and generation settings produced the answers.

`entry_id` is the single fingerprint of an entry and its answer: ratings (helpers.review.ratings)
and judge scores (helpers.review.judge_scoring) are stored under it, so neither can attach to an
answer that was regenerated since.

`published_responses_path` gives the chapter's published `instruction-data-with-response.json`
(the book's fine-tuned gpt2-medium answers): `$COURSE_RESPONSES`, else a sha256-checked
download into `data/cache/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from helpers.atomic import atomic_write_text
from helpers.data import DownloadError, default_cache_dir, download_file

RESPONSE_KEY = "model_response"
REQUIRED_FIELDS = ("instruction", "output")

# The chapter's published answers (its fine-tuned gpt2-medium on the test split).
PUBLISHED_RESPONSES_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data-with-response.json"
)
PUBLISHED_RESPONSES_SHA256 = "aced320504c77c98d957316eb9f3460945256226c36b5e9752bf7d49585eb943"
PUBLISHED_RESPONSES_FILENAME = "instruction-data-with-response.json"
RESPONSES_ENV = "COURSE_RESPONSES"


class ResponseSet(NamedTuple):
    """Entries with model answers, plus how they were produced (empty for the chapter's file)."""

    entries: list[dict[str, Any]]
    metadata: dict[str, Any]


def entry_id(entry: Mapping[str, Any], response_key: str = RESPONSE_KEY) -> str:
    """Short hash of an entry's instruction, input, expected output and answer."""
    parts = [entry["instruction"], entry.get("input", ""), entry["output"], entry[response_key]]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def published_responses_path(
    *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = False
) -> Path:
    """The chapter's published response file: $COURSE_RESPONSES, else a verified download.

    The download goes to `cache_dir` (default: the repository's `data/cache/`), is checked
    against PUBLISHED_RESPONSES_SHA256 and reused on later calls. Read it with
    `load_responses(published_responses_path())`.
    """
    override = os.environ.get(RESPONSES_ENV, "").strip()
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"${RESPONSES_ENV} names no file: {path}")
        return path
    dest = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / (
        PUBLISHED_RESPONSES_FILENAME
    )
    try:
        return download_file(
            PUBLISHED_RESPONSES_URL, dest, PUBLISHED_RESPONSES_SHA256, progress=progress
        )
    except DownloadError as exc:
        raise type(exc)(
            f"{exc} (offline? set ${RESPONSES_ENV} to a local copy of "
            f"{PUBLISHED_RESPONSES_FILENAME})"
        ) from exc


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
    except UnicodeDecodeError:
        raise ValueError(f"{path.name}: not UTF-8 text") from None
    if isinstance(doc, list):
        entries, metadata = doc, {}
    elif isinstance(doc, dict) and isinstance(doc.get("entries"), list):
        entries, metadata = doc["entries"], dict(doc.get("metadata") or {})
    else:
        raise ValueError(f"{path.name}: expected a list of entries or {{'metadata', 'entries'}}")
    _validate_entries(entries, response_key, source=path.name)
    return ResponseSet(entries, metadata)


def _validate_entries(entries: list[Any], response_key: str, *, source: str) -> None:
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
