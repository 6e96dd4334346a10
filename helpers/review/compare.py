"""Reading answers by hand: a side-by-side table, a rating widget, a terminal fallback.

The widget (`ReviewTool`) and `review_in_terminal` save every rating at once through
`helpers.review.ratings.RatingStore`, and reopening either resumes at the first unrated answer.
Comparing reviewers (merge, agreement, kappa) is in `helpers.review.ratings`.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import pandas as pd

from helpers.review.metrics import normalize_text
from helpers.review.ratings import SCALES, RatingStore
from helpers.review.responses import RESPONSE_KEY

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler


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


class ReviewTool:
    """ipywidgets tool: show one answer, rate it with a note, save, move on.

    Display the tool itself (or `.widget`). Beside the live widget it carries a static view of
    the same entry, rating and progress (`text/html`, `text/plain`), which is what nbconvert,
    GitHub and nbviewer show where no widget front end runs.
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        path: str | Path,
        *,
        reviewer: str | None = None,
        scale: str = "3-level",
        response_key: str = RESPONSE_KEY,
    ) -> None:
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
        cells = "".join(
            f"<tr><th style='text-align:left;vertical-align:top'>{k}</th>"
            f"<td style='white-space:pre-wrap'>{html.escape(v)}</td></tr>"
            for k, v in self._entry_rows()
        )
        self.view.value = f"<b>Entry {self.index}</b><table>{cells}</table>"
        old = self.store.ratings.get(self.index)
        self.rating.value = old["rating"] if old else None
        self.note.value = old["note"] if old else ""

    def _entry_rows(self) -> list[tuple[str, str]]:
        e = self.entries[self.index]
        rows = [
            ("Instruction", e["instruction"]),
            ("Input", e.get("input", "")),
            ("Expected", e["output"]),
            ("Model response", e[self.response_key]),
        ]
        return [(label, value) for label, value in rows if value]

    def _rating_line(self) -> str:
        choices = " / ".join(self.rating.options)
        old = self.store.ratings.get(self.index)
        if old is None:
            return f"Rating ({choices}): not rated yet"
        note = f" ({old['note']})" if old.get("note") else ""
        return f"Rating ({choices}): {old['rating']}{note}"

    def text(self) -> str:
        """The tool's current state as plain text: progress, the entry, its rating."""
        lines = [self.status.value]
        if self.index == len(self.entries):
            return "\n".join([*lines, "All answers reviewed."])
        lines.append(f"Entry {self.index}")
        for label, value in self._entry_rows():
            wrapped = textwrap.fill(value, 88, subsequent_indent=" " * 17)
            lines.append(f"  {label:>14}: {wrapped}")
        lines.append(self._rating_line())
        return "\n".join(lines)

    def html(self) -> str:
        """The tool's current state as static HTML (no controls): what the widget shows."""
        rating = (
            "" if self.index == len(self.entries) else f"<p>{html.escape(self._rating_line())}</p>"
        )
        return (
            f"<div><p>{html.escape(self.status.value)}</p>{self.view.value}{rating}"
            "<p><i>Static view: the rating buttons work in Jupyter with ipywidgets.</i></p></div>"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        # Without a widget front end (nbconvert, GitHub) these show instead of the
        # widget's raw repr, VBox(children=(Label(...
        bundle["text/plain"] = self.text()
        bundle["text/html"] = self.html()
        return bundle

    def save_and_next(self) -> None:
        """Save the selected rating and note for the current entry, then show the next unrated."""
        if self.index >= len(self.entries) or self.rating.value is None:
            self.status.value = "Pick a rating first."
            return
        self.store.rate(self.index, self.rating.value, self.note.value)
        nxt = next(
            (i for i in range(self.index + 1, len(self.entries)) if i not in self.store.ratings),
            self.store.first_unrated(len(self.entries)),
        )
        self.go(nxt)


def review_in_terminal(
    entries: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    reviewer: str | None = None,
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
        answer = _ask_rating(options, input_fn)
        if not answer:
            break
        store.rate(i, answer, input_fn("note: ").strip())
    return store


def _ask_rating(options: Sequence[str], input_fn: Callable[[str], str]) -> str:
    """A rating from `options`, asked again after a typo; empty means stop."""
    while True:
        answer = input_fn(f"rating {'/'.join(options)} (empty to stop): ").strip()
        if not answer or answer in options:
            return answer
        print(f"{answer!r} is not one of {', '.join(options)}")
