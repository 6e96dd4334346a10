"""LLM as judge: score answers with a bigger model behind Ollama or an OpenAI-compatible server.

The chapter asks Llama 3 (via Ollama) for a 0-100 integer per answer. Here the same prompt
(and a 1-5 rubric) goes to either API, deterministically (temperature 0, fixed seed), with
retries, timeouts, a per-entry JSONL cache so interrupted runs resume, and every reply that
cannot be read as a score kept and listed rather than dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from helpers.prompts import format_input

OLLAMA_URL = "http://localhost:11434"
DEFAULT_JUDGE_MODEL = "llama3"
API_KEY_ENVS = ("JUDGE_API_KEY", "OPENAI_API_KEY")

# The chapter's prompt, word for word.
CHAPTER_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)
RUBRIC_PROMPT = (
    "You are grading an answer to an instruction.\n\n"
    "Instruction and input:\n{input}\n\nReference answer:\n{output}\n\n"
    "Answer to grade:\n{response}\n\n"
    "Rate the answer from 1 to 5:\n"
    "5 = correct and complete, as good as the reference\n"
    "4 = correct with a minor flaw or omission\n"
    "3 = partly correct\n"
    "2 = mostly wrong but related to the task\n"
    "1 = wrong, off-topic or empty\n"
    "Respond with the single digit only."
)
PROMPTS: dict[str, tuple[str, int, int]] = {
    "chapter": (CHAPTER_PROMPT, 0, 100),
    "rubric": (RUBRIC_PROMPT, 1, 5),
}


class JudgeServerError(RuntimeError):
    """The judge server is unreachable or refused the request; the message says what to do."""


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
    max_tokens: int = 32
    # Never shown in repr, never written to caches; read from the environment by default.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api not in ("ollama", "openai"):
            raise ValueError(f"api must be 'ollama' or 'openai', got {self.api!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.api == "openai" and self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        if self.api_key is None and self.api == "openai":
            self.api_key = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)

    @property
    def _chat_path(self) -> str:
        return "/api/chat" if self.api == "ollama" else "/v1/chat/completions"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _down_message(self, exc: Exception) -> str:
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
        except httpx.HTTPError as exc:
            raise JudgeServerError(self._down_message(exc)) from None
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
            options = {"seed": self.seed, "temperature": self.temperature, "num_ctx": 2048}
            return {"model": self.model, "messages": messages, "options": options, "stream": False}
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }

    def chat(self, prompt: str) -> str:
        """Send one user message and return the reply text, retrying transient failures."""
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
            return self._reply_text(r.json())
        if isinstance(last, httpx.TransportError):
            raise JudgeServerError(self._down_message(last)) from None
        raise JudgeServerError(f"Judge server at {self.base_url} kept failing: {last}")

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
    """Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenAI, helpers.serve)."""
    return JudgeClient(base_url=base_url, model=model, api="openai", **kw)


# --- prompts and parsing -----------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
# Numbers that describe the scale rather than give a score: "out of 100", "/100", "0 to 100".
_SCALE_BEFORE = re.compile(r"(out of|/|from|between|scale of|\d\s*(to|-|–|and))\s*$", re.IGNORECASE)
_SCALE_AFTER = re.compile(r"^\s*(to|-|–|and)\s*\d", re.IGNORECASE)


def build_prompt(
    entry: Mapping[str, Any], prompt: str = "chapter", *, response_key: str = "model_response"
) -> str:
    """The judge prompt for one entry ('chapter' 0-100 or 'rubric' 1-5)."""
    template = PROMPTS[prompt][0]
    return template.format(
        input=format_input(entry), output=entry["output"], response=entry[response_key]
    )


def parse_score(reply: str, low: int = 0, high: int = 100) -> int | None:
    """The score in a judge reply, or None when there is none in [low, high] (refusals, prose)."""
    for m in _NUMBER.finditer(reply):
        if _SCALE_BEFORE.search(reply[: m.start()]) or _SCALE_AFTER.match(reply[m.end() :]):
            continue  # part of "out of 100" / "0 to 100", not the score
        value = float(m.group())
        if value != int(value) and high <= 10:
            return None  # "3.5" on a 1-5 rubric is not one of the allowed grades
        score = int(value + 0.5)
        return score if low <= score <= high else None
    return None


# --- scoring runs with a resumable cache -------------------------------------------------


@dataclass
class JudgeReport:
    """Scores of one judging run; `unparseable` keeps the replies that gave no score."""

    results: list[dict]
    prompt: str
    model: str
    n_cached: int = 0

    @property
    def scores(self) -> list[int | None]:
        """Score per entry, None where the reply could not be parsed."""
        return [r["score"] for r in self.results]

    @property
    def unparseable(self) -> list[dict]:
        """Results whose reply held no valid score (index, reply)."""
        return [r for r in self.results if r["score"] is None]

    @property
    def mean(self) -> float:
        """Mean of the parsed scores (NaN if none)."""
        valid = [s for s in self.scores if s is not None]
        return sum(valid) / len(valid) if valid else float("nan")

    def summary(self) -> str:
        """One line: how many scored, unparseable, from cache, and the mean."""
        n, bad = len(self.results), len(self.unparseable)
        return (
            f"judge {self.model} ({self.prompt} prompt): {n - bad}/{n} scored, {bad} unparseable,"
            f" {self.n_cached} from cache, mean score {self.mean:.2f}"
        )


def entry_key(
    entry: Mapping[str, Any], prompt: str, model: str, response_key: str = "model_response"
) -> str:
    """Cache key: the entry's texts, the prompt kind and the judge model."""
    parts = [
        prompt,
        model,
        entry["instruction"],
        entry.get("input", ""),
        entry["output"],
        entry[response_key],
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            cache[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run: that entry is simply re-scored
    return cache


def _append(path: Path, record: Mapping[str, Any]) -> None:
    # One write of one whole line, then fsync: an interruption loses at most this entry.
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def score_entries(
    entries: Sequence[Mapping[str, Any]],
    client: JudgeClient,
    *,
    prompt: str = "chapter",
    cache_path: str | Path | None = None,
    response_key: str = "model_response",
    progress: bool = True,
) -> JudgeReport:
    """Judge every entry's answer; cached entries are reused so an interrupted run resumes."""
    if prompt not in PROMPTS:
        raise ValueError(f"Unknown judge prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
    _, low, high = PROMPTS[prompt]
    path = Path(cache_path) if cache_path else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(path) if path else {}
    results, n_cached = [], 0
    iterator = enumerate(entries)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(entries), desc="Judging")
    for i, entry in iterator:
        key = entry_key(entry, prompt, client.model, response_key)
        if key in cache:
            rec, n_cached = cache[key], n_cached + 1
        else:
            reply = client.chat(build_prompt(entry, prompt, response_key=response_key))
            rec = {"key": key, "reply": reply, "score": parse_score(reply, low, high)}
            if path:
                _append(path, rec)
            cache[key] = rec
        results.append({"index": i, "score": rec["score"], "reply": rec["reply"]})
    return JudgeReport(results, prompt, client.model, n_cached)
