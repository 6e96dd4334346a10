"""Reading answers by hand: a side-by-side table, a rating widget that saves as you go, agreement.

Ratings live in a JSON or JSONL file (chosen by the suffix). Every rating rewrites that file
atomically, so closing the notebook at any moment loses nothing, and reopening the tool
resumes at the first unrated answer. Several reviewers' files merge into one table with
percent agreement and Cohen's kappa.
"""

from __future__ import annotations

import hashlib
import html
import json
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

from helpers.atomic import atomic_write_text
from helpers.evaluate import RESPONSE_KEY, normalize_text

SCALES: dict[str, tuple[str, ...]] = {
    "3-level": ("correct", "partly", "wrong"),
    "1-5": ("1", "2", "3", "4", "5"),
}


def _frame(entries: Sequence[Mapping[str, Any]], response_key: str) -> pd.DataFrame:
    rows = [
        {
            "instruction": e["instruction"],
            "input": e.get("input", ""),
            "expected": e["output"],
            "response": e[response_key],
            "differs": normalize_text(e[response_key]) != normalize_text(e["output"]),
        }
        for e in entries
    ]
    return pd.DataFrame(rows)


def review_frame(
    entries: Sequence[Mapping[str, Any]],
    *,
    response_key: str = RESPONSE_KEY,
    only_differs: bool = False,
    limit: int | None = None,
) -> pd.DataFrame:
    """Instruction, input, expected and model response per entry, plus a 'differs' flag."""
    df = _frame(entries, response_key)
    if only_differs:
        df = df[df["differs"]]
    return df.head(limit) if limit else df


def review_table(
    entries: Sequence[Mapping[str, Any]],
    *,
    response_key: str = RESPONSE_KEY,
    only_differs: bool = False,
    limit: int | None = 10,
) -> Styler:
    """Styled side-by-side table; answers that differ from the expected output are tinted."""
    df = review_frame(entries, response_key=response_key, only_differs=only_differs, limit=limit)

    def tint(row: pd.Series) -> list[str]:
        color = "background-color: #fff3cd" if row["differs"] else "background-color: #e8f5e9"
        return [color if c == "response" else "" for c in row.index]

    return (
        df.style.apply(tint, axis=1)
        .set_properties(
            **{"text-align": "left", "white-space": "pre-wrap", "vertical-align": "top"}
        )
        .set_table_styles([{"selector": "th", "props": [("text-align", "left")]}])
    )


