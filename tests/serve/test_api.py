"""The chat server's protocol layer without HTTP: request checks and streamed answer text."""

from __future__ import annotations

from typing import Any

import pytest

from helpers.prompts import extract_response
from helpers.serve.api import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    RequestError,
    fit_max_tokens,
    parse_chat_request,
)
from helpers.serve.stream import ResponseText
from helpers.tokenizer import EOS_TOKEN, decode, encode

USER = [{"role": "user", "content": "Hi"}]


def parse(**body: Any) -> ChatRequest:
    return parse_chat_request({"messages": USER, **body}, vocab_size=50257)


def test_defaults() -> None:
    r = parse()
    assert (r.max_tokens, r.temperature, r.top_k, r.seed, r.stream) == (
        None,
        0.0,
        None,
        None,
        False,
    )
    assert parse(max_completion_tokens=7).max_tokens == 7
    assert parse(n=1, top_p=1, stop=None, logprobs=False, presence_penalty=0.0).max_tokens is None


def test_temperature_is_range_checked_and_tiny_ones_are_greedy() -> None:
    assert parse(temperature=2).temperature == 2.0
    assert parse(temperature=1e-300).temperature == 0.0
    for bad in (float("inf"), float("nan"), -1e-9, 2.0001, True, "1"):
        with pytest.raises(RequestError) as info:
            parse(temperature=bad)
        assert info.value.param == "temperature" and info.value.status == 400


def test_error_payload_is_openai_shaped() -> None:
    with pytest.raises(RequestError) as info:
        parse(n=2)
    assert info.value.payload() == {
        "error": {
            "message": "n must be 1: this server returns one choice per request",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    with pytest.raises(RequestError, match="must be a JSON object"):
        parse_chat_request([1], vocab_size=10)
    with pytest.raises(RequestError) as info:
        parse(logprobs=True)
    assert info.value.code == "unsupported_parameter"
    with pytest.raises(RequestError):
        parse(top_p=True)  # true is not 1


def test_fit_max_tokens() -> None:
    assert fit_max_tokens(None, 10, 1024) == DEFAULT_MAX_TOKENS
    assert fit_max_tokens(None, 1000, 1024) == 24  # what the context leaves
    assert fit_max_tokens(14, 10, 24) == 14
    with pytest.raises(RequestError) as info:
        fit_max_tokens(15, 10, 24)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(RequestError) as info:
        fit_max_tokens(None, 24, 24)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    "generated",
    [
        "Paris is the capital of France.",
        "  Paris.  \n\n### Instruction:\nName another capital.\n\n### Response:\nRome.",
        "The answer: 東京 and café — 🙂🙂 done.",
        "Line one\n\nLine two\n### Input:\nmore",
        "### Response:\nRepeated header, then the answer.",
        f"Stops at the end-of-text marker{EOS_TOKEN} and not after",
        "Trailing spaces and newlines   \n\n",
    ],
)
def test_streamed_pieces_add_up_to_the_answer(generated: Any) -> None:
    tokens = encode(generated)
    text = ResponseText("alpaca")
    pieces = [text.add(t) for t in tokens]
    pieces.append(text.finish())
    assert "".join(pieces) == extract_response(decode(tokens), "alpaca")
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert not any("###" in p for p in pieces)  # a turn start never leaks into the stream


def test_streamed_pieces_phi3() -> None:
    tokens = encode("Sure.<|user|>\nmore")
    text = ResponseText("phi3")
    pieces = [text.add(t) for t in tokens] + [text.finish()]
    assert "".join(pieces) == extract_response(decode(tokens), "phi3") == "Sure."


@pytest.mark.parametrize("text", [5, None, ["a"], {"t": "x"}, True])
def test_content_part_text_must_be_a_string(
    text: int | list[str] | dict[str, str] | bool | None,
) -> None:
    parts = [{"type": "text", "text": "Name a colour. "}, {"type": "text", "text": text}]
    with pytest.raises(RequestError) as info:
        parse_chat_request({"messages": [{"role": "user", "content": parts}]}, vocab_size=10)
    assert (info.value.status, info.value.param) == (400, "messages")
    assert "content part 1" in info.value.message and "text must be a string" in info.value.message


def test_text_content_parts_are_joined_and_others_skipped() -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {}}, {"text": "!"}]
    request = parse_chat_request({"messages": [{"role": "user", "content": parts}]}, vocab_size=10)
    assert request.instruction == "Hi!"
