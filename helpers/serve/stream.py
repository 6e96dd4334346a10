"""Streaming a reply as the OpenAI API does: server-sent events of `chat.completion.chunk`s.

`ResponseText` turns generated tokens into settled pieces of answer text (the pieces add up
to the non-streamed answer); `sse_events` turns a generation's tokens into the events of a
`stream: true` reply, ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from helpers.prompts import extract_response, get_style
from helpers.serve.api import PreparedRequest, RequestError, chunk_object, new_completion_id, usage
from helpers.tokenizer import EOS_TOKEN, decode

log = logging.getLogger("helpers.serve")  # one logger for the whole server


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` less an ending that may still change: a partial character, a partial stop
    string (a turn start the answer would be cut at) and trailing whitespace (stripped)."""
    text = text.rstrip("\ufffd")  # an incomplete UTF-8 character decodes as U+FFFD
    longest = max(len(s) for s in stops)
    for k in range(min(longest, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            text = text[:-k]
            break
    return text.rstrip()


class ResponseText:
    """The answer text of a generation in progress, handed out in increments for streaming.

    The full text is always `extract_response(decode(tokens), style)`, as in the notebooks;
    an increment is only sent once later tokens can no longer change it, so the streamed
    pieces add up to the non-streamed answer.
    """

    def __init__(self, style: str) -> None:
        self.style = get_style(style)
        self.tokens: list[int] = []
        self.sent = ""
        # Every marker the answer may be cut at (whatever the style calls its lists).
        markers = [
            m
            for attr in ("turn_starts", "section_headers", "turn_markers")
            for m in getattr(self.style, attr, ())
        ]
        self._stops = (EOS_TOKEN, self.style.response_header.strip(), *markers)

    @property
    def text(self) -> str:
        """The answer so far, cut out of the generated text."""
        return extract_response(decode(self.tokens), self.style)

    def add(self, token: int) -> str:
        """Take one generated token; return the new settled text (often empty)."""
        self.tokens.append(token)
        return self._advance(_held_back(self.text, self._stops))

    def finish(self) -> str:
        """The rest of the answer, once generation has ended."""
        return self._advance(self.text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # cannot happen with the held-back ending; never resend text
        delta, self.sent = text[len(self.sent) :], text
        return delta


async def sse_events(
    job: PreparedRequest, tokens: AsyncIterator[int], model_name: str, style: str
) -> AsyncIterator[str]:
    """Server-sent events of a streamed reply to `job`: chunks, then `data: [DONE]`."""
    cid, usage_asked = new_completion_id(), job.request.include_usage

    def event(delta: dict[str, str], finish: str | None = None) -> str:
        chunk = chunk_object(cid, model_name, delta, finish, with_usage=usage_asked)
        return f"data: {json.dumps(chunk)}\n\n"

    text = ResponseText(style)
    yield event({"role": "assistant", "content": ""})
    try:
        async for token in tokens:
            if piece := text.add(token):
                yield event({"content": piece})
    except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
        log.exception("generation failed")
        error = RequestError(repr(exc), kind="server_error", status=500)
        yield f"data: {json.dumps(error.payload())}\n\n"
        return
    if piece := text.finish():
        yield event({"content": piece})
    n_out = len(text.tokens)
    yield event({}, "length" if n_out >= job.max_tokens else "stop")
    if usage_asked:
        final = {**chunk_object(cid, model_name, {}), "choices": [], "usage": None}
        final["usage"] = usage(len(job.prompt_ids), n_out)
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
