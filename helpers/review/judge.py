"""A chat client for the judge model behind Ollama or an OpenAI-compatible server.

The chapter asks Llama 3 (via Ollama) to grade answers. `JudgeClient.chat` sends one user
message deterministically (temperature 0, fixed seed), with timeouts and retries, and turns
every failure into a `JudgeServerError` that says what to do: start the server, wait for a
slow one, fix the URL. Scoring runs (prompts, parsing, the resumable cache) live in
`helpers.review.judge_scoring`.

API keys: an explicit `api_key`, else `JUDGE_API_KEY` from the environment; `OPENAI_API_KEY`
is used only for https://api.openai.com, so it is never sent to a third-party or plain-HTTP
server. Keys are never shown in reprs or error messages, and never written to caches.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

OLLAMA_URL = "http://localhost:11434"
OPENAI_URL = "https://api.openai.com"
DEFAULT_JUDGE_MODEL = "llama3"


class JudgeServerError(RuntimeError):
    """The judge server is unreachable or refused the request; the message says what to do."""


def _env_api_key(base_url: str) -> str | None:
    """The key the environment offers for `base_url`: JUDGE_API_KEY, or OPENAI_API_KEY for OpenAI."""
    if os.environ.get("JUDGE_API_KEY"):
        return os.environ["JUDGE_API_KEY"]
    url = httpx.URL(base_url)
    if url.scheme == "https" and url.host == httpx.URL(OPENAI_URL).host:
        return os.environ.get("OPENAI_API_KEY") or None
    return None


@dataclass
class JudgeClient:
    """A chat client for `api` 'ollama' (/api/chat) or 'openai' (/v1/chat/completions)."""

    base_url: str = OLLAMA_URL
    model: str = DEFAULT_JUDGE_MODEL
    api: str = "ollama"
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 0.5
    seed: int = 123
    temperature: float = 0.0
    # The reply's length limit: Ollama's options.num_predict, OpenAI's max_tokens; a score needs
    # a few tokens, and without it Ollama-style servers may write hundreds. None: no limit sent.
    max_tokens: int | None = 32
    # Never shown in repr, never written to caches; for 'openai', read by `_env_api_key`.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api not in ("ollama", "openai"):
            raise ValueError(f"api must be 'ollama' or 'openai', got {self.api!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.api == "openai" and self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        if self.api_key is None and self.api == "openai":
            self.api_key = _env_api_key(self.base_url)

    @property
    def _chat_path(self) -> str:
        return "/api/chat" if self.api == "ollama" else "/v1/chat/completions"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _transport_message(self, exc: httpx.TransportError, timeout: float) -> str:
        """What a transport failure means: no server, a slow server, or a broken connection."""
        if isinstance(exc, httpx.ReadTimeout):
            return (
                f"The judge server at {self.base_url} accepted the request but sent no reply"
                f" within {timeout:g} s. It is running but slow (loading {self.model}, or a"
                " long answer): raise `timeout`, or use a smaller judge model."
            )
        if not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return (
                f"The connection to the judge server at {self.base_url} broke"
                f" ({type(exc).__name__}); is it still running?"
            )
        msg = f"No judge server answered at {self.base_url} ({type(exc).__name__})."
        if self.api == "ollama":
            port = httpx.URL(self.base_url).port or 11434
            msg += (
                f" Start Ollama with `ollama serve` (it listens on port {port}) and fetch the"
                f" judge model once with `ollama pull {self.model}`; or point base_url at"
                " another server."
            )
        else:
            msg += (
                " Start an OpenAI-compatible server there (e.g. `python -m helpers.serve"
                " --model tiny`, vLLM, llama.cpp server, LM Studio) or fix base_url."
            )
        return msg

    def check(self) -> None:
        """Raise JudgeServerError with start-up advice unless the server answers quickly."""
        path = "/api/tags" if self.api == "ollama" else "/v1/models"
        try:
            r = httpx.get(self.base_url + path, headers=self._headers(), timeout=3.0)
        except httpx.TransportError as exc:
            raise JudgeServerError(self._transport_message(exc, 3.0)) from None
        if r.status_code >= 400:
            raise JudgeServerError(f"Judge server at {self.base_url} answered HTTP {r.status_code}")

    def is_available(self) -> bool:
        """True when `check()` passes."""
        try:
            self.check()
        except JudgeServerError:
            return False
        return True

    def _payload(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        if self.api == "ollama":
            options: dict[str, Any] = {
                "seed": self.seed,
                "temperature": self.temperature,
                "num_ctx": 2048,
            }
            if self.max_tokens is not None:
                options["num_predict"] = self.max_tokens
            return {"model": self.model, "messages": messages, "options": options, "stream": False}
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        return payload

    def chat(self, prompt: str) -> str:
        """Send one user message and return the reply text, retrying transient failures.

        Retried: connection failures and timeouts, HTTP 429 and 5xx, and a 200 reply whose
        body is not JSON. Other HTTP errors (wrong model name, bad request) fail at once.
        """
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = httpx.post(
                    self.base_url + self._chat_path,
                    json=self._payload(prompt),
                    headers=self._headers(),
                    timeout=self.timeout,
                )
            except httpx.TransportError as exc:  # refused, reset, timed out: worth a retry
                last = exc
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = JudgeServerError(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            if r.status_code >= 400:
                hint = f" (try `ollama pull {self.model}`)" if r.status_code == 404 else ""
                raise JudgeServerError(
                    f"Judge server at {self.base_url} refused the request: HTTP {r.status_code}"
                    f" {r.text[:200]}{hint}"
                )
            try:
                body = r.json()
            except (json.JSONDecodeError, UnicodeDecodeError):  # a proxy's HTML page, a cut body
                last = JudgeServerError(f"a reply that is not JSON: {r.text[:200]!r}")
                continue
            return self._reply_text(body)
        if isinstance(last, httpx.TransportError):
            raise JudgeServerError(self._transport_message(last, self.timeout)) from None
        raise JudgeServerError(
            f"Judge server at {self.base_url} kept failing ({self.retries + 1} attempts): {last}"
        )

    def _reply_text(self, body: Mapping[str, Any]) -> str:
        try:
            if self.api == "ollama":
                return str(body["message"]["content"])
            return str(body["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeServerError(
                f"Unexpected reply from judge server: {str(body)[:200]}"
            ) from None


def ollama_client(
    model: str = DEFAULT_JUDGE_MODEL, base_url: str = OLLAMA_URL, **kw: Any
) -> JudgeClient:
    """The chapter's setup: Llama 3 served by Ollama on localhost:11434."""
    return JudgeClient(base_url=base_url, model=model, api="ollama", **kw)


def openai_client(base_url: str, model: str, **kw: Any) -> JudgeClient:
    """Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenAI, helpers.serve.server)."""
    return JudgeClient(base_url=base_url, model=model, api="openai", **kw)
