"""Tests for helpers.widgets.inspector: rows agree with collate_fn; text, HTML and widget views."""

from __future__ import annotations

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

ENTRY = {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45000 meters."}


def test_rows_by_hand():
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
def test_rows_agree_with_collate(style, mask):
    example = tokenize_example(ENTRY, style)
    rows = token_rows(ENTRY, style=style, mask_prompt=mask)
    inputs, targets = collate_fn([example], mask_prompt=mask)
    assert [r.input_id for r in rows] == inputs[0].tolist()
    assert [r.counted for r in rows] == (targets[0] != -100).tolist()
    assert sum(r.role == "end of text" for r in rows) == 1


def test_truncated_before_answer_is_flagged_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = token_rows(ENTRY, mask_prompt=True, allowed_max_length=10)
    assert len(rows) == 10 and not any(r.counted for r in rows)
    assert "nothing to learn here" in format_token_table(rows)


def test_bad_extra_padding():
    with pytest.raises(ValueError, match="extra_padding"):
        token_rows(ENTRY, extra_padding=-1)


def test_text_table(capsys):
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


def test_html_table():
    rows = token_rows(ENTRY, mask_prompt=True, extra_padding=1)
    page = token_table_html(rows)
    assert page.count("<tr") == len(rows) + 1
    assert "&lt;|endoftext|&gt;" in page and "<|endoftext|>" not in page
    for colour in [*ROLE_COLOURS.values(), IGNORED_COLOUR]:
        assert colour in page


def test_widget_controls_update_the_table():
    data = [ENTRY, {"instruction": "Say hi.", "input": "to Ann", "output": "Hi Ann!"}]
    inspector = TokenInspector(data, mask_prompt=False, extra_padding=0)
    first = inspector.output.value
    assert first == token_table_html(token_rows(ENTRY))
    inspector.index.value = 1
    assert inspector.output.value == token_table_html(token_rows(data[1]))
    inspector.style.value = "phi3"
    inspector.mask_prompt.value = True
    inspector.max_length.value = 5
    inspector.extra_padding.value = 3
    expected = token_rows(
        data[1], style="phi3", mask_prompt=True, allowed_max_length=5, extra_padding=3
    )
    assert inspector.rows() == expected and len(expected) == 5
    assert inspector.output.value == token_table_html(expected)
    assert inspector.text() == format_token_table(expected)
    bundle = inspector._repr_mimebundle_()
    assert bundle["text/plain"] == inspector.text()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_widget_needs_data():
    with pytest.raises(ValueError, match="at least one entry"):
        TokenInspector([])
