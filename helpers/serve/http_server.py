"""The HTTP guards of `helpers.serve`: limits, timeouts and access rules on top of uvicorn.

`ServeOptions` holds them. `uvicorn_config` sets uvicorn up with keep-alive and shutdown
timeouts, a bound on concurrent connections and a deadline for each request's head
(`_TimedH11Protocol`); `BodyGuard` reads and drops a large unread body before an error reply
(so a client still sending it can read the reply), within bounds, else closes the connection;
`AccessCheck` refuses a Host that is not allowed (DNS rebinding) and foreign browser Origins.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from helpers.run.fields import (
    boolean,
    int_at_least_zero,
    positive_int,
    positive_number,
    setting,
    texts,
    validate,
)
from helpers.serve.api import RequestError

MAX_BODY = 1_000_000  # bytes; a chat request is a few KB
# An unread request body up to this size is read and dropped (by uvicorn) after an early
# error reply, so the connection stays usable.
DRAIN_LIMIT = 16 * MAX_BODY
# A larger (or chunked) one is read and dropped by BodyGuard *before* the reply, up to this
# size and while it keeps arriving (DRAIN_IDLE seconds between pieces, DRAIN_SECONDS in all):
# a client that sends the whole body before reading (urllib, the chapter's query_model) would
# otherwise get a connection reset instead of the 413. Beyond that the connection is closed.
DRAIN_MAX = 256 * MAX_BODY
DRAIN_IDLE = 1.0
DRAIN_SECONDS = 10.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class ServeOptions:
    """HTTP limits and access rules of the server (the defaults suit one local user), validated.

    Fields with help text are `python -m helpers.serve` flags (helpers.run.fields).
    """

    # Requests naming another host get a 400 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "also accept this Host header name (repeatable; '*' accepts any; e.g. the machine's "
        "name when serving a LAN); loopback names are always accepted",
        texts,
        flag="--allow-host",
        action="append",
        metavar="NAME",
    )
    # A request from any other Origin gets a 403.
    cors_origins: tuple[str, ...] = setting(
        (),
        "let browser pages from this origin call the API, e.g. http://localhost:3000 "
        "(repeatable; default: none)",
        texts,
        flag="--cors-origin",
        action="append",
        metavar="ORIGIN",
    )
    max_body_bytes: int = setting(
        MAX_BODY, "largest request body (413 beyond)", positive_int, cli=False
    )
    limit_concurrency: int = setting(
        64, "connections + requests at once before answering 503", positive_int
    )
    request_timeout: float = setting(
        10.0, "seconds a client has to send a request's head, and its body", positive_number
    )
    keep_alive_timeout: int = setting(
        5, "seconds an idle keep-alive connection is kept open", positive_int, cli=False
    )
    shutdown_timeout: int = setting(
        5,
        "seconds shutdown() waits for requests in progress before cancelling them",
        int_at_least_zero,
        cli=False,
    )
    verbose: bool = setting(False, "log every request", boolean)

    def __post_init__(self) -> None:
        validate(self)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, as the host name resolves)."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family)


def allowed_host_names(host: str, extra: tuple[str, ...]) -> frozenset[str]:
    """The Host header names accepted by a server bound to `host`: loopback, host, extra."""
    names = {*LOOPBACK_HOSTS, *(h.lower() for h in extra)}
    if host not in ("", "0.0.0.0", "::"):
        names.add(f"[{host}]" if ":" in host else host.lower())
    return frozenset(names)


def uvicorn_config(app: ASGIApp, options: ServeOptions) -> uvicorn.Config:
    """uvicorn's settings for serving `app` with `options` (timeouts, concurrency, logging)."""
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


def error_response(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-style JSON error reply for `err`."""
    return JSONResponse(err.payload(), status_code=err.status, headers=headers)


class BodyGuard:
    """Read and drop a large or chunked unread request body before the reply, within bounds.

    uvicorn itself reads and drops a small unread body after the reply, so the connection can
    carry the next request. A large one is read here before the reply instead (a client
    still sending it would see its connection reset), up to DRAIN_MAX bytes while it keeps
    arriving; past those bounds the reply closes the connection rather than read a client's
    gigabytes for nothing.
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
        declared = int(length) if length.isdigit() else 0
        large = chunked or declared > DRAIN_LIMIT
        body_done = False  # (consulted only for a large body, which is never empty)

        async def guarded_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and large and not body_done:
                if declared <= DRAIN_MAX:  # includes chunked bodies (declared 0)
                    await _drain(guarded_receive, lambda: body_done)
                if not body_done:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"connection", b"close")],
                    }
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


async def _drain(receive: Receive, done: Callable[[], bool]) -> None:
    """Read and drop request body pieces until `done()`, within DRAIN_MAX bytes and the time bounds."""
    dropped = 0
    with anyio.move_on_after(DRAIN_SECONDS):
        while not done() and dropped <= DRAIN_MAX:
            with anyio.move_on_after(DRAIN_IDLE) as idle:
                message = await receive()
            if idle.cancelled_caught:
                return  # the client stopped sending
            dropped += len(message.get("body", b""))


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


class AccessCheck:
    """Refuse requests whose Host is not allowed (DNS rebinding) or whose Origin is foreign."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: frozenset[str], cors_origins: tuple[str, ...]
    ) -> None:
        self.app, self.allowed_hosts, self.cors_origins = app, allowed_hosts, cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(Request(scope))
            if error is not None:
                await error_response(error, {"connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> RequestError | None:
        allowed, origins = self.allowed_hosts, self.cors_origins
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