def format_review_text(
    entries: Sequence[Mapping[str, Any]],
    *,
    response_key: str = RESPONSE_KEY,
    only_differs: bool = False,
    limit: int | None = 10,
    width: int = 88,
) -> str:
    """The review table as plain text (the fallback where widgets/HTML do not render)."""
    df = review_frame(entries, response_key=response_key, only_differs=only_differs, limit=limit)
    blocks = []
    for idx, row in df.iterrows():
        lines = [f"[{idx}] {'DIFFERS' if row['differs'] else 'matches'}"]
        for label in ("instruction", "input", "expected", "response"):
            if row[label]:
                wrapped = textwrap.fill(row[label], width, subsequent_indent=" " * 13)
                lines.append(f"  {label:>10}: {wrapped}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def print_review_table(entries: Sequence[Mapping[str, Any]], **kw: Any) -> None:
    """Print `format_review_text` (same arguments)."""
    print(format_review_text(entries, **kw))


def entry_id(entry: Mapping[str, Any], response_key: str = RESPONSE_KEY) -> str:
    """Short hash of an entry and its answer, so ratings cannot attach to a different answer."""
    parts = [entry["instruction"], entry.get("input", ""), entry["output"], entry[response_key]]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


class RatingStore:
    """Ratings of one reviewer in a .json or .jsonl file; each `rate` saves atomically."""

    def __init__(
        self,
        path: str | Path,
        *,
        reviewer: str = "reviewer",
        scale: str = "3-level",
        entries: Sequence[Mapping[str, Any]] | None = None,
        response_key: str = RESPONSE_KEY,
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"Unknown scale {scale!r}; valid: {', '.join(SCALES)}")
        self.path, self.reviewer, self.scale = Path(path), reviewer, scale
        self.ratings: dict[int, dict] = {}
        # Ratings given to a different answer at the same index (responses regenerated since):
        # they do not count as done, but stay in the file until that entry is rated again.
        self.stale: dict[int, dict] = {}
        keys = [entry_id(e, response_key) for e in entries] if entries is not None else None
        if self.path.is_file():
            for rec in _read_ratings(self.path):
                i = int(rec["index"])
                if (
                    keys is not None
                    and rec.get("entry_id")
                    and (i >= len(keys) or rec["entry_id"] != keys[i])
                ):
                    self.stale[i] = rec
                else:
                    self.ratings[i] = rec
                self.reviewer = rec.get("reviewer", self.reviewer)
        if self.stale:
            warnings.warn(
                f"{self.path.name}: {len(self.stale)} rating(s) belong to different answers "
                "(responses changed since); those entries count as unrated",
                stacklevel=2,
            )

    def rate(self, index: int, rating: str | int, note: str = "", *, entry_key: str = "") -> dict:
        """Record (or replace) the rating of entry `index` and save the file."""
        rating = str(rating)
        if rating not in SCALES[self.scale]:
            raise ValueError(
                f"Rating {rating!r} not on the {self.scale} scale {SCALES[self.scale]}"
            )
        rec = {
            "index": int(index),
            "entry_id": entry_key,
            "rating": rating,
            "note": note,
            "reviewer": self.reviewer,
            "scale": self.scale,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.ratings[int(index)] = rec
        self.stale.pop(int(index), None)
        self.save()
        return rec

    def save(self) -> None:
        """Rewrite the whole file atomically (small: one line per rated answer)."""
        kept = {**self.stale, **self.ratings}
        recs = [kept[i] for i in sorted(kept)]
        if self.path.suffix == ".jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        else:
            text = json.dumps(
                {"reviewer": self.reviewer, "ratings": recs}, indent=1, ensure_ascii=False
            )
        atomic_write_text(self.path, text)

    def first_unrated(self, n: int) -> int:
        """Index of the first of `n` entries without a rating (n when all are rated)."""
        return next((i for i in range(n) if i not in self.ratings), n)


def _read_ratings(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            doc = json.loads(text)
            recs = doc["ratings"] if isinstance(doc, dict) else doc
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path.name}: not a ratings file ({exc})") from None
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict) or "index" not in rec or "rating" not in rec:
            raise ValueError(f"{path.name}: record {i} lacks 'index' or 'rating'")
    return recs


class ReviewTool:
    """ipywidgets tool: show one answer, rate it with a note, save, move on. `.widget` displays it."""

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        path: str | Path,
        *,
        reviewer: str = "reviewer",
        scale: str = "3-level",
        response_key: str = RESPONSE_KEY,
    ) -> None:
        import ipywidgets as w

        self.entries, self.response_key = list(entries), response_key
        self.store = RatingStore(
            path, reviewer=reviewer, scale=scale, entries=self.entries, response_key=response_key
        )
        self.index = self.store.first_unrated(len(self.entries))  # resume where we stopped
        self.view = w.HTML()
        self.status = w.Label()
        self.rating = w.ToggleButtons(options=SCALES[scale], value=None, description="Rating")
        self.note = w.Textarea(placeholder="note (optional)", layout=w.Layout(width="100%"))
        self.buttons = {
            "prev": w.Button(description="◀ Previous"),
            "save": w.Button(description="Save & next", button_style="primary"),
            "next": w.Button(description="Skip ▶"),
        }
        self.buttons["prev"].on_click(lambda _: self.go(self.index - 1))
        self.buttons["next"].on_click(lambda _: self.go(self.index + 1))
        self.buttons["save"].on_click(lambda _: self.save_and_next())
        controls = w.HBox(list(self.buttons.values()))
        self.widget = w.VBox([self.status, self.view, self.rating, self.note, controls])
        self.go(self.index)

    def go(self, index: int) -> None:
        """Show entry `index` (clamped) with any rating it already has."""
        self.index = max(0, min(index, len(self.entries)))
        done = len(self.store.ratings)
        self.status.value = f"{done}/{len(self.entries)} rated · reviewer {self.store.reviewer}"
        if self.index == len(self.entries):
            self.view.value = "<b>All answers reviewed.</b>"
            return
        e = self.entries[self.index]
        rows = [
            ("Instruction", e["instruction"]),
            ("Input", e.get("input", "")),
            ("Expected", e["output"]),
            ("Model response", e[self.response_key]),
        ]
        cells = "".join(
            f"<tr><th style='text-align:left;vertical-align:top'>{k}</th>"
            f"<td style='white-space:pre-wrap'>{html.escape(v)}</td></tr>"
            for k, v in rows
            if v
        )
        self.view.value = f"<b>Entry {self.index}</b><table>{cells}</table>"
        old = self.store.ratings.get(self.index)
        self.rating.value = old["rating"] if old else None
        self.note.value = old["note"] if old else ""

    def save_and_next(self) -> None:
        """Save the selected rating and note for the current entry, then show the next unrated."""
        if self.index >= len(self.entries) or self.rating.value is None:
            self.status.value = "Pick a rating first."
            return
        e = self.entries[self.index]
        self.store.rate(
            self.index, self.rating.value, self.note.value, entry_key=entry_id(e, self.response_key)
        )
        nxt = next(
            (i for i in range(self.index + 1, len(self.entries)) if i not in self.store.ratings),
            self.store.first_unrated(len(self.entries)),
        )
        self.go(nxt)


def review_in_terminal(
    entries: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    reviewer: str = "reviewer",
    scale: str = "3-level",
    response_key: str = RESPONSE_KEY,
    input_fn: Callable[[str], str] = input,
    limit: int | None = None,
) -> RatingStore:
    """Plain-text fallback of the widget: prompts for ratings; an empty answer stops."""
    store = RatingStore(
        path, reviewer=reviewer, scale=scale, entries=entries, response_key=response_key
    )
    options = SCALES[scale]
    end = len(entries) if limit is None else min(len(entries), limit)
    for i in range(store.first_unrated(end), end):
        if i in store.ratings:
            continue
        print(
            format_review_text([entries[i]], response_key=response_key, limit=None).replace(
                "[0]", f"[{i}]", 1
            )
        )
        answer = input_fn(f"rating {'/'.join(options)} (empty to stop): ").strip()
        if not answer:
            break
        note = input_fn("note: ").strip()
        store.rate(i, answer, note, entry_key=entry_id(entries[i], response_key))
    return store


def merge_reviews(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One column per reviewer, one row per entry index, cells are ratings (NaN if unrated)."""
    columns = {}
    for p in paths:
        recs = _read_ratings(Path(p))
        name = next((r.get("reviewer") for r in recs if r.get("reviewer")), Path(p).stem)
        if name in columns:
            name = f"{name} ({Path(p).stem})"
        columns[name] = pd.Series({int(r["index"]): str(r["rating"]) for r in recs})
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
