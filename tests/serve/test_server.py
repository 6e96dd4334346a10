"""The OpenAI-compatible chat server, exercised over real HTTP on loopback.

Every network call has a timeout, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import faulthandler
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
import torch

from helpers.config import GPTConfig
from helpers.generate import GenerationSettings, generate_responses
from helpers.model import GPTModel
from helpers.prompts import format_prompt
from helpers.serve.api import _instruction_from_messages
from helpers.serve.http_server import ServeOptions
from helpers.serve.server import ChatServer, load_served_model, main, make_server, serve_in_thread
from helpers.tokenizer import encode

T = 30  # seconds: the limit of any one network operation in these tests


def _stalled_count() -> int:
    """The issue's 1,500 stalled connections, when the file-descriptor limit allows both ends."""
    try:
        import resource
    except ImportError:  # Windows
        return 200
    return min(1500, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 3)


STALLED = _stalled_count()
USER = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """A hard bound on every test here: a hang dumps all threads' stacks and ends pytest."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def tiny_model(tiny_config: GPTConfig, context_length: int = 512) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(replace(tiny_config, context_length=context_length)).eval()


@pytest.fixture()
def start(tiny_config: GPTConfig) -> Iterator[Callable[..., ChatServer]]:
    """start(**kw) -> a running server on a free port; every one is stopped after the test."""
    servers = []

    def _start(context_length: int = 512, **options: Any) -> ChatServer:
        model = tiny_model(tiny_config, context_length)
        srv = serve_in_thread(
            model, model_name="tiny-test", style="alpaca", options=ServeOptions(**options)
        )
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def server(start: Callable[..., ChatServer]) -> ChatServer:
    return start()


def chat(server: ChatServer, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    body.setdefault("model", "tiny-test")
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=T)


def client(server: ChatServer) -> Any:
    """The official OpenAI client pointed at `server` (a test-only dependency)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=T, max_retries=0)


def connect(server: ChatServer) -> tuple[socket.socket, BinaryIO]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=T)
    return sock, sock.makefile("rb")


