"""The Ollama chat protocol of `helpers.serve`: POST /api/chat, as the chapter's judge calls it.

Section 7.8 of the chapter sends its judge prompts with `query_model`: a POST of
`{"model", "messages", "options": {"seed", "temperature", "num_ctx"}}` to Ollama's
`/api/chat`, whose reply is newline-delimited JSON, one `{"message": {"role", "content"},
"done": false}` object per piece of the answer and a last one with `"done": true` and the
counts. This module gives the course server the same protocol, so that code runs unchanged
against a course model. No HTTP here (that is `helpers.serve.app`):

* `parse_ollama_request` checks a body: `stream` (default true, as Ollama), and the options
  `seed`, `temperature` (default 0: greedy, the course default), `top_k`, `num_predict`
  (the answer's token limit; -1 or -2: whatever the window leaves) and `num_ctx`;
* `fit_window` applies `num_ctx`: a context window larger than the model's is capped at the
  model's context, as Ollama caps it at the trained context; the prompt is never cut, a
  prompt and answer that do not fit the window get a 400 that says so;
* `ndjson_lines` streams a reply and `chat_object` is a whole one (`"stream": false`).

Errors are Ollama's `{"error": "..."}`. Sampling options this server does not implement
(`top_p`, `stop`, penalties, ...) get a 400 unless they have their neutral value; options
that only tune how Ollama runs a model (threads, GPU layers, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from helpers.serve.api import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    PreparedRequest,
    RequestError,
    _boolean,
    _instruction_from_messages,
    _integer,
    _is_neutral,
    _temperature,
    check_unsupported,
)
from helpers.serve.stream import ResponseText

log = logging.getLogger("helpers.serve")  # one logger for the whole server

# Options that only tune how Ollama runs the model, not the answer: accepted, ignored.
RUNTIME_OPTIONS = frozenset(
    (
        "num_keep num_batch num_gpu main_gpu num_thread numa low_vram use_mmap use_mlock "
        "vocab_only f16_kv logits_all embedding_only "
        # These tune penalties and mirostat, which must be off anyway (see below).
        "repeat_last_n penalize_newline mirostat_eta mirostat_tau"
    ).split()
)
# Sampling options not implemented here, with the values that mean "not used".
UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "top_p": (1,),
    "min_p": (0,),
    "typical_p": (1,),
    "tfs_z": (1,),
    "repeat_penalty": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "mirostat": (0,),
    "stop": ([], ""),
}
SUPPORTED_OPTIONS = ("seed", "temperature", "top_k", "num_predict", "num_ctx")
# Top-level fields for features this server does not have, with their "not used" values.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {"format": ("",), "tools": ([],)}


@dataclass(frozen=True)
class OllamaRequest:
    """A checked /api/chat request: the chat request plus the context window it asks for."""

    chat: ChatRequest  # max_tokens is options.num_predict (None: the default)
    num_ctx: int | None  # None: the model's context
    fill_window: bool  # num_predict -1 or -2: answer until the window is full


def error_payload(err: RequestError) -> dict[str, str]:
    """Ollama's error body: {"error": "message"}."""
    return {"error": err.message}


@contextmanager
def _in_options() -> Iterator[None]:
    """Name the parameter of a failed option check `options.<name>`."""
    try:
        yield
    except RequestError as err:
        raise RequestError(f"options.{err.message}", param=f"options.{err.param}") from None


def _check_options(options: dict[str, Any]) -> None:
    for name, value in options.items():
        if name in SUPPORTED_OPTIONS or name in RUNTIME_OPTIONS or value is None:
            continue
        neutral = UNSUPPORTED_OPTIONS.get(name)
        if neutral is None:
            raise RequestError(
                f"unknown option {name!r}; this server reads {', '.join(SUPPORTED_OPTIONS)}",
                param=f"options.{name}",
            )
        if not _is_neutral(value, neutral):
            raise RequestError(
                f"options.{name} is not supported by this server (got {value!r})",
                param=f"options.{name}",
                code="unsupported_parameter",
            )


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError(f"options must be an object, got {options!r}", param="options")
    _check_options(options)
    return options


