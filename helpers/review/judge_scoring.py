"""LLM as judge: score answers with a bigger model, with a per-entry cache so runs resume.

The chapter asks Llama 3 for a 0-100 integer per answer; the same prompt (and a 1-5 rubric)
goes through `helpers.review.judge.JudgeClient`. Every reply is kept: the ones that hold no score
are listed in the report (and asked again when an interrupted run resumes), never dropped.
The cache is a JSONL file, one line per judged answer, keyed by the answer's
`helpers.review.responses.entry_id`, the prompt kind and the judge model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.atomic import atomic_write_text
from helpers.prompts import format_input
from helpers.review.judge import JudgeClient
from helpers.review.responses import RESPONSE_KEY, entry_id
from helpers.widgets.progress import tqdm

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

# An optional exponent is part of the number: "8e1" is 80 and "1e308" is out of range, never 8 or 1.
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
# Numbers that describe the scale rather than give a score: "out of 100", "/100", "0 to 100".
_SCALE_BEFORE = re.compile(r"(out of|/|from|between|scale of|\d\s*(to|-|–|and))\s*$", re.IGNORECASE)
_SCALE_AFTER = re.compile(r"^\s*(to|-|–|and)\s*\d", re.IGNORECASE)


def judge_prompt(
    entry: Mapping[str, Any], prompt: str = "chapter", *, response_key: str = RESPONSE_KEY
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
        if not math.isfinite(value):
            return None  # hundreds of digits: no score
        if value != int(value) and high <= 10:
            return None  # "3.5" on a 1-5 rubric is not one of the allowed grades
        score = int(value + 0.5)
        return score if low <= score <= high else None
    return None


@dataclass
class JudgeReport:
    """Scores of one judging run; `unparseable` keeps the replies that gave no score."""

    results: list[dict[str, Any]]
    prompt: str
    model: str
    n_cached: int = 0

    @property
    def scores(self) -> list[int | None]:
        """Score per entry, None where the reply could not be parsed."""
        return [r["score"] for r in self.results]

    @property
    def unparseable(self) -> list[dict[str, Any]]:
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


CacheKey = tuple[str, str, str]  # (entry_id, prompt kind, judge model)


def _key(rec: Mapping[str, Any]) -> CacheKey:
    return (str(rec["entry_id"]), str(rec["prompt"]), str(rec["model"]))


def _read_cache(path: Path) -> dict[CacheKey, dict[str, Any]]:
    """Cached judgements by (entry_id, prompt, model); the last line for a key wins.

    A last line cut short by an interrupted run is dropped and the file repaired, so the
    next record starts on a line of its own. Other unreadable lines are skipped.
    """
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    cut = bool(raw) and not raw.endswith(b"\n")
    if cut:
        raw = raw[: raw.rfind(b"\n") + 1]  # the cut line, possibly mid-character
    text = _decode(raw, path)
    if cut:
        atomic_write_text(path, text)
    cache: dict[CacheKey, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            cache[_key(rec)] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # that entry is simply judged again
    return cache


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: judge cache is not UTF-8 text (bad byte at offset {exc.start});"
            " move it away to judge again"
        ) from None


def _append(path: Path, record: Mapping[str, Any]) -> None:
    # An append-only log rather than an atomic rewrite (helpers.atomic) per entry: one
    # write of one whole line, then fsync, so an interruption loses at most this entry.
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
    response_key: str = RESPONSE_KEY,
    progress: bool = True,
) -> JudgeReport:
    """Judge every entry's answer; cached scores are reused so an interrupted run resumes.

    Cached replies that held no score are asked again.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"Unknown judge prompt {prompt!r}; valid: {', '.join(PROMPTS)}")
    _, low, high = PROMPTS[prompt]
    path = Path(cache_path) if cache_path else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(path) if path else {}
    results, n_cached = [], 0
    for i, entry in enumerate(tqdm(entries, desc="Judging", disable=not progress)):
        rec: dict[str, Any] = {
            "entry_id": entry_id(entry, response_key),
            "prompt": prompt,
            "model": client.model,
        }
        cached = cache.get(_key(rec))
        if cached is not None and cached.get("score") is not None:
            rec, n_cached = cached, n_cached + 1
        else:
            reply = client.chat(judge_prompt(entry, prompt, response_key=response_key))
            rec.update(reply=reply, score=parse_score(reply, low, high))
            if path:
                _append(path, rec)
            cache[_key(rec)] = rec
        results.append({"index": i, "score": rec["score"], "reply": rec["reply"]})
    return JudgeReport(results, prompt, client.model, n_cached)
