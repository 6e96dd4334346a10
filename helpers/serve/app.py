"""The ASGI app of `helpers.serve`: the OpenAI and Ollama routes, JSON bodies, error replies.

`build_app` puts a `ChatEngine` behind Starlette routes: POST /v1/chat/completions (a whole
reply, or server-sent events with `stream: true`), GET /v1/models, /v1/models/{model}, the
Ollama pair POST /api/chat (newline-delimited JSON, or one object with `stream: false`) and
GET /api/tags, and a health check. `_read_json` takes JSON bodies only (415), within the
size limit (413) and time (408). Errors are OpenAI-style JSON replies, Ollama's
`{"error": "..."}` on the /api routes; the guards are `helpers.serve.http_server`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from helpers.serve.api import RequestError
from helpers.serve.engine import ChatEngine
from helpers.serve.http_server import AccessCheck, BodyGuard, ServeOptions, error_response
from helpers.serve.ollama import error_payload

log = logging.getLogger("helpers.serve")  # one logger for the whole server


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    """The request's JSON body: 415 unless application/json, 413 past `limit`, 408 if slow."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(
            f"Content-Type must be application/json, got {ctype or 'none'!r} (with curl: "
            "-H 'Content-Type: application/json')",
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


def _engine(request: Request) -> ChatEngine:
    engine: ChatEngine = request.app.state.engine
    return engine


def _options(request: Request) -> ServeOptions:
    options: ServeOptions = request.app.state.options
    return options


async def _chat(request: Request) -> Response:
    """POST /v1/chat/completions: a chat.completion, or server-sent events with stream."""
    engine, options = _engine(request), _options(request)
    try:
        body = await _read_json(request, options.max_body_bytes, options.request_timeout)
        job = engine.prepare(body)
    except RequestError as err:
        # A body that stopped arriving (408) leaves the connection in an unknown state.
        return error_response(err, {"connection": "close"} if err.status == 408 else None)
    if job.request.stream:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(
            engine.stream(job), media_type="text/event-stream", headers=headers
        )
    try:
        return JSONResponse(await engine.complete_async(job))
    except Exception as exc:  # report, keep serving; the client sees a 500 with the reason
        log.exception("generation failed")
        return error_response(RequestError(repr(exc), kind="server_error", status=500))


def _ollama_error(err: RequestError) -> Response:
    """Ollama's error reply, {"error": "..."}, with the status of `err`."""
    headers = {"connection": "close"} if err.status == 408 else None
    return JSONResponse(error_payload(err), status_code=err.status, headers=headers)


async def _ollama_chat(request: Request) -> Response:
    """POST /api/chat (Ollama): newline-delimited JSON, or one object with stream: false.

    The header X-Num-Ctx tells the context window used: options.num_ctx, capped at the
    model's context.
    """
    engine, options = _engine(request), _options(request)
    try:
        body = await _read_json(request, options.max_body_bytes, options.request_timeout)
        job, window = engine.prepare_ollama(body)
    except RequestError as err:
        return _ollama_error(err)
    headers = {"x-num-ctx": str(window)}
    if job.request.stream:
        return StreamingResponse(
            engine.stream_ollama(job), media_type="application/x-ndjson", headers=headers
        )
    try:
        return JSONResponse(await engine.chat_ollama(job), headers=headers)
    except Exception as exc:  # report, keep serving; the client sees a 500 with the reason
        log.exception("generation failed")
        return _ollama_error(RequestError(repr(exc), status=500))


async def _ollama_tags(request: Request) -> Response:
    """GET /api/tags (Ollama's model list): the one served model."""
    engine = _engine(request)
    n_params = sum(p.numel() for p in engine.model.parameters())
    size = f"{n_params / 1e6:.1f}M"
    model = {
        "name": engine.model_name,
        "model": engine.model_name,
        "details": {"format": "safetensors", "family": "gpt2", "parameter_size": size},
    }
    return JSONResponse({"models": [model]})


def _model_object(engine: ChatEngine) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "course"}


async def _models(request: Request) -> Response:
    """GET /v1/models: the one served model."""
    return JSONResponse({"object": "list", "data": [_model_object(_engine(request))]})


async def _one_model(request: Request) -> Response:
    """GET /v1/models/{model}: the served model, or a 404 for any other name."""
    engine, name = _engine(request), request.path_params["model"]
    if name != engine.model_name:
        return error_response(
            RequestError(
                f"The model {name!r} does not exist; this server serves {engine.model_name!r}",
                param="model",
                code="model_not_found",
                status=404,
            )
        )
    return JSONResponse(_model_object(engine))


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": _engine(request).model_name})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 as OpenAI-style JSON errors."""
    assert isinstance(exc, HTTPException)
    message = f"no route {request.method} {request.url.path}"
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(RequestError(message, status=exc.status_code), dict(exc.headers or {}))


def build_app(
    engine: ChatEngine, options: ServeOptions, allowed_hosts: frozenset[str]
) -> Starlette:
    """The ASGI app serving `engine`: routes, error replies and the access checks."""
    middleware = [
        Middleware(BodyGuard),
        Middleware(AccessCheck, allowed_hosts=allowed_hosts, cors_origins=options.cors_origins),
    ]
    if options.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(options.cors_origins),
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
        Route("/api/chat", _ollama_chat, methods=["POST"]),
        Route("/api/tags", _ollama_tags, methods=["GET"]),
        Route("/", _health, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error}
    )
    app.state.engine, app.state.options = engine, options
    return app
