"""Tests for helpers.prompts: the chapter's exact templates and the format -> extract round trip."""

from __future__ import annotations

import pytest

from helpers.prompts import (
    PROMPT_STYLES,
    PromptStyle,
    extract_response,
    format_example,
    format_input,
    format_prompt,
    format_response,
    get_style,
)

WITH_INPUT = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
}
NO_INPUT = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def test_alpaca_exact_template():
    assert format_input(WITH_INPUT) == (
        f"{PREAMBLE}\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast."
    )
    # "### Input:" only when the entry has an input.
    assert (
        format_input(NO_INPUT) == f"{PREAMBLE}\n\n### Instruction:\nWhat is the capital of France?"
    )
    assert format_response(WITH_INPUT) == "\n\n### Response:\nThe car is as fast as lightning."
    assert format_prompt(NO_INPUT) == format_input(NO_INPUT) + "\n\n### Response:\n"
    # The chapter's training text: format_input(entry) + "\n\n### Response:\n" + output.
    assert format_example(WITH_INPUT) == format_input(WITH_INPUT) + format_response(WITH_INPUT)


def test_phi3_exact_template():
    assert format_input(WITH_INPUT, "phi3") == (
        "<|user|>\nRewrite the sentence using a simile.\nThe car is very fast."
    )
    assert format_input(NO_INPUT, "phi3") == "<|user|>\nWhat is the capital of France?"
    assert format_prompt(NO_INPUT, "phi3") == (
        "<|user|>\nWhat is the capital of France?\n<|assistant|>:\n"
    )
    assert format_example(NO_INPUT, "phi3") == format_prompt(NO_INPUT, "phi3") + "Paris."
    assert format_response(NO_INPUT, "phi3") == "\n<|assistant|>:\nParis."


def test_training_text_is_prompt_plus_output():
    for style in PROMPT_STYLES:
        for entry in (WITH_INPUT, NO_INPUT):
            assert format_example(entry, style) == format_prompt(entry, style) + entry["output"]


def test_style_lookup():
    assert get_style("ALPACA").name == "alpaca"
    style = PROMPT_STYLES["phi3"]
    assert get_style(style) is style and isinstance(style, PromptStyle)
    for bad in ("chatml", None, 3):
        with pytest.raises(ValueError, match="valid styles: alpaca, phi3"):
            format_prompt(NO_INPUT, bad)


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_round_trip_on_chapter_data(chapter_data, style):
    for entry in chapter_data:
        text = format_example(entry, style)
        assert extract_response(text, style) == entry["output"]
        assert extract_response(text + "<|endoftext|>junk", style) == entry["output"]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_stops_at_a_new_turn(style):
    prompt = format_prompt(WITH_INPUT, style)
    next_turn = format_prompt(NO_INPUT, style)
    generated = prompt + " The car is as fast as lightning. " + next_turn + "Paris."
    assert extract_response(generated, style) == "The car is as fast as lightning."


def test_extract_without_prompt_and_edge_cases():
    # Only the generated continuation (prompt already cut off by the caller).
    assert extract_response("Paris.\n\n### Instruction:\nmore", "alpaca") == "Paris."
    assert extract_response("  Paris.  ", "alpaca") == "Paris."
    assert extract_response("", "alpaca") == ""
    # phi3's header split by the tokenizer as "<|assistant|>" + ":" is tolerated.
    assert extract_response("<|user|>\nQ\n<|assistant|>:\nA<|user|>", "phi3") == "A"
    assert extract_response(": A", "phi3") == "A"


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_new_tokens_followed_by_an_invented_turn(style):
    # generate/serve pass only the new tokens: an invented second turn must not win.
    invented = format_prompt(NO_INPUT, style) + "Paris."
    assert extract_response("Lightning fast.\n\n" + invented, style) == "Lightning fast."
    assert extract_response(format_prompt(WITH_INPUT, style) + "A.\n" + invented, style) == "A."
