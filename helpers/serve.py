"""Chat with the course model from any OpenAI client: a small local /v1/chat/completions server.

    python -m helpers.serve --model tiny
    python -m helpers.serve --checkpoint runs/gpt2-medium-sft.safetensors --port 8000

The last user message becomes the instruction, is wrapped in the prompt style the model
was fine-tuned with, and the answer is cut out of the generated text, all by the same code
the notebooks use (`helpers.generate.generate_responses`). Binds 127.0.0.1 only by default.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers.prompts import extract_response, format_prompt, get_style
from helpers.tokenizer import decode, encode

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY = 1_000_000  # bytes; a chat request is a few KB


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that holds the model; one generation at a time (a lock)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: Any, model_name: str, style: str) -> None:
        super().__init__(address, _Handler)
        self.model, self.model_name, self.style = model, model_name, get_style(style).name
        self.lock = threading.Lock()  # the model is not safe to run from two threads at once

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8000 (append /v1 for OpenAI clients)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one chat request body with an OpenAI chat.completion object."""
        from helpers.generate import generate_batch

        instruction, extra = _instruction_from_messages(body.get("messages"))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 0.0)
        seed = body.get("seed")
        if max_tokens < 1 or temperature < 0:
            raise ValueError("max_tokens must be >= 1 and temperature >= 0")
        entry = {"instruction": instruction, "input": extra, "output": ""}
        # The same steps as generate_responses, but keeping the token ids for `usage`.
        prompt_ids = encode(format_prompt(entry, self.style))
        with self.lock:
            new = generate_batch(
                self.model,
                [prompt_ids],
                max_tokens,
                temperature=temperature,
                top_k=body.get("top_k"),
                seed=None if seed is None else int(seed),
            )[0]
        text = extract_response(decode(new), self.style)
        n_prompt, n_out = len(prompt_ids), len(new)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if n_out >= max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
            },
        }


def _instruction_from_messages(messages: Any) -> tuple[str, str]:
    """(instruction, input): the last user message; a system message, if any, becomes the input."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("'messages' holds no message with role 'user'")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the last user message has no text content")
    system = [
        m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"
    ]
    extra = system[-1] if system and isinstance(system[-1], str) else ""
    return content, extra


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        """GET /v1/models (the one served model) and /health."""
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.server.model_name, "object": "model", "owned_by": "course"}
            self._send(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif self.path in ("/", "/health"):
            self._send(HTTPStatus.OK, {"status": "ok", "model": self.server.model_name})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        """POST /v1/chat/completions; bad requests get a 400 with the reason."""
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, "request body missing or too large")
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            if body.get("stream"):
                raise ValueError("streaming is not supported by this server; send stream=false")
            reply = self.server.complete(body)
        except (ValueError, TypeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except Exception as exc:  # report, keep serving; the client sees a 500 with the reason
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": {"message": repr(exc), "type": "server_error"}},
            )
            return
        self._send(HTTPStatus.OK, reply)


def make_server(
    model: Any,
    *,
    model_name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    style: str = "alpaca",
) -> ChatServer:
    """A ready ChatServer for `model` (port 0 picks a free port); call serve_forever()."""
    model.eval()
    return ChatServer((host, port), model, model_name, style)


def serve_in_thread(
    model: Any, *, model_name: str, style: str = "alpaca", port: int = 0
) -> ChatServer:
    """Start a server on 127.0.0.1 in a daemon thread (for notebooks and tests); shutdown() stops it."""
    server = make_server(model, model_name=model_name, port=port, style=style)
    threading.Thread(target=server.serve_forever, daemon=True, name="chat-server").start()
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


def main(argv: list[str] | None = None) -> None:
    """Command line: load a preset or checkpoint and serve it until Ctrl-C."""
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
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    model, name, style = load_served_model(args.model, args.checkpoint)
    server = make_server(
        model, model_name=name, host=args.host, port=args.port, style=args.style or style
    )
    server.verbose = args.verbose
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine; the server has no authentication")
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
