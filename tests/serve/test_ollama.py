"""The Ollama /api/chat route of the chat server: the chapter's `query_model` runs against it.

Over real HTTP on loopback (every call has a timeout), plus the request checks without HTTP.
"""

from __future__ import annotations

import faulthandler
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from helpers.generate import GenerationSettings, generate_responses
from helpers.model import GPTModel
from helpers.prompts import format_prompt
from helpers.review.judge import ollama_client
from helpers.serve.api import DEFAULT_MAX_TOKENS, RequestError
from helpers.serve.ollama import fit_window, parse_ollama_request
from helpers.serve.server import ChatServer, serve_in_thread
from helpers.tokenizer import encode

T = 30  # seconds: the limit of any one network operation in these tests
PROMPT = "Name the capital of France."
USER = [{"role": "user", "content": PROMPT}]
ENTRY = {"instruction": PROMPT, "input": ""}


def query_model(
    prompt: str, model: str = "llama3", url: str = "http://localhost:11434/api/chat"
) -> str:
    """The chapter's query_model (section 7.8), as printed, plus a timeout."""
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    payload = json.dumps(data).encode("utf-8")
    request = urllib.request.Request(url, data=payload, method="POST")
    request.add_header("Content-Type", "application/json")
    response_data = ""
    with urllib.request.urlopen(request, timeout=T) as response:
        while True:
            line = response.readline().decode("utf-8")
            if not line:
                break
            response_json = json.loads(line)
            response_data += response_json["message"]["content"]
    return response_data


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """A hard bound on every test here: a hang dumps all threads' stacks and ends pytest."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    from helpers.config import get_config

    torch.manual_seed(0)
    config = get_config("tiny", context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    model = GPTModel(config).eval()
    with serve_in_thread(model, model_name="tiny-test", style="alpaca") as srv:
        yield srv


def api_chat(server: ChatServer, **body: Any) -> httpx.Response:
    body.setdefault("messages", USER)
    return httpx.post(server.url + "/api/chat", json=body, timeout=T)


def lines(server: ChatServer, **body: Any) -> list[dict[str, Any]]:
    """The parsed lines of a streamed /api/chat reply."""
    body.setdefault("messages", USER)
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=T) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def test_the_chapters_query_model_runs_unchanged(server: ChatServer) -> None:
    answer = query_model(PROMPT, url=server.url + "/api/chat")
    # The same answer as the notebooks' generation (greedy), and as the judge client's
    # non-streamed request; the default answer length is the OpenAI route's.
    n_prompt = len(encode(format_prompt(ENTRY)))
    room = min(DEFAULT_MAX_TOKENS, 128 - n_prompt)  # num_ctx 2048 is capped at 128
    expected = generate_responses(
        server.model, [ENTRY], GenerationSettings(max_new_tokens=room), progress=False
    )
    assert answer == expected[0]
    judge = ollama_client("tiny-test", server.url, max_tokens=None)  # no num_predict, as above
    assert judge.is_available()
    assert judge.chat(PROMPT) == answer


def test_streamed_lines_add_up_and_end_with_the_counts(server: ChatServer) -> None:
    streamed = lines(server, options={"num_predict": 12, "temperature": 1.3, "seed": 5})
    assert all(not x["done"] for x in streamed[:-1])
    assert all(x["message"]["role"] == "assistant" for x in streamed)
    assert all(x["model"] == "tiny-test" and x["created_at"].endswith("Z") for x in streamed)
    last = streamed[-1]
    assert last["done"] is True and last["message"]["content"] == ""
    assert last["done_reason"] in ("stop", "length")
    assert last["prompt_eval_count"] == len(encode(format_prompt(ENTRY)))
    assert 1 <= last["eval_count"] <= 12
    assert last["total_duration"] >= last["eval_duration"] >= 0
    whole = api_chat(
        server, stream=False, options={"num_predict": 12, "temperature": 1.3, "seed": 5}
    )
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    body = whole.json()
    assert body["done"] is True and body["eval_count"] == last["eval_count"]
    text = "".join(x["message"]["content"] for x in streamed)
    assert text == body["message"]["content"]


def test_seed_temperature_and_num_predict_are_honoured(server: ChatServer) -> None:
    def answer(**options: Any) -> str:
        return api_chat(server, stream=False, options=options).json()["message"]["content"]

    sampled = answer(seed=8, temperature=1.5, num_predict=8)
    assert sampled == answer(seed=8, temperature=1.5, num_predict=8)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=8)
    same = generate_responses(server.model, [ENTRY], settings, progress=False)
    assert sampled == same[0]
    greedy = generate_responses(
        server.model, [ENTRY], GenerationSettings(max_new_tokens=5), progress=False
    )
    assert answer(num_predict=5, temperature=0, top_k=0) == greedy[0]
    # null options and runtime-only options change nothing; neutral sampling values pass.
    neutral = answer(num_predict=5, seed=None, num_thread=2, top_p=1, repeat_penalty=1.0)
    assert neutral == greedy[0]


def test_num_ctx_is_the_window_capped_at_the_models_context(server: ChatServer) -> None:
    n_prompt = len(encode(format_prompt(ENTRY)))
    r = api_chat(server, stream=False, options={"num_ctx": 4096, "num_predict": -1})
    assert r.status_code == 200 and r.headers["x-num-ctx"] == "128"
    assert r.json()["eval_count"] <= 128 - n_prompt
    r = api_chat(server, stream=False, options={"num_ctx": n_prompt + 3, "num_predict": -2})
    assert r.status_code == 200 and r.headers["x-num-ctx"] == str(n_prompt + 3)
    assert r.json()["eval_count"] <= 3
    r = api_chat(server, stream=False, options={"num_ctx": n_prompt + 3, "num_predict": 4})
    assert r.status_code == 400
    assert "at most 3 tokens" in r.json()["error"] and "num_predict" in r.json()["error"]
    r = api_chat(server, options={"num_ctx": n_prompt})
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]
    long = [{"role": "user", "content": "word " * 200}]
    r = api_chat(server, messages=long, options={"num_ctx": 2048})
    assert r.status_code == 400 and "context window is 128 tokens" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"options": [1]}, "options"),
        ({"options": {"num_ctx": 0}}, "options.num_ctx"),
        ({"options": {"num_ctx": "2048"}}, "options.num_ctx"),
        ({"options": {"num_predict": 0}}, "options.num_predict"),
        ({"options": {"num_predict": -3}}, "options.num_predict"),
        ({"options": {"temperature": -1}}, "options.temperature"),
        ({"options": {"seed": 1.5}}, "options.seed"),
        ({"options": {"top_k": -1}}, "options.top_k"),
        ({"options": {"top_p": 0.9}}, "options.top_p"),
        ({"options": {"stop": ["\n"]}}, "options.stop"),
        ({"options": {"num_ctxx": 2048}}, "num_ctxx"),
        ({"format": "json"}, "format"),
        ({"stream": "yes"}, "stream"),
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_requests_get_ollama_style_400s(
    server: ChatServer,
    body: dict[str, list[int]]
    | dict[str, dict[str, int]]
    | dict[str, dict[str, str]]
    | dict[str, dict[str, float]]
    | dict[str, dict[str, list[str]]]
    | dict[str, str]
    | dict[str, int]
    | dict[str, list[Any]],
    names: str,
) -> None:
    r = api_chat(server, **body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and names in r.json()["error"]


def test_same_access_checks_as_the_openai_route(server: ChatServer) -> None:
    body = json.dumps({"messages": USER}).encode()
    url = server.url + "/api/chat"
    # What `curl -d` or an HTML form sends without a JSON Content-Type: 415, with the fix.
    r = httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=T)
    assert r.status_code == 415 and "-H 'Content-Type: application/json'" in r.json()["error"]
    r = httpx.post(url, content=body, headers={"Host": "evil.example"}, timeout=T)
    assert r.status_code == 400
    r = httpx.post(url, content=body, headers={"Origin": "https://evil.example"}, timeout=T)
    assert r.status_code == 403
    # urllib without add_header sends application/x-www-form-urlencoded: refused too.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=T)
    assert info.value.code == 415


def test_tags_list_the_served_model(server: ChatServer) -> None:
    r = httpx.get(server.url + "/api/tags", timeout=T)
    assert r.status_code == 200
    (model,) = r.json()["models"]
    assert model["name"] == model["model"] == "tiny-test"


# --- request checks without HTTP ----------------------------------------------------------


def test_defaults_follow_ollama_where_the_course_allows() -> None:
    r = parse_ollama_request({"messages": USER}, vocab_size=50257)
    assert r.chat.stream is True  # Ollama streams unless told not to
    assert (r.chat.temperature, r.chat.seed, r.chat.top_k, r.num_ctx) == (0.0, None, None, None)
    assert fit_window(r, 30, 1024) == (DEFAULT_MAX_TOKENS, 1024)
    chapter = {"messages": USER, "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    r = parse_ollama_request(chapter, vocab_size=50257)
    assert (r.chat.seed, r.num_ctx, r.chat.stream) == (123, 2048, True)
    assert fit_window(r, 30, 1024) == (DEFAULT_MAX_TOKENS, 1024)
    fill = parse_ollama_request({"messages": USER, "options": {"num_predict": -1}}, vocab_size=9)
    assert fit_window(fill, 30, 1024) == (994, 1024)


def test_option_errors_name_the_option() -> None:
    with pytest.raises(RequestError) as info:
        parse_ollama_request({"messages": USER, "options": {"seed": "x"}}, vocab_size=9)
    assert info.value.param == "options.seed"
    assert info.value.message.startswith("options.seed must be an integer")
