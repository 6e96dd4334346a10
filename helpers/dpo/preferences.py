"""Preference pairs for DPO: load and validate them, download the book's file, save them.

Each entry is an instruction entry (`instruction`, `input`, `output`) plus a `chosen` and a
`rejected` answer. `load_preferences` reads a JSON / JSON Lines file, $COURSE_PREFERENCES or
the book's checksum-verified download, and names the file, entry and field of any problem.
Making new pairs (`generate_preferences`, `REWRITE_PROMPT`, the command line
`python -m helpers.dpo.generate_pairs`) lives in helpers.dpo.generate_pairs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from helpers.atomic import atomic_write_text
from helpers.data import (
    DatasetError,
    DownloadError,
    default_cache_dir,
    download_file,
    load_instruction_data,
    sha256_of,
    validate_entries,
)

PREFERENCES_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"
)
PREFERENCES_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
PREFERENCES_ENV = "COURSE_PREFERENCES"
PREFERENCES_FILENAME = "instruction-data-with-preference.json"
PAIR_KEYS = ("chosen", "rejected")
# Entries of the book's file whose chosen and rejected answers are the same. They are kept when
# that file is loaded, so its splits, batches and losses stay the book's; any other file with
# such pairs is refused.
BOOK_IDENTICAL_PAIRS = (122, 226, 400, 566, 628, 676)


class PreferenceDataError(DatasetError):
    """Preference data that cannot be used; the message names the file, entry and field."""


class MissingPreferenceError(PreferenceDataError):
    """An entry lacks its `chosen` or `rejected` answer."""


class EmptyPreferenceError(PreferenceDataError):
    """An entry's `chosen` or `rejected` answer is empty (or only whitespace)."""


class IdenticalPreferenceError(PreferenceDataError):
    """An entry's `chosen` and `rejected` answers are the same: DPO learns nothing from it."""


def validate_preferences(
    entries: Sequence[Any], source: str = "<data>", *, allow_identical: bool = False
) -> list[dict[str, Any]]:
    """Check the instruction fields and non-empty, different string `chosen`/`rejected` answers.

    A pair whose two answers are the same (up to surrounding whitespace) is refused unless
    `allow_identical`: its DPO loss is log 2 with zero gradient, whatever the model.
    """
    entries = validate_entries(entries, source)
    for index, entry in enumerate(entries):
        for key in PAIR_KEYS:
            if key not in entry:
                raise MissingPreferenceError(
                    f"{source}: entry {index} is missing the field {key!r} "
                    f"(preference data needs {' and '.join(PAIR_KEYS)})"
                )
            value = entry[key]
            if not isinstance(value, str):
                raise PreferenceDataError(
                    f"{source}: entry {index}, field {key!r} must be a string, "
                    f"got {type(value).__name__} ({value!r:.40})"
                )
            if not value.strip():
                raise EmptyPreferenceError(f"{source}: entry {index}, field {key!r} is empty")
        if not allow_identical and entry["chosen"].strip() == entry["rejected"].strip():
            raise IdenticalPreferenceError(
                f"{source}: entry {index}: 'chosen' and 'rejected' are the same answer, so DPO "
                "learns nothing from it (loss log 2, zero gradient); fix or remove the entry"
            )
    return entries


def load_preferences(
    path: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Preference pairs from `path`, else $COURSE_PREFERENCES, else the book's verified file."""
    if path is None and os.environ.get(PREFERENCES_ENV, "").strip():
        path = os.environ[PREFERENCES_ENV].strip()
    if path is None:
        dest = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        try:
            path = download_file(
                PREFERENCES_URL, dest / PREFERENCES_FILENAME, PREFERENCES_SHA256, progress=False
            )
        except DownloadError as exc:
            raise type(exc)(
                f"{exc} (offline? set ${PREFERENCES_ENV} to a local copy of "
                f"{PREFERENCES_FILENAME}, or make pairs with generate_preferences)"
            ) from exc
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(
            f"{path}: no such preference file (from the argument or ${PREFERENCES_ENV})"
        )
    # The instruction loader parses JSON / JSON Lines and checks the instruction fields.
    books = sha256_of(path) == PREFERENCES_SHA256  # keeps BOOK_IDENTICAL_PAIRS, as the book does
    return validate_preferences(load_instruction_data(path), str(path), allow_identical=books)


def save_preferences(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write preference entries as an indented JSON list, atomically."""
    validate_preferences(list(entries), str(path))
    return atomic_write_text(path, json.dumps(list(entries), indent=4, ensure_ascii=False) + "\n")


# --- the book's pairs teach tone: words that mark it, to measure it in a model's answers ---

# Among the book's 1,100 pairs, the frequent words that occur only in the chosen (polite)
# answer or only in the rejected (impolite) one. The dataset's own outputs, which
# fine-tuning imitates, contain almost none (under 1%); 18% of the chosen answers have a polite
# word, 30% of the rejected ones an impolite word (tests/dpo/test_preferences.py).
POLITE_WORDS = ("indeed", "happy", "i'd", "kindly", "glad", "please", "certainly", "thank")
IMPOLITE_WORDS = ("obviously", "duh", "freaking", "anyway", "seriously", "yourself", "look")
_STYLE_WORD = re.compile(r"[a-z']+")


def style_shares(answers: Sequence[str]) -> dict[str, float]:
    """Share of `answers` with a POLITE_WORDS word ("polite") and with an IMPOLITE_WORDS one."""
    if not answers:
        raise ValueError("style_shares: no answers")
    said = [set(_STYLE_WORD.findall(a.lower())) for a in answers]
    return {
        "polite": sum(bool(s.intersection(POLITE_WORDS)) for s in said) / len(said),
        "impolite": sum(bool(s.intersection(IMPOLITE_WORDS)) for s in said) / len(said),
    }
