"""Chat with the course model from any OpenAI client: a small local /v1/chat/completions server.

    python -m helpers.serve --model tiny
    python -m helpers.serve --checkpoint runs/gpt2-medium-sft.safetensors --port 8000

The last user message becomes the instruction, is wrapped in the prompt style the model
was fine-tuned with, and the answer is cut out of the generated text by the same code the
notebooks use (`helpers.prompts`, `helpers.generate`). `stream: true` sends the answer as
server-sent events, as the OpenAI API does. The request's `model` name is not checked: the
one loaded model answers (GET /v1/models tells its name). Out-of-range parameters, `n` other
than 1, and a prompt plus `max_tokens` beyond the model's context get a 400 that names the
parameter; the prompt is never cut behind the client's back.

The HTTP side is Starlette on uvicorn: keep-alive, timeouts, a body limit (413), a bound on
concurrent connections (503 beyond it), a Host allow-list against DNS rebinding (loopback
names by default), JSON bodies only (415 otherwise) and no CORS unless asked for. Binds
127.0.0.1 only by default; the server has no authentication.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from helpers.generate import _next_token
from helpers.model import eval_mode
from helpers.prompts import extract_response, format_prompt, get_style
from helpers.serve_api import (
    ChatRequest,
    RequestError,
    ResponseText,
    _instruction_from_messages,
    chunk_object,
    completion_object,
    fit_max_tokens,
    new_completion_id,
    parse_chat_request,
    usage,
)
from helpers.tokenizer import EOS_ID, decode, encode

__all__ = [
    "ChatServer",
    "ServeOptions",
    "_instruction_from_messages",
    "load_served_model",
    "main",
    "make_server",
    "serve_in_thread",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY = 1_000_000  # bytes; a chat request is a few KB
# An unread request body up to this size is read and dropped after an early error reply, so
# the connection stays usable; a larger (or chunked) one closes the connection instead.
DRAIN_LIMIT = 16 * MAX_BODY
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """HTTP limits and access rules of the server (the defaults suit one local user)."""

    # Host header names accepted besides the loopback ones ("*": any; e.g. the machine's
    # name when serving a LAN). Requests naming another host get a 400 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # Browser origins allowed to call the API (CORS), e.g. "http://localhost:3000"; none by
    # default, and a request from any other Origin gets a 403.
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = MAX_BODY
    # Open connections plus running requests; beyond it requests get a 503.
    limit_concurrency: int = 64
    # Seconds a client has to send a request's head, and then its body (else 408/closed).
    request_timeout: float = 10.0
    # Seconds an idle keep-alive connection is kept open.
    keep_alive_timeout: int = 5
    # Seconds shutdown() waits for requests in progress before cancelling them.
    shutdown_timeout: int = 5
    # Log every request (uvicorn's access log).
    verbose: bool = False


# --- generation --------------------------------------------------------------------------


@torch.inference_mode()
def generate_tokens(
    model: Any,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """New token ids one at a time (eos ends it, unreturned): what `generate_batch` produces.

    The same steps as `helpers.generate.generate_batch` for a single prompt (KV cache,
    the same sampling and seeded generator), but yielding each token as it is made, which
    streaming needs. The caller makes sure prompt + max_tokens fit the context.
    """
    device = model.wte.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    cache = model.new_kv_cache(1, len(prompt_ids) + max_tokens)
    step = torch.tensor([prompt_ids], device=device)  # (1, T): the prompt, then one token
    with eval_mode(model):
        for _ in range(max_tokens):
            logits = model(step, kv_cache=cache, last_only=True)  # (1, 1, V)
            next_id = _next_token(logits[:, -1].float(), temperature, top_k, generator)  # (1,)
            token = int(next_id.item())
            if token == EOS_ID:
                return
            yield token
            step = next_id[:, None]


_END = object()  # marks the end of a generation in the token queue


@dataclass
class _Prepared:
    """A checked request with its prompt tokens and the max_tokens that fit the context."""

    request: ChatRequest
    prompt_ids: list[int]
    max_tokens: int


# --- the server --------------------------------------------------------------------------


class ChatServer:
    """An OpenAI-compatible chat server for one model; one generation at a time (a lock).

    The listening socket is bound on creation (port 0 picks a free port: see `.port`);
    `serve_forever()` serves until `shutdown()` is called from another thread (or Ctrl-C).
    """

    def __init__(
        self,
        model: Any,
        model_name: str,
        style: str = "alpaca",
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        options: ServeOptions | None = None,
    ) -> None:
        self.model, self.model_name, self.style = model, model_name, get_style(style).name
        self.options = options or ServeOptions()
        self.lock = threading.Lock()  # the model is not safe to run from two threads at once
        self.host = host
        self._socket = _bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.server_address = (host, self.port)
        self.allowed_hosts = _allowed_hosts(host, self.options.allowed_hosts)
        self.app = build_app(self)
        # One worker thread runs every generation, in arrival order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-generate")
        self._closing = threading.Event()  # set by shutdown(): generations stop early
        self._serving = threading.Event()
        self._uvicorn = uvicorn.Server(_uvicorn_config(self.app, self.options))

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8000 (append /v1 for OpenAI clients)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- lifecycle --

    def serve_forever(self) -> None:
        """Serve until shutdown() (from another thread) or Ctrl-C (in the main thread)."""
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self._serving.clear()

    def wait_started(self, timeout: float = 30.0) -> None:
        """Block until serve_forever() accepts connections."""
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"chat server did not start within {timeout} s")
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Stop serving: running generations end early; returns once serve_forever has ended."""
        self._closing.set()
        self._uvicorn.should_exit = True
        deadline = time.monotonic() + self.options.shutdown_timeout + 5.0
        while self._serving.is_set():
            if time.monotonic() > deadline:
                self._uvicorn.force_exit = True
            time.sleep(0.01)

    def server_close(self) -> None:
        """Release the listening socket and the generation thread (after shutdown())."""
        self._socket.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    # -- requests --

    def prepare(self, body: Any) -> _Prepared:
        """Check a request body and tokenize its prompt (RequestError for a bad request)."""
        request = parse_chat_request(body, vocab_size=self.model.cfg.vocab_size)
        entry = {"instruction": request.instruction, "input": request.input, "output": ""}
        prompt_ids = encode(format_prompt(entry, self.style))
        limit = fit_max_tokens(request.max_tokens, len(prompt_ids), self.model.cfg.context_length)
        return _Prepared(request, prompt_ids, limit)

    def _run(self, job: _Prepared, stop: threading.Event) -> Iterator[int]:
        r = job.request
        with self.lock:
            for token in generate_tokens(
                self.model,
                job.prompt_ids,
                job.max_tokens,
                temperature=r.temperature,
                top_k=r.top_k,
                seed=r.seed,
            ):
                if stop.is_set() or self._closing.is_set():
                    return
                yield token

    def complete(self, body: Any) -> dict[str, Any]:
        """Answer one chat request body with a chat.completion object (no HTTP involved)."""
        job = self.prepare(body)
        return self._completion(job, list(self._run(job, threading.Event())))

    def _completion(self, job: _Prepared, tokens: list[int]) -> dict[str, Any]:
        return completion_object(
            new_completion_id(),
            self.model_name,
            extract_response(decode(tokens), self.style),
            "length" if len(tokens) >= job.max_tokens else "stop",
            len(job.prompt_ids),
            len(tokens),
        )

    async def tokens(self, job: _Prepared) -> AsyncIterator[int]:
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

    async def complete_async(self, job: _Prepared) -> dict[str, Any]:
        """The whole chat.completion for a prepared request, generated off the event loop."""
        return self._completion(job, [token async for token in self.tokens(job)])

    async def stream(self, job: _Prepared) -> AsyncIterator[str]:
        """Server-sent events of a streamed reply: chunks, then `data: [DONE]`."""
        cid, name, usage_asked = new_completion_id(), self.model_name, job.request.include_usage

        def event(delta: dict[str, str], finish: str | None = None) -> str:
            chunk = chunk_object(cid, name, delta, finish, with_usage=usage_asked)
            return f"data: {json.dumps(chunk)}\n\n"

        text = ResponseText(self.style)
        yield event({"role": "assistant", "content": ""})
        try:
            async for token in self.tokens(job):
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
            final = {**chunk_object(cid, name, {}), "choices": [], "usage": None}
            final["usage"] = usage(len(job.prompt_ids), n_out)
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, as the host name resolves)."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family)


