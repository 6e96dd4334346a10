"""Widgets that render everywhere: a one-line note, the live controls, and a plain view.

A notebook saved with its widget state (`make notebooks` saves it) exports to HTML with each
widget's view only: nbconvert picks `application/vnd.jupyter.widget-view+json` over the
`text/html` and `text/plain` in the same output, and that view is drawn by JavaScript fetched
from a CDN. Offline, and wherever no widget JavaScript runs, it is an empty `Out[N]:`. So the
course's widgets (the token inspector, the review tool) show their content (the table, the
entry) as a separate plain output, `text/html` plus `text/plain`, which the kernel rewrites
under a display id whenever a control moves, and which every front end shows as saved. A note
above says that the controls respond only once the cell has run; the widget output itself
carries a one-line text fallback (never the raw `VBox(children=...` repr) for where no saved
state exists.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NOTE_PREFIX = "Live widget:"
NOTE_STYLE = "margin:2px 0;color:#555;font-size:12px;font-style:italic"


class Output(NamedTuple):
    """One output of a cell: a raw MIME bundle, and its display id where it is updated later."""

    bundle: dict[str, Any]
    display_id: str | None = None


def note_output(text: str) -> Output:
    """The one-line "Live widget: ..." note shown above a widget."""
    line = f"{NOTE_PREFIX} {text}"
    body = f"<b>{NOTE_PREFIX}</b> {html.escape(text)}"
    return Output({"text/plain": line, "text/html": f"<p style='{NOTE_STYLE}'>{body}</p>"})


def widget_output(widget: Any, text: str) -> Output:
    """The widget's view, with `text` as its fallback where no widget front end runs."""
    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return Output({WIDGET_VIEW: view, "text/plain": text})


class PlainView:
    """A plain output (`text/html` + `text/plain`) shown under a display id, kept up to date.

    `render` returns (html, text) for the current state; `refresh` rewrites every place the
    view was shown, in the live kernel (nbconvert's execution keeps the last version).
    """

    def __init__(self, render: Callable[[], tuple[str, str]]) -> None:
        self.render = render
        self.display_id = uuid.uuid4().hex
        self.shown = False

    def output(self) -> Output:
        """The current view as an output under this view's display id."""
        page, text = self.render()
        return Output({"text/html": page, "text/plain": text}, self.display_id)

    def refresh(self) -> None:
        """Redraw the view wherever it was shown (nothing to do before it is shown)."""
        if self.shown:
            _publish(self.output(), update=True)


def _publish(output: Output, *, update: bool = False) -> None:
    from IPython.display import display as ipython_display

    if output.display_id is None:
        ipython_display(output.bundle, raw=True)
    else:
        ipython_display(output.bundle, raw=True, display_id=output.display_id, update=update)


def show(*parts: Output | PlainView) -> None:
    """Display each part as its own output, in order (for `_ipython_display_`)."""
    for part in parts:
        if isinstance(part, PlainView):
            _publish(part.output())
            part.shown = True
        else:
            _publish(part)
