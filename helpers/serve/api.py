"""The OpenAI chat-completions protocol of `helpers.serve`: request checks and reply objects.

No HTTP here: `parse_chat_request` turns a request body into a `ChatRequest` or raises a
`RequestError` that becomes an OpenAI-style error reply; `fit_max_tokens` checks the prompt
and answer against the context; `completion_object` and `chunk_object` build the replies.
Streaming (server-sent events) is `helpers.serve.stream`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from helpers.generate import MIN_SAMPLING_TEMPERATURE

DEFAULT_MAX_TOKENS = 256  # when a request gives none (and the context leaves room for it)
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2
# OpenAI parameters this server does not implement, with the values that mean "not used";
# anything else gets a 400 rather than being silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "top_p": (1,),
    "stop": ([], ""),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "response_format": ({"type": "text"},),
}


class RequestError(Exception):
    """A request the server refuses; `payload()` is the OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message,
            param,
            code,
            status,
            kind,
        )

    def payload(self) -> dict[str, Any]:
        """{"error": {"message", "type", "param", "code"}} as the OpenAI API answers."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request: the instruction (and input) plus the generation settings."""

    instruction: str
    input: str
    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, or what the context leaves
    temperature: float
    top_k: int | None
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass
class PreparedRequest:
    """A checked request with its prompt tokens and the max_tokens that fit the context."""

    request: ChatRequest
    prompt_ids: list[int]
    max_tokens: int


def _text_of_parts(parts: list[Any]) -> str:
    """The text of a message's content parts joined (other parts skipped); a 400 for non-string text."""
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or "text" not in part:
            continue  # e.g. an image part: this model reads text only
        if not isinstance(part["text"], str):
            raise RequestError(
                f"content part {i} of the last user message: text must be a string, "
                f"got {type(part['text']).__name__}",  # not the value: it may be huge
                param="messages",
            )
        texts.append(part["text"])
    return "".join(texts)


def _instruction_from_messages(messages: Any) -> tuple[str, str]:
    """(instruction, input): the last user message; a system message, if any, becomes the input."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            "'messages' must be a non-empty list of {role, content}", param="messages"
        )
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError("'messages' holds no message with role 'user'", param="messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = _text_of_parts(content)
    if not isinstance(content, str) or not content.strip():
        raise RequestError("the last user message has no text content", param="messages")
    system = [
        m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"
    ]
    extra = system[-1] if system and isinstance(system[-1], str) else ""
    return content, extra


def _integer(
    body: dict[str, Any], name: str, low: int, high: int | None, default: int | None
) -> int | None:
    """body[name] as an int in [low, high]; null or absent gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"from {low} to {high}"
        raise RequestError(f"{name} must be {bound}, got {value}", param=name)
    return value


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 0.0  # the course default: greedy, reproducible answers
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"temperature must be a number, got {value!r}", param="temperature")
    if not 0.0 <= value <= MAX_TEMPERATURE:
        raise RequestError(
            f"temperature must be from 0 to {MAX_TEMPERATURE:g}, got {value!r}",
            param="temperature",
        )
    return float(value) if value >= MIN_SAMPLING_TEMPERATURE else 0.0


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    return _boolean(options, "include_usage")


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # 1.0 == 1 counts, True == 1 does not.
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def check_unsupported(body: dict[str, Any], unsupported: dict[str, Any] = UNSUPPORTED) -> None:
    """A 400 for each field of `unsupported` given with other than its neutral value(s)."""
    for name, neutral in unsupported.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise RequestError(
                f"{name} is not supported by this server (got {value!r})",
                param=name,
                code="unsupported_parameter",
            )


def parse_chat_request(body: Any, *, vocab_size: int) -> ChatRequest:
    """Check a /v1/chat/completions body; out-of-range values raise RequestError (a 400)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    instruction, extra = _instruction_from_messages(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", param="model")
    check_unsupported(body)
    if _integer(body, "n", 1, None, 1) != 1:
        raise RequestError("n must be 1: this server returns one choice per request", param="n")
    # max_completion_tokens is the newer name of max_tokens; either may be given.
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    stream = _boolean(body, "stream")
    return ChatRequest(
        instruction=instruction,
        input=extra,
        max_tokens=_integer(body, name, 1, None, None),
        temperature=_temperature(body),
        top_k=_integer(body, "top_k", 1, vocab_size, None),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1, None),
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def fit_max_tokens(requested: int | None, n_prompt: int, context_length: int) -> int:
    """max_tokens for a prompt of `n_prompt` tokens; a 400 when the two do not fit the context.

    The prompt is never cut: `usage.prompt_tokens` is what the model really read.
    """
    room = context_length - n_prompt
    if room < 1:
        raise RequestError(
            f"the prompt is {n_prompt} tokens, but this model's context is {context_length} "
            "tokens and the answer needs at least one: shorten the messages",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if requested > room:
        raise RequestError(
            f"the prompt ({n_prompt} tokens) plus max_tokens ({requested}) exceed this model's "
            f"context of {context_length} tokens: ask for at most {room} tokens or shorten "
            "the messages",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def new_completion_id() -> str:
    """An id like OpenAI's: chatcmpl- and 24 hex digits."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    """The `usage` object of a reply."""
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }


def completion_object(
    completion_id: str, model: str, text: str, finish_reason: str, n_prompt: int, n_out: int
) -> dict[str, Any]:
    """A whole `chat.completion` reply."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(n_prompt, n_out),
    }


def chunk_object(
    completion_id: str,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    *,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One `chat.completion.chunk` of a streamed reply (usage: null when it is asked for)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk
