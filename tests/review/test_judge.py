"""LLM-as-judge: parsing, caching and resume, retries, server-down advice, and a real local server.

Two real HTTP servers on loopback, no mocks: a small stdlib "fake judge" that answers with
scripted replies (so scores are known), and helpers.serve.server with a tiny random model (so
transport and bookkeeping are tested against the course's own OpenAI-compatible server).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers.config import GPTConfig
from helpers.review.judge import JudgeClient, JudgeServerError, ollama_client, openai_client
from helpers.review.judge_scoring import CHAPTER_PROMPT, judge_prompt, parse_score, score_entries
from helpers.review.responses import entry_id


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("85", 85),
        ("Score: 85", 85),
        ("I would rate this response 85 out of 100.", 85),
        ("85/100", 85),
        ("On a scale from 0 to 100, I give it 72.", 72),
        ("**90**\n\nThe response is accurate.", 90),
        ("100", 100),
        ("0", 0),
        ("150", None),  # out of range
        ("-5", None),
        ("I'm sorry, but I cannot evaluate this response.", None),  # refusal
        ("", None),
        ("Between 70 and 80", None),  # a range is not a score
        # Exponent form is read as the whole number, never as its first digit.
        ("1e2", 100),
        ("Score: 8e1", 80),
        ("8.5E1", 85),
        ("1e308", None),  # out of range, not 1
        ("1e999", None),  # overflows to infinity
        ("2e-1", 0),
    ],
)
def test_parse_score_0_100(reply: str, expected: int | None) -> None:
    assert parse_score(reply, 0, 100) == expected


def test_parse_score_rubric() -> None:
    assert parse_score("4", 1, 5) == 4
    assert parse_score("On a scale of 1 to 5, I give 4.", 1, 5) == 4
    assert parse_score("Score: 3/5", 1, 5) == 3
    assert parse_score("6", 1, 5) is None
    assert parse_score("0", 1, 5) is None
    assert parse_score("3.5", 1, 5) is None
    assert parse_score("4e0", 1, 5) == 4
    assert parse_score("1e2", 1, 5) is None  # 100, not 1
    assert parse_score("5e-1", 1, 5) is None


def test_chapter_prompt_matches_the_book(responses_path: Path) -> None:
    entry = json.loads(responses_path.read_text())[0]
    prompt = judge_prompt(entry, "chapter")
    assert prompt.startswith("Given the input `Below is an instruction that describes a task.")
    assert "and correct output `The car is as fast as lightning.`" in prompt
    assert prompt.endswith(
        "score the model response `The car is as fast as a bullet.` on a scale from 0 to 100,"
        " where 100 is the best score. Respond with the integer number only."
    )
    assert CHAPTER_PROMPT.count("{") == 3
    assert "1 to 5" in judge_prompt(entry, "rubric")


class FakeJudge(ThreadingHTTPServer):
    """Loopback server speaking both APIs; replies come from `script` in order, then '50'."""

    daemon_threads = True

    def __init__(
        self,
        script: tuple[str, ...] | list[str] = (),
        fail_first: int = 0,
        non_json_first: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.script, self.fail_first = list(script), fail_first
        self.non_json_first, self.delay = non_json_first, delay
        self.requests: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        assert isinstance(srv, FakeJudge)
        srv.headers_seen.append(dict(self.headers))
        if srv.fail_first > 0:  # a flaky server: 503 before it works
            srv.fail_first -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if srv.non_json_first > 0:  # a proxy's error page with status 200
            srv.non_json_first -= 1
            self._send(b"<html>502 Bad Gateway</html>")
            return
        time.sleep(srv.delay)  # a slow server: up, but late
        srv.requests.append(body)
        text = srv.script.pop(0) if srv.script else "50"
        if self.path == "/api/chat":
            out = {
                "model": body["model"],
                "message": {"role": "assistant", "content": text},
                "done": True,
            }
        else:
            out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        self._send(json.dumps(out).encode())

    def _send(self, data: bytes) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the read-timeout test)


@pytest.fixture()
def entries(responses_path: Path) -> list[dict[str, Any]]:
    return json.loads(responses_path.read_text())[:6]


def test_scoring_counts_unparseable_and_sends_deterministic_options(
    entries: list[dict[str, Any]],
) -> None:
    server = FakeJudge(["90", "I cannot rate this.", "Score: 70 out of 100", "150", "60", "40"])
    try:
        report = score_entries(entries, ollama_client(base_url=server.url), progress=False)
    finally:
        server.shutdown()
    assert report.scores == [90, None, 70, None, 60, 40]
    assert [(r["index"], r["reply"]) for r in report.unparseable] == [
        (1, "I cannot rate this."),
        (3, "150"),
    ]
    assert report.mean == pytest.approx(65.0)
    assert "4/6 scored, 2 unparseable" in report.summary()
    first = server.requests[0]
    assert first["model"] == "llama3" and first["stream"] is False
    assert first["options"]["temperature"] == 0 and first["options"]["seed"] == 123
    assert first["messages"][0]["content"] == judge_prompt(entries[0])


def test_interrupted_run_resumes_from_cache(entries: list[dict[str, Any]], tmp_path: Path) -> None:
    cache = tmp_path / "judge.jsonl"
    server = FakeJudge(["10", "20", "30"])
    client = openai_client(server.url + "/v1", "judge-model")
    try:
        first = score_entries(entries[:3], client, cache_path=cache, progress=False)
        # Simulate a crash in the middle of writing the next line.
        with cache.open("a") as f:
            f.write('{"key": "abc", "rep')
        server.script = ["40", "50", "60"]
        second = score_entries(entries, client, cache_path=cache, progress=False)
    finally:
        server.shutdown()
    assert first.scores == [10, 20, 30]
    assert second.scores == [10, 20, 30, 40, 50, 60]
    assert second.n_cached == 3
    assert len(server.requests) == 6  # each entry was sent exactly once
    # A different judge model does not reuse another model's scores.
    server2 = FakeJudge(["1"] * 6)
    try:
        other = score_entries(
            entries[:1], openai_client(server2.url, "other"), cache_path=cache, progress=False
        )
    finally:
        server2.shutdown()
    assert other.n_cached == 0 and other.scores == [1]


def test_retries_with_backoff_then_succeeds(entries: list[dict[str, Any]]) -> None:
    server = FakeJudge(["77"], fail_first=2)
    try:
        client = ollama_client(base_url=server.url, retries=3, backoff=0.01)
        assert score_entries(entries[:1], client, progress=False).scores == [77]
    finally:
        server.shutdown()
    assert len(server.headers_seen) == 3


def test_server_down_gives_advice_not_a_traceback(unused_port: int) -> None:
    client = ollama_client(base_url=f"http://127.0.0.1:{unused_port}", retries=1, backoff=0.01)
    assert not client.is_available()
    with pytest.raises(JudgeServerError, match=r"ollama serve.*port \d+.*ollama pull llama3"):
        client.chat("hello")
    with pytest.raises(JudgeServerError, match="No judge server answered"):
        client.check()


def test_api_key_from_env_never_shown(
    monkeypatch: pytest.MonkeyPatch, entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("JUDGE_API_KEY", "sk-secret-123")
    server = FakeJudge(["80"])
    client = openai_client(server.url, "m")
    cache = tmp_path / "c.jsonl"
    try:
        score_entries(entries[:1], client, cache_path=cache, progress=False)
    finally:
        server.shutdown()
    assert server.headers_seen[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(client) and "sk-secret" not in str(client)
    assert "sk-secret" not in cache.read_text()
    with pytest.raises(ValueError, match="api must be"):
        JudgeClient(api="grpc")


def test_judge_against_real_course_server(
    entries: list[dict[str, Any]], tiny_config: GPTConfig, tmp_path: Path
) -> None:
    import torch

    from helpers.model import GPTModel
    from helpers.serve.server import serve_in_thread

    torch.manual_seed(0)
    model = GPTModel(replace(tiny_config, context_length=512))
    server = serve_in_thread(model, model_name="tiny-test")
    try:
        client = openai_client(server.url + "/v1", "tiny-test", max_tokens=4)
        client.check()
        report = score_entries(entries[:3], client, cache_path=tmp_path / "j.jsonl", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    # A random model's replies are gibberish: every reply is kept, none is dropped.
    assert len(report.results) == 3
    assert all(isinstance(r["reply"], str) for r in report.results)
    assert len(report.unparseable) == sum(s is None for s in report.scores)
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 3


@pytest.fixture()
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _auth_seen(client: JudgeClient, server: FakeJudge) -> str | None:
    try:
        client.chat("hello")
    finally:
        server.shutdown()
    return server.headers_seen[-1].get("Authorization")


def test_openai_key_goes_only_to_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-456")
    # A third-party (here plain-HTTP, local) server never receives OPENAI_API_KEY.
    server = FakeJudge(["1"])
    assert _auth_seen(openai_client(server.url + "/v1", "m"), server) is None
    assert openai_client("http://api.openai.com/v1", "m").api_key is None  # not https
    assert openai_client("https://api.openai.com.evil.example/v1", "m").api_key is None
    official = openai_client("https://api.openai.com/v1", "gpt-4o-mini")
    assert official.api_key == "sk-openai-456" and "sk-openai" not in repr(official)
    # JUDGE_API_KEY or an explicit key is meant for the judge server, whichever it is.
    server = FakeJudge(["1"])
    assert _auth_seen(openai_client(server.url, "m", api_key="sk-mine"), server) == (
        "Bearer sk-mine"
    )
    monkeypatch.setenv("JUDGE_API_KEY", "sk-judge")
    server = FakeJudge(["1"])
    assert _auth_seen(openai_client(server.url, "m"), server) == "Bearer sk-judge"


def test_key_not_in_error_messages(unused_port: int) -> None:
    client = openai_client(f"http://127.0.0.1:{unused_port}", "m", api_key="sk-hidden-789")
    client.retries, client.backoff = 0, 0.0
    with pytest.raises(JudgeServerError) as err:
        client.chat("hello")
    assert "sk-hidden" not in str(err.value) and "sk-hidden" not in repr(client)


def test_unparseable_replies_are_asked_again_on_resume(
    entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    cache = tmp_path / "judge.jsonl"
    server = FakeJudge(["I cannot rate this.", "80", "9" * 309])
    client = ollama_client(base_url=server.url)
    try:
        first = score_entries(entries[:3], client, cache_path=cache, progress=False)
        server.script = ["75", "70"]
        second = score_entries(entries[:3], client, cache_path=cache, progress=False)
    finally:
        server.shutdown()
    assert first.scores == [None, 80, None]  # a 309-digit number is no score, not a crash
    assert second.scores == [75, 80, 70] and second.n_cached == 1
    assert len(server.requests) == 5


def test_truncated_last_line_is_repaired_not_merged_into_the_next(
    entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    cache = tmp_path / "judge.jsonl"
    server = FakeJudge(["10", "20"])
    client = ollama_client(base_url=server.url)
    try:
        score_entries(entries[:1], client, cache_path=cache, progress=False)
        with cache.open("ab") as f:  # crash mid-line, even mid-character
            f.write('{"entry_id": "x", "reply": "caf\u00e9'.encode()[:-1])
        score_entries(entries[:2], client, cache_path=cache, progress=False)
        third = score_entries(entries[:2], client, cache_path=cache, progress=False)
    finally:
        server.shutdown()
    assert third.scores == [10, 20] and third.n_cached == 2
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(line)["score"] for line in lines)
    # Stored under the one entry id that ratings use too.
    assert [json.loads(line)["entry_id"] for line in lines] == [entry_id(e) for e in entries[:2]]


def test_non_utf8_cache_is_one_clear_error(entries: list[dict[str, Any]], tmp_path: Path) -> None:
    cache = tmp_path / "judge.jsonl"
    cache.write_bytes(b'{"reply": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"judge\.jsonl: judge cache is not UTF-8"):
        score_entries(entries[:1], ollama_client(), cache_path=cache, progress=False)


def test_reply_that_is_not_json_is_retried_then_reported(entries: list[dict[str, Any]]) -> None:
    server = FakeJudge(["66"], non_json_first=1)
    try:
        client = ollama_client(base_url=server.url, retries=2, backoff=0.01)
        assert score_entries(entries[:1], client, progress=False).scores == [66]
        server.non_json_first = 5
        with pytest.raises(JudgeServerError, match=r"kept failing \(3 attempts\).*not JSON"):
            client.chat("hello")
    finally:
        server.shutdown()


def test_read_timeout_is_not_reported_as_server_down() -> None:
    server = FakeJudge(["1"], delay=1.0)
    try:
        client = ollama_client(base_url=server.url, timeout=0.2, retries=0)
        with pytest.raises(JudgeServerError, match="no reply within 0.2 s") as err:
            client.chat("hello")
    finally:
        server.shutdown()
    assert "ollama serve" not in str(err.value)


def test_reply_length_limit_is_sent_to_both_apis() -> None:
    # Ollama reads the limit from options.num_predict (without it: hundreds of tokens).
    options = ollama_client()._payload("p")["options"]
    assert options["num_predict"] == 32 and options["seed"] == 123
    assert ollama_client(max_tokens=3)._payload("p")["options"]["num_predict"] == 3
    assert openai_client("http://h/v1", "m", max_tokens=5)._payload("p")["max_tokens"] == 5
    # None sends no limit: the chapter's query_model request, the server's own default.
    assert "num_predict" not in ollama_client(max_tokens=None)._payload("p")["options"]
    assert "max_tokens" not in openai_client("http://h/v1", "m", max_tokens=None)._payload("p")
    server = FakeJudge(["7"])
    try:
        assert ollama_client(base_url=server.url, max_tokens=4).chat("p") == "7"
    finally:
        server.shutdown()
    assert server.requests[0]["options"]["num_predict"] == 4
