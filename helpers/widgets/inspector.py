"""See what the model is trained on: each position's input token, target token and loss mask.

`token_rows` runs the real `collate_fn` on one example, so what you see is what training
gets. `format_token_table` / `print_token_table` are the plain-text view, `token_table_html`
the colour-coded one, and `TokenInspector` wraps it in ipywidgets controls.
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


def token_table_html(rows: Sequence[TokenRow]) -> str:
    """Colour-coded HTML table: colour = role of the target, grey struck-out = ignored."""
    cells = []
    for r in rows:
        colour = ROLE_COLOURS[r.role] if r.counted else IGNORED_COLOUR
        style = f"background:{colour};" + ("" if r.counted else "color:#999;")
        loss = "✓" if r.counted else "-100"
        cells.append(
            f"<tr style='{style}'><td>{r.position}</td>"
            f"<td><code>{html.escape(r.input_text)}</code></td><td>{r.input_id}</td>"
            f"<td><code>{html.escape(r.target_text)}</code></td><td>{r.target_id}</td>"
            f"<td>{r.role}</td><td>{loss}</td></tr>"
        )
    legend = " ".join(
        f"<span style='background:{c};padding:0 4px'>{name}</span>"
        for name, c in [*ROLE_COLOURS.items(), ("ignored (-100)", IGNORED_COLOUR)]
    )
    return (
        f"<div><p>{legend}</p><p>{html.escape(summarize_rows(rows))}</p>"
        "<table style='border-collapse:collapse;font-size:12px'>"
        "<tr><th>pos</th><th>input</th><th>id</th><th>target</th><th>id</th>"
        "<th>role</th><th>loss</th></tr>" + "".join(cells) + "</table></div>"
    )


class TokenInspector:
    """ipywidgets inspector: example slider, style, prompt masking, max length, extra padding."""

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
        self.mask_prompt = widgets.Checkbox(value=mask_prompt, description="mask prompt")
        self.max_length = widgets.IntSlider(
            value=max_length, min=0, max=256, description="max len", tooltip="0 = no truncation"
        )
        self.extra_padding = widgets.IntSlider(
            value=extra_padding, min=0, max=8, description="padding"
        )
        self.output = widgets.HTML()
        controls = [self.index, self.style, self.mask_prompt, self.max_length, self.extra_padding]
        for control in controls:
            control.observe(lambda _change: self.refresh(), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox(controls[:3]), widgets.HBox(controls[3:]), self.output]
        )
        self.refresh()

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

    def refresh(self) -> None:
        """Redraw the table from the current control values."""
        self.output.value = token_table_html(self.rows())

    def text(self) -> str:
        """The current table as plain text (what a front end without widgets can show)."""
        return format_token_table(self.rows())

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        # Without a widget front end (nbconvert, GitHub) show the table as text instead.
        bundle["text/plain"] = self.text()
        return bundle
