"""Tests for helpers.prompts: the chapter's exact templates and the format -> extract round trip."""

from __future__ import annotations

from typing import Any

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


def test_alpaca_exact_template() -> None:
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


def test_phi3_exact_template() -> None:
    assert format_input(WITH_INPUT, "phi3") == (
        "<|user|>\nRewrite the sentence using a simile.\nThe car is very fast."
    )
    assert format_input(NO_INPUT, "phi3") == "<|user|>\nWhat is the capital of France?"
    assert format_prompt(NO_INPUT, "phi3") == (
        "<|user|>\nWhat is the capital of France?\n<|assistant|>:\n"
    )
    assert format_example(NO_INPUT, "phi3") == format_prompt(NO_INPUT, "phi3") + "Paris."
    assert format_response(NO_INPUT, "phi3") == "\n<|assistant|>:\nParis."


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
@pytest.mark.parametrize("entry", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_each_style_formats_an_entry_and_extracts_it_back(style: str, entry: Any) -> None:
    prompt = format_prompt(entry, style)
    # The instruction, then the input (when there is one), then the response header last.
    at = prompt.index(entry["instruction"])
    if entry["input"]:
        assert prompt.index(entry["input"], at) > at
    assert prompt.endswith(get_style(style).response_header)
    text = format_example(entry, style)
    assert text.startswith(prompt) and text.endswith(entry["output"])
    # Round trip: the prompt is recognised and removed, the answer comes back unchanged.
    assert extract_response(text, style) == entry["output"]
    assert extract_response(text, style, prompt=prompt) == entry["output"]
    assert extract_response(text[len(prompt) :], style) == entry["output"]


def test_style_lookup() -> None:
    assert get_style("ALPACA").name == "alpaca"
    style = PROMPT_STYLES["phi3"]
    assert get_style(style) is style and isinstance(style, PromptStyle)
    for bad in ("chatml", None, 3):
        with pytest.raises(ValueError, match="valid styles: alpaca, phi3"):
            format_prompt(NO_INPUT, bad)  # type: ignore[arg-type]  # wrong on purpose


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_round_trip_on_chapter_data(chapter_data: list[dict[str, str]], style: str) -> None:
    for entry in chapter_data:
        text = format_example(entry, style)
        assert extract_response(text, style) == entry["output"]
        assert extract_response(text + "<|endoftext|>junk", style) == entry["output"]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_stops_at_a_new_turn(style: str) -> None:
    prompt = format_prompt(WITH_INPUT, style)
    next_turn = format_prompt(NO_INPUT, style)
    generated = prompt + " The car is as fast as lightning. " + next_turn + "Paris."
    assert extract_response(generated, style) == "The car is as fast as lightning."


def test_extract_without_prompt_and_edge_cases() -> None:
    # Only the generated continuation (prompt already cut off by the caller).
    assert extract_response("Paris.\n\n### Instruction:\nmore", "alpaca") == "Paris."
    assert extract_response("  Paris.  ", "alpaca") == "Paris."
    assert extract_response("", "alpaca") == ""
    # phi3's header split by the tokenizer as "<|assistant|>" + ":" is tolerated.
    assert extract_response("<|user|>\nQ\n<|assistant|>:\nA<|user|>", "phi3") == "A"
    assert extract_response(": A", "phi3") == "A"


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_new_tokens_followed_by_an_invented_turn(style: str) -> None:
    # generate/serve pass only the new tokens: an invented second turn must not win.
    invented = format_prompt(NO_INPUT, style) + "Paris."
    assert extract_response("Lightning fast.\n\n" + invented, style) == "Lightning fast."
    assert extract_response(format_prompt(WITH_INPUT, style) + "A.\n" + invented, style) == "A."


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_after_a_prompt_without_response_header(style: str) -> None:
    # The chapter generates from format_input (no header); a model that writes none.
    prompt = format_input(WITH_INPUT, style)
    generated = prompt + "\n\nThe car is as fast as lightning."
    assert extract_response(generated, style) == "The car is as fast as lightning."
    assert extract_response(generated, style, prompt=prompt) == ("The car is as fast as lightning.")
    # A model that writes the header itself, as in the chapter.
    wrote = prompt + get_style(style).response_header + "Fast."
    assert extract_response(wrote, style, prompt=prompt) == "Fast."
    assert extract_response(wrote, style) == "Fast."
    assert extract_response(prompt, style) == ""  # nothing generated yet


def test_section_headers_cut_only_as_whole_lines() -> None:
    prompt = format_prompt(WITH_INPUT)
    mention = "Put the data under ### Input: and the task under ### Instruction: in Alpaca."
    assert extract_response(prompt + mention) == mention
    assert extract_response(mention) == mention
    assert extract_response(prompt + "A.\n### Input:\nmore") == "A."
    assert extract_response("A.\n  ### Response:  \nB") == "A."
    # The response header inside a sentence is not mistaken for the prompt's header.
    assert extract_response("It says ### Response: here.") == "It says ### Response: here."


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_extract_response_both_styles(style: str) -> None:
    prompt = format_prompt(NO_INPUT, style)
    assert extract_response(prompt + " The capital is Paris. <|endoftext|>junk", style) == (
        "The capital is Paris."
    )
    # A model that starts a new turn of the template is cut there.
    nxt = "### Instruction:\n" if style == "alpaca" else "<|user|>"
    assert extract_response(prompt + "Paris.\n\n" + nxt + " more", style) == "Paris."
    # Generated text without the prompt in front (what generate_responses decodes).
    assert extract_response("  Paris. ", style) == "Paris."
