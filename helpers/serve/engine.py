"""The model side of `helpers.serve`: one model answering chat requests, one at a time.

`ChatEngine` checks a request body and tokenizes its prompt (`prepare`), then runs the
generation on its own worker thread, so the HTTP event loop never waits on the model; a lock
keeps it to one generation at a time. The tokens come one by one from
`helpers.generate.generate_stream`, the same decoding loop the notebooks' `generate_responses`
runs, so a reply (streamed or not) is the notebooks' answer. Requests come as OpenAI bodies
(`prepare`) or Ollama ones (`prepare_ollama`).
No HTTP here: `helpers.serve.server.ChatServer` puts an engine behind a server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

from helpers.generate import GenerationSettings, generate_stream
from helpers.prompts import extract_response, format_prompt, get_style
from helpers.serve.api import (
    ChatRequest,
    PreparedRequest,
    completion_object,
    fit_max_tokens,
    new_completion_id,
    parse_chat_request,
)
from helpers.serve.ollama import Timing, chat_object, fit_window, ndjson_lines, parse_ollama_request
from helpers.serve.stream import sse_events
from helpers.tokenizer import decode, encode

_END = object()  # marks the end of a generation in the token queue


class ChatEngine:
    """Chat requests answered by one model, one generation at a time (a lock), off the loop."""

    def __init__(self, model: Any, model_name: str, style: str = "alpaca") -> None:
        self.model, self.model_name, self.style = model, model_name, get_style(style).name
        self.lock = threading.Lock()  # the model is not safe to run from two threads at once
        # One worker thread runs every generation, in arrival order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-generate")
        self._closing = threading.Event()  # set by stop_generating(): generations stop early

    def stop_generating(self) -> None:
        """End running generations early and refuse to continue any (for shutdown)."""
        self._closing.set()

    def release_worker(self) -> None:
        """Let the generation thread go; queued generations are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The request's instruction (and input) in the served prompt style, as token ids."""
        entry = {"instruction": request.instruction, "input": request.input, "output": ""}
        return encode(format_prompt(entry, self.style))

    def prepare(self, body: Any) -> PreparedRequest:
        """Check a request body and tokenize its prompt (RequestError for a bad request)."""
        request = parse_chat_request(body, vocab_size=self.model.cfg.vocab_size)
        prompt_ids = self.prompt_ids(request)
        limit = fit_max_tokens(request.max_tokens, len(prompt_ids), self.model.cfg.context_length)
        return PreparedRequest(request, prompt_ids, limit)

    def prepare_ollama(self, body: Any) -> tuple[PreparedRequest, int]:
        """(job, context window) for an Ollama /api/chat body (see `helpers.serve.ollama`)."""
        request = parse_ollama_request(body, vocab_size=self.model.cfg.vocab_size)
        prompt_ids = self.prompt_ids(request.chat)
        limit, window = fit_window(request, len(prompt_ids), self.model.cfg.context_length)
        return PreparedRequest(request.chat, prompt_ids, limit), window

    def settings(self, job: PreparedRequest) -> GenerationSettings:
        """How the job's answer is generated: its length, temperature, top-k and seed."""
        r = job.request
        return GenerationSettings(
            max_new_tokens=job.max_tokens,
            temperature=r.temperature,
            top_k=r.top_k,
            seed=r.seed,
            style=self.style,
        )

    def _run(self, job: PreparedRequest, stop: threading.Event) -> Iterator[int]:
        settings = self.settings(job)
        with self.lock, closing(generate_stream(self.model, job.prompt_ids, settings)) as tokens:
            for token in tokens:
                if stop.is_set() or self._closing.is_set():
                    return  # closing the stream ends the generation
                yield token

    def complete(self, body: Any) -> dict[str, Any]:
        """Answer one chat request body with a chat.completion object (no HTTP involved)."""
        job = self.prepare(body)
        return self._completion(job, list(self._run(job, threading.Event())))

    def _completion(self, job: PreparedRequest, tokens: list[int]) -> dict[str, Any]:
        return completion_object(
            new_completion_id(),
            self.model_name,
            extract_response(decode(tokens), self.style),
            "length" if len(tokens) >= job.max_tokens else "stop",
            len(job.prompt_ids),
            len(tokens),
        )

    async def tokens(self, job: PreparedRequest) -> AsyncIterator[int]:
        """The job's tokens as the generation thread makes them; closing it stops generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                stop.set()

        def produce() -> None:
            try:
                for token in self._run(job, stop):
                    put(token)
                put(_END)
            except Exception as exc:  # reported to the client by the request handler
                put(exc)

        self._executor.submit(produce)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()  # the client left or the reply is done: free the model for others

    async def complete_async(self, job: PreparedRequest) -> dict[str, Any]:
        """The whole chat.completion for a prepared request, generated off the event loop."""
        return self._completion(job, [token async for token in self.tokens(job)])

    def stream(self, job: PreparedRequest) -> AsyncIterator[str]:
        """Server-sent events of a streamed reply: chunks, then `data: [DONE]`."""
        return sse_events(job, self.tokens(job), self.model_name, self.style)

    def stream_ollama(self, job: PreparedRequest) -> AsyncIterator[str]:
        """Newline-delimited JSON of a streamed Ollama reply (`helpers.serve.ollama`)."""
        return ndjson_lines(job, self.tokens(job), self.model_name, self.style)

    async def chat_ollama(self, job: PreparedRequest) -> dict[str, Any]:
        """The whole Ollama reply object (`"stream": false`), generated off the event loop."""
        timing, tokens = Timing(), []
        async for token in self.tokens(job):
            timing.tick()
            tokens.append(token)
        text = extract_response(decode(tokens), self.style)
        return chat_object(self.model_name, text, job, len(tokens), timing)
