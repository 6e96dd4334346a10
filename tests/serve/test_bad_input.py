"""Bad input to the chat server over real HTTP and on its command line: a clear reply, never a crash.

Content parts whose text is not a string (400 on both routes), a body far over the limit that
a plain urllib client (the chapter's `query_model`) can still read the 413 of, and
`--checkpoint` files that are not course checkpoints or hold NaN weights (one `error:` line,
exit 2).
"""

from __future__ import annotations

import json
import os
import pickle
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from helpers.config import GPTConfig
from helpers.model import GPTModel
from helpers.serve.http_server import ServeOptions
from helpers.serve.server import ChatServer, main, serve_in_thread
from helpers.weights import save_model

T = 30  # seconds: the limit of any one network operation here
ROUTES = ["/v1/chat/completions", "/api/chat"]


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    from helpers.config import get_config

    torch.manual_seed(0)
    cfg = get_config("tiny", context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    srv = serve_in_thread(GPTModel(cfg).eval(), model_name="tiny-test", options=ServeOptions())
    yield srv
    srv.shutdown()
    srv.server_close()


def error_message(route: str, body: bytes) -> str:
    reply = json.loads(body)
    return reply["error"] if route == "/api/chat" else reply["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("text", [5, None, ["a"]])
def test_non_string_text_part_is_a_400(
    server: ChatServer, route: str, text: int | list[str] | None
) -> None:
    content = [{"type": "text", "text": text}]
    body = {
        "model": "tiny-test",
        "stream": False,
        "messages": [{"role": "user", "content": content}],
    }
    r = httpx.post(server.url + route, json=body, timeout=T)
    assert r.status_code == 400
    assert "text must be a string" in error_message(route, r.content)
    if route != "/api/chat":
        assert r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("route", ROUTES)
def test_50_mb_body_gets_a_413_that_urllib_can_read(server: ChatServer, route: str) -> None:
    # urllib sends the whole body before reading: a server that closes early resets it.
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 50_000_000}]}).encode()
    request = urllib.request.Request(
        server.url + route, data=big, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=T)
    assert info.value.code == 413
    assert "larger than" in error_message(route, info.value.read())
    # The server is still fine afterwards.
    assert httpx.get(server.url + "/v1/models", timeout=T).status_code == 200


def write_bad_checkpoints(folder: Path, tiny_config: GPTConfig) -> None:
    good = save_model(GPTModel(tiny_config), folder / "good.safetensors").read_bytes()
    files = {
        "truncated": good[: len(good) // 2],
        "random": os.urandom(4096),
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
        "oversized": (10**12).to_bytes(8, "little") + b"{}",  # a header claiming 1 TB
    }
    for name, data in files.items():
        (folder / f"{name}.safetensors").write_bytes(data)
    torch.save(GPTModel(tiny_config).state_dict(), folder / "torch-save.safetensors")
    diverged = GPTModel(tiny_config)
    with torch.no_grad():
        for p in diverged.parameters():
            p.fill_(float("nan"))
    save_model(diverged, folder / "all-nan.safetensors")  # loads fine, answers garbage


@pytest.mark.parametrize(
    "name", ["truncated", "random", "pickle", "oversized", "torch-save", "all-nan", "missing"]
)
def test_bad_checkpoint_files_give_one_error_line(
    tmp_path: Path, tiny_config: GPTConfig, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    write_bad_checkpoints(tmp_path, tiny_config)
    path = tmp_path / f"{name}.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(path), "--port", "0"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
