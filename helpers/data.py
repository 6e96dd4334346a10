"""The chapter's instruction dataset: verified download, JSON/JSONL loading, validation, split."""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from helpers.atomic import atomic_path

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data.json"
)
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
DATASET_ENV = "COURSE_DATASET"
DATA_FILENAME = "instruction-data.json"
REQUIRED_KEYS = ("instruction", "input", "output")
# Fields that must hold real text: an empty instruction or output teaches nothing.
NON_EMPTY_KEYS = ("instruction", "output")

_CHUNK = 1 << 16


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, entry and field."""


class DownloadError(OSError):
    """A download that failed (network, HTTP status); the message names the URL."""


class ChecksumError(DownloadError):
    """Downloaded bytes whose sha256 is not the expected one; nothing is left on disk."""


def default_cache_dir() -> Path:
    """Where downloads go: the repository's git-ignored `data/cache/` (else ~/.cache)."""
    repo_data = Path(__file__).resolve().parents[1] / "data"
    if repo_data.is_dir():
        return repo_data / "cache"
    # Installed without the repository (e.g. a wheel): use the user's cache folder.
    return Path.home() / ".cache" / "instruction-finetuning-course"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str, dest: str | os.PathLike[str], sha256: str | None, *, progress: bool = True
) -> Path:
    """Download `url` to `dest` atomically, verifying sha256; reuse `dest` if already valid."""
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    # Written to a temp file and renamed into place only once the digest is right, so an
    # interrupted or corrupt download never sits where a later run would trust it.
    with atomic_path(dest, suffix=".part") as tmp:
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = None
                if progress:
                    from helpers.widgets.progress import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name)
                try:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"Could not download {url}: {exc}") from exc
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {sha256}, got {actual}; nothing was saved"
            )
    return dest


def _parse_jsonl(text: str, source: str) -> list[Any]:
    entries = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not entries
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{source}: invalid JSON on line {line_no} (entry {len(entries)}): {exc.msg}"
            ) from None
        except RecursionError:
            raise DatasetError(f"{source}: line {line_no} is nested too deeply") from None
    return entries


def _is_jsonl(text: str) -> bool:
    """Detect: a JSON document is one list; JSON Lines starts with an object per line."""
    stripped = text.strip()
    if not (stripped.startswith("{") and len(stripped.splitlines()) > 1):
        return False
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return True
    return False  # one pretty-printed object, not JSON Lines


def _parse(text: str, source: str, jsonl: bool | None) -> list[Any]:
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError(f"{source}: the file is empty (no entries)")
    if jsonl is None:
        jsonl = _is_jsonl(text)
    if jsonl:
        return _parse_jsonl(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:  # e.g. 100,000 nested brackets: not a dataset
        raise DatasetError(f"{source}: the JSON is nested too deeply to be a dataset") from None
    if isinstance(data, dict) and stripped.rstrip().count("\n") == 0:
        return [data]  # a single-line JSON Lines file holding one entry
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: expected a JSON list of entries (or JSON Lines), got {type(data).__name__}"
        )
    return data


def validate_entries(entries: Sequence[Any], source: str = "<data>") -> list[dict[str, Any]]:
    """Check every entry has string `instruction`/`input`/`output`, non-empty where required."""
    if len(entries) == 0:
        raise DatasetError(f"{source}: the dataset has no entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{source}: entry {index} must be an object with keys "
                f"{', '.join(REQUIRED_KEYS)}; got {type(entry).__name__}"
            )
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise DatasetError(f"{source}: entry {index} is missing the field {key!r}")
            value = entry[key]
            if not isinstance(value, str):
                raise DatasetError(
                    f"{source}: entry {index}, field {key!r} must be a string, "
                    f"got {type(value).__name__} ({value!r:.40})"
                )
            if key in NON_EMPTY_KEYS and not value.strip():
                raise DatasetError(f"{source}: entry {index}, field {key!r} is empty")
    return list(entries)


def load_instruction_data(
    path: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """The chapter's entries from `path`, else $COURSE_DATASET, else a verified download."""
    if path is None and os.environ.get(DATASET_ENV, "").strip():
        path = os.environ[DATASET_ENV].strip()
    if path is None:
        dest = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        try:
            path = download_file(DATA_URL, dest / DATA_FILENAME, DATA_SHA256, progress=False)
        except DownloadError as exc:
            raise type(exc)(
                f"{exc} (offline? set ${DATASET_ENV} to a local copy of {DATA_FILENAME})"
            ) from exc
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file (from the argument or ${DATASET_ENV})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not data
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    jsonl = True if path.suffix.lower() in (".jsonl", ".ndjson") else None
    return validate_entries(_parse(text, str(path), jsonl), str(path))


class DataSplits(NamedTuple):
    """The three portions of the dataset, in the chapter's order of use."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]


def split_data(
    data: Sequence[dict[str, Any]],
    train_frac: float = 0.85,
    test_frac: float = 0.10,
    *,
    shuffle: bool = False,
    seed: int = 123,
) -> DataSplits:
    """The chapter's split: first 85% train, next 10% test, the rest validation."""
    for name, frac in (("train_frac", train_frac), ("test_frac", test_frac)):
        if not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"split_data: {name} must be a number in [0, 1], got {frac!r}")
    if train_frac + test_frac > 1.0 + 1e-9:
        raise ValueError(
            f"split_data: train_frac + test_frac must be <= 1, got {train_frac} + {test_frac}"
        )
    items = list(data)
    if shuffle:
        # A private RNG: shuffling here must not disturb the learner's global random state.
        random.Random(seed).shuffle(items)
    # int() truncation as in the chapter: 1,100 entries -> 935 train, 110 test, 55 validation.
    train_portion = int(len(items) * train_frac)
    test_portion = int(len(items) * test_frac)
    train = items[:train_portion]
    test = items[train_portion : train_portion + test_portion]
    validation = items[train_portion + test_portion :]
    return DataSplits(train=train, validation=validation, test=test)