def _allowed_hosts(host: str, extra: tuple[str, ...]) -> frozenset[str]:
    names = {*LOOPBACK_HOSTS, *(h.lower() for h in extra)}
    if host not in ("", "0.0.0.0", "::"):
        names.add(f"[{host}]" if ":" in host else host.lower())
    return frozenset(names)


def _uvicorn_config(app: ASGIApp, options: ServeOptions) -> uvicorn.Config:
    protocol = type(
        "TimedH11Protocol", (_TimedH11Protocol,), {"request_timeout": options.request_timeout}
    )
    return uvicorn.Config(
        app,
        http=protocol,
        lifespan="off",
        log_config=None,  # leave the program's logging setup alone (notebooks, tests)
        log_level="info" if options.verbose else "warning",
        access_log=options.verbose,
        limit_concurrency=options.limit_concurrency,
        timeout_keep_alive=options.keep_alive_timeout,
        timeout_graceful_shutdown=options.shutdown_timeout,
    )


class _TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request's head.

    uvicorn closes idle keep-alive connections, but a client that opens a connection and
    sends nothing, or a header a byte at a time, would hold it forever: here the request
    head must arrive within `request_timeout` seconds of the connection opening or of the
    previous reply. (The body has its own deadline, in the request handler.)
    """

    request_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request is in progress

    def on_response_complete(self) -> None:
        self._arm()  # before the base class starts a pipelined request (which disarms)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


# --- the ASGI app ------------------------------------------------------------------------


def _error(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.payload(), status_code=err.status, headers=headers)


class _BodyGuard:
    """Close the connection after a reply that left a large or chunked request body unread.

    uvicorn reads and drops an unread body so the connection can carry the next request;
    that is right for a small body but would mean reading a client's gigabytes for nothing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = headers.get(b"content-length", b"0")
        large = chunked or (length.isdigit() and int(length) > DRAIN_LIMIT)
        body_done = False  # (consulted only for a large body, which is never empty)

        async def guarded_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and large and not body_done:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"connection", b"close")],
                }
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


