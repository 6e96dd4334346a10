"""Human ratings on disk: saved as you go, safe to share between tools, compared across reviewers.

Ratings live in a JSON or JSONL file (chosen by the suffix), one record per rated answer
with its index, rating, note, reviewer, scale and the answer's `entry_id`. Every rating is
saved at once: under a lock on a hidden sidecar file, the file is read again, the new
rating merged in and the whole file replaced atomically. So closing the notebook at any
moment loses nothing, and two tools rating into one file (two kernels, or the widget and
the terminal review) lose none of each other's ratings. Several reviewers' files merge into
one table with percent agreement and Cohen's kappa.
"""

from __future__ import annotations

import glob
import json
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.atomic import atomic_write_text
from helpers.review.responses import RESPONSE_KEY, entry_id

if sys.platform != "win32":
    import fcntl

SCALES: dict[str, tuple[str, ...]] = {
    "3-level": ("correct", "partly", "wrong"),
    "1-5": ("1", "2", "3", "4", "5"),
}


@contextmanager
def _file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the hidden `.<name>.lock` beside `path` (no-op on Windows).

    Yields whether this process holds it: False on Windows, or with `wait=False` when
    another process holds it now.
    """
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if sys.platform == "win32":  # no flock: saves still merge, in a narrow race window
            yield False
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_dead_temps(path: Path) -> None:
    """Remove the temp files that writers killed mid-save (kill -9) left beside `path`.

    Call only under the file lock: every save writes its temp (helpers.atomic's
    `.<name>.*.tmp`) while holding the lock, so a temp seen by the lock's holder belongs to
    a writer that died; the lock itself is released by the system when a process dies.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def read_ratings(path: str | Path, scale: str | None = None) -> list[dict[str, Any]]:
    """The records of a ratings file, each with its reviewer; errors name the file and record.

    Ratings are checked against each record's own scale, else `scale` when given.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            recs, reviewer = [json.loads(line) for line in text.splitlines() if line.strip()], None
        else:
            recs, reviewer = _json_records(json.loads(text), path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not a ratings file ({exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path.name}: not a ratings file (not UTF-8 text)") from None
    for i, rec in enumerate(recs):
        _check_record(rec, f"{path.name}: record {i}", scale)
        rec["index"], rec["rating"] = int(rec["index"]), str(rec["rating"])
        rec["reviewer"] = rec.get("reviewer") or reviewer or path.stem
    return recs


def _json_records(doc: Any, path: Path) -> tuple[list[Any], str | None]:
    if isinstance(doc, list):
        return doc, None
    if not isinstance(doc, dict) or "ratings" not in doc:
        raise ValueError(
            f"{path.name}: not a ratings file (expected {{'ratings': [...]}} or a list,"
            f" found {type(doc).__name__})"
        )
    if not isinstance(doc["ratings"], list):
        raise ValueError(
            f"{path.name}: field 'ratings' must be a list, found {type(doc['ratings']).__name__}"
        )
    return doc["ratings"], doc.get("reviewer")


def _check_record(rec: Any, where: str, scale: str | None) -> None:
    if not isinstance(rec, dict) or "index" not in rec or "rating" not in rec:
        raise ValueError(f"{where} lacks 'index' or 'rating'")
    index = rec["index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}: index {index!r} must be a whole number >= 0")
    own = rec.get("scale") or scale
    if scale is not None and own != scale:
        raise ValueError(f"{where}: rated on the {own!r} scale, not {scale!r} (pass scale={own!r})")
    if own is not None:
        _check_rating(rec["rating"], own, where)


def _check_rating(rating: Any, scale: str, where: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"{where}: unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    if isinstance(rating, bool) or str(rating) not in SCALES[scale]:
        raise ValueError(f"{where}: rating {rating!r} not on the {scale} scale {SCALES[scale]}")


def _write_ratings(path: Path, recs: Iterable[dict[str, Any]]) -> None:
    ordered = sorted(recs, key=lambda r: (r["index"], r["reviewer"]))
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    else:
        names = sorted({r["reviewer"] for r in ordered})
        head = {"reviewer": names[0]} if len(names) == 1 else {"reviewers": names}
        text = json.dumps({**head, "ratings": ordered}, indent=1, ensure_ascii=False)
    atomic_write_text(path, text)


class RatingStore:
    """One reviewer's ratings in a .json or .jsonl file (which may hold other reviewers' too).

    `reviewer=None` takes the reviewer of the file's ratings when they all have one. Each
    `rate` merges into the file under a lock, so concurrent stores on one file lose nothing.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        reviewer: str | None = None,
        scale: str = "3-level",
        entries: Sequence[Mapping[str, Any]] | None = None,
        response_key: str = RESPONSE_KEY,
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"Unknown scale {scale!r}; valid: {', '.join(SCALES)}")
        self.path, self.scale = Path(path), scale
        self.keys = [entry_id(e, response_key) for e in entries] if entries is not None else None
        if self.path.parent.is_dir():
            # Without waiting: a live writer holding the lock keeps its temp file.
            with _file_lock(self.path, wait=False) as locked:
                if locked:
                    _remove_dead_temps(self.path)
        recs = read_ratings(self.path, scale) if self.path.is_file() else []
        names = {r["reviewer"] for r in recs}
        self.reviewer = reviewer or (names.pop() if len(names) == 1 else "reviewer")
        self.ratings: dict[int, dict[str, Any]] = {}
        # Ratings given to a different answer at the same index (responses regenerated since):
        # they do not count as done, but stay in the file until that entry is rated again.
        self.stale: dict[int, dict[str, Any]] = {}
        self._records: dict[tuple[str, int], dict[str, Any]] = {}
        self._load(recs)
        if self.stale:
            warnings.warn(
                f"{self.path.name}: {len(self.stale)} rating(s) belong to different answers "
                "(responses changed since); those entries count as unrated",
                stacklevel=2,
            )

    def _load(self, recs: Iterable[dict[str, Any]]) -> None:
        self._records = {(r["reviewer"], r["index"]): r for r in recs}
        self.ratings, self.stale = {}, {}
        for (name, i), rec in sorted(self._records.items()):
            if name != self.reviewer:
                continue
            (self.stale if self._is_stale(i, rec) else self.ratings)[i] = rec

    def _is_stale(self, index: int, rec: Mapping[str, Any]) -> bool:
        """True for a rating given to another answer than the one now at `index`."""
        if self.keys is None or not rec.get("entry_id"):
            return False
        return index >= len(self.keys) or rec["entry_id"] != self.keys[index]

    def rate(
        self, index: int, rating: str | int, note: str = "", *, entry_key: str = ""
    ) -> dict[str, Any]:
        """Record (or replace) this reviewer's rating of entry `index` and save the file.

        `entry_key` defaults to the entry's `entry_id` when the store knows the entries.
        """
        n = len(self.keys) if self.keys is not None else None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index {index!r} must be a whole number >= 0")
        if n is not None and index >= n:
            raise ValueError(f"index {index} is past the last of the {n} entries")
        _check_rating(rating, self.scale, "Rating")
        rec = {
            "index": index,
            "entry_id": entry_key or (self.keys[index] if self.keys is not None else ""),
            "rating": str(rating),
            "note": note,
            "reviewer": self.reviewer,
            "scale": self.scale,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.save(rec)
        return rec

    def save(self, *new: dict[str, Any]) -> None:
        """Merge `new` records and whatever the file gained since into the file, atomically.

        Under the file lock: ratings on disk win over this store's older copies of them,
        `new` ones win over both, nothing is dropped.
        """
        with _file_lock(self.path) as locked:
            if locked:
                _remove_dead_temps(self.path)
            disk = read_ratings(self.path) if self.path.is_file() else []
            merged = dict(self._records)
            merged.update({(r["reviewer"], r["index"]): r for r in (*disk, *new)})
            _write_ratings(self.path, merged.values())
        self._load(merged.values())

    def first_unrated(self, n: int) -> int:
        """Index of the first of `n` entries without a rating (n when all are rated)."""
        return next((i for i in range(n) if i not in self.ratings), n)


def merge_reviews(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One column per reviewer, one row per entry index, cells are ratings (NaN if unrated)."""
    columns: dict[str, pd.Series] = {}
    for p in paths:
        by_reviewer: dict[str, dict[int, str]] = {}
        for r in read_ratings(Path(p)):
            by_reviewer.setdefault(r["reviewer"], {})[r["index"]] = r["rating"]
        for name, ratings in by_reviewer.items():
            column = f"{name} ({Path(p).stem})" if name in columns else name
            columns[column] = pd.Series(ratings)
    df = pd.DataFrame(columns).sort_index()
    df.index.name = "index"
    return df


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels: agreement corrected for chance, 1 = perfect."""
    if len(a) != len(b) or not a:
        raise ValueError("cohen_kappa needs two equally long, non-empty rating lists")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    expected = sum((list(a).count(k) / n) * (list(b).count(k) / n) for k in labels)
    if expected == 1.0:  # both raters used one and the same label throughout
        return 1.0
    return (observed - expected) / (1.0 - expected)


def agreement(merged: pd.DataFrame) -> pd.DataFrame:
    """Pairwise percent agreement and Cohen's kappa over the entries both reviewers rated."""
    rows = []
    for r1, r2 in combinations(merged.columns, 2):
        both = merged[[r1, r2]].dropna()
        if both.empty:
            continue
        a, b = both[r1].tolist(), both[r2].tolist()
        rows.append(
            {
                "rater_1": r1,
                "rater_2": r2,
                "n_both": len(both),
                "percent_agreement": 100.0
                * sum(x == y for x, y in zip(a, b, strict=True))
                / len(a),
                "cohen_kappa": cohen_kappa(a, b),
            }
        )
    return pd.DataFrame(
        rows, columns=["rater_1", "rater_2", "n_both", "percent_agreement", "cohen_kappa"]
    )
