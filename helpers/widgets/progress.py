"""Progress bars for the course: `from helpers.widgets.progress import tqdm`, a drop-in for tqdm.auto.

In a Jupyter kernel, `tqdm` is `NotebookTqdm`: tqdm's widget bar while it runs, which leaves a
plain output behind once it closes. tqdm's own notebook bar stores the text it had when it was
displayed, so a committed notebook shows "fine-tuning:   0%|          | 0/24" forever; and a
saved notebook's widget view is drawn only by JavaScript (nbconvert's HTML export picks it over
any text beside it: offline, and on GitHub, an empty `Out[N]:`). `NotebookTqdm` displays its
widget under a display id and, when the bar closes, replaces that output with the bar's final
state as plain `text/plain` ("fine-tuning: 100%|██████████| 24/24 [00:41<00:00, ...]") and
`text/html` (the same bar, drawn in HTML), then closes its widgets. The widget is the bar's only
output while it runs: nothing goes to stderr. `tqdm.write` prints to stdout unless told
otherwise.

Anywhere else (a terminal, scripts, the tests) `tqdm` is tqdm.std's text bar, as tqdm.auto
would pick. The choice is made once, when this module is first imported, like tqdm.auto's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.notebook import IProgress, tqdm_notebook
from tqdm.std import tqdm as std_tqdm


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel that can show widgets (JupyterLab, Notebook, VS Code,
    nbconvert/nbval execution); False in a terminal, IPython, qtconsole/Spyder and plain Python."""
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    kind = type(shell).__name__.lower()
    return "qt" not in kind and "spyder" not in kind


# The finished bar's colour by tqdm's bar_style, as JupyterLab draws the widget's.
BAR_COLOURS = {"success": "#4caf50", "danger": "#f44336", "": "#2196f3", "info": "#2196f3"}


class NotebookTqdm(tqdm_notebook):
    """tqdm's notebook widget bar whose saved output shows its final state without the widget.

    Takes every `tqdm` argument. The widget is displayed under a display id; `close()` (which
    tqdm calls at the end of a `for` loop) updates that output to the final bar as
    `text/plain` and `text/html`, or to an empty text when the bar goes away (`leave=False`),
    and closes the bar's widgets.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handle: Any = None
        show_now = kwargs.pop("display", True)
        super().__init__(*args, display=False, **kwargs)
        if show_now and not self.disable and self.delay <= 0:
            self._show()

    def _show(self) -> None:
        from IPython.display import display as ipython_display

        self._handle = ipython_display(self.container, display_id=True)
        self.displayed = True

    def display(
        self,
        msg: str | None = None,
        pos: int | None = None,
        close: bool = False,
        bar_style: str | None = None,
        check_delay: bool = True,
    ) -> None:
        """Refresh the widget; shows it once `delay` has passed (under our display id)."""
        super().display(msg, pos, close=close, bar_style=bar_style, check_delay=False)
        if check_delay and self.delay > 0 and not self.displayed:
            self._show()

    def close(self) -> None:
        if self.disable:
            return
        super().close()
        self._store_final_state()
        self._discard_widgets()  # the output no longer shows them

    def _kept(self) -> bool:
        """Whether the closed bar stays on screen: finished with `leave`, or stopped early."""
        failed = bool(self.total) and self.n < self.total
        return bool(failed or self.leave)

    def _discard_widgets(self) -> None:
        """Close the bar's widgets, so that the kernel and the front end can let them go."""
        for widget in (*self.container.children, self.container):
            for part in (getattr(widget, "style", None), getattr(widget, "layout", None), widget):
                if part is not None:
                    part.close()

    def final_html(self) -> str:
        """The bar's last frame as HTML: left text, the bar in its final colour, right text."""
        left, bar, right = self.container.children  # tqdm's texts are HTML-escaped already
        done = min(max(bar.value / bar.max, 0.0), 1.0) if bar.max else 1.0
        colour = BAR_COLOURS.get(bar.bar_style, BAR_COLOURS[""])
        box = "display:inline-block;height:0.9em;vertical-align:middle"
        return (
            f"<div>{left.value} <span style='{box};width:14em;background-color:#e0e0e0'>"
            f"<span style='{box};width:{100 * done:.1f}%;background-color:{colour}'></span>"
            f"</span> {right.value}</div>"
        )

    def final_bundle(self) -> dict[str, Any]:
        """What the bar's output holds once closed: a raw MIME bundle without the widget view."""
        if not self._kept():  # tqdm hid the widget: leave an empty output
            return {"text/plain": ""}
        return {"text/plain": str(self), "text/html": self.final_html()}

    def _store_final_state(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is None:
            return
        self._handle = None
        handle.update(self.final_bundle(), raw=True)


def _pick() -> Any:
    if IProgress is not None and in_jupyter_kernel():  # IProgress: None without ipywidgets
        return NotebookTqdm
    return std_tqdm


tqdm: Any = _pick()


def trange(*args: Any, **kwargs: Any) -> Any:
    """`tqdm(range(*args), **kwargs)`, as tqdm's own `trange`."""
    return tqdm(range(*args), **kwargs)
