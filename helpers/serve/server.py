"""Chat with the course model from any OpenAI or Ollama client: a small local chat server.

    python -m helpers.serve --model tiny
    python -m helpers.serve --checkpoint runs/gpt2-medium-sft.safetensors --port 8000

Two protocols, one model: OpenAI's POST /v1/chat/completions and Ollama's POST /api/chat
(what the chapter's `query_model` calls; `helpers.serve.ollama`). The last user message
becomes the instruction, is wrapped in the prompt style the model was fine-tuned with, and
the answer is cut out of the generated text by the same code the notebooks use
(`helpers.prompts`, `helpers.generate`). `stream: true` sends the answer as server-sent
events, as the OpenAI API does; /api/chat streams newline-delimited JSON unless
`"stream": false`, as Ollama does. The request's `model` name is not checked: the one loaded
model answers (GET /v1/models and /api/tags tell its name). Out-of-range parameters, `n`
other than 1, and a prompt plus `max_tokens` beyond the model's context get a 400 that names
the parameter; the prompt is never cut behind the client's back.

The HTTP side is Starlette on uvicorn: keep-alive, timeouts, a body limit (413), a bound on
concurrent connections (503 beyond it), a Host allow-list against DNS rebinding (loopback
names by default), JSON bodies only (415 otherwise) and no CORS unless asked for. Binds
127.0.0.1 only by default; the server has no authentication.

This module holds the server's lifecycle (`ChatServer`, `make_server`, `serve_in_thread`) and
the command line. The rest: `serve_engine` (the model side), `serve_app` (routes),
`serve_http` (limits and access checks), `serve_api` (request checks, reply objects) and
`serve_stream` (server-sent events), `serve_ollama` (the Ollama protocol).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from helpers.config import resolve_model_name
from helpers.prompts import PROMPT_STYLES
from helpers.run.fields import (
    add_dataclass_flags,
    flag_values,
    one_of,
    optional,
    setting,
    text,
    validate,
)
from helpers.runtime import describe_model
from helpers.serve.app import build_app
from helpers.serve.engine import ChatEngine
from helpers.serve.http_server import ServeOptions, allowed_host_names, bind_socket, uvicorn_config
from helpers.weights import build_model, load_model, read_metadata

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ChatServer(ChatEngine):
    """An OpenAI- and Ollama-compatible chat server for one model; one generation at a time (a lock).

    The listening socket is bound on creation (port 0 picks a free port: see `.port`);
    `serve_forever()` serves until `shutdown()` is called from another thread (or Ctrl-C).
    `complete(body)` answers a request body without HTTP (see `ChatEngine`).
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
        super().__init__(model, model_name, style)
        self.options = options or ServeOptions()
        self.host = host
        self._socket = bind_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.server_address = (host, self.port)
        self.allowed_hosts = allowed_host_names(host, self.options.allowed_hosts)
        self.app = build_app(self, self.options, self.allowed_hosts)
        self._serving = threading.Event()
        self._uvicorn = uvicorn.Server(uvicorn_config(self.app, self.options))

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8000 (append /v1 for OpenAI clients)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

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
        self.stop_generating()
        self._uvicorn.should_exit = True
        deadline = time.monotonic() + self.options.shutdown_timeout + 5.0
        while self._serving.is_set():
            if time.monotonic() > deadline:
                self._uvicorn.force_exit = True
            time.sleep(0.01)

    def server_close(self) -> None:
        """Release the listening socket and the generation thread (after shutdown())."""
        self._socket.close()
        self.release_worker()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


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
    if checkpoint:
        meta = read_metadata(checkpoint)
        # helpers.finetune records the prompt style it trained with; serve with the same one.
        style = meta.get("prompt_style") or "alpaca"
        print(
            f"model: checkpoint {Path(checkpoint).name} ({meta.get('weights', 'course weights')})"
        )
        return load_model(checkpoint), Path(checkpoint).stem, style
    if not model:
        raise ValueError("give a preset name (--model) or a checkpoint (--checkpoint)")
    net, weights = build_model(model)
    name = resolve_model_name(model)
    print(f"model: {describe_model(name, weights)}")
    return net, name, "alpaca"


def _port(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535
    return None if ok else f"must be a port number 0-65535, got {value!r}"


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """What `python -m helpers.serve` serves, and where; validated. Fields with help are flags."""

    model: str | None = setting(
        None, "preset name, e.g. tiny or gpt2-medium (OpenAI weights)", optional(text)
    )
    checkpoint: str | None = setting(
        None, "a .safetensors file written by helpers.weights.save_model", optional(text)
    )
    host: str = setting(DEFAULT_HOST, "address to listen on; 127.0.0.1 is this machine only", text)
    port: int = setting(DEFAULT_PORT, "TCP port (0: any free one)", _port)
    style: str | None = setting(
        None,
        "prompt style (default: the checkpoint's, else alpaca)",
        optional(one_of(*PROMPT_STYLES)),
        choices=tuple(PROMPT_STYLES),
    )
    options: ServeOptions = field(default_factory=ServeOptions)  # HTTP limits and access

    def __post_init__(self) -> None:
        validate(self)
        if (self.model is None) == (self.checkpoint is None):
            raise ValueError("give either a preset name (--model) or a checkpoint (--checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options, generated from ServeSettings and ServeOptions."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.serve", description=__doc__.splitlines()[0]
    )
    title = "model and address (ServeSettings; --model or --checkpoint is required)"
    add_dataclass_flags(parser, ServeSettings, title)
    add_dataclass_flags(parser, ServeOptions, "HTTP limits and access (ServeOptions)")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The parsed flags as validated ServeSettings; ValueError if they do not fit together."""
    options = ServeOptions(**flag_values(args, ServeOptions))
    return ServeSettings(**flag_values(args, ServeSettings), options=options)


def main(argv: list[str] | None = None) -> None:
    """Command line: load a preset or checkpoint and serve it until Ctrl-C."""
    parser = build_parser()
    try:
        settings = settings_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    verbose = settings.options.verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        model, name, style = load_served_model(settings.model, settings.checkpoint)
    except (OSError, ValueError) as err:  # a missing or broken file: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    server = make_server(
        model,
        model_name=name,
        host=settings.host,
        port=settings.port,
        style=settings.style or style,
        options=settings.options,
    )
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "warning: listening beyond this machine; the server has no authentication. "
            "Clients must use an allowed Host name (--allow-host)."
        )
    print(
        f"serving {name} ({server.style} prompts) at {server.url}/v1/chat/completions "
        f"(OpenAI) and {server.url}/api/chat (Ollama); Ctrl-C stops"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