def _host_name(host_header: str) -> str | None:
    """The name part of a Host header ("localhost:8000" -> "localhost"), None if malformed."""
    host = host_header.strip().lower()
    if host.startswith("["):  # an IPv6 address: [::1]:8000
        end = host.find("]") + 1
        name, port = host[:end], host[end:]
    else:
        name, sep, number = host.partition(":")
        port = sep + number
    if not _port_ok(port) or name in ("", "[]"):
        return None
    return name


def _port_ok(port: str) -> bool:
    """True for "" or ":<digits>", the port part a Host header may have."""
    return not port or (port.startswith(":") and port[1:].isdigit())


class _AccessCheck:
    """Refuse requests whose Host is not allowed (DNS rebinding) or whose Origin is foreign."""

    def __init__(self, app: ASGIApp, server: ChatServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(Request(scope))
            if error is not None:
                await _error(error, {"connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> RequestError | None:
        allowed, origins = self.server.allowed_hosts, self.server.options.cors_origins
        name = _host_name(request.headers.get("host", ""))
        if "*" not in allowed and name not in allowed:
            return RequestError(
                f"Host header {request.headers.get('host')!r} is not allowed by this server "
                "(allow it with --allow-host)",
                code="invalid_host",
            )
        origin = request.headers.get("origin")
        if origin is not None and "*" not in origins and origin not in origins:
            return RequestError(
                f"requests from origin {origin!r} are not allowed (allow it with --cors-origin)",
                code="origin_not_allowed",
                status=403,
            )
        return None


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    """The request's JSON body: 415 unless application/json, 413 past `limit`, 408 if slow."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(
            f"Content-Type must be application/json, got {ctype or 'none'!r}",
            code="unsupported_media_type",
            status=415,
        )
    too_large = RequestError(
        f"request body is larger than {limit} bytes", code="request_too_large", status=413
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise RequestError(
            f"request body not received within {timeout:g} s", code="timeout", status=408
        ) from None
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _server(request: Request) -> ChatServer:
    server: ChatServer = request.app.state.server
    return server


async def _chat(request: Request) -> Response:
    """POST /v1/chat/completions: a chat.completion, or server-sent events with stream."""
    server = _server(request)
    try:
        body = await _read_json(
            request, server.options.max_body_bytes, server.options.request_timeout
        )
        job = server.prepare(body)
    except RequestError as err:
        # A body that stopped arriving (408) leaves the connection in an unknown state.
        return _error(err, {"connection": "close"} if err.status == 408 else None)
    if job.request.stream:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(
            server.stream(job), media_type="text/event-stream", headers=headers
        )
    try:
        return JSONResponse(await server.complete_async(job))
    except Exception as exc:  # report, keep serving; the client sees a 500 with the reason
        log.exception("generation failed")
        return _error(RequestError(repr(exc), kind="server_error", status=500))


def _model_object(server: ChatServer) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "course"}


async def _models(request: Request) -> Response:
    """GET /v1/models: the one served model."""
    return JSONResponse({"object": "list", "data": [_model_object(_server(request))]})


async def _one_model(request: Request) -> Response:
    """GET /v1/models/{model}: the served model, or a 404 for any other name."""
    server, name = _server(request), request.path_params["model"]
    if name != server.model_name:
        return _error(
            RequestError(
                f"The model {name!r} does not exist; this server serves {server.model_name!r}",
                param="model",
                code="model_not_found",
                status=404,
            )
        )
    return JSONResponse(_model_object(server))


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": _server(request).model_name})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 as OpenAI-style JSON errors."""
    assert isinstance(exc, HTTPException)
    message = f"no route {request.method} {request.url.path}"
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return _error(RequestError(message, status=exc.status_code), dict(exc.headers or {}))


def build_app(server: ChatServer) -> Starlette:
    """The ASGI app of `server`: routes, error replies and the access checks."""
    middleware = [Middleware(_BodyGuard), Middleware(_AccessCheck, server=server)]
    if server.options.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(server.options.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
            )
        )
    routes = [
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/chat/completions", _chat, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/models", _models, methods=["GET"]),
        Route("/v1/models/{model:path}", _one_model, methods=["GET"]),
        Route("/", _health, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error}
    )
    app.state.server = server
    return app


# --- entry points ------------------------------------------------------------------------


def make_server(
    model: Any,
    *,
    model_name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    style: str = "alpaca",
    options: ServeOptions | None = None,
) -> ChatServer:
    """A ready ChatServer for `model` (port 0 picks a free port); call serve_forever()."""
    model.eval()
    return ChatServer(model, model_name, style, host=host, port=port, options=options)


def serve_in_thread(
    model: Any,
    *,
    model_name: str,
    style: str = "alpaca",
    port: int = 0,
    options: ServeOptions | None = None,
) -> ChatServer:
    """Start a server on 127.0.0.1 in a daemon thread (for notebooks and tests).

    Returns once it accepts connections; `server.url` is its address, `server.shutdown()`
    then `server.server_close()` stop it (or use it as a context manager).
    """
    server = make_server(model, model_name=model_name, port=port, style=style, options=options)
    threading.Thread(target=server.serve_forever, daemon=True, name="chat-server").start()
    server.wait_started()
    return server


def load_served_model(
    model: str | None = None, checkpoint: str | None = None
) -> tuple[Any, str, str]:
    """(model, name, prompt style): a preset via build_model or a save_model checkpoint."""
    from pathlib import Path

    from helpers.runtime import describe_model

    if checkpoint:
        from helpers.weights import load_model, read_metadata

        meta = read_metadata(checkpoint)
        # helpers.finetune records the prompt style it trained with; serve with the same one.
        style = meta.get("prompt_style") or "alpaca"
        print(
            f"model: checkpoint {Path(checkpoint).name} ({meta.get('weights', 'course weights')})"
        )
        return load_model(checkpoint), Path(checkpoint).stem, style
    if not model:
        raise ValueError("give a preset name (--model) or a checkpoint (--checkpoint)")
    from helpers.config import resolve_model_name
    from helpers.weights import build_model

    net, weights = build_model(model)
    name = resolve_model_name(model)
    print(f"model: {describe_model(name, weights)}")
    return net, name, "alpaca"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers.serve", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset name, e.g. tiny or gpt2-medium (OpenAI weights)")
    src.add_argument(
        "--checkpoint", help="a .safetensors file written by helpers.weights.save_model"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--style", default=None, help="prompt style (default: the checkpoint's, else alpaca)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this Host header name (repeatable; '*' accepts any); loopback "
        "names are always accepted",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from this origin call the API, e.g. http://localhost:3000 "
        "(repeatable; default: none)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=ServeOptions.limit_concurrency,
        help="connections + requests at once before answering 503",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=ServeOptions.request_timeout,
        help="seconds a client has to send a request's head, and its body",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command line: load a preset or checkpoint and serve it until Ctrl-C."""
    args = _parser().parse_args(argv)
    options = ServeOptions(
        allowed_hosts=tuple(args.allow_host),
        cors_origins=tuple(args.cors_origin),
        limit_concurrency=args.limit_concurrency,
        request_timeout=args.request_timeout,
        verbose=args.verbose,
    )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    model, name, style = load_served_model(args.model, args.checkpoint)
    server = make_server(
        model,
        model_name=name,
        host=args.host,
        port=args.port,
        style=args.style or style,
        options=options,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "warning: listening beyond this machine; the server has no authentication. "
            "Clients must use an allowed Host name (--allow-host)."
        )
    print(
        f"serving {name} ({server.style} prompts) at {server.url}/v1/chat/completions (Ctrl-C stops)"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
