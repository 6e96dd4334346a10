"""See what the model is trained on: each position's input token, target token and loss mask.

`token_rows` runs the real `collate_fn` on one example, so what you see is what training
gets. `format_token_table` / `print_token_table` are the plain-text view, `token_table_html`
the colour-coded one, and `TokenInspector` puts ipywidgets controls above it (the table itself
is a plain output that the controls redraw, so it renders everywhere: `helpers.widgets.live`).
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import tiktoken

from helpers.batching import IGNORE_INDEX, TokenizedExample, collate_fn, tokenize_example
from helpers.prompts import PROMPT_STYLES
from helpers.tokenizer import EOS_ID, decode
from helpers.widgets.live import PlainView, note_output, show, widget_output

# Role of a target token -> background colour (counted) in the HTML table.
ROLE_COLOURS = {
    "prompt": "#dbe9ff",
    "response": "#d7f5d7",
    "end of text": "#ffe8b3",
    "padding": "#eeeeee",
}
IGNORED_COLOUR = "#f4f4f4"


class TokenRow(NamedTuple):
    """One position of a collated sample."""

    position: int
    input_id: int
    input_text: str
    target_id: int  # the next token, before any masking
    target_text: str
    role: str  # what the target is: prompt, response, end of text or padding
    counted: bool  # whether the target counts in the loss (not ignore_index)


def _token_text(token_id: int, tokenizer: tiktoken.Encoding | None) -> str:
    # repr() shows whitespace and newlines, which matter in the template.
    return repr(decode([token_id], tokenizer))


def token_rows(
    entry: Mapping[str, str] | TokenizedExample,
    *,
    style: str = "alpaca",
    mask_prompt: bool = False,
    allowed_max_length: int | None = None,
    extra_padding: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
) -> list[TokenRow]:
    """Rows for one example collated as training sees it (optionally in a longer batch)."""
    example = (
        entry if isinstance(entry, TokenizedExample) else tokenize_example(entry, style, tokenizer)
    )
    if extra_padding < 0:
        raise ValueError(f"extra_padding must be >= 0, got {extra_padding}")
    batch = [example]
    if extra_padding:
        # A longer batch partner, so the example gets padded like in a real batch.
        partner = TokenizedExample([EOS_ID] * (len(example.ids) + extra_padding), 0)
        batch.append(partner)
    with warnings.catch_warnings():
        # A fully-ignored sample shows up in the table's summary line instead.
        warnings.simplefilter("ignore", UserWarning)
        _, targets = collate_fn(
            batch,
            pad_token_id=EOS_ID,
            ignore_index=IGNORE_INDEX,
            allowed_max_length=allowed_max_length,
            mask_prompt=mask_prompt,
        )
    length = targets.shape[1]
    padded = example.ids + [EOS_ID] * (length + 1 - len(example.ids))
    rows = []
    for pos in range(length):
        nxt = pos + 1  # targets[pos] is token pos+1 of the padded sequence
        if nxt < example.prompt_length:
            role = "prompt"
        elif nxt < len(example.ids):
            role = "response"
        elif nxt == len(example.ids):
            role = "end of text"
        else:
            role = "padding"
        rows.append(
            TokenRow(
                position=pos,
                input_id=padded[pos],
                input_text=_token_text(padded[pos], tokenizer),
                target_id=padded[nxt],
                target_text=_token_text(padded[nxt], tokenizer),
                role=role,
                counted=int(targets[0, pos]) != IGNORE_INDEX,
            )
        )
    return rows


def summarize_rows(rows: Sequence[TokenRow]) -> str:
    """One line: positions, how many count in the loss, and how many are ignored."""
    counted = sum(row.counted for row in rows)
    line = (
        f"{len(rows)} positions: {counted} count in the loss, {len(rows) - counted} ignored (-100)"
    )
    if not counted:
        line += "; nothing to learn here (collate_fn warns about such samples)"
    return line


def format_token_table(rows: Sequence[TokenRow], *, max_text: int = 18) -> str:
    """Plain-text table of the rows (the widget-free fallback)."""

    def cut(text: str) -> str:
        return text if len(text) <= max_text else text[: max_text - 1] + "…"

    header = f"{'pos':>4}  {'input':<{max_text}} {'id':>6}  {'target':<{max_text}} {'id':>6}  {'role':<11} loss"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.position:>4}  {cut(r.input_text):<{max_text}} {r.input_id:>6}  "
            f"{cut(r.target_text):<{max_text}} {r.target_id:>6}  {r.role:<11} "
            f"{'yes' if r.counted else '-100'}"
        )
    lines.append(summarize_rows(rows))
    return "\n".join(lines)


def print_token_table(
    entry: Mapping[str, str] | TokenizedExample,
    *,
    style: str = "alpaca",
    mask_prompt: bool = False,
    allowed_max_length: int | None = None,
    extra_padding: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
) -> None:
    """Print the plain-text table for `entry` (same options as `token_rows`)."""
    rows = token_rows(
        entry,
        style=style,
        mask_prompt=mask_prompt,
        allowed_max_length=allowed_max_length,
        extra_padding=extra_padding,
        tokenizer=tokenizer,
    )
    print(format_token_table(rows))


# Inline styles, so the table looks the same in JupyterLab, an nbconvert export and GitHub:
# padded cells that never run together, the natural width of each column (JupyterLab's own
# table style is `table-layout: fixed`, centred), text left and numbers right.
TABLE_STYLE = "border-collapse:collapse;font-size:12px;table-layout:auto;margin:0"
TEXT_CELL = "padding:1px 10px 1px 4px;text-align:left;white-space:pre"
NUMBER_CELL = "padding:1px 10px 1px 4px;text-align:right;white-space:nowrap"
COLUMNS = [
    ("pos", NUMBER_CELL),
    ("input", TEXT_CELL),
    ("id", NUMBER_CELL),
    ("target", TEXT_CELL),
    ("id", NUMBER_CELL),
    ("role", TEXT_CELL),
    ("loss", TEXT_CELL),
]


def _html_row(row: TokenRow) -> str:
    colour = ROLE_COLOURS[row.role] if row.counted else IGNORED_COLOUR
    style = f"background-color:{colour};" + ("" if row.counted else "color:#999;")
    values = [
        str(row.position),
        f"<code>{html.escape(row.input_text)}</code>",
        str(row.input_id),
        f"<code>{html.escape(row.target_text)}</code>",
        str(row.target_id),
        row.role,
        "✓" if row.counted else "-100",
    ]
    cells = "".join(
        f"<td style='{cell}'>{value}</td>" for (_, cell), value in zip(COLUMNS, values, strict=True)
    )
    return f"<tr style='{style}'>{cells}</tr>"


def token_table_html(rows: Sequence[TokenRow]) -> str:
    """Colour-coded HTML table: colour = role of the target, grey struck-out = ignored."""
    legend = " ".join(
        f"<span style='background-color:{c};padding:0 4px'>{name}</span>"
        for name, c in [*ROLE_COLOURS.items(), ("ignored (-100)", IGNORED_COLOUR)]
    )
    header = "".join(f"<th style='{cell}'>{name}</th>" for name, cell in COLUMNS)
    return (
        f"<div><p>{legend}</p><p>{html.escape(summarize_rows(rows))}</p>"
        f"<table style='{TABLE_STYLE}'><tr>{header}</tr>"
        + "".join(_html_row(r) for r in rows)
        + "</table></div>"
    )


INSPECTOR_NOTE = (
    "the controls respond once you run this cell; until then the table below shows the "
    "state saved with the notebook."
)


class TokenInspector:
    """ipywidgets inspector: example slider, style, prompt masking, max length, extra padding.

    Displayed, it is three outputs (see `helpers.widgets.live`): a one-line note, the
    controls, and the table as plain HTML and text, which the controls redraw while the
    kernel runs and which renders wherever the notebook is shown.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, str]],
        *,
        index: int = 0,
        style: str = "alpaca",
        mask_prompt: bool = True,
        max_length: int = 0,
        extra_padding: int = 2,
        tokenizer: tiktoken.Encoding | None = None,
    ) -> None:
        import ipywidgets as widgets

        if not data:
            raise ValueError("TokenInspector needs at least one entry")
        self.data = list(data)
        self.tokenizer = tokenizer
        self.index = widgets.IntSlider(
            value=index, min=0, max=len(self.data) - 1, description="example"
        )
        self.style = widgets.Dropdown(options=list(PROMPT_STYLES), value=style, description="style")
        self.mask_prompt = widgets.Checkbox(
            value=mask_prompt, description="mask prompt", layout=widgets.Layout(width="auto")
        )
        self.max_length = widgets.IntSlider(
            value=max_length, min=0, max=256, description="max len", tooltip="0 = no truncation"
        )
        self.extra_padding = widgets.IntSlider(
            value=extra_padding, min=0, max=8, description="padding"
        )
        controls = [self.index, self.style, self.mask_prompt, self.max_length, self.extra_padding]
        for control in controls:
            control.observe(lambda _change: self.refresh(), names="value")
        wrap = {"flex_flow": "row wrap"}  # narrow output areas: controls wrap, never overflow
        self.widget = widgets.VBox(
            [
                widgets.HBox(controls[:3], layout=widgets.Layout(**wrap)),
                widgets.HBox(controls[3:], layout=widgets.Layout(**wrap)),
            ]
        )
        self.view = PlainView(lambda: (self.html(), self.text()))

    def rows(self) -> list[TokenRow]:
        """Rows for the current control values."""
        return token_rows(
            self.data[self.index.value],
            style=self.style.value,
            mask_prompt=self.mask_prompt.value,
            allowed_max_length=self.max_length.value or None,
            extra_padding=self.extra_padding.value,
            tokenizer=self.tokenizer,
        )

    def settings(self) -> str:
        """One line: which example, and the control values the table is drawn with."""
        max_length = self.max_length.value
        return (
            f"example {self.index.value} of {len(self.data)} · style {self.style.value} · "
            f"prompt {'masked' if self.mask_prompt.value else 'counted'} · "
            f"max len {max_length if max_length else 'none'} · "
            f"padding +{self.extra_padding.value}"
        )

    def refresh(self) -> None:
        """Redraw the table from the current control values (wherever it is shown)."""
        self.view.refresh()

    def text(self) -> str:
        """The settings line and the table as plain text (the fallback without HTML)."""
        return f"{self.settings()}\n{format_token_table(self.rows())}"

    def html(self) -> str:
        """The settings line and the colour-coded table, as static HTML."""
        return f"<p><b>{html.escape(self.settings())}</b></p>{token_table_html(self.rows())}"

    def _ipython_display_(self) -> None:
        show(note_output(INSPECTOR_NOTE), widget_output(self.widget, self.settings()), self.view)