def _check_fields(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", param="model")
    check_unsupported(body, UNSUPPORTED_FIELDS)


def parse_ollama_request(body: Any, *, vocab_size: int) -> OllamaRequest:
    """Check an /api/chat body; a bad value raises RequestError (a 400 naming it)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    instruction, extra = _instruction_from_messages(body.get("messages"))
    _check_fields(body)
    options = _options(body)
    stream = body.get("stream") is None or _boolean(body, "stream")  # Ollama streams by default
    with _in_options():
        num_predict = _integer(options, "num_predict", -2, None, None)
        if num_predict == 0:
            raise RequestError("num_predict must be at least 1, or -1 or -2", param="num_predict")
        top_k = _integer(options, "top_k", 0, vocab_size, None)  # 0: no top-k, as Ollama
        chat = ChatRequest(
            instruction=instruction,
            input=extra,
            max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
            temperature=_temperature(options),
            top_k=top_k or None,
            seed=_integer(options, "seed", -(2**63), 2**64 - 1, None),
            stream=stream,
            include_usage=False,
        )
        num_ctx = _integer(options, "num_ctx", 1, None, None)
    return OllamaRequest(chat, num_ctx, num_predict is not None and num_predict < 0)


def fit_window(request: OllamaRequest, n_prompt: int, context_length: int) -> tuple[int, int]:
    """(max_tokens, window) for a prompt of `n_prompt` tokens in the request's num_ctx.

    The window is options.num_ctx capped at the model's context (what Ollama does with a
    num_ctx beyond a model's trained context); the prompt is never cut.
    """
    window = min(request.num_ctx or context_length, context_length)
    room = window - n_prompt
    if room < 1:
        raise RequestError(
            f"the prompt is {n_prompt} tokens, but the context window is {window} tokens "
            f"(options.num_ctx, at most this model's context of {context_length}) and the "
            "answer needs at least one: shorten the messages or raise options.num_ctx",
            param="options.num_ctx",
            code="context_length_exceeded",
        )
    requested = request.chat.max_tokens
    if request.fill_window:
        return room, window
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, room), window
    if requested > room:
        raise RequestError(
            f"the prompt ({n_prompt} tokens) plus options.num_predict ({requested}) exceed "
            f"the context window of {window} tokens: ask for at most {room} tokens, or -1 "
            "for whatever the window leaves",
            param="options.num_predict",
            code="context_length_exceeded",
        )
    return requested, window


def _now() -> str:
    """Ollama's created_at: an RFC 3339 UTC time."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Timing:
    """The durations (nanoseconds) of a reply's last object: from the request to the first
    token (reading the prompt) and from there to the last token (writing the answer)."""

    def __init__(self) -> None:
        self.start = time.monotonic_ns()
        self.first: int | None = None
        self.end = self.start

    def tick(self) -> None:
        """A token was generated."""
        self.end = time.monotonic_ns()
        if self.first is None:
            self.first = self.end

    def stats(self, n_prompt: int, n_out: int) -> dict[str, int]:
        """Ollama's counts and durations."""
        first = self.first or self.end
        return {
            "total_duration": self.end - self.start,
            "load_duration": 0,  # the model stays loaded
            "prompt_eval_count": n_prompt,
            "prompt_eval_duration": first - self.start,
            "eval_count": n_out,
            "eval_duration": self.end - first,
        }


def message_object(model: str, content: str) -> dict[str, Any]:
    """One object of a streamed reply: a piece of the answer, `done: false`."""
    return {
        "model": model,
        "created_at": _now(),
        "message": {"role": "assistant", "content": content},
        "done": False,
    }


def chat_object(
    model: str, content: str, job: PreparedRequest, n_out: int, timing: Timing
) -> dict[str, Any]:
    """A reply's last object (`done: true`, the counts): the whole answer, or "" if streamed."""
    return {
        **message_object(model, content),
        "done": True,
        "done_reason": "length" if n_out >= job.max_tokens else "stop",
        **timing.stats(len(job.prompt_ids), n_out),
    }


async def ndjson_lines(
    job: PreparedRequest, tokens: AsyncIterator[int], model_name: str, style: str
) -> AsyncIterator[str]:
    """The lines of a streamed reply: pieces of the answer, then the `done: true` object.

    The pieces add up to the non-streamed answer (`helpers.serve.stream.ResponseText`).
    """
    timing, text = Timing(), ResponseText(style)

    def line(obj: dict[str, Any]) -> str:
        return json.dumps(obj) + "\n"

    try:
        async for token in tokens:
            timing.tick()
            if piece := text.add(token):
                yield line(message_object(model_name, piece))
    except Exception as exc:  # headers are sent: report in the stream, as Ollama does
        log.exception("generation failed")
        yield line({"error": repr(exc)})
        return
    if piece := text.finish():
        yield line(message_object(model_name, piece))
    yield line(chat_object(model_name, "", job, len(text.tokens), timing))