def read_response(f: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 response with a Content-Length."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


def request(
    method: str,
    path: str,
    body: bytes = b"",
    host: str = "127.0.0.1",
    ctype: str = "application/json",
    extra: str = "",
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def closed(sock: socket.socket, within: float) -> bool:
    """True if the server closes `sock` within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# --- the OpenAI API ----------------------------------------------------------------------


def test_binds_loopback_and_lists_model(server: ChatServer) -> None:
    assert server.server_address[0] == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}"
    r = httpx.get(server.url + "/v1/models", timeout=T)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-test"]
    assert [m.id for m in client(server).models.list()] == ["tiny-test"]
    assert client(server).models.retrieve("tiny-test").id == "tiny-test"
    r = httpx.get(server.url + "/v1/models/gpt-4", timeout=T)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_equals_generate_responses(server: ChatServer) -> None:
    messages = [
        {"role": "user", "content": "an earlier turn"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Name the capital of France."},
    ]
    r = chat(server, messages=messages, max_tokens=6, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-test"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    # The last user message is the instruction, through the same prompt/generation code.
    entry = {"instruction": "Name the capital of France.", "input": ""}
    expected = generate_responses(
        server.model, [entry], GenerationSettings(max_new_tokens=6), progress=False
    )[0]
    assert choice["message"]["content"] == expected
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(encode(format_prompt(entry)))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 6


def test_seed_and_temperature_are_honoured(server: ChatServer) -> None:
    msg = [{"role": "user", "content": "Write a word."}]
    a = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=7).json()
    b = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=7).json()
    c = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=8).json()
    texts = [x["choices"][0]["message"]["content"] for x in (a, b, c)]
    assert texts[0] == texts[1]
    entry = {"instruction": "Write a word.", "input": ""}
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=8)
    same = generate_responses(server.model, [entry], sampled, progress=False)
    assert texts[2] == same[0]


def test_openai_client_plain_and_streamed_agree(server: ChatServer) -> None:
    api = client(server)
    kw = {"model": "tiny-test", "messages": USER, "max_tokens": 12, "temperature": 1.2, "seed": 3}
    whole = api.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        api.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_is_server_sent_events_ending_with_done(server: ChatServer) -> None:
    body = {"model": "tiny-test", "messages": USER, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=T) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in e for e in events)  # only with stream_options.include_usage


def test_bad_parameters_get_openai_style_400s(server: ChatServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": 0, "temperature": 1}, "top_k"),
        ({"top_k": 10**6, "temperature": 1}, "top_k"),
        ({"n": 3}, "n"),
        ({"n": 0}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"top_p": 0.5}, "top_p"),
        ({"stop": ["\n"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": 5}, "model"),
    ]
    for extra, param in cases:
        r = chat(server, **{"messages": USER, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, (extra, error)
        assert param in error["message"] or param == "messages", error
    # The official client surfaces them as BadRequestError with the parameter.
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="tiny-test", messages=USER, n=3)
    assert info.value.param == "n"


def test_values_json_cannot_hold_in_a_python_int_or_float_get_400(server: ChatServer) -> None:
    # 1e400 parses as an infinite float and NaN/Infinity are not JSON: 400s, not 500s.
    for raw in (
        '{"messages": %s, "max_tokens": 1e400}',
        '{"messages": %s, "temperature": 1e400}',
        '{"messages": %s, "temperature": NaN}',
        '{"messages": %s, "max_tokens": Infinity}',
    ):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=(raw % json.dumps(USER)).encode(),
            headers={"Content-Type": "application/json"},
            timeout=T,
        )
        assert r.status_code == 400, (raw, r.text)


def test_defaults_and_tiny_temperatures(server: ChatServer) -> None:
    greedy = chat(server, messages=USER, max_tokens=5, temperature=0).json()
    # 1e-300 would overflow softmax(logits / T): it means greedy, not a 500.
    tiny_t = chat(server, messages=USER, max_tokens=5, temperature=1e-300, seed=1)
    assert tiny_t.status_code == 200
    assert tiny_t.json()["choices"][0] == greedy["choices"][0]
    # null means "the default", the same as leaving the field out.
    for extra in ({"max_tokens": None, "temperature": None, "top_k": None}, {}):
        r = chat(server, messages=USER, seed=None, **extra)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] <= 256


def test_prompt_and_max_tokens_beyond_the_context(start: Callable[..., ChatServer]) -> None:
    server = start(context_length=40)
    n_prompt = len(encode(format_prompt({"instruction": USER[0]["content"], "input": ""})))
    room = 40 - n_prompt
    assert 1 < room < 20
    r = chat(server, messages=USER, max_tokens=room + 1)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    assert f"at most {room}" in error["message"]
    # Without max_tokens: what the context leaves, the prompt never cut; usage tells.
    body = chat(server, messages=USER, max_tokens=None, temperature=0).json()
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] <= room
    long = [{"role": "user", "content": "word " * 60}]
    r = chat(server, messages=long)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_message_parsing() -> None:
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}],
        },
    ]
    assert _instruction_from_messages(msgs) == ("Hello!", "Answer briefly.")


# --- HTTP: keep-alive, limits, timeouts ---------------------------------------------------


def test_keep_alive_survives_404_and_413(server: ChatServer) -> None:
    sock, f = connect(server)
    with sock:
        sock.sendall(request("POST", "/v1/nope", b'{"x": 1}'))
        status, headers, body = read_response(f)
        assert status == 404 and json.loads(body)["error"]["message"]
        sock.sendall(request("GET", "/v1/models"))
        assert read_response(f)[0] == 200  # the unread body was not taken as a request
        big = b"{" + b" " * 2_000_000 + b"}"
        sock.sendall(request("POST", "/v1/chat/completions", big))
        status, headers, body = read_response(f)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        sock.sendall(request("GET", "/v1/models"))
        assert read_response(f)[0] == 200
        # Wrong method: 405 as JSON, connection still fine.
        sock.sendall(request("GET", "/v1/chat/completions"))
        assert read_response(f)[0] == 405
        sock.sendall(
            request(
                "POST",
                "/v1/chat/completions",
                json.dumps({"messages": USER, "max_tokens": 2}).encode(),
            )
        )
        assert read_response(f)[0] == 200


def test_huge_declared_body_is_refused_and_the_connection_closed(server: ChatServer) -> None:
    sock, f = connect(server)
    with sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        head += "Content-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n"
        sock.sendall(head.encode())
        status, headers, _ = read_response(f)
        assert status == 413 and headers.get("connection") == "close"
        assert closed(sock, within=5)
    # A chunked body has no declared end: past the limit it is refused and not drained.
    sock, f = connect(server)
    with sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        head += "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"x" * 65536
        sock.sendall(head.encode() + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20)
        status, headers, body = read_response(f)
        assert status == 413 and headers.get("connection") == "close"
        assert closed(sock, within=5)


def test_malformed_requests_get_400(server: ChatServer) -> None:
    sock, f = connect(server)
    with sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
        )
        assert f.readline().startswith(b"HTTP/1.1 400 ")
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{oops",
        headers={"Content-Type": "application/json"},
        timeout=T,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"[1]",
        headers={"Content-Type": "application/json"},
        timeout=T,
    )
    assert r.status_code == 400


def test_stalled_connections_are_bounded_and_timed_out(start: Callable[..., ChatServer]) -> None:
    server = start(limit_concurrency=8, request_timeout=1.0)
    threads_before = threading.active_count()
    stalled = [connect(server)[0] for _ in range(STALLED)]
    try:
        # A slowloris client: half a request head, then nothing.
        stalled[0].sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)
        assert threading.active_count() == threads_before  # no thread per connection
        # Over the limit: answered at once with 503, not queued behind the stalled ones.
        t0 = time.monotonic()
        r = httpx.get(server.url + "/v1/models", timeout=T)
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        # Within the request timeout every stalled connection is closed...
        assert all(closed(s, within=5) for s in stalled)
        # ...and the server answers normally again.
        assert httpx.get(server.url + "/v1/models", timeout=T).status_code == 200
    finally:
        for s in stalled:
            s.close()


def test_slow_body_gets_408_and_idle_keep_alive_is_closed(start: Callable[..., ChatServer]) -> None:
    server = start(request_timeout=1.0, keep_alive_timeout=1)
    sock, f = connect(server)
    with sock:
        head = request("POST", "/v1/chat/completions", b"{}")  # declares 2 bytes
        sock.sendall(head.replace(b"Content-Length: 2", b"Content-Length: 50") + b"{")
        t0 = time.monotonic()
        status, headers, body = read_response(f)
        assert status == 408 and time.monotonic() - t0 < 5
        assert headers.get("connection") == "close"
    sock, f = connect(server)
    with sock:
        sock.sendall(request("GET", "/health"))
        assert read_response(f)[0] == 200
        assert closed(sock, within=5)  # idle after the reply: closed by the keep-alive timeout


# --- access: Host, Origin, Content-Type, CORS --------------------------------------------


def test_host_allow_list(server: ChatServer) -> None:
    ok = ["127.0.0.1", f"127.0.0.1:{server.port}", "localhost", "LOCALHOST:80", "[::1]:8000"]
    for host in ok:
        r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=T)
        assert r.status_code == 200, host
    for host in [
        "evil.example",
        f"evil.example:{server.port}",
        "127.0.0.1.evil.example",
        "localhost:x",
    ]:
        r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=T)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    # HTTP/1.0 without a Host header at all.
    sock, f = connect(server)
    with sock:
        sock.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        assert f.readline().split()[1] == b"400"


def test_allowed_hosts_option(start: Callable[..., ChatServer]) -> None:
    server = start(allowed_hosts=("my-box.lan",))
    r = httpx.get(server.url + "/v1/models", headers={"Host": "my-box.lan:8000"}, timeout=T)
    assert r.status_code == 200
    r = httpx.get(server.url + "/v1/models", headers={"Host": "other.lan"}, timeout=T)
    assert r.status_code == 400


def test_json_only_and_no_cross_origin_requests(server: ChatServer) -> None:
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    url = server.url + "/v1/chat/completions"
    # What an HTML form or a "simple" fetch from another site can send: text/plain.
    r = httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=T)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, content=body, timeout=T)  # no Content-Type at all
    assert r.status_code == 415
    r = httpx.post(
        url,
        content=body,
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
        timeout=T,
    )
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.options(
        url,
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=T,
    )
    assert "access-control-allow-origin" not in r.headers
    ok = httpx.post(
        url, content=body, headers={"Content-Type": "application/json; charset=utf-8"}, timeout=T
    )
    assert ok.status_code == 200


def test_cors_only_when_asked(start: Callable[..., ChatServer]) -> None:
    server = start(cors_origins=("http://localhost:3000",))
    url = server.url + "/v1/chat/completions"
    pre = httpx.options(
        url,
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=T,
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = chat(server, headers={"Origin": "http://localhost:3000"}, messages=USER, max_tokens=2)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = chat(server, headers={"Origin": "http://localhost:4000"}, messages=USER, max_tokens=2)
    assert r.status_code == 403


# --- concurrency, lifecycle ----------------------------------------------------------------


def test_generation_is_serialized_and_a_dropped_stream_frees_the_model(server: ChatServer) -> None:
    steps = []
    server.model.register_forward_hook(lambda *args: steps.append(1))
    body = {"model": "tiny-test", "messages": USER, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=T) as r:
        events = (line for line in r.iter_lines() if line)
        for _ in range(3):  # the role, then answer text: the model is busy with this request
            next(events)
    # The generation stops soon after the client has gone, long before its 400 tokens.
    assert server.lock.acquire(timeout=T)
    server.lock.release()
    assert 0 < len(steps) < 200, len(steps)
    # The client left after one event; the next request does not wait for 400 tokens.
    t0 = time.monotonic()
    results = []

    def ask() -> None:
        results.append(chat(server, messages=USER, max_tokens=3, temperature=0).json())

    workers = [threading.Thread(target=ask) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=T)
    assert len(results) == 3 and time.monotonic() - t0 < T
    # One model, one generation at a time: concurrent greedy requests agree.
    assert len({json.dumps(r["choices"]) for r in results}) == 1


def test_serve_in_thread_shutdown_and_threads(tiny_config: GPTConfig) -> None:
    before = threading.active_count()
    server = serve_in_thread(tiny_model(tiny_config), model_name="m")
    assert chat(server, model="m", messages=USER, max_tokens=2).status_code == 200
    assert threading.active_count() <= before + 2  # the server loop and the generation worker
    t0 = time.monotonic()
    server.shutdown()
    server.server_close()
    assert time.monotonic() - t0 < 10
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/v1/models", timeout=5)
    with serve_in_thread(tiny_model(tiny_config), model_name="m") as again:
        assert httpx.get(again.url + "/health", timeout=T).status_code == 200


def test_port_in_use_is_an_error_not_an_exit(server: ChatServer, tiny_config: GPTConfig) -> None:
    with pytest.raises(OSError):
        make_server(tiny_model(tiny_config), model_name="x", port=server.port)


def test_complete_without_http(server: ChatServer) -> None:
    reply = server.complete({"messages": USER, "max_tokens": 3})
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 3


# --- command line -------------------------------------------------------------------------


def test_cli_requires_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "--model" in capsys.readouterr().err


def test_cli_help_lists_the_access_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--allow-host", "--cors-origin", "--verbose", "--limit-concurrency"):
        assert flag in out


def test_cli_flags_come_from_serve_settings_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.serve.server import ServeSettings, build_parser, settings_from_args

    args = ["--model", "tiny", "--allow-host", "a.lan", "--allow-host", "b", "--port", "0"]
    settings = settings_from_args(build_parser().parse_args([*args, "--request-timeout", "2.5"]))
    assert settings == ServeSettings(
        model="tiny",
        port=0,
        options=ServeOptions(allowed_hosts=("a.lan", "b"), request_timeout=2.5),
    )
    assert settings_from_args(
        build_parser().parse_args(["--checkpoint", "m.safetensors"])
    ).options == (ServeOptions())
    for bad, message in [
        (["--model", "tiny", "--checkpoint", "x"], "give either a preset name (--model)"),
        (["--model", "tiny", "--port", "70000"], "argument --port: must be a port number"),
        (["--model", "tiny", "--request-timeout", "0"], "argument --request-timeout: must be > 0"),
        (["--model", "tiny", "--limit-concurrency", "x"], "expected a int"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="ServeOptions.limit_concurrency must be > 0"):
        ServeOptions(limit_concurrency=0)


def test_loads_a_checkpoint_with_its_prompt_style(
    tmp_path: Path, tiny_config: GPTConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.weights import save_model

    torch.manual_seed(0)
    model = GPTModel(tiny_config)
    path = save_model(model, tmp_path / "my-sft.safetensors", metadata={"prompt_style": "phi3"})
    loaded, name, style = load_served_model(checkpoint=str(path))
    assert (name, style) == ("my-sft", "phi3")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert "my-sft.safetensors" in capsys.readouterr().out
