"""The OpenAI-compatible chat server, exercised over real HTTP on loopback."""

from __future__ import annotations

import socket
from dataclasses import replace

import httpx
import pytest
import torch

from helpers.generate import generate_responses
from helpers.model import GPTModel
from helpers.serve import _instruction_from_messages, load_served_model, main, serve_in_thread


@pytest.fixture()
def server(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(replace(tiny_config, context_length=512)).eval()
    srv = serve_in_thread(model, model_name="tiny-test", style="alpaca")
    yield srv
    srv.shutdown()
    srv.server_close()


def chat(server, **body):
    body.setdefault("model", "tiny-test")
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_binds_loopback_and_lists_model(server):
    assert server.server_address[0] == "127.0.0.1"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-test"]


def test_chat_equals_generate_responses(server):
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
    expected = generate_responses(server.model, [entry], max_new_tokens=6, progress=False)[0]
    assert choice["message"]["content"] == expected
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 6


def test_seed_and_temperature_are_honoured(server):
    msg = [{"role": "user", "content": "Write a word."}]
    a = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=7).json()
    b = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=7).json()
    c = chat(server, messages=msg, max_tokens=8, temperature=1.5, seed=8).json()
    texts = [x["choices"][0]["message"]["content"] for x in (a, b, c)]
    assert texts[0] == texts[1]
    entry = {"instruction": "Write a word.", "input": ""}
    same = generate_responses(
        server.model, [entry], max_new_tokens=8, temperature=1.5, seed=8, progress=False
    )
    assert texts[2] == same[0]


def test_bad_requests_get_clear_errors(server):
    r = chat(server, messages=[])
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = chat(server, messages=[{"role": "system", "content": "hi"}])
    assert r.status_code == 400 and "role 'user'" in r.json()["error"]["message"]
    r = chat(server, messages=[{"role": "user", "content": "x"}], stream=True)
    assert r.status_code == 400 and "streaming" in r.json()["error"]["message"]
    r = chat(server, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert r.status_code == 400
    for top_k in (0, 10**6):
        r = chat(server, messages=[{"role": "user", "content": "x"}], top_k=top_k, temperature=1)
        assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
    # A malformed Content-Length (httpx refuses to send one, so a raw socket) gets a 400 too.
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 400 ")
    assert httpx.post(server.url + "/v1/completions", json={}).status_code == 404
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{oops",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400


def test_message_parsing():
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}],
        },
    ]
    assert _instruction_from_messages(msgs) == ("Hello!", "Answer briefly.")


def test_cli_requires_a_model(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "--model" in capsys.readouterr().err


def test_loads_a_checkpoint_with_its_prompt_style(tmp_path, tiny_config, capsys):
    from helpers.weights import save_model

    torch.manual_seed(0)
    model = GPTModel(tiny_config)
    path = save_model(model, tmp_path / "my-sft.safetensors", metadata={"prompt_style": "phi3"})
    loaded, name, style = load_served_model(checkpoint=str(path))
    assert (name, style) == ("my-sft", "phi3")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert "my-sft.safetensors" in capsys.readouterr().out
