"""Tests for helpers.widgets.inspector: rows agree with collate_fn; text, HTML and widget views."""

from __future__ import annotations

import re
import warnings

import pytest

from helpers.batching import TokenizedExample, collate_fn, tokenize_example
from helpers.tokenizer import EOS_ID, encode
from helpers.widgets.inspector import (
    IGNORED_COLOUR,
    ROLE_COLOURS,
    TokenInspector,
    format_token_table,
    print_token_table,
    token_rows,
    token_table_html,
)
from helpers.widgets.live import WIDGET_VIEW
from tests.widgets.fakes import Shown

ENTRY = {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45000 meters."}


def test_rows_by_hand() -> None:
    ids = encode(" a b c d")  # four tokens
    example = TokenizedExample(ids, 2)
    rows = token_rows(example, extra_padding=2)
    assert [r.position for r in rows] == list(range(6))
    assert [r.input_id for r in rows] == [*ids, EOS_ID, EOS_ID]
    assert [r.target_id for r in rows] == [*ids[1:], EOS_ID, EOS_ID, EOS_ID]
    assert [r.role for r in rows] == ["prompt", "response", "response", "end of text"] + [
        "padding"
    ] * 2
    assert [r.counted for r in rows] == [True] * 4 + [False] * 2
    masked = token_rows(example, extra_padding=2, mask_prompt=True)
    assert [r.counted for r in masked] == [False] + [True] * 3 + [False] * 2
    assert rows[0].input_text == repr(" a") and rows[3].target_text == repr("<|endoftext|>")


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
@pytest.mark.parametrize("mask", [False, True])
def test_rows_agree_with_collate(style: str, mask: bool) -> None:
    example = tokenize_example(ENTRY, style)
    rows = token_rows(ENTRY, style=style, mask_prompt=mask)
    inputs, targets = collate_fn([example], mask_prompt=mask)
    assert [r.input_id for r in rows] == inputs[0].tolist()
    assert [r.counted for r in rows] == (targets[0] != -100).tolist()
    assert sum(r.role == "end of text" for r in rows) == 1


def test_truncated_before_answer_is_flagged_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = token_rows(ENTRY, mask_prompt=True, allowed_max_length=10)
    assert len(rows) == 10 and not any(r.counted for r in rows)
    assert "nothing to learn here" in format_token_table(rows)


def test_bad_extra_padding() -> None:
    with pytest.raises(ValueError, match="extra_padding"):
        token_rows(ENTRY, extra_padding=-1)


def test_text_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = token_rows(ENTRY, mask_prompt=True, extra_padding=1)
    table = format_token_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["pos", "input", "id", "target", "id", "role", "loss"]
    assert len(lines) == len(rows) + 3
    counted = sum(r.counted for r in rows)
    assert lines[-1] == (
        f"{len(rows)} positions: {counted} count in the loss, {len(rows) - counted} ignored (-100)"
    )
    print_token_table(ENTRY, mask_prompt=True, extra_padding=1)
    assert capsys.readouterr().out == table + "\n"


def test_html_table() -> None:
    rows = token_rows(ENTRY, mask_prompt=True, extra_padding=1)
    page = token_table_html(rows)
    assert page.count("<tr") == len(rows) + 1
    assert "&lt;|endoftext|&gt;" in page and "<|endoftext|>" not in page
    for colour in [*ROLE_COLOURS.values(), IGNORED_COLOUR]:
        assert colour in page
    # Columns never run together: every cell is padded and no column is squeezed.
    cells = re.findall(r"<t[dh] style='([^']*)'>", page)
    assert len(cells) == 7 * (len(rows) + 1)
    assert all("padding:1px 10px 1px 4px" in style for style in cells)
    assert "table-layout:auto" in page


def test_plain_text_columns_line_up() -> None:
    rows = token_rows(ENTRY, mask_prompt=True, extra_padding=1)
    lines = format_token_table(rows).splitlines()[2:-1]
    # The id columns sit at the same place on every line, apart from the token before them.
    assert all(line[24] == " " and line[25:31].strip().isdigit() for line in lines)
    assert all(line[51] == " " and line[52:58].strip().isdigit() for line in lines)


def test_widget_controls_update_the_table() -> None:
    data = [ENTRY, {"instruction": "Say hi.", "input": "to Ann", "output": "Hi Ann!"}]
    inspector = TokenInspector(data, mask_prompt=False, extra_padding=0)
    assert inspector.settings() == (
        "example 0 of 2 · style alpaca · prompt counted · max len none · padding +0"
    )
    assert inspector.html() == f"<p><b>{inspector.settings()}</b></p>" + token_table_html(
        token_rows(ENTRY)
    )
    inspector.index.value = 1
    assert inspector.rows() == token_rows(data[1])
    inspector.style.value = "phi3"
    inspector.mask_prompt.value = True
    inspector.max_length.value = 5
    inspector.extra_padding.value = 3
    expected = token_rows(
        data[1], style="phi3", mask_prompt=True, allowed_max_length=5, extra_padding=3
    )
    assert inspector.rows() == expected and len(expected) == 5
    settings = "example 1 of 2 · style phi3 · prompt masked · max len 5 · padding +3"
    assert inspector.settings() == settings
    assert inspector.html() == f"<p><b>{settings}</b></p>" + token_table_html(expected)
    assert inspector.text() == f"{settings}\n{format_token_table(expected)}"


def test_displayed_as_note_controls_and_a_plain_table_that_follows_them(
    published: list[Shown],
) -> None:
    data = [ENTRY, {"instruction": "Say hi.", "input": "to Ann", "output": "Hi Ann!"}]
    inspector = TokenInspector(data, mask_prompt=False, extra_padding=0)
    inspector._ipython_display_()
    note, controls, table = published
    assert note.bundle["text/plain"].startswith("Live widget: the controls respond once you run")
    assert "<b>Live widget:</b>" in note.bundle["text/html"]
    assert note.display_id is None and controls.display_id is None
    # Where no widget front end runs, the controls show their values, not VBox(children=...
    assert controls.bundle["text/plain"] == inspector.settings()
    assert controls.bundle[WIDGET_VIEW]["model_id"] == inspector.widget.model_id
    assert table.bundle == {"text/html": inspector.html(), "text/plain": inspector.text()}
    assert table.display_id and not table.update
    # Moving a control rewrites the same output (its display id) with the new table.
    inspector.index.value = 1
    update = published[-1]
    assert len(published) == 4 and update.update and update.display_id == table.display_id
    assert update.bundle["text/html"].startswith("<p><b>example 1 of 2 · ")
    assert update.bundle["text/plain"] == inspector.text()
    assert "' Ann'" in update.bundle["text/plain"]  # example 1's tokens


def test_widget_needs_data() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        TokenInspector([])
