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
from helpers.widgets.live import PlainView, note_output, show, widget_output

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


REVIEW_NOTE = (
    "the rating buttons respond once you run this cell; until then the entry below shows the "
    "state saved with the notebook."
)
# The entry's table fills the output area's width and wraps long text, so it never overflows.
ENTRY_TABLE_STYLE = "width:100%;table-layout:fixed;border-collapse:collapse;margin:0"
LABEL_CELL = "width:9.5em;text-align:left;vertical-align:top;padding:2px 8px 2px 0"
VALUE_CELL = "text-align:left;vertical-align:top;white-space:pre-wrap;overflow-wrap:anywhere"


class ReviewTool:
    """ipywidgets tool: show one answer, rate it with a note, save, move on.

    Displayed, it is three outputs (see `helpers.widgets.live`): a one-line note, the entry
    with its rating and progress as plain HTML and text (redrawn by the buttons while the
    kernel runs, and shown as saved by nbconvert, GitHub and nbviewer), and the controls.
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
        self.view = PlainView(lambda: (self.html(), self.text()))
        self.status = w.Label()  # what the last click did ("Pick a rating first.")
        self.rating = w.ToggleButtons(options=SCALES[scale], value=None, description="Rating")
        # width "auto" fills the column less the widget's margins ("100%" overflows by them).
        self.note = w.Textarea(placeholder="note (optional)", layout=w.Layout(width="auto"))
        self.buttons = {
            "prev": w.Button(description="◀ Previous"),
            "save": w.Button(description="Save & next", button_style="primary"),
            "next": w.Button(description="Skip ▶"),
        }
        self.buttons["prev"].on_click(lambda _: self.go(self.index - 1))
        self.buttons["next"].on_click(lambda _: self.go(self.index + 1))
        self.buttons["save"].on_click(lambda _: self.save_and_next())
        # The row of buttons wraps in a narrow output area instead of overflowing it.
        controls = w.HBox(list(self.buttons.values()), layout=w.Layout(flex_flow="row wrap"))
        self.widget = w.VBox([self.rating, self.note, controls, self.status])
        self.go(self.index)

    def go(self, index: int) -> None:
        """Show entry `index` (clamped) with any rating it already has."""
        self.index = max(0, min(index, len(self.entries)))
        self.status.value = ""
        if self.index < len(self.entries):
            old = self.store.ratings.get(self.index)
            self.rating.value = old["rating"] if old else None
            self.note.value = old["note"] if old else ""
        self.view.refresh()

    def progress(self) -> str:
        """One line: how many answers are rated, and by whom."""
        return (
            f"{len(self.store.ratings)}/{len(self.entries)} rated · reviewer {self.store.reviewer}"
        )

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
        if self.index == len(self.entries):
            return "All answers reviewed."
        choices = " / ".join(self.rating.options)
        old = self.store.ratings.get(self.index)
        if old is None:
            return f"Rating ({choices}): not rated yet"
        note = f" ({old['note']})" if old.get("note") else ""
        return f"Rating ({choices}): {old['rating']}{note}"

    def text(self) -> str:
        """The tool's current state as plain text: progress, the entry, its rating."""
        lines = [self.progress()]
        if self.index < len(self.entries):
            lines.append(f"Entry {self.index}")
            for label, value in self._entry_rows():
                wrapped = textwrap.fill(value, 88, subsequent_indent=" " * 17)
                lines.append(f"  {label:>14}: {wrapped}")
        lines.append(self._rating_line())
        return "\n".join(lines)

    def html(self) -> str:
        """The tool's current state as static HTML: progress, the entry, its rating."""
        parts = [f"<p style='margin:0'>{html.escape(self.progress())}</p>"]
        if self.index < len(self.entries):
            cells = "".join(
                f"<tr><th style='{LABEL_CELL}'>{k}</th>"
                f"<td style='{VALUE_CELL}'>{html.escape(v)}</td></tr>"
                for k, v in self._entry_rows()
            )
            parts.append(f"<p style='margin:4px 0'><b>Entry {self.index}</b></p>")
            parts.append(f"<table style='{ENTRY_TABLE_STYLE}'>{cells}</table>")
        parts.append(f"<p style='margin:4px 0'>{html.escape(self._rating_line())}</p>")
        return f"<div>{''.join(parts)}</div>"

    def _ipython_display_(self) -> None:
        show(note_output(REVIEW_NOTE), self.view, widget_output(self.widget, self._rating_line()))

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
